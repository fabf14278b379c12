"""Two-view pretraining data loading: our FFCV pipeline against a torchvision
ImageFolder + PIL DataLoader with the same augmentation parameters.

One temporary ImageFolder of PNG images (smooth random colour images, so that blur and
jitter do real work) per size; the .beton is written from the same files through the
project's own path (barlow.data.sources.image_folder → barlow.data.convert.write_beton):
raw pixels at 32 px (as the project stores its 28 px datasets), ffcv-imagenet's
proportion mode (half JPEG q90, max side 500) at 128 px (the ImageFolder settings of
params.yaml), and again raw at 128 px to show what JPEG decoding costs.

  ours       barlow.data.loaders.pretrain_loader(views=paper_views(res)), numba ops
  baseline   torchvision.datasets.ImageFolder + DataLoader(num_workers = same),
             per view: RandomResizedCrop(res, scale (0.08, 1), bicubic) → flip p 0.5 →
             RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p 0.8) → RandomGrayscale 0.2 →
             RandomApply(GaussianBlur(kernel 23 at 224 px scaled to res, σ 0.1–2), p) →
             RandomSolarize(128, p) → ToTensor → Normalize, with (blur p, solarize p)
             = (1.0, 0.0) for view A and (0.1, 0.2) for view B, as the reference.

Both yield batches of two normalised float32 views, same batch size, same number of
workers; torch uses the same number of threads in the main process. Each loader's
first epoch is not timed (for ours it is numba's JIT compile, reported apart; for the
baseline it starts the worker processes, which then persist). Then epochs alternate
ours, baseline, ours, baseline, … and the median images/s of each is compared.

Run from the repository root:
    NUMBA_THREADING_LAYER=workqueue PYTHONPATH=src python benchmarks/bench_loader.py
"""

from __future__ import annotations

import os

# ffcv's OpenCV brings TBB; forking DataLoader workers after it has run warns and can
# hang unless numba uses its workqueue layer (see the ffcv notes). Set before numba loads.
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from barlow.data.convert import FfcvSettings, write_beton  # noqa: E402
from barlow.data.loaders import ViewSpec, paper_views, pretrain_loader  # noqa: E402
from barlow.data.sources import image_folder  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def make_image_folder(root: Path, n: int, side: int, classes: int = 10) -> None:
    """``n`` smooth random RGB PNGs of side ``side`` in ``classes`` class folders."""
    rng = np.random.default_rng(side)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for start in range(0, n, 256):
        count = min(256, n - start)
        coarse = torch.from_numpy(rng.integers(0, 256, (count, 3, side // 4, side // 4))
                                  .astype(np.float32))
        images = F.interpolate(coarse, size=(side, side), mode="bilinear").byte()
        for k, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
            i = start + k
            Image.fromarray(img).save(root / f"c{i % classes}" / f"{i:06d}.png")


class TwoViews:
    """Two independent draws of the reference's view A and view B transforms."""

    def __init__(self, view_a: ViewSpec, view_b: ViewSpec):
        self.a, self.b = self.compose(view_a), self.compose(view_b)

    @staticmethod
    def compose(v: ViewSpec) -> T.Compose:
        # The reference blurs with a 23-tap kernel at 224 px; keep it odd, scaled to res.
        kernel = max(3, int(round(23 * v.resolution / 224)) | 1)
        return T.Compose([
            T.RandomResizedCrop(v.resolution, scale=v.crop_scale, ratio=v.crop_ratio,
                                interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=v.flip_p),
            T.RandomApply([T.ColorJitter(v.brightness, v.contrast, v.saturation, v.hue)],
                          p=v.jitter_p),
            T.RandomGrayscale(p=v.grayscale_p),
            T.RandomApply([T.GaussianBlur(kernel, sigma=v.blur_sigma)], p=v.blur_p),
            T.RandomSolarize(128, p=v.solarize_p),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ])

    def __call__(self, img):
        return self.a(img), self.b(img)


def baseline_loader(root: Path, views, batch: int, workers: int):
    dataset = ImageFolder(str(root), transform=TwoViews(*views))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True,
                                       num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0, prefetch_factor=4)


def epoch(loader, ours: bool) -> tuple[int, float]:
    """(images, seconds) of one pass; both views of every batch are touched."""
    start, count = time.perf_counter(), 0
    for batch in loader:
        a, b = batch if ours else batch[0]
        count += a.shape[0]
    return count, time.perf_counter() - start


def run_size(tmp: Path, resolution: int, stored: int, n: int, settings: FfcvSettings,
             batch: int, workers: int, epochs: int) -> dict[str, float]:
    root = tmp / f"folder{stored}"
    if not root.exists():
        make_image_folder(root, n, stored)
    beton = tmp / f"img{stored}-{settings.write_mode}.beton"
    write_beton(image_folder(root, "train", None, skip_bad=False, workers=workers), beton,
                settings, workers)
    views = paper_views(resolution)
    ours = pretrain_loader(str(beton), batch, workers, views, MEAN, STD, seed=0)
    start = time.perf_counter()
    epoch(ours, True)                                   # numba compiles the pipeline
    compile_s = time.perf_counter() - start
    base = baseline_loader(root, views, batch, workers)
    first_base = epoch(base, False)                     # starts the workers
    rates: dict[str, list[float]] = {"ours": [], "baseline": []}
    for _ in range(epochs):
        count, sec = epoch(ours, True)
        rates["ours"].append(count / sec)
        count, sec = epoch(base, False)
        rates["baseline"].append(count / sec)
    del base
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"compile_s": compile_s, "first_base_s": first_base[1], **med,
            "ratio": med["ours"] / med["baseline"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loader")
    parser.add_argument("--small", type=int, default=4096, help="images at 32 px")
    parser.add_argument("--large", type=int, default=1024, help="images at 128 px")
    args = parser.parse_args()
    torch.set_num_threads(args.workers)
    sizes = [  # (crop px, stored px, images, ffcv settings, goal)
        (32, 32, args.small, FfcvSettings(write_mode="raw"), 10.0),
        (96, 128, args.large, FfcvSettings(write_mode="proportion", max_resolution=500,
                                           compress_probability=0.5, jpeg_quality=90), 3.0),
        # the same 96 px crops from raw-stored pixels: how much JPEG decoding costs ours
        (96, 128, args.large, FfcvSettings(write_mode="raw"), 3.0),
    ]
    print(f"two views per image (paper's A/B), batch {args.batch}, {args.workers} workers, "
          f"median of {args.epochs} interleaved epochs; images/s")
    print(f"{'crop':>5} {'stored':>6} {'images':>6} {'ffcv mode':>10} {'ours':>8} "
          f"{'baseline':>8} {'ratio':>6} {'goal':>5} {'verdict':>7} {'numba JIT s':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for resolution, stored, n, settings, goal in sizes:
            r = run_size(Path(tmp), resolution, stored, n, settings, args.batch,
                         args.workers, args.epochs)
            verdict = "meets" if r["ratio"] >= goal else "misses"
            print(f"{resolution:>5} {stored:>6} {n:>6} {settings.write_mode:>10} "
                  f"{r['ours']:>8.0f} {r['baseline']:>8.0f} {r['ratio']:>6.2f} "
                  f"{goal:>5.0f}× {verdict:>7} {r['compile_s']:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
