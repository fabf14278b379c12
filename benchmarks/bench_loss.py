"""Our `barlow_twins_loss` against the reference formulation, forward + backward.

The reference, written here from the formula (facebookresearch/barlowtwins main.py):
    z1n, z2n = BatchNorm1d(D, affine=False)(z1), (…)(z2)      (training mode)
    c   = z1n.T @ z2n / B                                      (D×D)
    on  = (diag(c) − 1)².sum()
    off = c.flatten()[:-1].view(D−1, D+1)[:, 1:].flatten().pow(2).sum()
    loss = on + λ·off
Ours: barlow.loss.barlow_twins_loss, which for 2B < D never forms c (two B×B Grams).

Time: the two variants alternate (A, B, A, B, …) in one process; the medians are
compared. Peak memory: each variant runs in its own fresh subprocess, which creates
its inputs, runs the loss once, resets the RSS high-water mark to the current RSS
(writing 5 to /proc/self/clear_refs), runs forward+backward twice, and reports the
growth of the mark (VmHWM in /proc/self/status: ru_maxrss of getrusage(RUSAGE_SELF)
without the value it inherits across fork+exec, which would be the parent's RSS),
i.e. the extra resident memory the loss needed at its peak (activations saved for
backward, c and its gradient, temporaries) over the inputs. A separate process per
variant keeps one variant's freed-but-cached pages from hiding the other's peak.

Run from the repository root:  PYTHONPATH=src python benchmarks/bench_loss.py
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from barlow.loss import barlow_twins_loss

LAMBD = 0.0051


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class ReferenceLoss(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        c = self.bn(z1).T @ self.bn(z2)
        c.div_(z1.shape[0])
        on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
        off_diag = off_diagonal(c).pow_(2).sum()
        return on_diag + LAMBD * off_diag


def make_inputs(batch: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(batch, dim, generator=gen)
    z2 = z1 + 0.5 * torch.randn(batch, dim, generator=gen)
    return z1.requires_grad_(), z2.requires_grad_()


def variants(dim: int):
    ref = ReferenceLoss(dim).train()
    return {"ours": lambda a, b: barlow_twins_loss(a, b, LAMBD).loss,
            "reference": lambda a, b: ref(a, b)}


def step(fn, z1, z2) -> float:
    z1.grad = z2.grad = None
    start = time.perf_counter()
    fn(z1, z2).backward()
    return time.perf_counter() - start


def peak_memory_child(name: str, batch: int, dim: int, threads: int) -> None:
    torch.set_num_threads(threads)
    z1, z2 = make_inputs(batch, dim)
    fn = variants(dim)[name]
    fn(z1, z2)  # first call: lazy initialisation outside the measurement
    reset_peak_rss()
    before = peak_rss_kib()
    for _ in range(2):
        step(fn, z1, z2)
    after = peak_rss_kib()
    print(json.dumps({"peak_extra_bytes": (after - before) * 1024}))


def reset_peak_rss() -> None:
    """Set this process's RSS high-water mark (VmHWM) to its current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_kib() -> int:
    """VmHWM: the RSS high-water mark of this process's own address space.

    getrusage(RUSAGE_SELF).ru_maxrss is the same mark, except that it also keeps the
    pre-exec value, i.e. the RSS of the parent at fork (here a parent that has just run
    the reference loss), which clear_refs does not reset; VmHWM does not have that.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(args.child, args.batch, args.dim, args.threads)
        return

    torch.set_num_threads(args.threads)
    z1, z2 = make_inputs(args.batch, args.dim)
    fns = variants(args.dim)
    values = {name: fn(z1, z2).item() for name, fn in fns.items()}
    assert abs(values["ours"] - values["reference"]) <= 1e-3 * abs(values["reference"]), values
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up
        step(fn, z1, z2)
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(step(fn, z1, z2))
    med = {name: statistics.median(t) for name, t in times.items()}

    mem = {}
    for name in fns:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--batch",
                              str(args.batch), "--dim", str(args.dim), "--threads",
                              str(args.threads)], check=True, capture_output=True, text=True)
        mem[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]

    print(f"barlow_twins_loss forward+backward, B={args.batch}, D={args.dim}, fp32, "
          f"{args.threads} threads, median of {args.repeats} interleaved runs")
    print(f"loss values: ours {values['ours']:.6g}, reference {values['reference']:.6g}")
    print(f"{'':10} {'time ms':>9} {'peak extra MB':>14}")
    for name in fns:
        print(f"{name:10} {med[name] * 1e3:9.1f} {mem[name] / 1e6:14.1f}")
    t_ratio = med["ours"] / med["reference"]
    m_ratio = mem["ours"] / mem["reference"]
    print(f"time ratio ours/reference:   {t_ratio:.3f}  (goal ≤ 1.0: "
          f"{'meets' if t_ratio <= 1 else 'misses'}; {1 / t_ratio:.1f}× faster)")
    print(f"memory ratio ours/reference: {m_ratio:.3f}  (goal ≤ 1.0: "
          f"{'meets' if m_ratio <= 1 else 'misses'})")


if __name__ == "__main__":
    main()
