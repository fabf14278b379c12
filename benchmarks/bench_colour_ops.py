"""The colour operations of the paper's two views at 224 px: the numba kernels (the
host path, ffcv's compiler flags) against the batched tensor ops
(barlow.augment.apply_colour_ops) on this CPU, same images and same draws; ms per
batch of pairs with the same number of threads. The loader around them is not timed
(bench_view_ops.py times whole pipelines).

    NUMBA_THREADING_LAYER=workqueue PYTHONPATH=src python benchmarks/bench_colour_ops.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np
import torch
import torch.nn.functional as F

from barlow.augment import COLOUR_PARAMS, apply_colour_ops
from barlow.data.loaders import colour_params, paper_views, view_operations


def smooth_images(n: int, side: int) -> np.ndarray:
    """Random colour images, blurred so that jitter and blur see natural-ish statistics."""
    coarse = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 3, side // 8, side // 8))
                              .astype(np.float32))
    return F.interpolate(coarse, size=(side, side), mode="bilinear").byte().permute(0, 2, 3, 1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    images = smooth_images(args.batch, args.resolution)
    rows = {"numba kernels (host)": [], "tensor ops (this CPU)": []}
    hosts, devices = [], []
    for index, view in enumerate(paper_views(args.resolution)):
        ops = view_operations(view, 0, index)[2:]  # after crop and flip
        hosts.append([(numba.njit(fastmath=True, nogil=True, error_model="numpy", parallel=True)(
            op.generate_code()), op.needs_scratch) for op in ops])
        params = colour_params(view, 0, index)
        devices.append((numba.njit(params.generate_code()), params.solarize.threshold))
    for round_ in range(args.rounds + 1):  # round 0 compiles
        for offset in range(2):
            indices = np.arange(args.batch, dtype=np.uint64) + args.batch * (round_ + offset)
            start = time.perf_counter()
            for code in hosts:
                batch = images.copy()
                for run, scratch in code:
                    run(batch, np.empty(batch.shape, np.float32) if scratch else None, indices)
            host_ms = 1e3 * (time.perf_counter() - start)
            start = time.perf_counter()
            x = torch.from_numpy(images).permute(0, 3, 1, 2)
            for run, threshold in devices:
                q = run(None, np.empty((args.batch, COLOUR_PARAMS)), indices)
                apply_colour_ops(x, torch.from_numpy(q), threshold)
            device_ms = 1e3 * (time.perf_counter() - start)
            if round_:
                rows["numba kernels (host)"].append(host_ms)
                rows["tensor ops (this CPU)"].append(device_ms)
    print(f"colour ops of both views, {args.resolution} px, batch {args.batch} pairs, "
          f"{args.threads} thread(s), median of {2 * args.rounds} batches")
    for name, times in rows.items():
        ms = statistics.median(times)
        print(f"{name:24s} {ms:8.1f} ms/batch {ms / args.batch:6.2f} ms/pair "
              f"{1e3 * args.batch / ms / args.threads:7.1f} pairs/s per thread")


if __name__ == "__main__":
    main()
