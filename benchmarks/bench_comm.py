"""Bytes sent per rank per step by the loss path: the reference's all-reduce of c versus
the library's feature-sharded loss and its all-gather fallback.

Counts, it does not time: the figures do not depend on machine load.

1. Analytic, at paper scale (global batch 2048, D = 8192, fp32) for W = 32 ranks (the
   paper's 4 nodes × 8 GPUs) and for W = 24 and 48, which do not divide D, with the
   bytes one rank SENDS in the usual ring algorithms:
       all-reduce of S bytes      2(W−1)/W · S
       all-gather to S bytes      (W−1)/W · S      (S = the gathered output)
       reduce-scatter of S bytes  (W−1)/W · S      (S = the full input)
       all-to-all of S bytes      (W−1)/W · S      (S = this rank's input)
   reference   all_reduce(c), c D×D, forward only (invisible to autograd; DDP's
               gradient all-reduce is the same in every design and not counted)
   sharded     barlow.distributed.sharded_barlow_twins_loss, what
               distributed_barlow_twins_loss runs for any W: one all-to-all of
               [z1 | z2] so each rank holds all B rows of k = ⌈D/W⌉ features (D
               zero-padded to W·k when W ∤ D), one
               reduce-scatter of its B×B Gram partials [Z1Z1ᵀ | Z2Z2ᵀ], one all-reduce of
               3 scalars; backward: the reverse all-to-all, an all-gather, an all-reduce
   gathered    barlow.distributed.gathered_barlow_twins_loss, the simple alternative
               (the library's path for W ∤ D until the padding): all-gather z1, z2
               (B×D each) forward; reduce-scatter their gradients backward
   (a)         the rejected sharded alternative, analytic only: all-reduce both Grams
               (autograd-visible, so all-reduce in backward too)

2. Measured at 3 gloo ranks on the CPU (D = 8192 is not divisible by 3, so the padded
   path runs): a TorchDispatchMode records every
   ``_c10d_functional`` collective (forward and backward) during one forward+backward of
   each library function, which is also checked against the single-process loss (value
   and gradients). Recorded tensor sizes are converted to bytes sent with the ring
   formulas above and compared with the analytic model at the same (W, B, D), which
   validates the model used at paper scale.

Run from the repository root:  PYTHONPATH=src python benchmarks/bench_comm.py
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

MB = 1e6
REFERENCE = "reference: all-reduce c (D×D)"
SHARDED = "ours: sharded"
GATHERED = "gathered (alternative)"
PAPER_WORLDS = (24, 32, 48)


# --- analytic model --------------------------------------------------------------------

def analytic(world: int, batch: int, dim: int, elem: int = 4) -> dict[str, dict[str, float]]:
    """Bytes sent per rank per step, forward and backward, for each design."""
    f = (world - 1) / world
    emb = batch * dim * elem            # one view's gathered embeddings, B×D
    k = -(-dim // world)                # features per shard, D padded to W·k
    local = batch * k * elem            # one view's all-to-all input, B/W × W·k
    gram = batch * batch * 4            # one B×B Gram matrix, always float32
    scalars = 2 * f * 3 * 4             # one all-reduce of 3 float32 scalars
    sharded = 2 * f * local + 2 * f * gram + scalars
    return {
        REFERENCE: {"fwd": 2 * f * dim * dim * elem, "bwd": 0.0},
        SHARDED: {"fwd": sharded, "bwd": sharded},
        GATHERED: {"fwd": 2 * f * emb, "bwd": 2 * f * emb},
        "(a) sharded, all-reduce Grams": {"fwd": sharded + 2 * f * gram,
                                          "bwd": sharded + 2 * f * gram},
    }


# --- measurement -----------------------------------------------------------------------

class CollectiveBytes(TorchDispatchMode):
    """Records (op, bytes sent per rank) for every functional collective dispatched."""

    def __init__(self, world: int):
        super().__init__()
        self.world = world
        self.sent: list[tuple[str, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if func.namespace == "_c10d_functional" and name not in ("wait_tensor",
                                                                   "_wrap_tensor_autograd"):
            x = args[0]
            size = x.numel() * x.element_size()
            f = (self.world - 1) / self.world
            if name.startswith("all_gather"):
                sent = f * size * self.world     # input is this rank's slice
            elif name.startswith("all_reduce"):
                sent = 2 * f * size
            else:                                # reduce_scatter (full input), all_to_all
                sent = f * size
            self.sent.append((name, sent))
        return func(*args, **kwargs)


def _worker(rank: int, world: int, port: int, batch: int, dim: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from barlow import distributed as bd
    from barlow.loss import barlow_twins_loss

    bd.init("gloo")
    gen = torch.Generator().manual_seed(0)
    full1 = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    full2 = full1 + 0.5 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    ref1, ref2 = full1.clone().requires_grad_(), full2.clone().requires_grad_()
    ref = barlow_twins_loss(ref1, ref2, 0.0051)
    ref.loss.backward()
    rows = slice(rank * batch // world, (rank + 1) * batch // world)
    results = {}
    for name, fn in ((SHARDED, bd.sharded_barlow_twins_loss),
                     (GATHERED, bd.gathered_barlow_twins_loss)):
        z1 = full1[rows].clone().requires_grad_()
        z2 = full2[rows].clone().requires_grad_()
        counter = CollectiveBytes(world)
        with counter:
            loss = fn(z1, z2, 0.0051).loss
            loss.backward()
        # each rank's gradient is W·∂L/∂z_r (DDP then divides by W)
        grad_err = max((z1.grad / world - ref1.grad[rows]).abs().max().item(),
                       (z2.grad / world - ref2.grad[rows]).abs().max().item())
        results[name] = {"sent": counter.sent, "loss_err": abs(loss.item() - ref.loss.item()),
                         "grad_err": grad_err}
    if rank == 0:
        torch.save(results, out)
    bd.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=3)
    parser.add_argument("--batch", type=int, default=192, help="global batch, measured run")
    parser.add_argument("--dim", type=int, default=8192)
    args = parser.parse_args()

    for world in PAPER_WORLDS:
        k = -(-8192 // world)
        print(f"== analytic, paper scale: W={world}, global B=2048, D=8192 "
              f"({'divisible' if 8192 % world == 0 else f'padded to {world * k}'}), fp32 "
              f"(MB sent per rank per step) ==")
        paper = analytic(world, 2048, 8192)
        ref_total = sum(paper[REFERENCE].values())
        print(f"{'design':36} {'fwd':>9} {'bwd':>9} {'total':>9} {'vs ref':>7}")
        for name, v in paper.items():
            total = v["fwd"] + v["bwd"]
            print(f"{name:36} {v['fwd'] / MB:9.1f} {v['bwd'] / MB:9.1f} {total / MB:9.1f} "
                  f"{total / ref_total:7.3f}")
        for name in (SHARDED, GATHERED):
            ratio = sum(paper[name].values()) / ref_total
            print(f"{name} / reference = {ratio:.3f} → "
                  f"{'meets' if ratio <= 0.25 else 'misses'} the goal ≤ 0.25 "
                  f"({ratio / 0.25:.2f}× the allowed bytes)")
        bf16 = analytic(world, 2048, 8192, elem=2)
        print(f"(bf16 embeddings, fp32 Grams, against an fp16 c as the reference's fp16 "
              f"autocast reduces: sharded / reference = "
              f"{sum(bf16[SHARDED].values()) / sum(bf16[REFERENCE].values()):.3f})\n")

    print(f"== measured: {args.world} gloo ranks, global B={args.batch}, D={args.dim}, "
          f"float64 tensors (converted to fp32 bytes), one forward+backward ==")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "res.pt")
        mp.spawn(_worker, args=(args.world, _free_port(), args.batch, args.dim, out),
                 nprocs=args.world)
        results = torch.load(out)
    model = analytic(args.world, args.batch, args.dim)
    print(f"{'design':28} {'collectives':>11} {'measured MB':>12} {'model MB':>9} "
          f"{'loss err':>9} {'grad err':>9}")
    for name, r in results.items():
        measured = sum(s for _, s in r["sent"]) / 2  # float64 → fp32 bytes
        predicted = sum(model[name].values())
        print(f"{name:28} {len(r['sent']):11d} {measured / MB:12.3f} {predicted / MB:9.3f} "
              f"{r['loss_err']:9.1e} {r['grad_err']:9.1e}")
        ops: dict[str, int] = {}
        for op, _ in r["sent"]:
            ops[op] = ops.get(op, 0) + 1
        print(f"{'':28} {', '.join(f'{k}×{v}' for k, v in ops.items())}")
    ref_measured = 2 * (args.world - 1) / args.world * args.dim**2 * 4
    print(f"reference at this size (one all-reduce of c): {ref_measured / MB:.3f} MB")


if __name__ == "__main__":
    main()
