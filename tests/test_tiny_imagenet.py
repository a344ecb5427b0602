"""Tiny ImageNet through mergejax's own TFDS builder, on a small archive laid out as the official
``tiny-imagenet-200.zip`` (JPEGs, one grayscale; val labels in ``val_annotations.txt``), in a
fresh interpreter on the installed package: ``mergejax prepare tiny_imagenet`` converts it, and
``mergejax.load`` reads exactly the decoded pixels, normalised, with sorted-wnid labels."""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from test_tfds_real import run_fresh

WNIDS = ["n03", "n01", "n02"]  # wnids.txt order; labels follow sorted order: n01 -> 0, n02 -> 1, n03 -> 2
MEAN, STD = (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)  # written out independently of mergejax


def make_archive(manual) -> dict:
    """``manual/tiny-imagenet-200.zip`` with 3 train images per class and 4 val images.
    Returns ``{split: {file name: (label, decoded RGB uint8 (64, 64, 3))}}``."""
    rng = np.random.default_rng(0)
    src = manual.parent / "src" / "tiny-imagenet-200"
    expected = {"train": {}, "test": {}}
    (src / "val" / "images").mkdir(parents=True)
    (src / "wnids.txt").write_text("\n".join(WNIDS) + "\n")

    def write(path, gray: bool):
        smooth = rng.integers(0, 256, (8, 8, 1 if gray else 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(smooth[..., 0] if gray else smooth).save(path, "JPEG", quality=90)
        with Image.open(path) as im:  # the reference: PIL's own decoding of that JPEG, to RGB
            return np.asarray(im.convert("RGB"), np.uint8)

    for wnid in WNIDS:
        d = src / "train" / wnid / "images"
        d.mkdir(parents=True)
        for i in range(3):
            name = f"{wnid}_{i}.JPEG"
            expected["train"][name] = (sorted(WNIDS).index(wnid), write(d / name, gray=(wnid == "n02" and i == 1)))
    lines = []
    for i, wnid in enumerate(["n02", "n03", "n01", "n02"]):
        name = f"val_{i}.JPEG"
        expected["test"][name] = (sorted(WNIDS).index(wnid), write(src / "val" / "images" / name, gray=False))
        lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (src / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    manual.mkdir(parents=True)
    with zipfile.ZipFile(manual / "tiny-imagenet-200.zip", "w") as z:
        for root, _, files in os.walk(src):
            for f in files:
                z.write(os.path.join(root, f), os.path.relpath(os.path.join(root, f), src.parent))
    return expected


# The test extras install TensorFlow (TFDS encodes the prepared images with it), so CI always runs this.
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None and not os.environ.get("CI"),
                    reason="preparing a TFDS dataset needs TensorFlow: pip install -e '.[test]'")
def test_prepare_and_load_tiny_imagenet_from_the_archive(tmp_path):
    data_dir = tmp_path / "data"
    expected = make_archive(data_dir / "tfds" / "downloads" / "manual")
    proc = run_fresh(f"DATA, OUT = {str(data_dir)!r}, {str(tmp_path / 'loaded.npz')!r}\n" + """
import json
import numpy as np
import mergejax
from mergejax.cli import prepare as prepare_cli
from mergejax.core import tiny_imagenet
print("RC", prepare_cli.main(["tiny_imagenet", "--data-dir", DATA]))
arrays, names = {}, {}
for split in ("train", "test"):
    s = mergejax.load("tiny_imagenet", split, data_dir=DATA, download=False)
    arrays[split + "_images"], arrays[split + "_labels"] = s.images, s.labels
    names[split] = [k for k, _, _ in tiny_imagenet.examples(tiny_imagenet.find_root(DATA + "/tfds/downloads/manual"), split)]
    assert s.num_classes == 200 and s.name == "tiny_imagenet"
np.savez(OUT, **arrays)
print(json.dumps(names))
""", tmp_path, timeout=240)
    out = proc.stdout.strip().splitlines()
    assert "RC 0" in out, proc.stdout
    names = json.loads(out[-1])
    loaded = np.load(tmp_path / "loaded.npz")
    for split, n in (("train", 9), ("test", 4)):
        assert f"tiny_imagenet {split}: {n} images 64x64x3 -> {data_dir / 'npz' / f'tiny_imagenet-{split}.npz'}" in proc.stdout
        images, labels = loaded[f"{split}_images"], loaded[f"{split}_labels"]
        assert images.shape == (n, 64, 64, 3) and images.dtype == np.float32 and sorted(names[split]) == sorted(expected[split])
        # TFDS may store examples in any order: match each loaded image to its source by its pixels.
        refs = {name: ((px.astype(np.float32) / 255 - MEAN) / STD, label) for name, (label, px) in expected[split].items()}
        matched = set()
        for img, label in zip(images, labels):
            name = next(k for k, (px, _) in refs.items() if np.allclose(img, px, atol=1e-5))
            assert refs[name][1] == label, (split, name, label)
            matched.add(name)
        assert matched == set(expected[split])  # every image once
    gray = expected["train"]["n02_1.JPEG"][1]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()  # converted to RGB


def test_missing_archive_is_one_line_user_error(tmp_path):
    from mergejax.core import data
    from mergejax.core.errors import UserError

    with pytest.raises(UserError) as e:
        data.load("tiny_imagenet", "train", data_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "tiny-imagenet-200.zip" in msg and "mergejax prepare tiny_imagenet" in msg, msg
    assert str(tmp_path / "tfds" / "downloads" / "manual") in msg
    with pytest.raises(ValueError, match="has no split 'validation'"):
        data.load("tiny_imagenet", "validation", data_dir=str(tmp_path))
