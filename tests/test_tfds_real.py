"""The TFDS path for real: no ``tfds.testing.mock_data``, no network.

Small hand-made source files (MNIST's gzipped IDX, CIFAR-10's binary batches) are turned into
ArrayRecord datasets on disk by TFDS builders, then read back through ``mergejax.load`` and
``mergejax prepare``. Every check runs in a fresh interpreter on the installed package, so a
dependency missing from pyproject.toml fails here (CI installs ``.[test]`` into a new venv).

* Always: builders that are the real ``mnist`` / ``cifar10`` builders (their DatasetInfo:
  name, version, features, supervised keys) with only the file parsing replaced, because the
  real parsers need TensorFlow (``tf.io.gfile``, ``tf.image.encode_png``), which reading must
  not and CI does not install. The data is written by TFDS's own writer.
* With TensorFlow installed (``pip install -e '.[prepare]'``): the unmodified ``mnist``
  builder and download manager, fed the hand-made IDX files from ``downloads/manual``
  (TFDS's registered checksums swapped for theirs, the example counts set to theirs),
  driven by ``mergejax prepare``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

# Normalisation constants, written out independently of mergejax.core.data.
STATS = {"mnist": ((0.1307,), (0.3081,)), "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}
SIZES = {"train": 20, "test": 10}


def run_fresh(code: str, cwd, *, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter, outside the repo (so ``mergejax`` is the installed one)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def make_sources(src) -> dict:
    """Distinct random images and labels per dataset and split, written in the original formats.
    Returns ``{(name, split): (uint8 images (N, H, W, C), int labels (N,))}``."""
    rng = np.random.default_rng(0)
    out = {}
    os.makedirs(src / "mnist", exist_ok=True)
    os.makedirs(src / "cifar10", exist_ok=True)
    for split, n in SIZES.items():
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        prefix = "train" if split == "train" else "t10k"
        with gzip.open(src / "mnist" / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + x.tobytes())
        with gzip.open(src / "mnist" / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + y.tobytes())
        out["mnist", split] = (x[..., None], y.astype(np.int64))

        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        rows = np.concatenate([y[:, None], x.transpose(0, 3, 1, 2).reshape(n, -1)], axis=1)  # label, then CHW
        (src / "cifar10" / ("data_batch_1.bin" if split == "train" else "test_batch.bin")).write_bytes(rows.tobytes())
        out["cifar10", split] = (x, y.astype(np.int64))
    return out


# Builders: the registered mnist / cifar10 classes with only the source parsing replaced (no TF).
BUILDERS = """
import gzip, io, os
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.image_classification import cifar, mnist

def png(img):
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
    return buf.getvalue()

class LocalMnist(mnist.MNIST, skip_registration=True):
    name = "mnist"
    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in ("train", "test")}
    def _generate_examples(self, split):
        prefix = os.path.join(SRC, "mnist", "train" if split == "train" else "t10k")
        with gzip.open(prefix + "-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
        with gzip.open(prefix + "-labels-idx1-ubyte.gz") as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)
        for i, (img, label) in enumerate(zip(images, labels)):
            yield i, {"image": png(img), "label": int(label)}

class LocalCifar10(cifar.Cifar10, skip_registration=True):
    name = "cifar10"
    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s, f) for s, f in (("train", "data_batch_1.bin"), ("test", "test_batch.bin"))}
    def _generate_examples(self, split, fname):
        rows = np.fromfile(os.path.join(SRC, "cifar10", fname), np.uint8).reshape(-1, 3073)
        images = rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for i, (img, label) in enumerate(zip(images, rows[:, 0])):
            yield i, {"id": f"{split}_{i:05d}", "image": png(np.ascontiguousarray(img)), "label": int(label)}

for cls in (LocalMnist, LocalCifar10):
    builder = cls(data_dir=os.path.join(DATA, "tfds"), file_format="array_record")
    builder.download_and_prepare()
    assert builder.is_prepared(), builder.data_dir
"""


def match(images, labels, name, raw, raw_labels):
    """``perm`` with ``images == normalise(raw[perm])`` and ``labels == raw_labels[perm]``
    (TFDS shuffles examples on write), checking that every source example appears once."""
    mean, std = (np.asarray(s, np.float64) for s in STATS[name])
    back = np.rint((images.astype(np.float64) * std + mean) * 255.0)
    assert back.min() >= 0 and back.max() <= 255
    index = {r.tobytes(): i for i, r in enumerate(raw)}
    perm = np.asarray([index[b.astype(np.uint8).tobytes()] for b in back])
    assert sorted(perm.tolist()) == list(range(len(raw))), "examples lost or duplicated"
    np.testing.assert_allclose(images, (raw[perm] / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(labels, raw_labels[perm])
    return perm


def test_real_builders_on_local_files_load_exactly_and_prepare(tmp_path):
    src, data_dir, out = tmp_path / "src", tmp_path / "data", tmp_path / "out"
    out.mkdir()
    expected = make_sources(src)
    t0 = time.monotonic()
    proc = run_fresh(
        f"SRC, DATA, OUT = {str(src)!r}, {str(data_dir)!r}, {str(out)!r}\n" + BUILDERS + """
import shutil
import numpy as np
import mergejax
from mergejax.cli import prepare as prepare_cli
for name in ("mnist", "cifar10"):
    for split in ("train", "test"):
        s = mergejax.load(name, split, data_dir=DATA, download=False)  # from the ArrayRecord files
        np.savez(os.path.join(OUT, f"{name}-{split}.npz"), images=s.images, labels=s.labels,
                 num_classes=s.num_classes, split_name=s.name)
shutil.rmtree(os.path.join(DATA, "npz"))
print("PREPARE")
rc = prepare_cli.main(["mnist", "cifar10", "digits", "--data-dir", DATA])
print("RC", rc)
""",
        tmp_path,
    )
    wall = time.monotonic() - t0
    for (name, split), (raw, raw_labels) in expected.items():
        with np.load(out / f"{name}-{split}.npz") as f:
            images, labels = f["images"], f["labels"]
            assert (int(f["num_classes"]), str(f["split_name"])) == (10, name)
        assert images.dtype == np.float32 and images.shape == raw.shape
        assert labels.dtype == np.int32 and labels.shape == raw_labels.shape
        perm = match(images, labels, name, raw, raw_labels)
        # `mergejax prepare` rewrote the uint8 cache: the same examples, in the same order.
        with np.load(data_dir / "npz" / f"{name}-{split}.npz") as f:
            np.testing.assert_array_equal(f["images"], raw[perm])
            np.testing.assert_array_equal(f["labels"], raw_labels[perm])
    lines = proc.stdout.split("PREPARE\n", 1)[1].splitlines()
    shapes = {"mnist": "28x28x1", "cifar10": "32x32x3"}
    assert lines == [
        *(f"{name} {split}: {SIZES[split]} images {shapes[name]} -> {data_dir / 'npz' / f'{name}-{split}.npz'}"
          for name in ("mnist", "cifar10") for split in ("train", "test")),
        "digits: bundled with scikit-learn, nothing to prepare",
        "RC 0",
    ], proc.stdout
    assert wall < 60, f"took {wall:.0f} s"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unprepared_dataset_offline_is_one_line_user_error_within_seconds(tmp_path):
    """download=False, and download=True with the network cut (every HTTP(S) request goes to a
    proxy on a closed local port, so this holds on machines with internet too)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    proxy = f"http://127.0.0.1:{_closed_port()}"
    env = {k: proxy for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")}
    env.update(NO_PROXY="", no_proxy="", MERGEJAX_DATA=str(empty))
    proc = run_fresh(
        f"EMPTY = {str(empty)!r}\n" + """
import json, time
import mergejax
from mergejax.cli import prepare as prepare_cli
from mergejax.core.errors import UserError
cases = {
    "cifar10 download=False": lambda: mergejax.load("cifar10", "test", download=False),
    "mnist download=True": lambda: mergejax.load("mnist", "train", data_dir=EMPTY),
    "svhn_cropped download=True": lambda: mergejax.load("svhn_cropped", "extra"),
    "prepare fashion_mnist": lambda: prepare_cli.main(["fashion_mnist", "--data-dir", EMPTY]),
    "prepare imagenet": lambda: prepare_cli.main(["imagenet"]),
}
res = {}
for case, fn in cases.items():
    t = time.monotonic()
    try:
        fn()
        res[case] = ["no error", "", 0.0]
    except UserError as e:
        res[case] = [type(e).__name__, str(e), time.monotonic() - t]
print(json.dumps(res))
""",
        tmp_path,
        env=env,
    )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, (kind, msg, seconds) in res.items():
        assert kind == "UserError", (case, kind)
        assert "\n" not in msg, (case, msg)
        assert seconds < 20, f"{case}: {seconds:.1f} s"
        if case == "prepare imagenet":
            assert msg.startswith("unknown dataset 'imagenet'; available: digits, mnist"), msg
            continue
        name = case.split()[1] if case.startswith("prepare") else case.split()[0]
        assert f"dataset {name!r} is not prepared in {empty} " in msg, msg
        assert f"`mergejax prepare {name}` on a machine with network" in msg, msg
        assert "MERGEJAX_DATA" in msg and "--data-dir" in msg, msg
    assert "(download=False)" in res["cifar10 download=False"][1]
    for case in ("mnist download=True", "svhn_cropped download=True", "prepare fashion_mnist"):
        assert "(no network: cannot connect to 127.0.0.1:" in res[case][1], res[case][1]
    assert os.listdir(empty) == [], "a failed load left files behind"


# The test extras install TensorFlow, so CI (CI=true) always runs this; elsewhere it may skip.
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None and not os.environ.get("CI"),
                    reason="preparing with the unmodified builder needs TensorFlow: pip install -e '.[test]'")
def test_unmodified_mnist_builder_from_manual_files_with_prepare_cli(tmp_path):
    data_dir = tmp_path / "data"
    manual = data_dir / "tfds" / "downloads" / "manual"
    expected = make_sources(tmp_path / "src")
    manual.mkdir(parents=True)
    for f in (tmp_path / "src" / "mnist").iterdir():
        (manual / f.name).write_bytes(f.read_bytes())
    proc = run_fresh(
        f"DATA, MANUAL = {str(data_dir)!r}, {str(manual)!r}\n" + """
import dataclasses, os
from unittest import mock
from tensorflow_datasets.core.download import checksums
from tensorflow_datasets.image_classification import mnist
from mergejax.cli import prepare as prepare_cli
# The hand-made files stand in for the originals: register their checksums and sizes.
infos = {url: dataclasses.replace(checksums.compute_url_info(os.path.join(MANUAL, i.filename)), filename=i.filename)
         for url, i in mnist.MNIST.url_infos.items()}
with mock.patch.object(mnist.MNIST, "url_infos", infos), \\
        mock.patch.object(mnist, "_TRAIN_EXAMPLES", 20), mock.patch.object(mnist, "_TEST_EXAMPLES", 10):
    print("RC", prepare_cli.main(["mnist", "--data-dir", DATA]))
""",
        tmp_path,
        timeout=180,
    )
    assert proc.stdout.strip().splitlines()[-1] == "RC 0", proc.stdout
    assert (data_dir / "tfds" / "mnist" / "3.0.1" / "dataset_info.json").exists()
    for split in SIZES:
        raw, raw_labels = expected["mnist", split]
        assert f"mnist {split}: {SIZES[split]} images 28x28x1 -> {data_dir / 'npz' / f'mnist-{split}.npz'}" in proc.stdout
        with np.load(data_dir / "npz" / f"mnist-{split}.npz") as f:
            images, labels = f["images"], f["labels"]
        index = {r.tobytes(): i for i, r in enumerate(raw)}
        perm = np.asarray([index[r.tobytes()] for r in images])
        assert sorted(perm.tolist()) == list(range(len(raw)))
        np.testing.assert_array_equal(labels, raw_labels[perm])
