"""The Barlow Twins objective (Zbontar et al., ICML 2021, eq. 1) as a pure function.

Cross-process reduction does not live here: ``barlow.distributed`` computes the same
terms over all ranks' batch, sharding the features over the ranks.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

Variant = Literal["full", "invariance", "redundancy"]
VARIANTS: tuple[str, ...] = get_args(Variant)
Normalization = Literal["batch", "feature", "none"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)

# BatchNorm1d's default; the reference normalises z with BatchNorm1d(affine=False).
BN_EPS = 1e-5


class LossTerms(NamedTuple):
    """The objective and its two parts (``on_diag``, ``off_diag`` are never weighted)."""

    loss: Tensor
    on_diag: Tensor
    off_diag: Tensor


def standardize(z: Tensor, eps: float = BN_EPS) -> Tensor:
    """Per-feature standardisation over the batch, as BatchNorm1d(affine=False).train().

    ẑ_bi = (z_bi − μ_i) / sqrt(σ²_i + eps), μ_i = mean_b z_bi, σ²_i = mean_b (z_bi − μ_i)²
    (biased variance, exactly the statistics BatchNorm normalises with in training mode).
    """
    var, mean = torch.var_mean(z, dim=0, correction=0)
    return (z - mean) * torch.rsqrt(var + eps)


def standardize_rows(z: Tensor, eps: float = BN_EPS) -> Tensor:
    """Per-sample standardisation across the D features, as LayerNorm(D, elementwise_affine=False).

    ẑ_bi = (z_bi − m_b) / sqrt(s²_b + eps), m_b = mean_i z_bi, s²_b = mean_i (z_bi − m_b)²
    (biased variance; the same eps as `standardize`). Each row is normalised on its own,
    so the result does not depend on the rest of the batch.
    """
    var, mean = torch.var_mean(z, dim=1, correction=0, keepdim=True)
    return (z - mean) * torch.rsqrt(var + eps)


def normalize(z: Tensor, normalization: Normalization) -> Tensor:
    """The embeddings the cross-correlation is computed from (the paper's loss ablations).

    batch:   `standardize`, each feature over the batch (the paper's loss; the reference's
             BatchNorm1d(affine=False)).
    feature: `standardize_rows`, each embedding across its D features (the paper's
             "normalization along the feature dimension", 69.8 vs 71.4 top-1).
    none:    z itself (the paper's "no normalization", reported with no BN in the
             projector: 53.4).
    """
    if normalization == "batch":
        return standardize(z)
    if normalization == "feature":
        return standardize_rows(z)
    if normalization == "none":
        return z
    raise ValueError(f"loss normalization {normalization!r} is not one of "
                     f"{list(NORMALIZATIONS)}")


def combine(on_diag: Tensor, off_diag: Tensor, lambd: float, variant: Variant) -> Tensor:
    """The objective of an ablation variant (the paper's loss ablations).

    full: on + λ·off;  invariance: on;  redundancy: λ·off.
    """
    if variant == "full":
        return on_diag + lambd * off_diag
    if variant == "invariance":
        return on_diag
    if variant == "redundancy":
        return lambd * off_diag
    raise ValueError(f"loss variant {variant!r} is not one of {list(VARIANTS)}")


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float, variant: Variant = "full",
                      normalization: Normalization = "batch") -> LossTerms:
    """Barlow Twins loss of two (batch N, dim D) projector outputs of the same images.

        ẑ = standardize(z)                  (per feature over the batch, see `standardize`;
                                             other normalizations: see `normalize`)
        c_ij = Σ_b ẑ1_bi ẑ2_bj / N          (cross-correlation matrix, D×D)
        on   = Σ_i (1 − c_ii)²
        off  = Σ_i Σ_{j≠i} c_ij²  = ‖c‖²_F − Σ_i c_ii²
        loss = on + λ·off                   (or one term alone, see `combine`)

    ``off`` never materialises a mask or an off-diagonal copy of c. When 2N < D (the
    paper's D = 8192 with per-step batches of 256..2048) c is not formed at all:
    ‖c‖²_F = ‖ẑ1ᵀẑ2‖²_F / N² = Σ_ab (ẑ1ẑ1ᵀ)_ab (ẑ2ẑ2ᵀ)_ab / N², two N×N Gram matrices,
    and c_ii = Σ_b ẑ1_bi ẑ2_bi / N; that costs 2N²D instead of ND² multiply-adds.

    With normalization "feature" or "none", c is the same Σ_b ẑ1_bi ẑ2_bj / N of the
    other ẑ: no longer a correlation (c_ii is not bounded by 1), but the same target I
    and the same two terms, as in the paper's ablation.

    Computed in float32 (float64 inputs stay float64) with autocast disabled, since
    the reduced-precision c is what makes the reference's fp16 runs diverge to NaN.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"expected two (batch, dim) tensors of one shape, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    n, d = z1.shape
    if n < 2:
        raise ValueError(f"batch statistics need at least 2 samples, got {n}")
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        a = normalize(z1.to(dtype), normalization)
        b = normalize(z2.to(dtype), normalization)
        diag = (a * b).sum(dim=0) / n
        if 2 * n < d:
            frobenius_sq = ((a @ a.T) * (b @ b.T)).sum() / n**2
        else:
            c = a.T @ b / n
            frobenius_sq = torch.linalg.vector_norm(c).square()
        on_diag = (1 - diag).square().sum()
        off_diag = frobenius_sq - diag.square().sum()
        return LossTerms(combine(on_diag, off_diag, lambd, variant), on_diag, off_diag)
