"""Where the host time of the paper's two 224-px views goes: decode + crop/resize, flip,
colour jitter, grayscale, blur, solarise.

One proportion .beton (ffcv-imagenet's settings: half JPEG q90, max side 500) of
ImageNet-shaped JPEGs (benchmarks/imagenet_like.py, 500×375 px); one
``pretrain_loader`` per cumulative pipeline, each adding the next operation of the
paper's views (an operation with probability 0 is left out of the pipeline, so the
first row is decode + RandomResizedCrop alone). The loaders run on the CPU with the
same workers; after each one's first (JIT) epoch, epochs alternate between the
pipelines round by round (benchmarks/harness.py), and the median pairs/s of each is
kept, so load on a shared machine hits every row alike. The marginal cost of an operation is the difference of
per-pair times between its row and the row before.

Two more rows time ``colour_ops_on="device"`` (barlow.data.loaders): the host side
alone (decode, crop, flip and the colour parameters, what a GPU's host would do; the
loader's ``finish`` step switched off), and the same with the colour ops run as tensor
ops here on the CPU (torch with ``--workers`` threads), whose own time per batch is
printed too. ``--max-resolution`` sets the stored images' longest side (the decode's
cost follows it); further values time the decode-bound rows again on a .beton of the
same JPEGs at each size, in the same rounds, as speed-ups against the first.

    NUMBA_THREADING_LAYER=workqueue PYTHONPATH=src python benchmarks/bench_view_ops.py
    ... bench_view_ops.py --max-resolution 500 320   # the decode at a smaller stored size
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from barlow.data.convert import FfcvSettings, read_manifest, write_beton
from barlow.data.loaders import paper_views, pretrain_loader
from barlow.data.sources import image_folder
from barlow.data.convert import normalisation
from harness import compare, parser, report

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
#: The paper's views with the colour ops off the host: (name, run them here on the CPU).
DEVICE_ROWS = [
    ("colour ops on the device: host side", False),
    ("colour ops as tensor ops on this CPU", True),
]


def views_without(resolution: int, off: dict):
    view_a, view_b = paper_views(resolution)
    return replace(view_a, **off), replace(view_b, **off)


def main() -> None:
    p = parser(__doc__, rounds=3)
    p.add_argument("--images", type=int, default=512, help="JPEGs in the .beton")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-resolution", type=int, nargs="+", default=[500],
                        help="data.ffcv.max_resolution of the .beton (ffcv-imagenet: 500); "
                             "each further value adds the decode-bound rows (decode + "
                             "crop/resize, and the host side with the colour ops on the "
                             "device) for a .beton of the same JPEGs at that size, timed in "
                             "the same rounds")
    p.add_argument("--decode-only", action="store_true",
                        help="time the first row alone (decode + crop/resize)")
    args = p.parse_args()
    torch.set_num_threads(args.workers)
    base_res, *other_res = args.max_resolution
    stages = STAGES[:1] if args.decode_only else STAGES
    device_rows = [] if args.decode_only else DEVICE_ROWS

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        classes = 8
        imagenet_like.make_tree(tmp / "tree", classes, args.images // classes, 0,
                                workers=args.workers)
        source = image_folder(tmp / "tree" / "train", "train", None, False, args.workers)

        def beton_at(max_resolution: int) -> tuple[str, tuple]:
            beton = tmp / f"train_{max_resolution}.beton"
            write_beton(source, beton, FfcvSettings(write_mode="proportion",
                                                    max_resolution=max_resolution,
                                                    compress_probability=0.5,
                                                    jpeg_quality=90),
                        args.workers)
            return str(beton), normalisation(read_manifest(beton))

        def host_loader(beton: str, mean_std: tuple, off: dict):
            return pretrain_loader(beton, args.batch, args.workers,
                                   views_without(args.resolution, off), *mean_std, seed=0)

        def device_loader(beton: str, mean_std: tuple, run_here: bool):
            loader = pretrain_loader(beton, args.batch, args.workers,
                                     paper_views(args.resolution), *mean_std, seed=0,
                                     colour_ops_on="device")
            loader.finish = timed(loader.finish) if run_here else None
            return loader

        beton, mean_std = beton_at(base_res)
        rows = [(name, host_loader(beton, mean_std, off)) for name, off in stages]
        rows += [(name, device_loader(beton, mean_std, here)) for name, here in device_rows]
        # The decode-bound rows again at each further size, to be read against the base's:
        # (index of the base's row, its name), in the order they are appended below.
        compared = [(0, stages[0][0])] + [(len(stages), name) for name, _ in device_rows[:1]]
        extra = []  # (size, index of its first row)
        for res in other_res:
            beton, mean_std = beton_at(res)
            extra.append((res, len(rows)))
            rows.append((f"{stages[0][0]} @ {res}", host_loader(beton, mean_std, stages[0][1])))
            if device_rows:
                name, here = device_rows[0]
                rows.append((f"{name} @ {res}", device_loader(beton, mean_std, here)))
        # The warm-up epoch is numba compiling each pipeline; a batch is (view A, view B[,
        # their colour params]).
        results = compare({name: lambda loader=loader: sum(b[0].shape[0] for b in loader)
                           for name, loader in rows}, args.rounds, args.warmup)

    print(f"\n{args.images} JPEGs (500x375, proportion .beton, max side {base_res}), "
          f"{args.resolution} px, {args.workers} worker(s), batch {args.batch}")
    report(results, "pairs/s", json_path=args.json, args=vars(args))
    print(f"\n{'pipeline':40s} {'pairs/s':>9s} {'ms/pair':>8s} {'marginal ms':>12s} {'share':>6s}")
    per_pair = [1e3 / r.rate for r in results.values()]
    total = per_pair[len(stages) - 1]
    for i, (name, _) in enumerate(stages):
        marginal = per_pair[i] - (per_pair[i - 1] if i else 0.0)
        print(f"{name:40s} {1e3 / per_pair[i]:9.1f} {per_pair[i]:8.2f} {marginal:12.2f} "
              f"{marginal / total:6.1%}")
    for i, (name, _) in enumerate(device_rows, start=len(stages)):
        print(f"{name:40s} {1e3 / per_pair[i]:9.1f} {per_pair[i]:8.2f}")
    print(f"per worker: {1e3 / total / args.workers:.1f} pairs/s with every operation on the host")
    if device_rows:
        print(f"per worker: {1e3 / per_pair[len(stages)] / args.workers:.1f} pairs/s, host side "
              "with the colour ops on the device")
        ms = sorted(FINISH_MS)[len(FINISH_MS) // 2]
        print(f"tensor colour ops + normalisation on this CPU: {ms:.1f} ms per batch of "
              f"{args.batch} pairs (median of {len(FINISH_MS)}), {ms / args.batch:.2f} ms/pair")
    for res, first in extra:
        print(f"\nmax side {res} against {base_res}: {'pairs/s':>9s} {'ms/pair':>8s} "
              f"{'speed-up':>9s}")
        for offset, (base_row, name) in enumerate(compared):
            i = first + offset
            print(f"{name:40s} {1e3 / per_pair[i]:9.1f} {per_pair[i]:8.2f} "
                  f"{per_pair[base_row] / per_pair[i]:8.2f}x")


FINISH_MS: list[float] = []


def timed(finish):
    """``finish`` (the loader's tensor colour ops) with its time per batch recorded."""
    def run(batch):
        start = time.perf_counter()
        out = finish(batch)
        FINISH_MS.append(1e3 * (time.perf_counter() - start))
        return out
    return run


if __name__ == "__main__":
    main()
