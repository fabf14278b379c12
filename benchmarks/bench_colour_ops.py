"""The colour operations of the paper's two views at 224 px: the numba kernels (the
host path, ffcv's compiler flags) against the batched tensor ops
(barlow.augment.apply_colour_ops) on this CPU, same images and same draws; ms per
batch of pairs with the same number of threads (the first call of each compiles). The
loader around them is not timed (bench_view_ops.py times whole pipelines).

    NUMBA_THREADING_LAYER=workqueue PYTHONPATH=src python benchmarks/bench_colour_ops.py
"""

from __future__ import annotations

import itertools

import numba
import numpy as np
import torch
import torch.nn.functional as F

from barlow.augment import COLOUR_PARAMS, apply_colour_ops
from barlow.data.loaders import colour_params, paper_views, view_operations
from harness import compare, parser, report


def smooth_images(n: int, side: int) -> np.ndarray:
    """Random colour images, blurred so that jitter and blur see natural-ish statistics."""
    coarse = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 3, side // 8, side // 8))
                              .astype(np.float32))
    return F.interpolate(coarse, size=(side, side), mode="bilinear").byte().permute(0, 2, 3, 1).numpy()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    images = smooth_images(args.batch, args.resolution)
    hosts, devices = [], []
    for index, view in enumerate(paper_views(args.resolution)):
        ops = view_operations(view, 0, index)[2:]  # after crop and flip
        hosts.append([(numba.njit(fastmath=True, nogil=True, error_model="numpy", parallel=True)(
            op.generate_code()), op.needs_scratch) for op in ops])
        params = colour_params(view, 0, index)
        devices.append((numba.njit(params.generate_code()), params.solarize.threshold))
    # Each call draws for the next batch of sample indices: other draws every time.
    batches = {name: itertools.count() for name in ("host", "device")}

    def indices(name: str) -> np.ndarray:
        return np.arange(args.batch, dtype=np.uint64) + args.batch * next(batches[name])

    def host() -> int:
        drawn = indices("host")
        for code in hosts:
            batch = images.copy()
            for run, scratch in code:
                run(batch, np.empty(batch.shape, np.float32) if scratch else None, drawn)
        return args.batch

    def device() -> int:
        drawn = indices("device")
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        for run, threshold in devices:
            q = run(None, np.empty((args.batch, COLOUR_PARAMS)), drawn)
            apply_colour_ops(x, torch.from_numpy(q), threshold)
        return args.batch

    print(f"colour ops of both views, {args.resolution} px, batch {args.batch} pairs, "
          f"{args.threads} thread(s)")
    results = compare({"numba kernels (host)": host, "tensor ops (this CPU)": device},
                      args.rounds, args.warmup)
    report(results, "pairs/s", baseline="numba kernels (host)", json_path=args.json,
           args=vars(args))


if __name__ == "__main__":
    main()
