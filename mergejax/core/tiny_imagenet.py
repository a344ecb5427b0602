"""Tiny ImageNet (the CS231n 200-class, 64x64 subset of ImageNet) as a TFDS builder.

TFDS has no builder for it, so this module registers one, ``tiny_imagenet``, the moment it is
imported (:func:`mergejax.core.data.load` does that). It reads the official archive,
``tiny-imagenet-200.zip`` (http://cs231n.stanford.edu/tiny-imagenet-200.zip, 248 MB), or its
extracted folder ``tiny-imagenet-200/`` from TFDS's manual directory,
``<data dir>/tfds/downloads/manual/``; it downloads nothing itself.

Splits (as Huang et al. 2017 and most papers report it: the test labels are not public):

* ``train``: the 100,000 images of ``train/<wnid>/images/`` (500 per class);
* ``test``: the 10,000 images of ``val/images/``, labelled by ``val/val_annotations.txt``.

Labels are the positions of the wnids in sorted order (``sorted(wnids.txt)``, the order of
``torchvision.datasets.ImageFolder`` over ``train/``). Images are (64, 64, 3) uint8; the few
grayscale JPEGs in the archive are converted to RGB (PIL ``convert('RGB')``). Preparing needs
TensorFlow (TFDS encodes the images as PNG with it), as for the other TFDS datasets.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
import tensorflow_datasets as tfds

ARCHIVE = "tiny-imagenet-200.zip"
FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
NUM_CLASSES = 200
SHAPE = (64, 64, 3)


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
    """Tiny ImageNet 200 from the official archive in the manual directory."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "train (100,000) and test (= the official val, 10,000) splits."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (f"Download {URL} and put {ARCHIVE} (or its extracted folder {FOLDER}/) in "
                                    f"the manual directory, <data dir>/tfds/downloads/manual/.")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=SHAPE),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "id": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="http://cs231n.stanford.edu/",
        )

    def _split_generators(self, dl_manager):
        root = find_root(str(dl_manager.manual_dir), dl_manager)
        return {"train": self._generate_examples(root, "train"), "test": self._generate_examples(root, "test")}

    def _generate_examples(self, root: str, split: str):
        for key, path, label in examples(root, split):
            yield key, {"image": read_rgb(path), "label": label, "id": key}


def find_root(manual_dir: str, dl_manager=None) -> str:
    """The ``tiny-imagenet-200`` folder in ``manual_dir``: the extracted one, else the archive
    extracted (by ``dl_manager`` when given, else next to it). Raises ``FileNotFoundError``
    saying what to put where."""
    folder = os.path.join(manual_dir, FOLDER)
    if os.path.isfile(os.path.join(folder, "wnids.txt")):
        return folder
    archive = os.path.join(manual_dir, ARCHIVE)
    if os.path.isfile(archive):
        if dl_manager is not None:
            out = str(dl_manager.extract(archive))
        else:
            out = os.path.join(manual_dir, "extracted")
            with zipfile.ZipFile(archive) as z:
                z.extractall(out)
        if os.path.isfile(os.path.join(out, FOLDER, "wnids.txt")):
            return os.path.join(out, FOLDER)
        raise FileNotFoundError(f"{archive} has no {FOLDER}/wnids.txt: not the Tiny ImageNet archive")
    raise FileNotFoundError(f"Tiny ImageNet is not in {manual_dir}: download {URL} and put {ARCHIVE} "
                            f"(or its extracted folder {FOLDER}/) there")


def class_ids(root: str) -> dict[str, int]:
    """wnid -> label: positions in ``sorted(wnids.txt)``."""
    with open(os.path.join(root, "wnids.txt")) as f:
        wnids = sorted({line.strip() for line in f if line.strip()})
    if not 0 < len(wnids) <= NUM_CLASSES:
        raise ValueError(f"{root}/wnids.txt lists {len(wnids)} classes; Tiny ImageNet has {NUM_CLASSES}")
    return {w: i for i, w in enumerate(wnids)}


def examples(root: str, split: str) -> list[tuple[str, str, int]]:
    """``(key, image path, label)`` of every image of ``split`` ("train" or "test" = the
    official val), sorted by key. A val image whose wnid is not in wnids.txt is an error."""
    ids = class_ids(root)
    out = []
    if split == "train":
        for wnid, label in ids.items():
            d = os.path.join(root, "train", wnid, "images")
            out += [(name, os.path.join(d, name), label) for name in os.listdir(d) if name.lower().endswith(".jpeg")]
    elif split == "test":
        with open(os.path.join(root, "val", "val_annotations.txt")) as f:
            for line in f:
                if not line.strip():
                    continue
                name, wnid = line.split("\t")[:2]
                if wnid not in ids:
                    raise ValueError(f"val image {name} has class {wnid}, which is not in {root}/wnids.txt")
                out.append((name, os.path.join(root, "val", "images", name), ids[wnid]))
    else:
        raise ValueError(f"Tiny ImageNet has splits train and test (the official val), not {split!r}")
    return sorted(out)


def read_rgb(path: str) -> np.ndarray:
    """One image as (64, 64, 3) uint8 RGB (grayscale JPEGs converted)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), np.uint8)
    if arr.shape != SHAPE:
        raise ValueError(f"{path} is {arr.shape}, not {SHAPE}")
    return arr
