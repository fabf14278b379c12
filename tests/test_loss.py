"""barlow.loss against the reference code's formulation, plus its invariances."""

import pytest
import torch
from torch import nn

from barlow.loss import (BN_EPS, NORMALIZATIONS, VARIANTS, LossTerms, barlow_twins_loss, combine,
                         normalize, standardize, standardize_rows)
from reference_loss import reference_loss

LAMBD = 0.0051


def correlated_views(n: int, d: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=dtype) * 3 + 1
    z2 = z1 + 0.5 * torch.randn(n, d, generator=g, dtype=dtype)
    return z1, z2


# Both code paths: (n, d) with 2n < d uses the N×N Gram identity, the rest form c.
SHAPES = [(2, 3), (8, 5), (16, 64), (33, 16), (64, 256), (128, 32)]


@pytest.mark.parametrize("n,d", SHAPES)
def test_matches_reference_float64(n, d):
    z1, z2 = correlated_views(n, d)
    got = barlow_twins_loss(z1, z2, LAMBD)
    want = reference_loss(z1, z2, LAMBD)
    assert got.loss.dtype == torch.float64
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n,d", SHAPES)
def test_gradients_match_reference_float64(n, d):
    z1, z2 = correlated_views(n, d)
    grads = []
    for fn in (barlow_twins_loss, reference_loss):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        fn(a, b, LAMBD).loss.backward()
        grads.append((a.grad, b.grad))
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n,d", [(64, 512), (512, 64)])
def test_float32_close_to_float64(n, d):
    z1, z2 = correlated_views(n, d)
    got = barlow_twins_loss(z1.float(), z2.float(), LAMBD)
    want = reference_loss(z1, z2, LAMBD)
    assert got.loss.dtype == torch.float32
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_standardize_is_batchnorm_in_training_mode():
    z, _ = correlated_views(10, 7)
    bn = nn.BatchNorm1d(7, affine=False).double().train()
    torch.testing.assert_close(standardize(z), bn(z))


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("n,d", [(16, 64), (64, 16)])
def test_invariant_to_per_feature_affine_maps(which, n, d):
    # eps in the variance breaks exact invariance at the eps/σ² level: keep σ ≥ 300.
    z = [v * 100 for v in correlated_views(n, d)]
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(d, generator=g, dtype=torch.float64) * 10 + 1
    shift = torch.randn(d, generator=g, dtype=torch.float64) * 100
    before = barlow_twins_loss(*z, LAMBD)
    z[which] = z[which] * scale + shift
    after = barlow_twins_loss(*z, LAMBD)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_lambda_zero_leaves_on_diagonal_term():
    z1, z2 = correlated_views(16, 8)
    terms = barlow_twins_loss(z1, z2, 0.0)
    assert terms.off_diag > 0
    torch.testing.assert_close(terms.loss, terms.on_diag)


@pytest.mark.parametrize("n,d", [(16, 64), (64, 16)])
def test_identical_views_have_no_invariance_loss(n, d):
    z, _ = correlated_views(n, d)
    terms = barlow_twins_loss(z, z, LAMBD)
    # c_ii = σ²/(σ² + eps) with σ ≈ 3: 1 − c_ii ≈ 1e-6.
    assert terms.on_diag < 1e-9


def test_decorrelated_identical_views_have_zero_loss():
    # Orthonormal columns spanning centred vectors are centred: z has c = I up to eps.
    n, d = 32, 8
    x = torch.randn(n, d, dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))
    z = q * n**0.5
    terms = barlow_twins_loss(z, z, LAMBD)
    assert terms.loss < 1e-8


def test_fp32_under_bf16_autocast():
    z1, z2 = correlated_views(32, 128, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = z1.bfloat16(), z2.bfloat16()
        terms = barlow_twins_loss(a, b, LAMBD)
    assert all(t.dtype == torch.float32 for t in terms)
    want = barlow_twins_loss(a.float(), b.float(), LAMBD)
    for t, w in zip(terms, want):
        torch.testing.assert_close(t, w)


def test_variants():
    z1, z2 = correlated_views(16, 8)
    full = barlow_twins_loss(z1, z2, LAMBD)
    inv = barlow_twins_loss(z1, z2, LAMBD, variant="invariance")
    red = barlow_twins_loss(z1, z2, LAMBD, variant="redundancy")
    torch.testing.assert_close(inv.loss, full.on_diag)
    torch.testing.assert_close(red.loss, LAMBD * full.off_diag)
    assert set(VARIANTS) == {"full", "invariance", "redundancy"}
    with pytest.raises(ValueError, match="'both'"):
        combine(full.on_diag, full.off_diag, LAMBD, "both")


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 2), LAMBD)
    with pytest.raises(ValueError):
        barlow_twins_loss(torch.randn(1, 3), torch.randn(1, 3), LAMBD)


# --- the normalizations of the paper's loss ablations ---------------------------------

def reference_other_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float,
                         normalization: str) -> LossTerms:
    """A literal transcription for the other normalizations: ẑ per row across the D
    features (mean, biased variance, eps as BatchNorm's) or z itself, then c = ẑ1ᵀẑ2/N,
    the full D×D matrix and a mask."""
    n, d = z1.shape

    def rows(z):
        mean = z.sum(dim=1, keepdim=True) / d
        var = ((z - mean) ** 2).sum(dim=1, keepdim=True) / d
        return (z - mean) / torch.sqrt(var + BN_EPS)

    a, b = (rows(z1), rows(z2)) if normalization == "feature" else (z1, z2)
    c = a.T @ b / n
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c[~torch.eye(d, dtype=torch.bool)].pow(2).sum()
    return LossTerms(on + lambd * off, on, off)


@pytest.mark.parametrize("normalization", ["feature", "none"])
@pytest.mark.parametrize("n,d", SHAPES)
def test_other_normalizations_match_formula_float64(normalization, n, d):
    z1, z2 = correlated_views(n, d)
    got = barlow_twins_loss(z1, z2, LAMBD, normalization=normalization)
    want = reference_other_loss(z1, z2, LAMBD, normalization)
    assert got.loss.dtype == torch.float64
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    grads = []
    for fn in (lambda a, b: barlow_twins_loss(a, b, LAMBD, normalization=normalization),
               lambda a, b: reference_other_loss(a, b, LAMBD, normalization)):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        fn(a, b).loss.backward()
        grads.append((a.grad, b.grad))
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_batch_normalization_is_the_default_bit_for_bit():
    z1, z2 = correlated_views(16, 64, dtype=torch.float32)
    for variant in VARIANTS:
        default = barlow_twins_loss(z1, z2, LAMBD, variant)
        batch = barlow_twins_loss(z1, z2, LAMBD, variant, "batch")
        assert all(torch.equal(a, b) for a, b in zip(default, batch))
    assert set(NORMALIZATIONS) == {"batch", "feature", "none"}


def test_standardize_rows_is_layer_norm_without_affine():
    z, _ = correlated_views(10, 7)
    torch.testing.assert_close(standardize_rows(z), nn.functional.layer_norm(z, (7,)))
    torch.testing.assert_close(normalize(z, "feature"), standardize_rows(z))
    assert normalize(z, "none") is z


@pytest.mark.parametrize("n,d", [(16, 64), (64, 16)])
def test_feature_normalization_invariant_to_per_sample_affine_maps(n, d):
    # The batch normalisation is not: this tells the two apart.
    z = [v * 100 for v in correlated_views(n, d)]
    g = torch.Generator().manual_seed(2)
    scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 10 + 1
    shift = torch.randn(n, 1, generator=g, dtype=torch.float64) * 100
    moved = [z[0] * scale + shift, z[1]]
    for normalization, invariant in (("feature", True), ("batch", False)):
        before = barlow_twins_loss(*z, LAMBD, normalization=normalization)
        after = barlow_twins_loss(*moved, LAMBD, normalization=normalization)
        assert torch.allclose(after.loss, before.loss, rtol=1e-8, atol=1e-10) == invariant


def test_no_normalization_scales_c():
    # c is bilinear in raw z: doubling one view doubles every c_ij.
    z1, z2 = correlated_views(16, 8)
    base = barlow_twins_loss(z1, z2, LAMBD, normalization="none")
    doubled = barlow_twins_loss(z1, 2 * z2, LAMBD, normalization="none")
    torch.testing.assert_close(doubled.off_diag, 4 * base.off_diag)


def test_feature_normalization_fp32_under_bf16_autocast():
    z1, z2 = correlated_views(32, 128, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = z1.bfloat16(), z2.bfloat16()
        terms = barlow_twins_loss(a, b, LAMBD, normalization="feature")
    assert all(t.dtype == torch.float32 for t in terms)
    want = barlow_twins_loss(a.float(), b.float(), LAMBD, normalization="feature")
    for t, w in zip(terms, want):
        torch.testing.assert_close(t, w)


def test_unknown_normalization_is_refused_by_name():
    z1, z2 = correlated_views(8, 4)
    with pytest.raises(ValueError, match=r"'layer' is not one of \['batch', 'feature', 'none'\]"):
        barlow_twins_loss(z1, z2, LAMBD, normalization="layer")
