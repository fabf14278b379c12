"""A synthetic ImageFolder tree shaped like ImageNet, for benchmarks that need real JPEG
files at ImageNet's sizes (benchmarks/gpu_check.py): synset-named class folders,
`train/` and `val/`, unequal class sizes (smallest/largest ≈ 0.56 as ImageNet's 732/1300),
ImageNet-style file names, JPEGs of ImageNet's typical 500×375 px (some portrait)
holding smooth random colour fields, so JPEG decoding costs what it costs on photos
of that size.

    python benchmarks/imagenet_like.py OUT --classes 100 --max-per-class 32 --val-per-class 10
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

#: ImageNet's smallest / largest training class (732 / 1300 images).
SIZE_RATIO = 732 / 1300


def class_sizes(classes: int, max_per_class: int) -> list[int]:
    """Per-class image counts spread evenly from ⌈0.56·max⌉ to max."""
    low = max(1, int(np.ceil(SIZE_RATIO * max_per_class)))
    return [int(round(v)) for v in np.linspace(max_per_class, low, classes)]


def synset(index: int) -> str:
    """A WordNet-style id (n + 8 digits), stable per index."""
    return f"n{1440764 + 7919 * index:08d}"


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth random colour field: low-resolution noise upsampled bicubically."""
    rng = np.random.default_rng(seed)
    width, height = size
    small = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def _write(job: tuple[str, int, tuple[int, int]]) -> None:
    path, seed, size = job
    _image(seed, size).save(path, quality=90)


def make_tree(root: str | Path, classes: int, max_per_class: int, val_per_class: int,
              seed: int = 0, workers: int = 1) -> dict[str, int]:
    """Write ``root/{train,val}/<synset>/<synset>_<n>.JPEG``; return the image counts."""
    root = Path(root)
    jobs = []
    for c, count in enumerate(class_sizes(classes, max_per_class)):
        wnid = synset(c)
        for split, n in (("train", count), ("val", val_per_class)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                # One in five portrait, as ImageNet's mix of 4:3 and 3:4 photos.
                size = (375, 500) if (c + i) % 5 == 0 else (500, 375)
                name = (f"{wnid}_{i}.JPEG" if split == "train"
                        else f"ILSVRC2012_val_{c * val_per_class + i + 1:08d}.JPEG")
                image_seed = int(np.random.SeedSequence([seed, c, i, int(split == "val")]).generate_state(1)[0])
                jobs.append((str(folder / name), image_seed, size))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write, jobs, chunksize=16))
    else:
        for job in jobs:
            _write(job)
    return {split: sum(1 for p, _, _ in jobs if f"/{split}/" in p) for split in ("train", "val")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--max-per-class", type=int, default=32)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    print(make_tree(args.out, args.classes, args.max_per_class, args.val_per_class,
                    workers=args.workers))


if __name__ == "__main__":
    main()
