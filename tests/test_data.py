"""Data: digits split, normalisation, CIFAR augmentation, batch iterator, sharding, TFDS path."""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest

from mergejax.core import data


# ---------------------------------------------------------------- digits


def test_digits_split_sizes_disjoint_and_complete(digits):
    from sklearn.datasets import load_digits

    train, test = digits
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape == (1437, 8, 8, 1) and test.images.shape == (360, 8, 8, 1)
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
    assert train.num_classes == 10 and train.name == "digits"
    # Undo the normalisation and match every image back to a raw sklearn image (float64 reference).
    raw = load_digits()
    raw_images = raw.images.reshape(len(raw.images), -1) / 16.0
    mean, std = raw_images[_digits_train_rows()].mean(), raw_images[_digits_train_rows()].std()
    rows = {}
    for name, split in (("train", train), ("test", test)):
        x = split.images.reshape(len(split), -1).astype(np.float64) * std + mean
        d = ((x[:, None, :] - raw_images[None]) ** 2).sum(-1)  # (N, 1797)
        idx = d.argmin(1)
        assert np.allclose(d[np.arange(len(idx)), idx], 0.0, atol=1e-8)
        np.testing.assert_array_equal(split.labels, raw.target[idx])
        rows[name] = set(idx.tolist())
    # Disjoint and together all of the 1,797 images. (Duplicate raw images would make argmin
    # ambiguous; the sklearn digits have none that are exact duplicates across these rows.)
    assert len(rows["train"]) == 1437 and len(rows["test"]) == 360
    assert rows["train"].isdisjoint(rows["test"])
    assert rows["train"] | rows["test"] == set(range(1797))


def _digits_train_rows():
    return np.random.default_rng(data.DIGITS_SEED).permutation(1797)[: data.DIGITS_NUM_TRAIN]


def test_digits_normalised_with_train_statistics(digits):
    train, test = digits
    assert abs(float(train.images.astype(np.float64).mean())) < 1e-5
    assert abs(float(train.images.astype(np.float64).std()) - 1.0) < 1e-5
    # the test split uses the *train* statistics, so it is only approximately standardised
    assert abs(float(test.images.mean())) < 0.1 and abs(float(test.images.std()) - 1.0) < 0.1
    # every class is present in both splits
    assert set(np.unique(train.labels)) == set(range(10)) == set(np.unique(test.labels))


def test_load_is_deterministic(digits):
    again = data.load("digits", "train")
    np.testing.assert_array_equal(again.images, digits[0].images)
    np.testing.assert_array_equal(again.labels, digits[0].labels)


def test_unknown_dataset_and_split_errors_list_what_exists():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as e:
        data.load("imagenet", "train")
    for name in ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="no split 'validation'") as e:
        data.load("digits", "validation")
    assert "train, test" in str(e.value)
    with pytest.raises(ValueError, match="train, test, extra"):
        data.load("svhn_cropped", "valid")
    assert data.splits_of("svhn_cropped") == ("train", "test", "extra")


# ---------------------------------------------------------------- augmentation


def _images(b=16, h=8, w=6, c=3, seed=0):
    # distinct continuous values: every crop/flip of an image is unique, and none contains only zeros
    return np.random.default_rng(seed).normal(size=(b, h, w, c)).astype(np.float32) + 5.0


def _candidates(img, pad):
    """All (dy, dx, flip) -> numpy reference crops of the zero-padded image."""
    h, w, c = img.shape
    padded = np.zeros((h + 2 * pad, w + 2 * pad, c), img.dtype)
    padded[pad : pad + h, pad : pad + w] = img
    out = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy : dy + h, dx : dx + w]
            out[(dy, dx, False)] = crop
            out[(dy, dx, True)] = crop[:, ::-1]
    return out


def test_augment_keeps_shape_dtype_and_is_deterministic_per_rng():
    x = _images()
    a = data.augment_cifar(jax.random.key(1), x)
    assert a.shape == x.shape and a.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(data.augment_cifar(jax.random.key(1), x)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(jax.jit(data.augment_cifar)(jax.random.key(1), x)))
    assert not np.array_equal(np.asarray(a), np.asarray(data.augment_cifar(jax.random.key(2), x)))


def test_augment_output_is_a_padded_crop_with_optional_flip():
    """Each output image equals exactly one numpy crop (offset in [0, 2*pad]^2, flipped or not) of
    the zero-padded input; over a batch all offsets' extremes and both flips occur."""
    pad = 2
    x = _images(b=256, h=6, w=5, c=2)
    out = np.asarray(jax.jit(data.augment_cifar, static_argnums=2)(jax.random.key(0), x, pad))
    found = []
    for img, o in zip(x, out):
        matches = [k for k, crop in _candidates(img, pad).items() if np.array_equal(crop, o)]
        assert len(matches) == 1, f"augmented image matches {len(matches)} reference crops"
        found.append(matches[0])
    dys = {k[0] for k in found}
    dxs = {k[1] for k in found}
    assert dys == dxs == set(range(2 * pad + 1))
    flip_rate = np.mean([k[2] for k in found])
    assert 0.35 < flip_rate < 0.65  # Bernoulli(0.5) over 256 draws: 5 sigma ~ 0.16
    # the content is preserved, apart from what the pad/crop moves out of view
    centred = [o for k, o in zip(found, out) if k[:2] == (pad, pad)]
    assert centred, "no centred crop in 256 draws"


def test_augment_default_pad_is_4_on_cifar_shapes():
    x = _images(b=8, h=32, w=32, c=3)
    out = np.asarray(data.augment_cifar(jax.random.key(3), x))
    for img, o in zip(x, out):
        assert any(np.array_equal(crop, o) for crop in _candidates(img, 4).values())


# ---------------------------------------------------------------- batches


def _toy_split(n=23, shape=(2, 2, 1)):
    images = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, *shape), np.float32)
    return data.Split(images, np.arange(n, dtype=np.int32) % 10, 10, "toy")


@pytest.mark.parametrize("n,bs", [(23, 5), (20, 5), (3, 7)])
def test_batches_pad_covers_every_example_once_per_epoch(n, bs):
    split = _toy_split(n)
    per_epoch = data.steps_per_epoch(n, bs, "pad")
    assert per_epoch == -(-n // bs)
    for epoch in range(3):
        seen = []
        stream = data.batches(split, bs, seed=4, start_step=epoch * per_epoch, remainder="pad", epochs=epoch + 1)
        for batch in stream:
            assert batch["image"].shape == (bs, 2, 2, 1) and batch["label"].shape == (bs,) and batch["mask"].shape == (bs,)
            ids = batch["image"][:, 0, 0, 0].astype(int)
            np.testing.assert_array_equal(batch["label"], ids % 10)  # images and labels stay paired
            seen += ids[batch["mask"] == 1].tolist()
            assert set(batch["mask"].tolist()) <= {0.0, 1.0}
        assert sorted(seen) == list(range(n)), f"epoch {epoch}"


def test_batches_drop_skips_the_tail_and_shuffles_per_epoch():
    split = _toy_split(23)
    assert data.steps_per_epoch(23, 5, "drop") == 4
    epochs = []
    stream = data.batches(split, 5, seed=0, remainder="drop", epochs=3)
    batches = list(stream)
    assert len(batches) == 12
    for e in range(3):
        ids = np.concatenate([b["image"][:, 0, 0, 0] for b in batches[4 * e : 4 * e + 4]]).astype(int)
        assert all(b["mask"].all() for b in batches)
        assert len(set(ids.tolist())) == 20  # no repeats within an epoch
        epochs.append(ids)
    assert not np.array_equal(epochs[0], epochs[1])  # a new permutation each epoch
    with pytest.raises(ValueError, match="exceeds"):
        data.steps_per_epoch(3, 5, "drop")
    with pytest.raises(ValueError, match="remainder"):
        next(data.batches(split, 5, seed=0, remainder="keep"))


def test_batches_resume_from_start_step_and_seed_determinism():
    split = _toy_split(23)
    full = [b["image"][:, 0, 0, 0] for _, b in zip(range(17), data.batches(split, 5, seed=7, remainder="pad"))]
    for start in (0, 3, 5, 11):
        resumed = [b["image"][:, 0, 0, 0] for _, b in zip(range(17 - start), data.batches(split, 5, seed=7, start_step=start, remainder="pad"))]
        for a, b in zip(full[start:], resumed):
            np.testing.assert_array_equal(a, b)
    other = [b["image"][:, 0, 0, 0] for _, b in zip(range(5), data.batches(split, 5, seed=8, remainder="pad"))]
    assert not all(np.array_equal(a, b) for a, b in zip(full, other))
    unshuffled = next(data.batches(split, 5, seed=7, shuffle=False))
    np.testing.assert_array_equal(unshuffled["image"][:, 0, 0, 0], np.arange(5))


def test_shard_batch_on_8_simulated_devices(run_python):
    """A fresh process with 8 host devices (this process's JAX backend is already initialised)."""
    proc = run_python(
        """
        import json, jax, numpy as np
        from mergejax.core import data
        assert jax.device_count() == 8, jax.devices()
        mesh = jax.make_mesh((8,), ("data",))
        split = data.Split(np.random.default_rng(0).normal(size=(40, 4, 4, 3)).astype(np.float32),
                           np.arange(40, dtype=np.int32) % 10, 10, "toy")
        batch = next(data.batches(split, 16, seed=0))
        out = data.shard_batch(batch, mesh)
        res = {}
        for k, v in out.items():
            np.testing.assert_array_equal(np.asarray(v), batch[k])
            shards = v.addressable_shards
            res[k] = [len(shards), sorted({s.data.shape for s in shards}),
                      sorted(s.index[0].start for s in shards), len({s.device for s in shards})]
        try:
            data.shard_batch(next(data.batches(split, 12, seed=0)), mesh)
        except ValueError as e:
            res["error"] = str(e)
        print(json.dumps(res))
        """,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"},
        timeout=120,
    )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["image"] == [8, [[2, 4, 4, 3]], list(range(0, 16, 2)), 8]
    assert res["label"] == [8, [[2]], list(range(0, 16, 2)), 8]
    assert "not divisible by mesh axis 'data' of size 8" in res["error"]


# ---------------------------------------------------------------- TFDS through mock data


@pytest.mark.parametrize(
    "name,split,shape,num_classes",
    [("cifar10", "train", (32, 32, 3), 10), ("mnist", "test", (28, 28, 1), 10)],
)
def test_tfds_path_with_mock_data(tmp_path, monkeypatch, name, split, shape, num_classes):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("MERGEJAX_DATA", str(tmp_path))
    n = 12
    with tfds.testing.mock_data(num_examples=n):
        s = data.load(name, split)  # data_dir from $MERGEJAX_DATA
    assert s.images.shape == (n, *shape) and s.images.dtype == np.float32
    assert s.labels.shape == (n,) and s.labels.dtype == np.int32
    assert s.num_classes == num_classes and s.name == name
    assert s.labels.min() >= 0 and s.labels.max() < num_classes
    # the uint8 cache holds the raw pixels; the split is (x/255 - mean) / std with the dataset constants
    cache = tmp_path / "npz" / f"{name}-{split}.npz"
    assert cache.exists()
    with np.load(cache) as f:
        raw, labels = f["images"], f["labels"]
    assert raw.dtype == np.uint8 and raw.shape == (n, *shape)
    np.testing.assert_array_equal(labels, s.labels)
    mean, std = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), "mnist": ((0.1307,), (0.3081,))}[name]
    expected = (raw.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(s.images, expected, rtol=1e-5, atol=1e-5)
    # A second load reads the cache (no TFDS, no mock needed) and gives the same arrays.
    again = data.load(name, split, data_dir=str(tmp_path), download=False)
    np.testing.assert_array_equal(again.images, s.images)
    np.testing.assert_array_equal(again.labels, s.labels)
    assert not [p for p in os.listdir(tmp_path / "npz") if ".tmp" in p]  # the atomic write left no temp file
    # Proof that the cache is what is read: rewrite it and load again.
    np.savez(cache, images=np.full_like(raw, 255), labels=(labels + 1) % num_classes)
    edited = data.load(name, split, data_dir=str(tmp_path), download=False)
    np.testing.assert_allclose(edited.images[0, 0, 0], (1.0 - np.asarray(mean)) / np.asarray(std), rtol=1e-6)
    np.testing.assert_array_equal(edited.labels, (labels + 1) % num_classes)


def test_split_sum_is_the_concatenation_of_the_cached_splits(tmp_path):
    # fake uint8 caches of two SVHN splits: load("train+extra") reads both and normalises with the training statistics
    rng = np.random.default_rng(0)
    raw = {s: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32))
           for s, n in (("train", 5), ("extra", 3))}
    for s, (images, labels) in raw.items():
        os.makedirs(os.path.dirname(data.npz_path("svhn_cropped", s, str(tmp_path))), exist_ok=True)
        np.savez(data.npz_path("svhn_cropped", s, str(tmp_path)), images=images, labels=labels)
    both = data.load("svhn_cropped", "train+extra", data_dir=str(tmp_path), download=False)
    mean, std = np.asarray((0.4377, 0.4438, 0.4728)), np.asarray((0.1980, 0.2010, 0.1970))
    expected = (np.concatenate([raw["train"][0], raw["extra"][0]]) / 255.0 - mean) / std
    np.testing.assert_allclose(both.images, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(both.labels, np.concatenate([raw["train"][1], raw["extra"][1]]))
    assert both.name == "svhn_cropped" and both.num_classes == 10 and both.images.dtype == np.float32
    for bad in ("train+valid", "train+train"):
        with pytest.raises(ValueError, match=rf"no split '{re.escape(bad)}'; available: train, test, extra \(or a sum"):
            data.load("svhn_cropped", bad, data_dir=str(tmp_path), download=False)


def test_split_sizes_for_the_dry_run():
    from mergejax import cost

    # TFDS svhn_cropped metadata: train 73,257, test 26,032, extra 531,131
    assert cost.num_examples("svhn_cropped", "train+extra") == 73_257 + 531_131 == 604_388
    assert cost.num_examples("svhn_cropped", "test") == 26_032 and cost.num_examples("cifar10") == 50_000
    with pytest.raises(ValueError, match="dataset 'cifar10' has no split 'train\\+extra'; available: train, test"):  # load's rule
        cost.num_examples("cifar10", "train+extra")


def test_a_train_split_that_includes_test_is_refused_in_one_line(tmp_path):
    """Every run evaluates on ``test``; a ``train_split`` with it in (a typo, ``test+train``) would
    silently score the model on images it trained on."""
    from mergejax.core import data as data_lib

    train = data_lib.load_train("digits", "train")
    np.testing.assert_array_equal(train.images, data_lib.load("digits", "train").images)
    for split in ("test", "test+train", "train+test"):
        with pytest.raises(ValueError, match=rf"train_split '{re.escape(split)}' of 'digits' includes the test split"):
            data_lib.load_train("digits", split)
