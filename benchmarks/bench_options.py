"""Which pretraining-step options pay on this CPU: each variant of our step against the
plain one (fp32, NCHW), side by side.

  plain          fp32, NCHW tensors                        (the baseline of the ratios)
  channels_last  fp32, model and inputs channels_last      (params: pretrain.channels_last)
  bf16           channels_last + torch.autocast(cpu, bf16) (params: pretrain.precision)
  compile        channels_last + torch.compile(model)      (params: pretrain.compile)

The step is barlow.train's: BarlowTwins(small_resnet, Projector), the fp32 loss
distributed_barlow_twins_loss, AdamW over param_groups (the quick profile's optimiser),
zero_grad(set_to_none=True). Random inputs, no data loading, the same initial weights
for every variant. Variants alternate in blocks (plain ×k, channels_last ×k, …, plain
×k, …) and the medians of per-step time are compared, so load from other processes
shifts all of them alike. Compilation (torch.compile's first steps) is timed apart.

Run from the repository root:
    PYTHONPATH=src python benchmarks/bench_options.py [--variants plain,bf16] [--batch 256]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch

from barlow import distributed as dist
from barlow.config import ModelConfig
from barlow.optim import build_optimizer, param_groups
from barlow.train import build_model

LAMBD = 0.0051
VARIANTS = ("plain", "channels_last", "bf16", "compile")


def make_step(base: torch.nn.Module, variant: str) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """One optimiser step of a copy of BASE in the given variant; returns the loss."""
    last = variant != "plain"
    fmt = torch.channels_last if last else torch.contiguous_format
    model = copy.deepcopy(base).to(memory_format=fmt)
    opt = build_optimizer("adamw", param_groups(model, 1e-2))
    for group in opt.param_groups:
        group["lr"] = 2e-3
    net = torch.compile(model) if variant == "compile" else model
    amp = variant == "bf16"

    def step(y1: torch.Tensor, y2: torch.Tensor) -> float:
        y1, y2 = y1.contiguous(memory_format=fmt), y2.contiguous(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            z1, z2 = net(y1, y2)
        terms = dist.distributed_barlow_twins_loss(z1.float(), z2.float(), LAMBD)
        opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        opt.step()
        return float(terms.loss.detach())

    model.train()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)} (plain is always run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--res", type=int, default=28)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--projector", default="512-512-512")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=3)
    args = parser.parse_args()
    chosen = ["plain"] + [v for v in args.variants.split(",") if v and v != "plain"]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = build_model(ModelConfig(arch="small_resnet", width=args.width, layers=(1, 1, 1, 1),
                                   projector=args.projector, projector_bn=True))
    gen = torch.Generator().manual_seed(0)
    y1, y2 = (torch.randn(args.batch, 3, args.res, args.res, generator=gen) for _ in range(2))

    steps, first, warm_s = {}, {}, {}
    for variant in chosen:
        steps[variant] = make_step(base, variant)
        start = time.perf_counter()
        first[variant] = steps[variant](y1, y2)   # same weights: first losses comparable
        steps[variant](y1, y2)
        warm_s[variant] = time.perf_counter() - start
    times: dict[str, list[float]] = {v: [] for v in chosen}
    for _ in range(args.rounds):
        for variant in chosen:
            start = time.perf_counter()
            for _ in range(args.block):
                steps[variant](y1, y2)
            times[variant].append((time.perf_counter() - start) / args.block)

    plain = statistics.median(times["plain"])
    print(f"pretraining step, small_resnet w{args.width} [1,1,1,1], projector {args.projector}, "
          f"{args.res} px, batch {args.batch}, {args.threads} threads; ratio = plain time / "
          f"variant time (> 1: the variant is faster)")
    for variant in chosen:
        t = statistics.median(times[variant])
        print(f"{variant:14s} {args.batch / t:7.0f} pairs/s  ratio {plain / t:5.2f}  "
              f"first loss {first[variant]:.2f}  first two steps {warm_s[variant]:.1f} s",
              flush=True)


if __name__ == "__main__":
    main()
