"""An ImageNet-shaped ImageFolder tree for the tests, built around the vendored SimCLR
lists (data/subsets/imagenet): synset-named class folders, ImageNet-style file names
(``<wnid>_<n>.JPEG`` in train/, ``ILSVRC2012_val_<n>.JPEG`` in val/), every list name of
the chosen classes present, unequal class sizes (smallest/largest = SIZE_RATIO, as
ImageNet's 732/1300), and a few grey and CMYK JPEGs among the RGB ones.

``make_names`` gives the file list alone (cheap for all 1000 classes: the subset checks
need only names and labels); ``make_tree`` writes tiny JPEGs for a sample of classes and
the vendored lists cut to them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
LISTS = REPO / "data" / "subsets" / "imagenet"
SIZE_RATIO = 732 / 1300     # ImageNet-1k train: smallest / largest class
EXTRA_ID = 900_000          # ids of the names not in any list (the lists stop at 175,315)
SIDE = (20, 24)             # H, W of the tiny JPEGs


def list_names(name: str) -> list[str]:
    """A vendored list's names in file order."""
    return (LISTS / f"{name}.txt").read_text().split()


def synset(name: str) -> str:
    return name.split("_", 1)[0]


def make_names(classes: list[str], spare: int) -> dict[str, list[str]]:
    """wnid -> train file names: every name of the lists in that class, then extra ones,
    so that the smallest class has (its list names + ``spare``) images and sizes grow
    linearly to smallest / SIZE_RATIO over the sorted classes."""
    listed: dict[str, set[str]] = {c: set() for c in classes}
    for name in list_names("10percent") + list_names("1percent"):
        if synset(name) in listed:
            listed[synset(name)].add(name)
    smallest = max(len(v) for v in listed.values()) + spare
    sizes = np.rint(np.linspace(smallest, smallest / SIZE_RATIO, len(classes))).astype(int)
    out = {}
    for c, size in zip(classes, sizes):
        extra = [f"{c}_{EXTRA_ID + i}.JPEG" for i in range(int(size) - len(listed[c]))]
        out[c] = sorted(listed[c]) + extra
    return out


def all_synsets() -> list[str]:
    return sorted({synset(n) for n in list_names("10percent")})


def sample_synsets(k: int) -> list[str]:
    """k synsets spread over the sorted 1000."""
    wnids = all_synsets()
    return [wnids[i] for i in np.linspace(0, len(wnids) - 1, k).astype(int)]


def _image(label: int, seed: int) -> np.ndarray:
    """Noise with a bright band whose row encodes the class: learnable from pixels."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 80, (*SIDE, 3), dtype=np.uint8)
    band = (label * 4) % SIDE[0]
    image[band:band + 4] += 150
    return image


def _save(array: np.ndarray, path: Path, index: int) -> None:
    """Mostly RGB JPEGs; every 50th grey and every 50th (offset 25) CMYK, as ImageNet
    has a few of each."""
    img = Image.fromarray(array)
    if index % 50 == 0:
        img = img.convert("L")
    elif index % 50 == 25:
        img = img.convert("CMYK")
    img.save(path, format="JPEG", quality=90)


def make_tree(root: Path, classes: list[str], spare: int, val_per_class: int,
              subsets_out: Path | None = None) -> dict[str, list[str]]:
    """Write ``root/train/<wnid>/<name>`` and ``root/val/<wnid>/ILSVRC2012_val_<n>.JPEG``
    (``val_per_class`` each); with ``subsets_out``, the vendored lists cut to ``classes``
    (file order kept). Returns the train names per class."""
    names = make_names(classes, spare)
    index = 0
    for label, (wnid, files) in enumerate(names.items()):
        (root / "train" / wnid).mkdir(parents=True)
        (root / "val" / wnid).mkdir(parents=True)
        for name in files:
            _save(_image(label, index), root / "train" / wnid / name, index)
            index += 1
        for j in range(val_per_class):
            n = label * val_per_class + j + 1
            _save(_image(label, 10**6 + n), root / "val" / wnid / f"ILSVRC2012_val_{n:08d}.JPEG", n)
    if subsets_out is not None:
        subsets_out.mkdir(parents=True, exist_ok=True)
        for name in ("1percent", "10percent"):
            kept = [n for n in list_names(name) if synset(n) in names]
            (subsets_out / f"{name}.txt").write_text("".join(n + "\n" for n in kept))
    return names
