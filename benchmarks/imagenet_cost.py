"""What the ImageNet path costs, computed from figures the repository records: the
`## Cost` table of docs/imagenet.md is this script's output (tests/test_doc_pages.py
checks that the page holds it).

    PYTHONPATH=src python benchmarks/imagenet_cost.py                 # the table
    PYTHONPATH=src python benchmarks/imagenet_cost.py --measure-beton  # record the sizes

Inputs, each named in the table's last column:
- results/gpu_check-h200-*.json (`bash benchmarks/gpu_check.sh` on one H200): the
  pretraining step's pairs/s (ResNet-50, 224 px, bf16, batch 256, compute only) and the
  loader's pairs/s per host core with every view operation on the host.
- results/bench_view_ops-maxres-*.log (`bench_view_ops.py --max-resolution 500 320`):
  the host side of `augment.colour_ops_on: device` per core, stored at max side 500
  and 320.
- results/beton_size.json (``--measure-beton``): bytes per image of a train .beton at
  ffcv-imagenet's settings (proportion, compress_probability 0.5, quality 90) at
  max_resolution 500 and 320, written by the project's own writer from a synthetic
  tree (500×375 and 375×500 JPEGs of noisy colour fields).
- the convert stage's memory (benchmarks/README.md, bench_convert): ≈ 1 GB for its
  imports plus ≈ 0.3 KB of bookkeeping per image.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BETON_SIZE = RESULTS / "beton_size.json"

IMAGENET_TRAIN = 1_281_167
IMAGENET_VAL = 50_000
EPOCHS = 1000                  # the paper's
# The convert stage's memory, bench_convert at N = 5,250 and 4N = 20,250 images
# (benchmarks/README.md): the process after its imports, and what grows per image.
CONVERT_BASE_GB = 1.0
CONVERT_KB_PER_IMAGE = 0.3


def gpu_check() -> tuple[str, dict]:
    path = sorted(RESULTS.glob("gpu_check-h200-*.json"))[-1]
    return path.name, json.loads(path.read_text())


def view_ops() -> tuple[str, dict[int, float]]:
    """max side → pairs/s of one core, host side of colour_ops_on: device."""
    path = sorted(RESULTS.glob("bench_view_ops-maxres-*.log"))[-1]
    text = path.read_text()
    at_500 = float(re.search(r"^colour ops on the device: host side\s+([\d.]+)", text,
                             re.M).group(1))
    tail = text[text.index("max side 320 against 500"):]
    at_320 = float(re.search(r"^colour ops on the device: host side\s+([\d.]+)", tail,
                             re.M).group(1))
    return path.name, {500: at_500, 320: at_320}


def table() -> str:
    gpu_name, gpu = gpu_check()
    ops_name, host_side = view_ops()
    sizes = json.loads(BETON_SIZE.read_text())
    rate = gpu["step"]["pairs_per_s"]
    per_core_host = gpu["loader"]["pairs_per_s_per_core_8_cores"]
    gpu_hours = IMAGENET_TRAIN * EPOCHS / rate / 3600
    bpi = {int(k): v for k, v in sizes["bytes_per_image"].items()}
    src_gpu = f"`benchmarks/results/{gpu_name}`"
    src_ops = f"`benchmarks/results/{ops_name}` (one AMD EPYC core)"
    src_size = (f"`benchmarks/results/{BETON_SIZE.name}`: {sizes['images']} synthetic"
                " 500×375 JPEGs, scaled by image count")
    rows = [
        ("pretraining, 1000 epochs of 1,281,167 images",
         f"{gpu_hours:,.0f} GPU-hours at {rate:,.0f} pairs/s (one H200, batch 256,"
         f" compute only); {gpu_hours / 8:,.0f} h on 8 such GPUs at that rate each",
         src_gpu),
        ("host cores per GPU, every view operation on the host",
         f"{rate / per_core_host:.1f} (at {per_core_host:.1f} pairs/s per core)", src_gpu),
        ("host cores per GPU, `augment.colour_ops_on: device` (the paper switch)",
         f"{rate / host_side[500]:.1f} at max side 500 ({host_side[500]:.0f} pairs/s per"
         f" core); {rate / host_side[320]:.1f} at 320 ({host_side[320]:,.0f})", src_ops),
    ]
    for side in sorted(bpi, reverse=True):
        train_gb = bpi[side] * IMAGENET_TRAIN / 1e9
        val_gb = bpi[side] * IMAGENET_VAL / 1e9
        rows.append((f"`data/ffcv/*.beton`, `data.ffcv.max_resolution: {side}`",
                     f"train {train_gb:,.0f} GB + val {val_gb:,.0f} GB"
                     f" ({bpi[side] / 1e3:,.0f} KB per image)", src_size))
    top = max(bpi)
    convert_gb = (CONVERT_BASE_GB
                  + CONVERT_KB_PER_IMAGE * 1e3 * (IMAGENET_TRAIN + IMAGENET_VAL) / 1e9)
    rows += [
        ("disk read rate, .beton not in the page cache",
         f"{bpi[top] * rate / 1e6:,.0f} MB/s per GPU at max side {top}", "the rows above"),
        ("host RAM, convert stage",
         f"{convert_gb:.1f} GB ({CONVERT_BASE_GB:.0f} GB of imports, {CONVERT_KB_PER_IMAGE} KB per image)",
         "benchmarks/README.md, bench_convert"),
        ("host RAM, page cache holding the train .beton",
         f"{bpi[top] * IMAGENET_TRAIN / 1e9:,.0f} GB at max side {top},"
         f" {bpi[min(bpi)] * IMAGENET_TRAIN / 1e9:,.0f} GB at {min(bpi)}"
         " (optional: without it, the read rate above)", "the rows above"),
    ]
    lines = ["| what | cost | computed from |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def _write_jpeg(job: tuple[str, int]) -> None:
    """One 500-px JPEG: a bilinear-upsampled 1/16-scale random colour field plus noise
    (so files are about ImageNet-sized, not trivially compressible), seeded by ``job``."""
    import numpy as np
    from PIL import Image

    path, seed = job
    rng = np.random.default_rng(seed)
    h, w = (375, 500) if seed % 4 else (500, 375)
    coarse = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8))
    image = np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.int16)
    image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(path, quality=90)


def _noisy_tree(root: Path, images: int, classes: int, workers: int) -> None:
    """``root/train/<class>/*.JPEG``: ``images`` files, image i in class i mod classes."""
    from concurrent.futures import ProcessPoolExecutor

    for c in range(classes):
        (root / "train" / f"n{c:08d}").mkdir(parents=True)
    jobs = [(str(root / "train" / f"n{i % classes:08d}" / f"train_{i:08d}.JPEG"), i)
            for i in range(images)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_jpeg, jobs, chunksize=64))


def measure_beton(images: int, workers: int) -> None:
    """Write a synthetic tree of noisy colour fields, convert it at max side 500 and 320
    with the project's writer, and record the bytes per image."""
    from barlow.data import sources
    from barlow.data.convert import FfcvSettings, write_beton

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tree"
        _noisy_tree(root, images, 10, workers)
        train = sources.image_folder(root / "train", "train", None, False, workers)
        for side in (500, 320):
            beton = Path(tmp) / f"train-{side}.beton"
            write_beton(train, beton, FfcvSettings("proportion", side, 0.5, 90), workers)
            out[str(side)] = round(beton.stat().st_size / images, 1)
            print(f"max side {side}: {out[str(side)] / 1e3:.1f} KB per image")
        shutil.rmtree(root)
    BETON_SIZE.write_text(json.dumps({
        "images": images, "tree": "_noisy_tree: 500x375 / 375x500 JPEGs,"
        " quality 90", "settings": "proportion, compress_probability 0.5, quality 90",
        "bytes_per_image": out}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure-beton", action="store_true",
                        help=f"write {BETON_SIZE.relative_to(HERE.parent)} first")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.measure_beton:
        measure_beton(args.images, args.workers)
    print(table(), end="")


if __name__ == "__main__":
    main()
