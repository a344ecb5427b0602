"""Local SGD across real processes (``jax.distributed``, one worker per process) and the
single-process run it must reproduce.

    python -m mergejax.averaging.distributed OUT.npz PORT PROCESS_ID [NUM_PROCESSES]   # one process of N

:func:`problem` is a small fixed task (an MLP, a few rounds of random batches);
:func:`worker` runs it as one of ``N`` processes over a ``shard_map`` mesh of one CPU device
per process; :func:`reference` runs it in one process with the workers simulated by
``vmap``; :func:`launch` starts the ``N`` processes on this machine (gloo collectives) and
:func:`check` compares everything. Used by ``experiments/averaging.py`` (d) and the tests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax

from mergejax.averaging import local_sgd
from mergejax.core.models import make_model
from mergejax.core.train import TrainState, create_state

LOCAL_STEPS = 3
ROUNDS = 3


class LaunchError(RuntimeError):
    """A worker process failed or did not finish."""


def problem(num_workers: int = 2, seed: int = 0) -> tuple[TrainState, list[dict]]:
    """``(state, rounds)``: an MLP (8x8x1 -> 16 -> 10, SGD momentum) and ``ROUNDS`` rounds of
    random batches ``{'image': (W, K, 8, 8, 8, 1), 'label': (W, K, 8)}``, ``K = LOCAL_STEPS``."""
    model = make_model("mlp", 10, hidden=(16,))
    state = create_state(model, jax.random.key(seed), (1, 8, 8, 1), optax.sgd(0.1, momentum=0.9))
    r = np.random.default_rng(seed)
    rounds = [{"image": r.normal(size=(num_workers, LOCAL_STEPS, 8, 8, 8, 1)).astype(np.float32),
               "label": r.integers(0, 10, size=(num_workers, LOCAL_STEPS, 8)).astype(np.int32)} for _ in range(ROUNDS)]
    return state, rounds


def flat_params(tree, leaf=np.asarray) -> dict:
    """``{keystr(path): leaf(x)}``: the npz layout :func:`worker` writes."""
    return {jax.tree_util.keystr(p): leaf(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def reference(num_workers: int = 2, seed: int = 0) -> tuple[TrainState, list[dict], dict]:
    """The problem in one process, its workers simulated with ``vmap``:
    ``(initial state, rounds, flat_params(final global params))``."""
    state, rounds = problem(num_workers, seed)
    st = local_sgd.init(state, num_workers)
    rnd = local_sgd.make_round(num_workers, policy="keep")
    for bt in rounds:
        st, _ = rnd(st, bt, jax.random.key(0))
    return state, rounds, flat_params(st.params)


def worker(out: str, port: int, process_id: int, num_processes: int = 2, seed: int = 0) -> None:
    """One process of ``num_processes`` (each with one local device): run the problem over a
    mesh of all processes' devices and write the final global params to ``out`` (npz)."""
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mergejax.averaging import parallel

    if jax.device_count() != num_processes or jax.local_device_count() != 1:
        raise RuntimeError(f"expected one device per process: {jax.local_device_count()} local, {jax.device_count()} in all")
    mesh = parallel.data_mesh()
    state, rounds = problem(num_processes, seed)
    st = local_sgd.init(state, num_processes)

    def globalise(tree, spec):  # this process's part of a global array: all of it (P()) or its row
        sh = NamedSharding(mesh, spec)
        part = (lambda x: np.asarray(x)) if spec == P() else (lambda x: np.asarray(x)[process_id:process_id + 1])
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sh, part(x)), tree)

    st = st.replace(params=globalise(st.params, P()), outer_opt_state=globalise(st.outer_opt_state, P()),
                    rounds=globalise(st.rounds, P()), workers=globalise(st.workers, P("data")))
    rnd = local_sgd.make_round(num_processes, mesh=mesh, policy="keep")
    rng = jax.random.wrap_key_data(globalise(jax.random.key_data(jax.random.key(0)), P()))
    for b in rounds:
        st, _ = rnd(st, globalise(b, P("data")), rng)
    np.savez(out, **flat_params(st.params, lambda x: np.asarray(x.addressable_data(0))))
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir: str, *, num_processes: int = 2, seed: int = 0, timeout: float = 900) -> list[dict[str, np.ndarray]]:
    """Run :func:`worker` in ``num_processes`` fresh local processes (CPU); returns each
    process's final params (``flat_params`` layout). A failed or hung process raises
    :class:`LaunchError` with the tail of every process's stderr."""
    os.makedirs(out_dir, exist_ok=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    outs = [os.path.join(out_dir, f"proc{i}.npz") for i in range(num_processes)]
    procs = [subprocess.Popen([sys.executable, "-m", "mergejax.averaging.distributed", outs[i], str(port), str(i), str(num_processes),
                               str(seed)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(num_processes)]
    errs = []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=timeout)[1])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise LaunchError(f"{num_processes}-process local SGD did not finish in {timeout:.0f} s") from None
    if any(p.returncode for p in procs):
        tails = "\n".join(f"process {i} (exit {p.returncode}):\n{e[-1500:]}" for i, (p, e) in enumerate(zip(procs, errs)))
        raise LaunchError(f"{num_processes}-process local SGD failed:\n{tails}")
    results = []
    for path in outs:
        with np.load(path) as f:
            results.append({k: f[k] for k in f.files})
        os.remove(path)
    return results


def check(out_dir: str, *, num_processes: int = 2, seed: int = 0, timeout: float = 900) -> dict:
    """:func:`launch` and compare with :func:`reference`: the largest parameter gap between
    processes (0 when they agree exactly) and against the single-process run."""
    t0 = time.perf_counter()
    procs = launch(out_dir, num_processes=num_processes, seed=seed, timeout=timeout)
    wall = time.perf_counter() - t0
    _, rounds, ref = reference(num_processes, seed)
    return {"ok": True, "processes": num_processes, "rounds": len(rounds), "local_steps": LOCAL_STEPS,
            "max_gap_between_processes": max(float(np.abs(p[k] - procs[0][k]).max()) for p in procs for k in ref),
            "max_gap_vs_single_process": max(float(np.abs(p[k] - ref[k]).max()) for p in procs for k in ref),
            "wall_time_s": wall}


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *(int(a) for a in sys.argv[4:6]))
