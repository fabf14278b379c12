"""Where the host time of the paper's two 224-px views goes: decode + crop/resize, flip,
colour jitter, grayscale, blur, solarise.

One proportion .beton (ffcv-imagenet's settings: half JPEG q90, max side 500) of
ImageNet-shaped JPEGs (benchmarks/imagenet_like.py, 500×375 px); one
``pretrain_loader`` per cumulative pipeline, each adding the next operation of the
paper's views (an operation with probability 0 is left out of the pipeline, so the
first row is decode + RandomResizedCrop alone). The loaders run on the CPU with the
same workers; after each one's first (JIT) epoch, epochs alternate between the
pipelines round by round, and the median pairs/s of each is kept, so load on a shared
machine hits every row alike. The marginal cost of an operation is the difference of
per-pair times between its row and the row before.

    NUMBA_THREADING_LAYER=workqueue PYTHONPATH=src python benchmarks/bench_view_ops.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


from barlow.data.convert import FfcvSettings, read_manifest, write_beton
from barlow.data.loaders import paper_views, pretrain_loader
from barlow.data.sources import image_folder
from barlow.data.convert import normalisation

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imagenet_like  # noqa: E402

#: Cumulative pipelines: (name, what to switch off from the paper's views).
STAGES = [
    ("decode + crop/resize", dict(flip_p=0, jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0)),
    ("+ flip", dict(jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0)),
    ("+ colour jitter", dict(grayscale_p=0, blur_p=0, solarize_p=0)),
    ("+ grayscale", dict(blur_p=0, solarize_p=0)),
    ("+ blur", dict(solarize_p=0)),
    ("+ solarise (the paper's views)", {}),
]


def views_without(resolution: int, off: dict):
    view_a, view_b = paper_views(resolution)
    return replace(view_a, **off), replace(view_b, **off)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="JPEGs in the .beton")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per pipeline")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        classes = 8
        imagenet_like.make_tree(tmp / "tree", classes, args.images // classes, 0,
                                workers=args.workers)
        source = image_folder(tmp / "tree" / "train", "train", None, False, args.workers)
        beton = tmp / "train.beton"
        write_beton(source, beton, FfcvSettings(write_mode="proportion", max_resolution=500,
                                                compress_probability=0.5, jpeg_quality=90),
                    args.workers)
        mean, std = normalisation(read_manifest(beton))
        loaders = []
        for name, off in STAGES:
            loader = pretrain_loader(str(beton), args.batch, args.workers,
                                     views_without(args.resolution, off), mean, std, seed=0)
            start = time.perf_counter()
            for _ in loader:  # numba compiles the pipeline
                pass
            print(f"{name}: first epoch (JIT) {time.perf_counter() - start:.1f} s", flush=True)
            loaders.append(loader)
        rates = [[] for _ in loaders]
        for _ in range(args.rounds):
            for i, loader in enumerate(loaders):
                start, pairs = time.perf_counter(), 0
                for y1, _ in loader:
                    pairs += y1.shape[0]
                rates[i].append(pairs / (time.perf_counter() - start))

    print(f"\n{args.images} JPEGs (500x375, proportion .beton), {args.resolution} px, "
          f"{args.workers} worker(s), batch {args.batch}, median of {args.rounds} epochs")
    print(f"{'pipeline':34s} {'pairs/s':>9s} {'ms/pair':>8s} {'marginal ms':>12s} {'share':>6s}")
    per_pair = [1e3 / statistics.median(r) for r in rates]
    total = per_pair[-1]
    for i, (name, _) in enumerate(STAGES):
        marginal = per_pair[i] - (per_pair[i - 1] if i else 0.0)
        print(f"{name:34s} {1e3 / per_pair[i]:9.1f} {per_pair[i]:8.2f} {marginal:12.2f} "
              f"{marginal / total:6.1%}")
    print(f"per worker: {1e3 / total / args.workers:.1f} pairs/s with every operation")


if __name__ == "__main__":
    main()
