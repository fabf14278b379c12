"""The Barlow Twins loss as facebookresearch/barlowtwins main.py writes it: the
independent formulation barlow.loss is checked against (tests/test_loss.py) and timed
against (benchmarks/bench_loss.py).

    z1n, z2n = BatchNorm1d(D, affine=False)(z1), (…)(z2)      (training mode)
    c   = z1n.T @ z2n / N                                      (D×D)
    on  = (diag(c) − 1)².sum()
    off = c.flatten()[:-1].view(D−1, D+1)[:, 1:].flatten().pow(2).sum()
    loss = on + λ·off
"""

from __future__ import annotations

import torch
from torch import nn

from barlow.loss import LossTerms


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The off-diagonal elements of a square matrix, flattened (no copy of c)."""
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def reference_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> LossTerms:
    n, d = z1.shape
    bn = nn.BatchNorm1d(d, affine=False).to(z1.dtype).train()
    c = bn(z1).T @ bn(z2) / n
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = off_diagonal(c).pow(2).sum()
    return LossTerms(on + lambd * off, on, off)
