"""Datasets as in-memory numpy arrays, CIFAR augmentation, and a seeded batch iterator.

Everything here is host-side numpy except :func:`augment_cifar`, which is a pure,
jittable function of ``(rng, images)``.

Images are float32 ``(N, H, W, C)`` normalised per channel; labels are int32 ``(N,)``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Literal

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.core.errors import UserError

# Per-channel mean / std of the *training* split, pixel values in [0, 1].
# CIFAR numbers: the values used by the He et al. / Zagoruyko reference code.
_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    # The values commonly used for Tiny ImageNet's training split (not re-measured here: no copy offline).
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}
_TFDS_SPLITS = {
    "mnist": ("train", "test"),
    "fashion_mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "svhn_cropped": ("train", "test", "extra"),
    "tiny_imagenet": ("train", "test"),  # mergejax.core.tiny_imagenet's builder; test = the official val
}
_NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "svhn_cropped": 10,
                "tiny_imagenet": 200}
DATASETS = ("digits",) + tuple(_TFDS_SPLITS)

# digits: a fixed, documented split. Shuffle all 1,797 images with this seed and keep
# the first 1,437 (80%) for training and the remaining 360 for test.
DIGITS_SEED = 0
DIGITS_NUM_TRAIN = 1437


@dataclasses.dataclass(frozen=True)
class Split:
    """One split: ``images`` float32 (N, H, W, C) normalised, ``labels`` int32 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str

    def __len__(self) -> int:
        return len(self.labels)


def splits_of(name: str) -> tuple[str, ...]:
    """The split names that ``load(name, split)`` accepts."""
    _check_name(name)
    return ("train", "test") if name == "digits" else _TFDS_SPLITS[name]


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")


def default_data_dir() -> str:
    """``$MERGEJAX_DATA`` or ``~/.cache/mergejax``: where TFDS data and the numpy cache live."""
    return os.environ.get("MERGEJAX_DATA", os.path.expanduser("~/.cache/mergejax"))


def load(name: str, split: str, *, data_dir: str | None = None, download: bool = True) -> Split:
    """Load a whole split into memory, normalised with the dataset's training statistics.

    ``digits`` is scikit-learn's bundled 8x8 digits (offline); the others are read
    through ``tfds.data_source`` (no TensorFlow needed to read) and cached as ``.npz``
    under ``data_dir/npz`` after the first load. A TFDS dataset that is not prepared under
    ``data_dir/tfds`` is downloaded and converted (``download=True``; needs network and
    TensorFlow, see ``mergejax prepare``); when it cannot be, :class:`~mergejax.core.errors.UserError`
    with a one-line message saying how to prepare it. ``split`` may be a TFDS-style sum such as
    ``"train+extra"`` (SVHN): the parts concatenated in that order, each cached on its own.
    """
    parts = split_parts(name, split)
    if name == "digits":
        raw = [_digits(p) for p in parts]
    else:
        raw = [_tfds_numpy(name, p, data_dir or default_data_dir(), download) for p in parts]
    images, labels = (np.concatenate(a) if len(a) > 1 else a[0] for a in zip(*raw))
    if name != "digits":
        mean, std = (np.asarray(s, np.float32) for s in _STATS[name])
        images = (images.astype(np.float32) / 255.0 - mean) / std
    return Split(images.astype(np.float32), labels.astype(np.int32), _NUM_CLASSES[name], name)


def split_parts(name: str, split: str) -> list[str]:
    """The splits of ``name`` that ``split`` names: one (``"train"``) or a TFDS-style sum of
    distinct ones (``"train+extra"``); anything else is refused in one line naming the available."""
    parts = split.split("+")
    if any(p not in splits_of(name) for p in parts) or len(set(parts)) < len(parts):
        raise ValueError(f"dataset {name!r} has no split {split!r}; available: {', '.join(splits_of(name))} "
                         "(or a sum of distinct ones, e.g. 'train+extra')")
    return parts


def load_train(name: str, split: str = "train", **kwargs) -> Split:
    """:func:`load` of the split a run *trains* on (a train config's ``train_split``): one that
    includes ``test``, which every run evaluates on, is refused in one line instead of silently
    training on the test images."""
    if "test" in split_parts(name, split):
        raise ValueError(f"train_split {split!r} of {name!r} includes the test split, which the run is evaluated on; "
                         "train on 'train' (or e.g. 'train+extra')")
    return load(name, split, **kwargs)


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float32)[..., None] / 16.0  # (1797, 8, 8, 1) in [0, 1]
    order = np.random.default_rng(DIGITS_SEED).permutation(len(images))
    tr, te = order[:DIGITS_NUM_TRAIN], order[DIGITS_NUM_TRAIN:]
    mean, std = images[tr].mean(), images[tr].std()
    idx = tr if split == "train" else te
    return (images[idx] - mean) / std, d.target[idx]


def _tfds_numpy(name: str, split: str, data_dir: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    cache = npz_path(name, split, data_dir)
    if os.path.exists(cache):
        with np.load(cache) as f:
            return f["images"], f["labels"]
    builder = _tfds_builder(name, data_dir, download)
    source = builder.as_data_source(split=split)
    # One record at a time: a one-off cost before the npz cache, and the batched
    # ``__getitems__`` is broken under ``tfds.testing.mock_data`` (tfds 4.9.10).
    rows = [source[i] for i in range(len(source))]
    images, labels = [r["image"] for r in rows], [r["label"] for r in rows]
    images, labels = np.stack(images).astype(np.uint8), np.asarray(labels, np.int32)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = cache + f".tmp{os.getpid()}.npz"
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, cache)
    return images, labels


def npz_path(name: str, split: str, data_dir: str | None = None) -> str:
    """Where :func:`load` caches a TFDS split as uint8 ``images`` and int32 ``labels``."""
    return os.path.join(data_dir or default_data_dir(), "npz", f"{name}-{split}.npz")


def prepare_split(name: str, split: str, *, data_dir: str | None = None, download: bool = True) -> tuple[str, int, tuple]:
    """Make sure :func:`load` can read ``name``/``split`` offline: download and convert it with
    TFDS if needed, then write its ``.npz`` cache (what ``load`` does, without normalising a
    float32 copy). Returns ``(npz path, number of examples, image shape)``."""
    _check_name(name)
    if name == "digits" or split not in splits_of(name):
        raise ValueError(f"nothing to prepare for {name!r} split {split!r}; TFDS datasets: {', '.join(_TFDS_SPLITS)}")
    data_dir = data_dir or default_data_dir()
    images, _ = _tfds_numpy(name, split, data_dir, download)
    return npz_path(name, split, data_dir), len(images), tuple(images.shape[1:])


def _tfds_builder(name: str, data_dir: str, download: bool):
    """The TFDS builder of ``name`` under ``data_dir/tfds``, prepared (ArrayRecord files).

    Prepared files are looked for first; only then, and only if ``download``, is the dataset
    downloaded and converted. An unprepared dataset that cannot be downloaded is a one-line
    :class:`UserError` within seconds: the download hosts are probed (one TCP connection
    each) before TFDS is asked, whose own retries take minutes to give up.
    """
    import tensorflow_datasets as tfds

    if name == "tiny_imagenet":
        from mergejax.core import tiny_imagenet  # registers the builder (TFDS has none)
    tfds_dir = os.path.join(data_dir, "tfds")
    builder = tfds.builder(name, data_dir=tfds_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    # Only TFDS's own download_and_prepare needs the network (or, for Tiny ImageNet, the archive);
    # tfds.testing.mock_data swaps in one that does not.
    real = type(builder).download_and_prepare.__module__.startswith("tensorflow_datasets.core")
    manual = os.path.join(tfds_dir, "downloads", "manual")
    if real and name == "tiny_imagenet" and not any(os.path.exists(os.path.join(manual, f)) for f in (
            tiny_imagenet.ARCHIVE, os.path.join(tiny_imagenet.FOLDER, "wnids.txt"))):
        raise UserError(f"dataset 'tiny_imagenet' is not prepared in {data_dir} and its archive is not in {manual}: "
                        f"download {tiny_imagenet.URL} (248 MB), put {tiny_imagenet.ARCHIVE} there and run "
                        f"`mergejax prepare tiny_imagenet` (TFDS has no builder that downloads it)")

    def offline(reason: str) -> UserError:
        return UserError(
            f"dataset {name!r} is not prepared in {data_dir} (no {builder.data_dir}) and cannot be "
            f"downloaded ({_one_line(reason)}): run `mergejax prepare {name}` on a machine with "
            f"network and copy its data dir here, or point MERGEJAX_DATA (or --data-dir) at a "
            f"data dir where it is prepared"
        )

    if not download:
        raise offline("download=False")
    if real and (problem := _network_problem(_urls_to_download(builder, tfds_dir))):
        raise offline(f"no network: {problem}")
    import requests
    from tensorflow_datasets.core.download.util import DownloadError

    try:
        builder.download_and_prepare(file_format="array_record")
    except (requests.RequestException, DownloadError, ConnectionError, TimeoutError) as e:
        raise offline(f"{type(e).__name__}: {e}") from e
    except Exception as e:  # TFDS wraps a missing TensorFlow, e.g. in an ExtractError
        if not _missing_tensorflow(e):
            raise
        raise UserError(
            f"preparing dataset {name!r} (converting the download into {builder.data_dir}) needs "
            f"TensorFlow, which is not installed: pip install 'mergejax[prepare]' and run again "
            f"(downloads are kept; reading a prepared dataset does not need TensorFlow)"
        ) from e
    return builder


def _missing_tensorflow(e: BaseException | None) -> bool:
    """Whether ``e`` or an exception it was raised from is "No module named 'tensorflow'"."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "tensorflow":
            return True
        e = e.__cause__ or e.__context__
    return False


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _urls_to_download(builder, tfds_dir: str) -> list[str]:
    """The dataset's registered download URLs whose files are not already on disk (in TFDS's
    download cache, ``tfds_dir/downloads[/NAME]``, or placed by hand in ``downloads/manual``)."""
    from tensorflow_datasets.core.download import resource

    downloads = os.path.join(tfds_dir, "downloads")
    missing = []
    for url, info in sorted((builder.url_infos or {}).items()):
        fname = resource.get_dl_fname(url, info.checksum)
        found = any(os.path.exists(os.path.join(d, fname)) for d in (downloads, os.path.join(downloads, builder.name)))
        if not found and info.filename:
            found = os.path.exists(os.path.join(downloads, "manual", info.filename))
        if not found:
            missing.append(url)
    return missing


def _network_problem(urls: list[str], timeout: float = 5.0) -> str | None:
    """Why the hosts of ``urls`` (or the HTTP(S) proxy that would carry them) cannot be
    reached, or None. One TCP connection per host, at most ``timeout`` seconds each."""
    import socket
    import urllib.parse

    import requests.utils

    tried = set()
    for url in urls:
        proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
        target = urllib.parse.urlsplit(proxy if proxy else url)
        port = target.port or (443 if target.scheme == "https" else 80)
        if not target.hostname or (target.hostname, port) in tried:
            continue
        tried.add((target.hostname, port))
        try:
            socket.create_connection((target.hostname, port), timeout=timeout).close()
        except OSError as e:
            via = " (the proxy)" if proxy else ""
            return f"cannot connect to {target.hostname}:{port}{via}: {e}"
    return None


def augment_cifar(rng: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """Standard CIFAR augmentation: zero-pad ``pad`` pixels, random crop back, random h-flip.

    images: (B, H, W, C) float; returns the same shape and dtype. Pure and jittable;
    the same ``rng`` gives the same result.
    """
    b, h, w, _ = images.shape
    crop_rng, flip_rng = jax.random.split(rng)
    offsets = jax.random.randint(crop_rng, (b, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(flip_rng, 0.5, (b,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, off, flip):
        out = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
        return jnp.where(flip, out[:, ::-1], out)

    return jax.vmap(one)(padded, offsets, flips)


def steps_per_epoch(num_examples: int, batch_size: int, remainder: Literal["drop", "pad"] = "drop") -> int:
    """Number of batches one epoch yields."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    full, rest = divmod(num_examples, batch_size)
    if full == 0 and remainder == "drop":
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples and remainder='drop'")
    return full + (1 if rest and remainder == "pad" else 0)


def batches(
    split: Split,
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    shuffle: bool = True,
    remainder: Literal["drop", "pad"] = "drop",
    epochs: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{'image': (B,H,W,C), 'label': (B,), 'mask': (B,)}`` numpy batches.

    The order in epoch e is ``permutation(default_rng((seed, e)))``, so the stream is a
    pure function of ``(seed, step)`` and ``start_step`` resumes it exactly. With
    ``remainder='pad'`` the last batch is padded with zeros and ``mask`` 0 for the padding
    (every example seen exactly once per epoch); with ``'drop'`` the tail is dropped.
    ``epochs=None`` streams forever.
    """
    if remainder not in ("drop", "pad"):
        raise ValueError(f"remainder must be 'drop' or 'pad', got {remainder!r}")
    n = len(split)
    per_epoch = steps_per_epoch(n, batch_size, remainder)
    epoch, i = divmod(start_step, per_epoch)
    while epochs is None or epoch < epochs:
        order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
        for j in range(i, per_epoch):
            idx = order[j * batch_size : (j + 1) * batch_size]
            mask = np.ones(batch_size, np.float32)
            if len(idx) < batch_size:
                mask[len(idx) :] = 0.0
                idx = np.concatenate([idx, np.zeros(batch_size - len(idx), idx.dtype)])
            yield {"image": split.images[idx], "label": split.labels[idx], "mask": mask}
        epoch, i = epoch + 1, 0


def shard_batch(batch: dict, mesh: jax.sharding.Mesh, axis: str = "data") -> dict:
    """Place a host batch on ``mesh`` split along its leading axis over mesh axis ``axis``."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    size = mesh.shape[axis]
    for k, v in batch.items():
        if v.shape[0] % size:
            raise ValueError(f"batch[{k!r}] has leading size {v.shape[0]}, not divisible by mesh axis {axis!r} of size {size}")
    return jax.device_put(batch, sharding)


def holdout(split: Split, num_holdout: int, seed: int = 0) -> tuple[Split, Split]:
    """``(train, held_out)``: ``split`` cut into two disjoint parts, ``num_holdout`` examples held
    out, chosen by a permutation drawn from ``seed`` (numpy ``default_rng``); each part keeps
    the original order. The FreezeOut authors report validation error on 5,000 held out of the
    CIFAR training set (the last 5,000 of torchvision's order, which TFDS does not share) after
    training on the other 45,000: ``holdout(train, 5000)``."""
    n = len(split)
    if not 0 < num_holdout < n:
        raise ValueError(f"cannot hold out {num_holdout} of the {n} examples of {split.name}")
    perm = np.random.default_rng(seed).permutation(n)
    keep, held = np.sort(perm[:n - num_holdout]), np.sort(perm[n - num_holdout:])
    part = lambda idx: dataclasses.replace(split, images=split.images[idx], labels=split.labels[idx])  # noqa: E731
    return part(keep), part(held)
