"""FreezeOut (Brock et al. 2017, arXiv 1706.04983): per-layer cosine learning rates and
progressive freezing of a prefix of layers that really skips its backward pass.

Layer i (in ``model.layer_names()`` order, head last) has its own schedule

    t_i = f(t_0 + (1 - t_0) i / L),  f(x) = x, x^2 or x^3,  i = 0..L (the head: t_L = 1)
    alpha_i(t) = 0.5 alpha_i(0) (1 + cos(pi t / (t_i T)))  for t < t_i T, then frozen,

with ``alpha_i(0) = alpha(0) / t_i`` (scaled) or ``alpha(0)`` (unscaled); t counts optimizer
steps, T is the real number of steps of the run. Layer i is frozen from step
``ceil(t_i T)`` on: its parameters and BatchNorm statistics never change again.

The pieces:

* :func:`make_plan` -> :class:`FreezeOutPlan` (structure as data: t_i, alpha_i(0), freeze steps
  and the freeze *stages*, i.e. at which step the static frozen prefix grows).
* :func:`freezeout_tx`: a unit-rate optax optimizer followed by :func:`scale_by_freezeout`,
  which multiplies layer i's updates by alpha_i(t) and zeroes them from its freeze step on
  (*after* the optimizer, so momentum and weight decay cannot move a frozen layer). The
  schedule is data in the optimizer state (:class:`FreezeOutState`), so one compiled step
  serves every plan of a sweep (:func:`with_plan` swaps it); both factories compare by value.
* :func:`freezeout_step`: the core ``train_step(..., frozen=k)`` (eval-mode prefix,
  ``stop_gradient`` at its output, so XLA drops its backward) plus an exact hold
  (``where(frozen, old, new)``) of every layer already past its freeze step, for layers frozen
  inside a group whose stage has not started yet. One compiled step per stage.
* :func:`compile_stages` (lower + compile every stage once, FLOPs from XLA's cost analysis,
  reused through a cache dict keyed by static values), :func:`predict_saving`,
  :func:`cost_report` and :func:`staged_step_fn` (a ``fit`` ``step_fn`` that switches stage on the host).
* :func:`train_and_evaluate`: one timed, resumable FreezeOut training of a model
  (``t0 = 1``: the no-freeze baseline); :func:`timing_sequence` interleaves a sweep with
  baseline timings and :func:`compare_with_baselines` measures each run's saving against the
  baselines timed before and after it (drift correction on a shared machine).

Grouping (``max_stages``): with fewer compiled stages than layers, the static prefix grows
only when the last layer of a group freezes; a layer frozen earlier inside its group is held
exactly by the per-step hold (its schedule is unchanged), but its backward is still computed
and its BatchNorm still normalises with batch statistics in the forward pass until its
group's stage starts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax.core import data as data_lib
from mergejax.core import trees
from mergejax.core.loop import evaluate, fit, read_metrics
from mergejax.core.optim import value_equal
from mergejax.core.train import TrainState, create_state, model_apply_fn, train_step

Params = Any
SPACINGS = {"linear": 1, "squared": 2, "cubic": 3}
BASELINE = (1.0, "linear", False)  # (t0, spacing, scaled) of the no-freeze baseline: t0 = 1 freezes nothing
_EPS = 1e-9  # t_i * T that is an integer up to float rounding counts as that integer


def layer_fractions(num_layers: int, t0: float, spacing: str = "cubic") -> tuple[float, ...]:
    """``(t_0', ..., t_L')`` for ``num_layers = L + 1`` layers (head last, t = 1).

    ``t_i' = f(t0 + (1 - t0) i / L)``; the power applies to the whole expression, so cubic with
    t0 = 0.8 freezes layer 0 at 0.512 of training.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; available: {', '.join(SPACINGS)}")
    if not 0.0 < t0 <= 1.0:
        raise ValueError(f"t0 must be in (0, 1], got {t0}")
    if num_layers < 1:
        raise ValueError(f"need at least one layer (the head), got {num_layers}")
    L = num_layers - 1
    p = SPACINGS[spacing]
    return tuple(1.0 if i == L else (t0 + (1.0 - t0) * i / L) ** p for i in range(L + 1))


@dataclasses.dataclass(frozen=True)
class FreezeOutPlan:
    """Everything static about one FreezeOut run (all tuples are in layer order, head last).

    fractions: t_i (fraction of training at which layer i freezes; head 1.0).
    lr0: alpha_i(0). freeze_steps: first step at which layer i is frozen (``ceil(t_i T)``;
    the head gets ``total_steps``, i.e. never). stages: ``((first_step, frozen_prefix), ...)``,
    starting with ``(0, 0)``, strictly increasing in both.
    """

    layer_names: tuple[str, ...]
    total_steps: int
    fractions: tuple[float, ...]
    lr0: tuple[float, ...]
    freeze_steps: tuple[int, ...]
    stages: tuple[tuple[int, int], ...]

    def schedules(self) -> dict[str, optax.Schedule]:
        """``{layer: alpha_i}`` as optax schedules (cosine over ``t_i T`` steps, then 0)."""
        return {
            name: optax.cosine_decay_schedule(a0, t * self.total_steps)
            for name, a0, t in zip(self.layer_names, self.lr0, self.fractions)
        }

    def frozen_at(self, step: int) -> int:
        """The static frozen prefix length of the stage that runs optimizer step ``step`` (host int)."""
        k = 0
        for start, frozen in self.stages:
            if step >= start:
                k = frozen
        return k

    def stage_lengths(self) -> list[tuple[int, int]]:
        """``[(frozen_prefix, number of steps run in that stage), ...]`` summing to ``total_steps``."""
        bounds = [s for s, _ in self.stages] + [self.total_steps]
        return [(k, bounds[j + 1] - s) for j, (s, k) in enumerate(self.stages)]


def make_plan(
    layer_names: Sequence[str],
    total_steps: int,
    *,
    lr: float = 0.1,
    t0: float = 0.8,
    spacing: str = "cubic",
    scaled: bool = True,
    max_stages: int | None = None,
) -> FreezeOutPlan:
    """The FreezeOut plan for ``layer_names`` (``model.layer_names()``, head last) over ``total_steps``.

    ``scaled``: alpha_i(0) = lr / t_i, else lr. ``max_stages``: at most this many compiled steps
    (including the unfrozen first one) by freezing contiguous groups of layers together
    (``None``: one stage per distinct freeze step). ``t0 = 1`` freezes nothing (the baseline).
    """
    names = tuple(layer_names)
    if not names or names[-1] != "head":
        raise ValueError(f"layer_names must end with 'head' (never frozen), got {names}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    fr = layer_fractions(len(names), t0, spacing)
    lr0 = tuple(lr / t if scaled else lr for t in fr)
    L = len(names) - 1
    steps = tuple(min(total_steps, math.ceil(t * total_steps - _EPS)) for t in fr[:L]) + (total_steps,)
    if max_stages is None:
        groups = [[i] for i in range(L)]
    else:
        if max_stages < 1:
            raise ValueError(f"max_stages must be >= 1, got {max_stages}")
        groups = [list(g) for g in np.array_split(np.arange(L), max_stages - 1) if len(g)] if max_stages > 1 and L else []
    stages = {0: 0}
    for g in groups:
        last = g[-1]
        start = max(steps[i] for i in g)
        if start < total_steps:
            stages[start] = max(stages.get(start, 0), last + 1)
    ordered, k = [], -1
    for start in sorted(stages):
        if stages[start] > k:
            k = stages[start]
            ordered.append((start, k))
    return FreezeOutPlan(names, int(total_steps), fr, lr0, steps, tuple(ordered))


# --------------------------------------------------------------------------- optax


class FreezeOutState(NamedTuple):
    """The schedule as data (so one compiled step serves every plan): per layer name
    ``lr0`` alpha_i(0), ``horizon`` t_i T (steps) and ``freeze_steps`` (int32), plus ``count``."""

    count: jax.Array
    lr0: dict
    horizon: dict
    freeze_steps: dict


def _plan_arrays(plan: FreezeOutPlan) -> dict:
    f = jnp.asarray(0.0).dtype  # float64 under jax.enable_x64, else float32
    return {
        "lr0": {n: jnp.asarray(a, f) for n, a in zip(plan.layer_names, plan.lr0)},
        "horizon": {n: jnp.asarray(t * plan.total_steps, f) for n, t in zip(plan.layer_names, plan.fractions)},
        "freeze_steps": {n: jnp.asarray(s, jnp.int32) for n, s in zip(plan.layer_names, plan.freeze_steps)},
    }


def layer_rates(state: FreezeOutState) -> dict[str, jax.Array]:
    """``{layer: alpha_i(count)}``: 0.5 lr0 (1 + cos(pi count / horizon)), exactly 0 once frozen."""
    out = {}
    for n, a0 in state.lr0.items():
        t = state.count.astype(a0.dtype)
        cos = 0.5 * a0 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t, state.horizon[n]) / state.horizon[n]))
        out[n] = jnp.where(state.count < state.freeze_steps[n], cos, jnp.zeros_like(cos))
    return out


@value_equal
def scale_by_freezeout(plan: FreezeOutPlan) -> optax.GradientTransformation:
    """Multiply the updates of top-level layer i by alpha_i(t) (see :func:`layer_rates`); from
    layer i's freeze step on its updates are exactly 0, whatever came before in the chain
    (momentum, weight decay). Put it last, after a unit-rate optimizer.
    The plan lives in the state: :func:`with_plan` swaps it without recompiling; equal plans
    give equal transforms (one static value to ``jax.jit``).
    """

    def init(params):
        if set(params) != set(plan.layer_names):
            raise ValueError(f"params have top-level layers {sorted(params)}, the plan has {sorted(plan.layer_names)}")
        return FreezeOutState(jnp.zeros((), jnp.int32), **_plan_arrays(plan))

    def update(updates, state, params=None):
        del params
        rates = layer_rates(state)
        out = {}
        for k, v in updates.items():
            if k not in rates:
                raise ValueError(f"updates have a top-level layer {k!r} the FreezeOut plan does not know ({sorted(rates)})")
            live = state.count < state.freeze_steps[k]
            out[k] = jax.tree.map(lambda u: jnp.where(live, u * rates[k].astype(u.dtype), jnp.zeros_like(u)), v)
        return out, state._replace(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init, update)


@value_equal
def freezeout_tx(plan: FreezeOutPlan, base: optax.GradientTransformation) -> optax.GradientTransformation:
    """``base`` (an optimizer with learning rate 1, e.g. ``optim.make_optimizer('sgd', 1.0,
    momentum=0.9, nesterov=True, weight_decay=1e-4)``) followed by :func:`scale_by_freezeout`.

    Same arithmetic as SGD/Adam with per-layer learning-rate groups (the rate multiplies the
    final direction, as in PyTorch param groups and optax's ``scale_by_learning_rate``);
    tested against one ``optax.partition`` label per layer with ``cosine_decay_schedule``.
    Equal plans and equal (value-equal) ``base`` give equal transforms.
    """
    return optax.chain(base, scale_by_freezeout(plan))


def _is_fo_state(x) -> bool:
    return isinstance(x, FreezeOutState)


def freezeout_state(opt_state: optax.OptState) -> FreezeOutState:
    """The (single) :class:`FreezeOutState` inside ``opt_state``."""
    found = trees.find_states(opt_state, FreezeOutState)
    if len(found) != 1:
        raise ValueError(f"expected exactly one FreezeOutState in the optimizer state, found {len(found)}; build tx with freezeout_tx")
    return found[0]


def with_plan(opt_state: optax.OptState, plan: FreezeOutPlan) -> optax.OptState:
    """``opt_state`` with its FreezeOut schedule replaced by ``plan``'s (count kept). Same
    layer names required; compiled steps keep working (the schedule is data)."""
    old = freezeout_state(opt_state)
    if set(old.lr0) != set(plan.layer_names):
        raise ValueError(f"plan layers {sorted(plan.layer_names)} differ from the state's {sorted(old.lr0)}")
    arrays = _plan_arrays(plan)
    arrays = {k: {n: a.astype(getattr(old, k)[n].dtype) for n, a in v.items()} for k, v in arrays.items()}
    return jax.tree.map(lambda x: x._replace(**arrays) if _is_fo_state(x) else x, opt_state, is_leaf=_is_fo_state)


# --------------------------------------------------------------------------- steps


def hold(old: Params, new: Params, held: Mapping[str, jax.Array]) -> Params:
    """``new`` with every top-level subtree ``k`` where ``held[k]`` replaced by ``old`` (bit-exact)."""
    return {k: (jax.tree.map(lambda a, b: jnp.where(held[k], a, b), old[k], v) if k in held else v) for k, v in new.items()}


def freezeout_step(state: TrainState, batch: dict, rng: jax.Array, *, frozen: int = 0,
                   mesh: Any = None) -> tuple[TrainState, dict]:
    """The core ``train_step(state, batch, rng, frozen=frozen)`` (static prefix in eval mode,
    no backward there), then every layer past its freeze step (read from the optimizer state)
    held exactly: parameters and BatchNorm statistics. The hold matters for a layer frozen
    inside a group whose stage has not started (``max_stages``); ``state.tx`` must come from
    :func:`freezeout_tx`. Extra metric: ``frozen_layers`` (layers held at this step).

    ``mesh``: a ``data`` mesh (:func:`mergejax.averaging.parallel.data_mesh`): the batch is split
    over its devices (:func:`~mergejax.averaging.parallel.dp_train_step`; the state's model
    synchronises BatchNorm over that axis, :func:`~mergejax.averaging.parallel.sync_bn`).
    """
    fs = freezeout_state(state.opt_state)
    held = {n: fs.count >= f for n, f in fs.freeze_steps.items()}
    if mesh is None:
        new, metrics = train_step(state, batch, rng, frozen=frozen)
    else:
        from mergejax.averaging.parallel import dp_train_step  # that package imports the core, as this one does

        new, metrics = dp_train_step(state, batch, rng, mesh=mesh, frozen=frozen)
    new = new.replace(params=hold(state.params, new.params, held), batch_stats=hold(state.batch_stats, new.batch_stats, held))
    metrics["frozen_layers"] = sum(h.astype(jnp.int32) for h in held.values())
    return new, metrics


def _jit_step() -> Callable:
    # jitted where it is used; JAX keys its trace cache on freezeout_step and the static args
    return jax.jit(freezeout_step, donate_argnums=0, static_argnames=("frozen", "mesh"))


def stage_step(frozen: int, mesh: Any = None) -> Callable:
    """The jitted step ``(state, batch, rng) -> (state, metrics)`` of the stage with static prefix
    ``frozen`` (state donated; ``mesh``: see :func:`freezeout_step`)."""
    return functools.partial(_jit_step(), frozen=frozen, mesh=mesh)


def stage_signature(state: TrainState, batch: dict, rng: jax.Array) -> tuple:
    """What a compiled step depends on besides ``frozen``: the pytree structure (including the
    state's static fields, which compare by value) and every leaf's shape and dtype."""
    leaves, treedef = jax.tree.flatten((state, batch, rng))
    return treedef, tuple((np.shape(x), x.dtype, getattr(x, "weak_type", False)) for x in leaves)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def compile_stages(plan: FreezeOutPlan, state: TrainState, batch: dict, rng: jax.Array,
                   cache: dict | None = None, mesh: Any = None) -> tuple[dict[int, Callable], dict[int, dict]]:
    """Compile every stage of ``plan`` (and the unfrozen stage 0) once for these arguments
    (placed as the steps will get them; ``mesh``: see :func:`freezeout_step`).

    Returns ``(steps, costs)``: ``steps[frozen]`` is the compiled step (call it like the step),
    ``costs[frozen] = {'flops': per step from XLA's cost analysis, 'compile_s'}``. ``cache``: a
    dict the caller creates and passes to every call (e.g. all runs of a sweep), filled with
    ``(frozen, stage_signature(...), mesh) -> (compiled, cost)``; stages found there are reused.
    With a mesh, ``flops`` is one device's program.
    """
    cache = {} if cache is None else cache
    signature = (stage_signature(state, batch, rng), mesh)
    steps, costs = {}, {}
    for k in sorted({0, *(f for _, f in plan.stages)}):
        if (k, signature) not in cache:
            t = time.perf_counter()
            compiled = _jit_step().lower(state, batch, rng, frozen=k, mesh=mesh).compile()
            cache[k, signature] = (compiled, {"flops": _flops(compiled), "compile_s": time.perf_counter() - t})
        steps[k], costs[k] = cache[k, signature]
    return steps, costs


def predict_saving(plan: FreezeOutPlan, costs: Mapping[int, Mapping[str, float]]) -> dict:
    """Whole-run FLOPs with and without freezing and the predicted saving (fraction).

    ``costs[frozen]['flops']`` per stage (from :func:`compile_stages`); the baseline runs
    ``total_steps`` steps of stage 0.
    """
    base = costs[0]["flops"] * plan.total_steps
    run = sum(costs[k]["flops"] * n for k, n in plan.stage_lengths())
    return {"baseline_flops": base, "freezeout_flops": run, "saving": 1.0 - run / base}


def cost_report(plan: FreezeOutPlan, costs: Mapping[int, Mapping[str, float]]) -> str:
    """A few lines: per stage (first step, frozen layers, steps, GFLOPs/step) and the predicted saving."""
    lines = ["stage  first_step  frozen  steps  GFLOP/step  vs stage0  compile_s"]
    f0 = costs[0]["flops"]
    for j, ((start, k), (_, n)) in enumerate(zip(plan.stages, plan.stage_lengths())):
        c = costs[k]
        lines.append(f"{j:5d}  {start:10d}  {k:6d}  {n:5d}  {c['flops'] / 1e9:10.4f}  {c['flops'] / f0:9.3f}  {c['compile_s']:9.2f}")
    p = predict_saving(plan, costs)
    lines.append(f"predicted FLOP saving over {plan.total_steps} steps: {100 * p['saving']:.1f}%")
    return "\n".join(lines)


def staged_step_fn(plan: FreezeOutPlan, steps: Mapping[int, Callable] | None = None, mesh: Any = None) -> Callable:
    """A ``fit`` step_fn ``(state, batch, rng) -> (state, metrics)`` that runs each step with its
    stage's compiled step (from ``steps``, e.g. :func:`compile_stages`, else :func:`stage_step`
    on ``mesh``).

    The step counter lives on the host (read from ``state.step`` once, at the first call), so
    switching stages never waits for the device.
    """
    steps = dict(steps or {})
    counter = [None]

    def step_fn(state, batch, rng):
        if counter[0] is None:
            counter[0] = int(state.step)
        k = plan.frozen_at(counter[0])
        if k not in steps:
            steps[k] = stage_step(k, mesh)
        counter[0] += 1
        return steps[k](state, batch, rng)

    return step_fn


# --------------------------------------------------------------------------- runs


def _timed(step_fn: Callable, num_steps: int) -> tuple[Callable, Callable, dict]:
    """``(step_fn, callback, record)`` for ``fit``: ``record`` gets ``first_step`` and, once step
    ``num_steps`` has finished on the device, ``wall_s``/``cpu_s`` (process CPU time) of the
    loop from its first step: this call's steps only, without fit's setup or final checkpoint."""
    record: dict = {}

    def step(state, batch, rng):
        if not record:
            record.update(first_step=int(state.step), t=time.perf_counter(), c=time.process_time())
        return step_fn(state, batch, rng)

    def callback(done, state):
        if done == num_steps:
            jax.block_until_ready(state.params)
            record.update(wall_s=time.perf_counter() - record.pop("t"), cpu_s=time.process_time() - record.pop("c"))

    return step, callback, record


def train_and_evaluate(model: nn.Module, train: data_lib.Split, test: data_lib.Split, base_tx: optax.GradientTransformation, *,
                       total_steps: int, batch_size: int, lr: float, t0: float = 0.8, spacing: str = "cubic",
                       scaled: bool = True, max_stages: int | None = None, seed: int = 0, augment_fn: Callable | None = None,
                       remainder: str = "drop", log_every: int = 50, checkpoint_every: int = 0, eval_batch_size: int = 500,
                       workdir: str | None = None, repeats: int = 1, manifest: Mapping | None = None,
                       progress: bool = False, cache: dict | None = None, devices: Sequence | None = None) -> dict:
    """Train ``model`` on ``train`` for ``total_steps`` with FreezeOut at alpha(0) = ``lr`` over the
    unit-rate optimizer ``base_tx``, evaluate on ``test``; ``t0 = 1`` is the no-freeze baseline
    (one stage). ``seed`` initialises the model and orders the batches. Returns a JSON-able summary.

    Every stage is compiled first (timed: with the persistent compilation cache on, a cache
    load). The first training runs in ``workdir`` (checkpoints every ``checkpoint_every`` steps,
    resumes after a kill; ``manifest`` goes to its manifest); ``repeats - 1`` identical
    trainings follow, for timing only. ``train_s``/``cpu_s``: the minimum over the repeats that
    ran from step 0 of the training loop's wall/process-CPU seconds (compile excluded); when
    only a resumed one exists, its time (steps from ``timed_from_step`` on; ``resumed`` is
    True), or None when a resume found the training finished. Losses are in nats, savings are fractions.

    ``cache``: a dict the caller creates and passes to every run of a sweep (see
    :func:`compile_stages`). The optimizer is built from the no-freeze plan and the run's plan
    enters as optimizer-state data (:func:`with_plan`), so all runs of a sweep on one model,
    optimizer and batch shape share each stage's compile.

    ``devices`` (2 or more, e.g. :func:`~mergejax.averaging.parallel.resolve_devices`): each batch
    is split over a ``data`` mesh of them with BatchNorm synchronised, equal to one device up to
    float rounding; evaluation runs on the first.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = model.layer_names()
    plan = make_plan(names, total_steps, lr=lr, t0=t0, spacing=spacing, scaled=scaled, max_stages=max_stages)
    tx = freezeout_tx(make_plan(names, total_steps, t0=1.0), base_tx)  # equal for every plan: one static value

    mesh = None
    if devices is not None and len(devices) > 1:
        from mergejax.averaging import parallel

        mesh = parallel.data_mesh(devices)

    def placed(step):  # the staged steps with their inputs on the mesh (identity on one device)
        return step if mesh is None else parallel.place_on(mesh, step)

    def fresh():
        state = create_state(model, jax.random.key(seed), (1, *train.images.shape[1:]), tx, augment_fn=augment_fn)
        state = state.replace(opt_state=with_plan(state.opt_state, plan))
        return state if mesh is None else parallel.sync_bn(state, devices)

    sample = jax.device_put(next(data_lib.batches(train, batch_size, seed=seed, remainder=remainder)))
    # compile each stage for the placement the steps will get: the placed wrapper's own arguments
    args = placed(lambda *a: a)(fresh(), sample, jax.random.key(0))
    steps, costs = compile_stages(plan, *args, cache, mesh)
    if progress:
        print(cost_report(plan, costs), flush=True)
    loop = dict(num_steps=total_steps, batch_size=batch_size, seed=seed, log_every=log_every, remainder=remainder,
                progress=progress)
    timings = []
    for r in range(repeats):
        staged = staged_step_fn(plan, steps, mesh)
        step, callback, record = _timed(placed(staged), total_steps)
        kw = dict(workdir=workdir, checkpoint_every=checkpoint_every, manifest=manifest) if r == 0 else {}
        state, history = fit(fresh(), train, step_fn=step, callbacks=[callback], **loop, **kw)
        timings.append(record)
        if r == 0:
            if mesh is not None:  # the plain model on one device
                state = jax.device_put(state.replace(apply_fn=model_apply_fn(model)), devices[0])
            final = evaluate(state, test, eval_batch_size)
            records = read_metrics(workdir) if workdir is not None else history
            train_loss = [h for h in records if h["split"] == "train"][-1]["loss"]
    full = [t for t in timings if t.get("first_step") == 0 and "wall_s" in t]
    timed = full or [t for t in timings if "wall_s" in t]
    first = timings[0].get("first_step", total_steps)
    return {
        "t0": t0, "spacing": spacing, "scaled": scaled, "seed": seed, "max_stages": max_stages,
        "total_steps": total_steps, "stages": len(plan.stages), "stage_prefixes": [k for _, k in plan.stages],
        "freeze_steps": list(plan.freeze_steps), "predicted_saving": predict_saving(plan, costs)["saving"],
        "stage_costs": {str(k): c for k, c in sorted(costs.items())},
        "compile_s": sum(c["compile_s"] for c in costs.values()),
        "train_s": min(t["wall_s"] for t in timed) if timed else None,
        "cpu_s": min(t["cpu_s"] for t in timed) if timed else None,
        "timed_runs": len(timed), "resumed": first > 0, "timed_from_step": first,
        "test_accuracy": final["accuracy"], "test_loss": final["loss"], "train_loss": train_loss,
        "device_kind": jax.devices()[0].device_kind, "num_devices_used": 1 if mesh is None else len(devices),
    }
