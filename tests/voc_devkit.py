"""A tiny synthetic PASCAL VOC2007 devkit for the tests: real JPEGs and class files in the
standard layout, with present (1), absent (-1) and difficult (0) labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from barlow.data.sources import VOC07_CLASSES

SIDE = 40                       # images are SIDE×SIDE
GRID = (4, 5)                   # class c lights cell divmod(c, 5) of a 4×5 grid
SPLITS = {"trainval": (60, 0), "test": (40, 1000)}  # images, first id


def devkit_labels(n: int, seed: int) -> np.ndarray:
    """(n, 20) devkit values: each class present with p 0.3 (and in rows c, c + 20, …
    so that every class has positives), difficult with p 0.1, else absent."""
    rng = np.random.default_rng(seed)
    u = rng.random((n, len(VOC07_CLASSES)))
    labels = np.where(u < 0.3, 1, np.where(u < 0.4, 0, -1)).astype(np.int8)
    labels[np.arange(n), np.arange(n) % len(VOC07_CLASSES)] = 1
    return labels


def devkit_image(labels: np.ndarray, seed: int) -> np.ndarray:
    """Dim noise with the cell of every present class bright and of every difficult one
    half as bright (an object hard to see): raw pixels separate the classes."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 50, (SIDE, SIDE, 3), dtype=np.uint8)
    h, w = SIDE // GRID[0], SIDE // GRID[1]
    for c, value in enumerate(labels):
        r, q = divmod(c, GRID[1])
        if value != -1:
            image[h * r:h * (r + 1), w * q:w * (q + 1)] += 180 if value == 1 else 90
    return image


def make_devkit(root: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """Write root/VOCdevkit/VOC2007 and return {devkit split: (image ids, labels)}."""
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    out = {}
    for seed, (split, (n, first)) in enumerate(SPLITS.items()):
        ids = [f"{first + i:06d}" for i in range(n)]
        labels = devkit_labels(n, seed)
        for i, image_id in enumerate(ids):
            Image.fromarray(devkit_image(labels[i], first + i)).save(
                voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        for c, name in enumerate(VOC07_CLASSES):
            # The devkit's own format: id, then the label right-aligned in 2 characters.
            (voc / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text(
                "".join(f"{image_id} {value:2d}\n" for image_id, value in zip(ids, labels[:, c])))
        out[split] = ids, labels
    return out
