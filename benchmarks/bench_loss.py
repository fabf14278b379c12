"""Our `barlow_twins_loss` against the reference code's formulation, forward + backward.

The reference is tests/reference_loss.py (facebookresearch/barlowtwins main.py: a
BatchNorm1d, the D×D c, the flatten trick for its off-diagonal); ours is
barlow.loss.barlow_twins_loss, which for 2B < D never forms c (two B×B Grams).

Time: the harness alternates the two in one process and compares medians. Peak
memory: each variant runs in its own fresh subprocess, which creates its inputs, runs
the loss once, resets the RSS high-water mark to the current RSS (writing 5 to
/proc/self/clear_refs), runs forward+backward twice, and reports the growth of the
mark (VmHWM in /proc/self/status: ru_maxrss of getrusage(RUSAGE_SELF) without the value
it inherits across fork+exec, which would be the parent's RSS), i.e. the extra
resident memory the loss needed at its peak over the inputs. A separate process per
variant keeps one variant's freed-but-cached pages from hiding the other's peak.

    PYTHONPATH=src python benchmarks/bench_loss.py [--batch 256 --dim 8192]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from barlow.loss import barlow_twins_loss
from harness import compare, parser, report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_loss import reference_loss  # noqa: E402

LAMBD = 0.0051
LOSSES = {"ours": barlow_twins_loss, "reference": reference_loss}


def make_inputs(batch: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(batch, dim, generator=gen)
    z2 = z1 + 0.5 * torch.randn(batch, dim, generator=gen)
    return z1.requires_grad_(), z2.requires_grad_()


def step(loss, z1: torch.Tensor, z2: torch.Tensor) -> None:
    z1.grad = z2.grad = None
    loss(z1, z2, LAMBD).loss.backward()


def peak_memory_child(name: str, batch: int, dim: int, threads: int) -> None:
    torch.set_num_threads(threads)
    z1, z2 = make_inputs(batch, dim)
    LOSSES[name](z1, z2, LAMBD)  # lazy initialisation outside the measurement
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := the current RSS (Linux)
        f.write("5")
    before = vm_hwm_kib()
    for _ in range(2):
        step(LOSSES[name], z1, z2)
    print(json.dumps({"peak_extra_bytes": (vm_hwm_kib() - before) * 1024}))


def vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    sizes = ["--batch", str(args.batch), "--dim", str(args.dim), "--threads", str(args.threads)]
    if args.child:
        peak_memory_child(args.child, args.batch, args.dim, args.threads)
        return
    torch.set_num_threads(args.threads)
    z1, z2 = make_inputs(args.batch, args.dim)
    values = {name: loss(z1, z2, LAMBD).loss.item() for name, loss in LOSSES.items()}
    assert abs(values["ours"] - values["reference"]) <= 1e-3 * abs(values["reference"]), values
    print(f"barlow_twins_loss forward+backward, B={args.batch}, D={args.dim}, fp32, "
          f"{args.threads} threads; loss values {values}")
    results = compare({name: lambda loss=loss: step(loss, z1, z2) for name, loss in LOSSES.items()},
                      args.rounds, args.warmup)
    memory = {name: json.loads(subprocess.run(
        [sys.executable, __file__, "--child", name, *sizes], check=True, capture_output=True,
        text=True).stdout.splitlines()[-1])["peak_extra_bytes"] for name in LOSSES}
    report(results, "steps/s", baseline="reference", json_path=args.json, args=vars(args),
           extra={"loss_values": values, "peak_extra_bytes": memory})
    print(f"peak extra memory: ours {memory['ours'] / 1e6:.1f} MB, reference "
          f"{memory['reference'] / 1e6:.1f} MB, ratio {memory['ours'] / memory['reference']:.3f}")


if __name__ == "__main__":
    main()
