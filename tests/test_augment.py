"""augment: each FFCV operation against an independent reference (numpy formula, PIL or
torchvision) on the parameters it draws, its probabilities, grey-image behaviour and the
purity of its random draws.

The operations run with ffcv's compiler off (plain Python on small images, no numba
compile); tests/test_loaders.py runs them compiled inside a Loader and checks the
compiled results against these same Python ones.
"""

from __future__ import annotations

import itertools

import math

import numba
import numpy as np
import pytest
import torch
from ffcv.pipeline.compiler import Compiler
from PIL import Image, ImageOps
from torchvision.transforms import RandomResizedCrop as TorchRandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from barlow.augment import (CROP_UNIFORMS, ColorJitter, GaussianBlur, RandomGrayscale,
                            RandomHorizontalFlip, RandomResizedCrop, Solarization, blur_radius,
                            crop_box, jitter_order, uniforms)


@pytest.fixture(autouse=True)
def python_mode():
    """Run the operations' code as plain Python; restore the compiler afterwards."""
    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(True)


def run(op, images, indices=None):
    """Apply ``op`` to a copy of a uint8 (B, H, W, 3) batch as ffcv would."""
    images = images.copy()
    if indices is None:
        indices = np.arange(len(images), dtype=np.uint64)
    scratch = np.empty(images.shape, np.float32) if op.needs_scratch else None
    return op.generate_code()(images, scratch, indices)


def random_images(n, h=12, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def grey_images(n, h=12, w=10, seed=1):
    grey = np.random.default_rng(seed).integers(0, 256, (n, h, w, 1), dtype=np.uint8)
    return np.repeat(grey, 3, axis=3)


def to_float_chw(image):
    return torch.from_numpy(image).permute(2, 0, 1).double() / 255


def to_uint8_hwc(tensor):
    return np.floor(tensor.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def assert_close(actual, expected, atol):
    diff = np.abs(actual.astype(int) - expected.astype(int))
    assert diff.max() <= atol, f"max |diff| {diff.max()} > {atol}"


# --- the random draws ------------------------------------------------------------------

def test_uniforms_are_a_pure_function_of_seed_batch_and_index():
    idx = np.array([5, 9, 2, 7], dtype=np.uint64)
    u = uniforms(idx, np.uint64(3), 4)
    assert u.shape == (4, 4) and u.min() >= 0 and u.max() < 1
    np.testing.assert_array_equal(u, uniforms(idx.astype(np.int64), np.uint64(3), 4))
    assert not np.isin(u, uniforms(idx, np.uint64(4), 4)).any()            # other seed
    assert not np.isin(u, uniforms(idx[[1, 0, 2, 3]], np.uint64(3), 4)).any()  # other batch
    assert len(np.unique(u)) == u.size


def test_uniforms_look_uniform_and_independent():
    u = uniforms(np.arange(20000, dtype=np.uint64), np.uint64(0), 2)
    counts, _ = np.histogram(u[:, 0], bins=10, range=(0, 1))
    assert np.all(np.abs(counts - 2000) < 5 * np.sqrt(2000))
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03


def test_jitter_order_is_a_uniform_permutation():
    u = uniforms(np.arange(24000, dtype=np.uint64), np.uint64(1), 3)
    orders = [tuple(jitter_order(row)) for row in u]
    counts = {perm: orders.count(perm) for perm in itertools.permutations(range(4))}
    assert len(counts) == 24 and sum(counts.values()) == 24000
    assert all(abs(c - 1000) < 5 * np.sqrt(1000) for c in counts.values())


# --- the crop box ----------------------------------------------------------------------

RATIO = (3 / 4, 4 / 3)


def boxes(height, width, scale, ratio, n=4000, seed=0):
    u = uniforms(np.arange(n, dtype=np.uint64), np.uint64(seed), CROP_UNIFORMS)
    return np.array([crop_box(height, width, *scale, *ratio, row) for row in u])


def test_crop_box_is_the_identity_for_scale_and_ratio_one_on_squares():
    for side in (1, 5, 28, 224):
        assert {tuple(b) for b in boxes(side, side, (1.0, 1.0), (1.0, 1.0), n=50)} == {(0, 0, side, side)}
    # No square has the whole area of a 40×48 image: torchvision's central fallback.
    assert {tuple(b) for b in boxes(40, 48, (1.0, 1.0), (1.0, 1.0), n=50)} == {(0, 4, 40, 40)}
    # A tall 60×20 image never fits ≥ 90 % of its area at ratio ≥ 3/4: fallback again,
    # the same box as torchvision's.
    want = tuple(TorchRandomResizedCrop.get_params(torch.empty(3, 60, 20), [0.9, 1.0], list(RATIO)))
    assert want == (16, 0, 27, 20)
    assert {tuple(b) for b in boxes(60, 20, (0.9, 1.0), RATIO, n=50)} == {want}


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.3, 0.5)])
def test_crop_boxes_lie_inside_and_in_range_and_match_torchvision_in_distribution(scale):
    height, width = 60, 90
    ours = boxes(height, width, scale, RATIO)
    i, j, h, w = ours.T
    assert (i >= 0).all() and (j >= 0).all() and (i + h <= height).all() and (j + w <= width).all()
    # Area fraction and aspect ratio in range up to rounding w and h to whole pixels
    # (≤ 0.5 px on sides ≥ 20 px here).
    area = h * w / (height * width)
    assert area.min() >= scale[0] * (1 - 0.06) and area.max() <= scale[1] * (1 + 0.06)
    assert (w / h).min() >= RATIO[0] * (1 - 0.06) and (w / h).max() <= RATIO[1] * (1 + 0.06)
    # Same distribution as torchvision's get_params (two-sample Kolmogorov–Smirnov).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = np.array([TorchRandomResizedCrop.get_params(torch.empty(3, height, width),
                                                            list(scale), list(RATIO))
                           for _ in range(len(ours))])
    n = len(ours)
    for stat in (lambda b: b[:, 2] * b[:, 3], lambda b: b[:, 3] / b[:, 2],
                 lambda b: b[:, 0] + b[:, 2] / 2, lambda b: b[:, 1] + b[:, 3] / 2):
        a, t = stat(ours), stat(theirs)
        grid = np.union1d(a, t)
        ks = np.abs(np.searchsorted(np.sort(a), grid, "right")
                    - np.searchsorted(np.sort(t), grid, "right")).max() / n
        assert ks < 1.95 * math.sqrt(2 / n)  # α = 0.001


@pytest.mark.slow
def test_crop_box_compiled_equals_python():
    @numba.njit(fastmath=True)
    def all_boxes(height, width, u):
        out = np.empty((u.shape[0], 4), dtype=np.int64)
        for k in range(u.shape[0]):
            out[k] = crop_box(height, width, 0.08, 1.0, 0.75, 4 / 3, u[k])
        return out

    u = uniforms(np.arange(4000, dtype=np.uint64), np.uint64(3), CROP_UNIFORMS)
    np.testing.assert_array_equal(all_boxes(np.uint32(37), np.uint32(53), u),
                                  boxes(37, 53, (0.08, 1.0), (0.75, 4 / 3), seed=3))


def test_flip_mirrors_exactly():
    images = random_images(6, 7, 5)
    np.testing.assert_array_equal(run(RandomHorizontalFlip(p=1.0), images), images[:, :, ::-1])
    np.testing.assert_array_equal(run(RandomHorizontalFlip(p=0.0), images), images)


# --- each operation against its reference ----------------------------------------------

def test_solarization_matches_pil_and_torchvision_exactly():
    images = random_images(6)
    out = run(Solarization(p=1.0, threshold=128), images)
    np.testing.assert_array_equal(out, np.where(images >= 128, 255 - images, images))
    for image, result in zip(images, out):
        np.testing.assert_array_equal(result, np.asarray(ImageOps.solarize(Image.fromarray(image), 128)))
    tv = TF.solarize(torch.from_numpy(images).permute(0, 3, 1, 2), 128).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(out, tv)


def test_grayscale_is_the_601_2_luma_replicated_like_pil():
    images = random_images(6)
    out = run(RandomGrayscale(p=1.0), images)
    rgb = images.astype(np.float64)
    luma = np.floor(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2] + 0.5)
    for c in range(3):
        assert_close(out[..., c], luma, atol=0)  # exact away from .5 ties; none here
    for image, result in zip(images, out):
        np.testing.assert_array_equal(result[..., 0], np.asarray(Image.fromarray(image).convert("L")))


def test_blur_matches_a_separable_reflect_conv_and_torchvision():
    images = random_images(8, 20, 17)
    op = GaussianBlur(p=1.0, sigma=(0.1, 2.0), seed=11)
    out = run(op, images)
    sigmas = 0.1 + 1.9 * uniforms(np.arange(8, dtype=np.uint64), op.seed, 2)[:, 1]
    for image, result, sigma in zip(images, out, sigmas):
        r = blur_radius(sigma, 20, 17)
        taps = np.arange(-r, r + 1)
        w = np.exp(-taps ** 2 / (2 * sigma ** 2))
        w /= w.sum()
        padded = np.pad(image.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
        rows = sum(w[t] * padded[:, t:t + 17] for t in range(2 * r + 1))
        both = sum(w[t] * rows[t:t + 20] for t in range(2 * r + 1))
        assert_close(result, np.floor(both + 0.5), atol=1)
        tv = TF.gaussian_blur(torch.from_numpy(image).permute(2, 0, 1), [2 * r + 1] * 2, [sigma] * 2)
        assert_close(result, tv.permute(1, 2, 0).numpy(), atol=1)
    assert blur_radius(2.0, 224, 224) == 6 and blur_radius(2.0, 4, 9) == 3


def test_brightness_alone_is_x_times_f_clipped():
    images = random_images(16)
    op = ColorJitter(p=1.0, brightness=0.8, contrast=0, saturation=0, hue=0, seed=5)
    out = run(op, images)
    factors = 0.2 + 1.6 * uniforms(np.arange(16, dtype=np.uint64), op.seed, 8)[:, 1]
    expected = np.clip(np.floor(images * factors[:, None, None, None] + 0.5), 0, 255)
    assert_close(out, expected, atol=0)
    assert factors.min() < 1 < factors.max()


def torchvision_jitter(image, order, b, c, s, h):
    """torchvision's float-path ColorJitter steps in ``order`` on one HWC uint8 image."""
    x = to_float_chw(image)
    steps = (lambda x: TF.adjust_brightness(x, b), lambda x: TF.adjust_contrast(x, c),
             lambda x: TF.adjust_saturation(x, s), lambda x: TF.adjust_hue(x, h))
    for k in order:
        x = steps[k](x)
    return to_uint8_hwc(x)


def test_full_jitter_matches_torchvision_in_the_drawn_random_order():
    n = 48
    images = random_images(n, 9, 11)
    op = ColorJitter(p=1.0, brightness=0.4, contrast=0.4, saturation=0.9, hue=0.4, seed=7)
    out = run(op, images)
    u = uniforms(np.arange(n, dtype=np.uint64), op.seed, 8)
    first_hue = 0
    for image, result, row in zip(images, out, u):
        b, c = 0.6 + 0.8 * row[1], 0.6 + 0.8 * row[2]
        s, h = 0.1 + 1.8 * row[3], 0.4 * (2 * row[4] - 1)
        order = list(jitter_order(row[5:]))
        # torchvision's greys use 0.2989 instead of 0.299: ≤ 1 level after rounding.
        assert_close(result, torchvision_jitter(image, order, b, c, s, h), atol=1)
        first_hue += order[0] == 3
    # hue does not commute with saturation or contrast: the order matters and varies.
    assert 0 < first_hue < n
    swapped = torchvision_jitter(images[0], [3, 2, 1, 0], 1.0, 1.0, 0.1, 0.3)
    assert np.abs(swapped.astype(int) - torchvision_jitter(images[0], [2, 3, 1, 0], 1.0, 1.0, 0.1, 0.3)).max() > 5


def test_hue_alone_matches_torchvision():
    images = random_images(16)
    op = ColorJitter(p=1.0, brightness=0, contrast=0, saturation=0, hue=0.5, seed=2)
    out = run(op, images)
    hues = 0.5 * (2 * uniforms(np.arange(16, dtype=np.uint64), op.seed, 8)[:, 4] - 1)
    for image, result, h in zip(images, out, hues):
        assert_close(result, to_uint8_hwc(TF.adjust_hue(to_float_chw(image), h)), atol=1)


@pytest.mark.slow
def test_compiled_jitter_and_blur_equal_the_python_formulas():
    """ffcv's compiler flags vectorise the pixel loops (the hue's division becomes a
    reciprocal estimate): allowed ±1 after rounding, as fastmath permits elsewhere."""
    images = random_images(32, 24, 21)
    ops = (ColorJitter(p=1.0, brightness=0.8, contrast=0.8, saturation=0.9, hue=0.5, seed=12),
           ColorJitter(p=1.0, brightness=0, contrast=0, saturation=0, hue=0.5, seed=13),
           GaussianBlur(p=1.0, sigma=(0.1, 2.0), seed=14))
    for op in ops:
        compiled = numba.njit(fastmath=True, nogil=True, error_model="numpy")(op.generate_code())
        scratch = np.empty(images.shape, np.float32)
        out = compiled(images.copy(), scratch, np.arange(32, dtype=np.uint64))
        expected = run(op, images)
        assert_close(out, expected, atol=1)
        assert (out != expected).mean() < 1e-3, type(op).__name__


# --- grey images -----------------------------------------------------------------------

def test_saturation_hue_and_grayscale_are_exact_no_ops_on_grey_images():
    images = grey_images(32)
    for op in (ColorJitter(p=1.0, brightness=0, contrast=0, saturation=0.9, hue=0.5, seed=3),
               RandomGrayscale(p=1.0, seed=4)):
        np.testing.assert_array_equal(run(op, images), images)


def test_brightness_and_contrast_act_on_grey_images_and_keep_them_grey():
    images = grey_images(32)
    for op in (ColorJitter(p=1.0, brightness=0.4, contrast=0, saturation=0, hue=0, seed=3),
               ColorJitter(p=1.0, brightness=0, contrast=0.4, saturation=0, hue=0, seed=3),
               ColorJitter(p=1.0, seed=3)):
        out = run(op, images)
        assert (out != images).any(axis=(1, 2, 3)).all()
        np.testing.assert_array_equal(out[..., 0], out[..., 1])
        np.testing.assert_array_equal(out[..., 0], out[..., 2])


# --- probabilities ---------------------------------------------------------------------

def every_op(p):
    return (ColorJitter(p=p, seed=1), RandomGrayscale(p=p, seed=2),
            GaussianBlur(p=p, sigma=(1.0, 2.0), seed=3), Solarization(p=p, seed=4),
            RandomHorizontalFlip(p=p, seed=5))


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_p0_never_and_p1_always_changes(p):
    images = random_images(64, 6, 5)
    for op in every_op(p):
        changed = (run(op, images) != images).any(axis=(1, 2, 3))
        assert changed.all() if p == 1 else not changed.any(), type(op).__name__


def test_probability_is_honoured_statistically():
    n, p = 3000, 0.3
    images = random_images(n, 3, 3)
    images[:, 0, 0] = 200  # every image has something to solarise and some colour
    images[:, 0, 1] = (10, 120, 240)
    bound = 4 * np.sqrt(p * (1 - p) / n)
    for op in every_op(p):
        rate = (run(op, images) != images).any(axis=(1, 2, 3)).mean()
        assert abs(rate - p) < bound, (type(op).__name__, rate)


# --- purity and independence of the per-sample draws -----------------------------------

def test_result_depends_on_seed_index_and_batch_not_on_call():
    images = random_images(8)
    op = ColorJitter(p=1.0, seed=9)
    idx = np.arange(8, dtype=np.uint64)
    first = run(op, images, idx)
    np.testing.assert_array_equal(first, run(op, images, idx))              # same call, same result
    assert (first != run(ColorJitter(p=1.0, seed=10), images, idx)).any(axis=(1, 2, 3)).all()
    # Same images under other dataset indices (another batch): new parameters for all.
    assert (first != run(op, images, idx + 100)).any(axis=(1, 2, 3)).all()
    # Samples are independent: each image's draws differ from its neighbours'.
    same = np.repeat(images[:1], 8, axis=0)
    out = run(op, same, idx)
    assert len({o.tobytes() for o in out}) == 8


def test_operations_reject_bad_arguments_and_non_image_states():
    with pytest.raises(ValueError):
        Solarization(p=1.5)
    with pytest.raises(ValueError):
        GaussianBlur(sigma=(0.0, 1.0))
    with pytest.raises(ValueError):
        ColorJitter(hue=0.7)
    with pytest.raises(ValueError):
        RandomResizedCrop((8, 8), scale=(0.5, 0.1))
    with pytest.raises(ValueError):
        RandomResizedCrop((8, 8), ratio=(0.0, 1.0))
    with pytest.raises(ValueError):
        RandomHorizontalFlip(p=-0.1)
    from ffcv.pipeline.state import State
    state = State(jit_mode=True, device=torch.device("cpu"), shape=(8, 8, 3), dtype=np.dtype("f4"))
    with pytest.raises(TypeError):
        Solarization().declare_state_and_memory(state)
    state = State(jit_mode=True, device=torch.device("cpu"), shape=(8, 8, 3), dtype=np.dtype("u1"))
    new_state, memory = ColorJitter().declare_state_and_memory(state)
    assert new_state == state and memory.shape == (8, 8, 3) and memory.dtype == np.float32
    assert Solarization().declare_state_and_memory(state) == (state, None)
