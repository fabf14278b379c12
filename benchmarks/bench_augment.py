"""Two Barlow Twins views per image: all augmentations as numba FFCV operations versus
crop + flip in FFCV and the rest as batched torch operations with per-sample parameters.

Both variants read the same raw-stored .beton, produce two normalised float32 views
of every image and use the same number of threads; the first epoch (numba compile) is
not timed. Run from the repository root:

    NUMBA_THREADING_LAYER=workqueue PYTHONPATH=src python benchmarks/bench_augment.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline import PipelineSpec
from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage
from ffcv.writer import DatasetWriter

from barlow.data.loaders import CROP_RATIO, ViewSpec, paper_views, pretrain_loader

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1) * 255
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1) * 255
LUMA = torch.tensor((0.299, 0.587, 0.114)).view(1, 3, 1, 1)


class Noise:
    """Smooth random colour images (noise is blurred so that blur and jitter do real work)."""

    def __init__(self, n: int, side: int):
        rng = np.random.default_rng(0)
        coarse = torch.from_numpy(rng.integers(0, 256, (n, 3, side // 4, side // 4)).astype(np.float32))
        self.images = F.interpolate(coarse, size=(side, side), mode="bilinear").byte().permute(0, 2, 3, 1).numpy()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], 0


def write_beton(path: Path, n: int, side: int) -> str:
    DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=2).from_indexed_dataset(Noise(n, side))
    return str(path)


# --- variant B: batched torch operations, parameters drawn per sample ------------------

def grey(x: torch.Tensor) -> torch.Tensor:
    return (x * LUMA).sum(1, keepdim=True)


def rotate_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-sample hue rotation of a float (B, 3, H, W) batch in [0, 255]."""
    hi, _ = x.max(1, keepdim=True)
    d = hi - x.min(1, keepdim=True).values
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    safe = torch.where(d > 0, d, torch.ones_like(d))
    h = torch.where(hi == r, (g - b) / safe,
                    torch.where(hi == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h6 = torch.remainder(h + 6 * shift.view(-1, 1, 1, 1), 6)
    n = torch.tensor((5.0, 3.0, 1.0)).view(1, 3, 1, 1)
    k = torch.remainder(n + h6, 6)
    return hi - d * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def jitter(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """ColorJitter(0.4, 0.4, 0.2, 0.1) with probability p, random order per sample."""
    batch = x.shape[0]
    apply = torch.rand(batch, generator=gen) < p
    factors = torch.rand(batch, 3, generator=gen) * torch.tensor((0.8, 0.8, 0.4)) + torch.tensor((0.6, 0.6, 0.8))
    hue = (torch.rand(batch, generator=gen) * 2 - 1) * 0.1
    order = torch.argsort(torch.rand(batch, 4, generator=gen), dim=1)
    for position in range(4):
        for step in range(4):
            m = apply & (order[:, position] == step)
            if not m.any():
                continue
            y, f = x[m], factors[m].view(-1, 3, 1, 1)
            if step == 0:
                y = y * f[:, 0:1]
            elif step == 1:
                y = f[:, 1:2] * y + (1 - f[:, 1:2]) * grey(y).mean((2, 3), keepdim=True)
            elif step == 2:
                y = f[:, 2:3] * y + (1 - f[:, 2:3]) * grey(y)
            else:
                y = rotate_hue(y, hue[m])
            x[m] = y.clamp_(0, 255)
    return x


def blur(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian blur, σ ~ U(0.1, 2), 13 taps, one kernel per sample (grouped conv)."""
    batch, channels, height, width = x.shape
    apply = torch.rand(batch, generator=gen) < p
    if not apply.any():
        return x
    y = x[apply]
    sigma = torch.rand(y.shape[0], generator=gen) * 1.9 + 0.1
    taps = torch.arange(-6, 7, dtype=torch.float32)
    w = torch.exp(-taps.view(1, -1) ** 2 / (2 * sigma.view(-1, 1) ** 2))
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(channels, 0)
    z = y.reshape(1, -1, height, width)
    z = F.conv2d(F.pad(z, (6, 6, 0, 0), mode="reflect"), w.view(-1, 1, 1, 13), groups=z.shape[1])
    z = F.conv2d(F.pad(z, (0, 0, 6, 6), mode="reflect"), w.view(-1, 1, 13, 1), groups=z.shape[1])
    x[apply] = z.view_as(y)
    return x


def torch_view(images: torch.Tensor, view: ViewSpec, gen: torch.Generator) -> torch.Tensor:
    """uint8 NCHW (already cropped and flipped) → normalised float32 view."""
    x = jitter(images.float(), view.jitter_p, gen)
    grey_mask = torch.rand(x.shape[0], generator=gen) < view.grayscale_p
    x[grey_mask] = grey(x[grey_mask]).expand(-1, 3, -1, -1)
    x = blur(x, view.blur_p, gen).round_()
    solar = (torch.rand(x.shape[0], generator=gen) < view.solarize_p).view(-1, 1, 1, 1)
    x = torch.where(solar & (x >= 128), 255 - x, x)
    return ((x - MEAN) / STD).contiguous(memory_format=torch.channels_last)


def crop_flip_loader(beton: str, batch: int, workers: int, resolution: int) -> Loader:
    def spec():
        return PipelineSpec("image", RandomResizedCropRGBImageDecoder((resolution, resolution), ratio=CROP_RATIO),
                            [RandomHorizontalFlip(0.5), ToTensor(), ToTorchImage()])
    return Loader(beton, batch_size=batch, num_workers=workers, order=OrderOption.RANDOM, seed=0,
                  pipelines={"image": None, "label": None, "a": spec(), "b": spec()})


def images_per_second(loader, step=None, epochs: int = 2) -> float:
    for batch in loader:  # compile, warm caches
        if step:
            step(*batch)
    start, count = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in loader:
            if step:
                step(*batch)
            count += batch[0].shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.workers)
    gen = torch.Generator().manual_seed(0)
    print(f"two views per image, batch {args.batch}, {args.workers} threads; images/s")
    print(f"{'crop px':>8} {'stored px':>9} {'numba ops':>10} {'torch ops':>10} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for resolution, stored, n in ((32, 32, 8192), (96, 128, 2048)):
            beton = write_beton(Path(tmp) / f"{stored}.beton", n, stored)
            view_a, view_b = paper_views(resolution)
            numba = images_per_second(pretrain_loader(beton, args.batch, args.workers, (view_a, view_b),
                                                      (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), seed=0))

            def step(a, b):
                torch_view(a, view_a, gen), torch_view(b, view_b, gen)

            torch_rate = images_per_second(crop_flip_loader(beton, args.batch, args.workers, resolution), step)
            print(f"{resolution:>8} {stored:>9} {numba:>10.0f} {torch_rate:>10.0f} {numba / torch_rate:>6.2f}")


if __name__ == "__main__":
    main()
