"""augment.tensor_ops: the colour operations as batched torch ops (run here on the CPU)
against the numba kernels on the same images and the same drawn parameters, per
operation and for a whole view; and the loader with the colour ops on the host against
the loader with them on the "device" (the CPU here): the same views.

Tolerance: grayscale and solarisation are integer arithmetic and must be equal; jitter
and blur may differ by ±1 grey level in a rare pixel (the kernels compute in float64 /
fastmath float32, the tensor ops in plain float32: a value within ~1e-5 of k + ½ can
round either way), at most 1 in 1,000 values here.
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np
import pytest
import torch
from ffcv.pipeline.compiler import Compiler

from barlow.augment import (COLOUR_COLUMNS, COLOUR_PARAMS, ColorJitter, ColourParams,
                            GaussianBlur, RandomGrayscale, Solarization, apply_colour_ops,
                            uniforms)
from barlow.config import AugmentConfig, ConfigError, from_mapping, read_params
from barlow.data.loaders import colour_params, paper_views, pretrain_loader, view_operations
from conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
B, H, W = 48, 26, 23
INDICES = np.arange(100, 100 + B, dtype=np.uint64)


def images(seed=0):
    """Smooth-ish colour images with saturated and grey regions (every hue branch)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (B, H, W, 3)).astype(np.float64)
    x[:, : H // 3] = np.clip(x[:, : H // 3] * 1.6 - 60, 0, 255)  # clipping, saturation
    x[:, -4:] = x[:, -4:, :, :1]  # grey rows: no chroma
    return x.astype(np.uint8)


def four_ops(jitter_p=0.8, grayscale_p=0.3, blur_p=0.7, solarize_p=0.4, sigma=(0.1, 2.0)):
    return {"jitter": ColorJitter(jitter_p, 0.8, 0.8, 0.9, 0.5, seed=21),
            "grayscale": RandomGrayscale(grayscale_p, seed=22),
            "blur": GaussianBlur(blur_p, sigma, seed=23),
            "solarize": Solarization(solarize_p, seed=24)}


def host(ops, batch, compiled):
    """The host operations in order, compiled with ffcv's flags or as plain Python."""
    batch = batch.copy()
    Compiler.set_enabled(compiled)
    try:
        for op in ops:
            code = op.generate_code()
            if compiled:
                code = numba.njit(fastmath=True, nogil=True, error_model="numpy")(code)
            scratch = np.empty(batch.shape, np.float32) if op.needs_scratch else None
            batch = code(batch, scratch, INDICES)
    finally:
        Compiler.set_enabled(True)
    return batch


def device(ops, batch):
    params = ColourParams(**ops)
    q = np.empty((B, COLOUR_PARAMS))
    Compiler.set_enabled(False)
    try:
        params.generate_code()(None, q, INDICES)
    finally:
        Compiler.set_enabled(True)
    out = apply_colour_ops(torch.from_numpy(batch).permute(0, 3, 1, 2), torch.from_numpy(q),
                           params.solarize.threshold)
    assert out.dtype == torch.float32 and torch.equal(out, out.round())
    return out.permute(0, 2, 3, 1).numpy().astype(np.uint8), q


def assert_agree(got, want, exact):
    diff = np.abs(got.astype(int) - want.astype(int))
    if exact:
        assert diff.max() == 0
    else:
        assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (diff.max(), (diff > 0).mean())


@pytest.mark.parametrize("name", ["jitter", "grayscale", "blur", "solarize", "view"])
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["python", "numba"])
def test_tensor_ops_equal_the_kernels_on_the_same_draws(name, compiled):
    """Each operation alone (the others at p = 0) and all four as in a view: the tensor
    ops with ColourParams' parameters = the host operations on the same batch."""
    off = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    ops = four_ops() if name == "view" else four_ops(**{**off, f"{name}_p": 0.6})
    batch = images()
    want = host([op for op in ops.values() if op.p > 0], batch, compiled)
    got, q = device(ops, batch)
    assert_agree(got, want, exact=name in ("grayscale", "solarize"))
    applied = q[:, COLOUR_COLUMNS[name if name != "view" else "jitter"].start] != 0
    assert 0 < applied.sum() < B  # the sub-batch selection is exercised
    changed = np.any(got != batch, axis=(1, 2, 3))
    assert changed.sum() >= applied.sum() - 2  # a drawn op changes its image (bar no-ops)


def test_every_jitter_order_and_step_is_exercised():
    """48 samples cover many of the 24 orders; each step at each position occurs."""
    _, q = device(four_ops(jitter_p=1.0), images())
    order = q[:, 5:9][q[:, 0] != 0]
    assert len({tuple(o) for o in order}) >= 12
    for position in range(4):
        assert set(order[:, position]) == {0, 1, 2, 3}


def test_colour_params_are_the_host_operations_draws():
    """ColourParams' columns are each operation's derive(uniforms(indices, seed, draws)):
    the function the host operation itself applies; p = 0 gives zero columns."""
    ops = four_ops(solarize_p=0.0)
    _, q = device(ops, images())
    for name, op in ops.items():
        want = op.derive_code()(uniforms(INDICES, op.seed, op.draws))
        np.testing.assert_array_equal(q[:, COLOUR_COLUMNS[name]], want)
    assert not q[:, COLOUR_COLUMNS["solarize"]].any()
    # The drawn parameters lie in their ranges.
    jitter = q[q[:, 0] != 0]
    assert (jitter[:, 1:3] >= 0.2).all() and (jitter[:, 1:3] <= 1.8).all()
    assert (np.abs(jitter[:, 4]) <= 0.5).all()
    sigma = q[q[:, 10] != 0, 11]
    assert (sigma >= 0.1).all() and (sigma <= 2.0).all()


def test_apply_colour_ops_refuses_wrong_inputs():
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        apply_colour_ops(x.float(), torch.zeros(4, COLOUR_PARAMS), 128)
    with pytest.raises(ValueError, match="parameters"):
        apply_colour_ops(x, torch.zeros(4, COLOUR_PARAMS - 1), 128)


# --- the loaders -----------------------------------------------------------------------

def tiny_views():
    """The paper's views at the tiny set's 16 px, blur scaled down, solarisation both."""
    return tuple(replace(v, crop_scale=(0.3, 1.0), blur_sigma=(0.1, 0.8), solarize_p=0.5)
                 for v in paper_views(16))


def epoch(beton, colour_ops_on, batch=16, **kwargs):
    loader = pretrain_loader(str(beton), batch, 1, tiny_views(), MEAN, STD, seed=7,
                             colour_ops_on=colour_ops_on, **kwargs)
    return [tuple(t.clone() for t in pair) for pair in loader]


def grey_levels(views):
    """Undo the normalisation: float (B, 3, H, W) → values in [0, 255]."""
    return views.double() * torch.tensor(STD).view(1, 3, 1, 1).double() * 255 \
        + torch.tensor(MEAN).view(1, 3, 1, 1).double() * 255


def assert_same_views(got, want):
    assert len(got) == len(want) == 4
    for pair, want_pair in zip(got, want):
        for x, y in zip(pair, want_pair):
            assert x.shape == y.shape == (16, 3, 16, 16) and x.dtype == y.dtype == torch.float32
            assert x.is_contiguous(memory_format=torch.channels_last)
            diff = (grey_levels(x) - grey_levels(y)).abs()
            assert diff.max() <= 1.001 and (diff > 0.5).float().mean() <= 1e-3


def test_loader_views_are_the_same_whichever_side_runs_the_colour_ops(tiny_ffcv):
    """Same seed, host colour ops vs "device" ones (here the CPU): the same views (±1
    grey level, rarely), every epoch: the draws do not depend on where they are applied.
    ffcv's compiler off (fast); the next test compiles the device pipeline once."""
    beton = tiny_ffcv / "train.beton"
    Compiler.set_enabled(False)
    try:
        want, got = epoch(beton, "host"), epoch(beton, "device")
    finally:
        Compiler.set_enabled(True)
    assert_same_views(got, want)
    a, b = (torch.cat([pair[k] for pair in got]) for k in (0, 1))
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 0.1  # the two views differ


@pytest.mark.slow
def test_compiled_device_loader_gives_the_python_host_views(tiny_ffcv):
    """ColourParams compiles inside a Loader (numba, ≈ 30 s here) and its views equal
    the host pipeline's (as plain Python)."""
    beton = tiny_ffcv / "train.beton"
    got = epoch(beton, "device")
    Compiler.set_enabled(False)
    try:
        want = epoch(beton, "host")
    finally:
        Compiler.set_enabled(True)
    assert_same_views(got, want)


def test_device_ops_pipeline_leaves_the_colour_ops_out_of_the_host_pipeline():
    view = paper_views(16)[1]
    host_ops = view_operations(view, 7, 1)
    crop_flip = view_operations(view, 7, 1, colour_ops=False)
    assert [type(op).__name__ for op in crop_flip] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    params = colour_params(view, 7, 1)
    # The same seeds as the host operations of that view.
    by_type = {type(op).__name__: op.seed for op in host_ops[2:]}
    assert by_type == {"ColorJitter": params.jitter.seed, "RandomGrayscale": params.grayscale.seed,
                       "GaussianBlur": params.blur.seed, "Solarization": params.solarize.seed}


def test_bad_colour_ops_on_is_refused_naming_the_key(tiny_ffcv):
    with pytest.raises(ValueError, match="colour_ops_on"):
        pretrain_loader(str(tiny_ffcv / "train.beton"), 16, 1, tiny_views(), MEAN, STD, seed=0,
                        colour_ops_on="gpu")
    augment = dict(read_params(REPO / "params.yaml")["augment"], colour_ops_on="gpu")
    with pytest.raises(ConfigError, match=r"augment\.colour_ops_on"):
        from_mapping(AugmentConfig, augment, "augment")
    augment.pop("colour_ops_on")
    with pytest.raises(ConfigError, match=r"augment\.colour_ops_on"):
        from_mapping(AugmentConfig, augment, "augment")
