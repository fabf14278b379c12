"""One pretraining step, ours against a plain loop in the style of the reference main.py.

  ours        as barlow.train does it: BarlowTwins(small_resnet, Projector) in
              channels_last, distributed_barlow_twins_loss (Gram path when 2B < D),
              barlow.optim.LARS (foreach kernels) over param_groups, per-group lr set
              every step, zero_grad(set_to_none=True).
  reference   the reference's structure: the loss inside the model's forward
              (BatchNorm1d(affine=False), c = z1nᵀz2n/B, off-diagonal by the flatten
              trick), a torch.optim-style LARS written plainly (a Python loop over
              parameters, as in main.py), NCHW tensors, zero_grad().

Same model sizes (params.yaml's small_resnet: width 16, layers [1,1,1,1], projector
512-512-512), 28 px, batch 256, same torch threads, same initial weights.

  compute     random input tensors, no data loading. Steps alternate in blocks
              (ours ×k, reference ×k, ours ×k, …); medians of per-step time.
  with data   ours: the FFCV pretrain_loader (numba ops; first epoch = JIT, not
              timed); reference: torchvision ImageFolder of PNGs + DataLoader with the
              same number of workers and the same augmentation parameters (see
              bench_loader.py). Whole epochs alternate; medians of pairs/s.

Run from the repository root:
    NUMBA_THREADING_LAYER=workqueue PYTHONPATH=src python benchmarks/bench_step.py
"""

from __future__ import annotations

import os

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from barlow import distributed as dist  # noqa: E402
from barlow.config import ModelConfig  # noqa: E402
from barlow.data.convert import FfcvSettings, write_beton  # noqa: E402
from barlow.data.loaders import paper_views, pretrain_loader  # noqa: E402
from barlow.data.sources import image_folder  # noqa: E402
from barlow.optim import build_optimizer, param_groups  # noqa: E402
from barlow.train import build_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import MEAN, STD, baseline_loader, make_image_folder  # noqa: E402

LAMBD = 0.0051


# --- the reference style -----------------------------------------------------------------

def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class ReferenceBarlowTwins(nn.Module):
    """The reference's module: the loss is computed inside forward."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, dim: int, batch: int):
        super().__init__()
        self.backbone, self.projector = backbone, projector
        self.bn = nn.BatchNorm1d(dim, affine=False)
        self.batch = batch

    def forward(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        z1 = self.projector(self.backbone(y1))
        z2 = self.projector(self.backbone(y2))
        c = self.bn(z1).T @ self.bn(z2)
        c.div_(self.batch)
        on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
        off_diag = off_diagonal(c).pow_(2).sum()
        return on_diag + LAMBD * off_diag


class PlainLARS(torch.optim.Optimizer):
    """LARS as the reference writes it: one parameter at a time."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      eta=eta))

    @torch.no_grad()
    def step(self):  # type: ignore[override]
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["eta"] * param_norm / update_norm,
                                                one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


# --- the two steps -------------------------------------------------------------------------

def build(cfg: ModelConfig, batch: int):
    """(our step, reference step), both from the same initial weights."""
    torch.manual_seed(0)
    model = build_model(cfg).to(memory_format=torch.channels_last)
    ref_net = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    opt = build_optimizer("lars", param_groups(model, 1.5e-6), momentum=0.9, eta=0.001)
    lr = {"weights": 0.2 * batch / 256, "biases": 0.0048 * batch / 256}

    def ours(y1: torch.Tensor, y2: torch.Tensor) -> float:
        for group in opt.param_groups:
            group["lr"] = lr[group["name"]]
        z1, z2 = model(y1.contiguous(memory_format=torch.channels_last),
                       y2.contiguous(memory_format=torch.channels_last))
        terms = dist.distributed_barlow_twins_loss(z1, z2, LAMBD)
        opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        opt.step()
        return float(terms.loss.detach())

    ref = ReferenceBarlowTwins(ref_net.backbone, ref_net.projector, ref_net.projector.out_dim,
                               batch)
    groups = [{"params": [p for p in ref.parameters() if p.ndim != 1], "weight_decay": 1.5e-6,
               "lr": lr["weights"]},
              {"params": [p for p in ref.parameters() if p.ndim == 1], "weight_decay": 0.0,
               "lr": lr["biases"]}]
    ref_opt = PlainLARS(groups)

    def reference(y1: torch.Tensor, y2: torch.Tensor) -> float:
        y1, y2 = y1.contiguous(), y2.contiguous()  # NCHW
        ref_opt.zero_grad()
        loss = ref(y1, y2)
        loss.backward()
        ref_opt.step()
        return float(loss.detach())

    model.train()
    ref.train()
    return ours, reference


def compute_only(cfg: ModelConfig, batch: int, res: int, rounds: int, block: int):
    ours, reference = build(cfg, batch)
    gen = torch.Generator().manual_seed(0)
    y1, y2 = (torch.randn(batch, 3, res, res, generator=gen) for _ in range(2))
    first = (ours(y1, y2), reference(y1, y2))  # warm-up; same weights → same first loss
    assert abs(first[0] - first[1]) <= 1e-3 * abs(first[1]) + 1e-3, first
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for _ in range(rounds):
        for name, fn in (("ours", ours), ("reference", reference)):
            start = time.perf_counter()
            for _ in range(block):
                fn(y1, y2)
            times[name].append((time.perf_counter() - start) / block)
    return {k: batch / statistics.median(v) for k, v in times.items()}


def with_data(cfg: ModelConfig, batch: int, res: int, images: int, workers: int,
              epochs: int, tmp: Path):
    root = tmp / "folder"
    make_image_folder(root, images, res)
    beton = tmp / "train.beton"
    write_beton(image_folder(root, "train", None, skip_bad=False, workers=workers), beton,
                FfcvSettings(write_mode="raw"), workers)
    # params.yaml's augment section: the paper's views with crop scale and blur σ scaled
    # to 28 px.
    views = tuple(replace(v, crop_scale=(0.2, 1.0), blur_sigma=(0.1, 0.5))
                  for v in paper_views(res))
    ours_loader = pretrain_loader(str(beton), batch, workers, views, MEAN, STD, seed=0,
                                  channels_last=True)
    ref_loader = baseline_loader(root, views, batch, workers)
    ours, reference = build(cfg, batch)

    def run_epoch(fn, loader, unpack) -> float:
        start, pairs = time.perf_counter(), 0
        for batch_ in loader:
            y1, y2 = unpack(batch_)
            fn(y1, y2)
            pairs += y1.shape[0]
        return pairs / (time.perf_counter() - start)

    start = time.perf_counter()
    run_epoch(ours, ours_loader, lambda b: b)          # JIT compile + warm-up
    jit_s = time.perf_counter() - start
    run_epoch(reference, ref_loader, lambda b: b[0])    # worker start-up + warm-up
    rates: dict[str, list[float]] = {"ours": [], "reference": []}
    for _ in range(epochs):
        rates["ours"].append(run_epoch(ours, ours_loader, lambda b: b))
        rates["reference"].append(run_epoch(reference, ref_loader, lambda b: b[0]))
    return {k: statistics.median(v) for k, v in rates.items()}, jit_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--res", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--second-size", action="store_true",
                        help="also time width 32, layers [2,2,2,2], projector 2048-2048-2048")
    parser.add_argument("--skip-data", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [ModelConfig(arch="small_resnet", width=16, layers=(1, 1, 1, 1),
                         projector="512-512-512", projector_bn=True)]
    if args.second_size:
        sizes.append(ModelConfig(arch="small_resnet", width=32, layers=(2, 2, 2, 2),
                                 projector="2048-2048-2048", projector_bn=True))
    print(f"pretraining step, {args.res} px, batch {args.batch}, {args.threads} threads; "
          f"pairs/s (higher is better), ratio = ours / reference")
    for cfg in sizes:
        label = f"small_resnet w{cfg.width} {list(cfg.layers)} proj {cfg.projector}"
        rate = compute_only(cfg, args.batch, args.res, args.rounds, args.block)
        ratio = rate["ours"] / rate["reference"]
        print(f"compute   {label}: ours {rate['ours']:.0f}, reference {rate['reference']:.0f}, "
              f"ratio {ratio:.2f} (goal ≥ 1.0: {'meets' if ratio >= 1 else 'misses'})",
              flush=True)
    if not args.skip_data:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = sizes[0]
            rate, jit_s = with_data(cfg, args.batch, args.res, args.images, args.workers,
                                    args.epochs, Path(tmp))
            ratio = rate["ours"] / rate["reference"]
            print(f"with data small_resnet w{cfg.width}, {args.workers} workers, "
                  f"{args.images} images: ours {rate['ours']:.0f}, reference "
                  f"{rate['reference']:.0f}, ratio {ratio:.2f} (goal ≥ 1.5: "
                  f"{'meets' if ratio >= 1.5 else 'misses'}); numba JIT of our loader "
                  f"{jit_s:.1f} s, not timed", flush=True)


if __name__ == "__main__":
    main()
