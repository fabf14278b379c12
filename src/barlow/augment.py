"""The paper's asymmetric view augmentations as FFCV operations.

ffcv 1.0.2 ships RandomResizedCrop (a decoder) and RandomHorizontalFlip but none of
the colour, blur or solarisation transforms Barlow Twins needs, and its own
RandomBrightness/Contrast/Saturation run in a fixed order without hue; its crop and
flip are also not reproducible (see below). This module provides all six random
steps of a view: the decoder ``RandomResizedCrop`` and the operations
``RandomHorizontalFlip``, ``ColorJitter``, ``RandomGrayscale``, ``GaussianBlur`` and
``Solarization``. Each of the five operations

* works in place on the uint8 (B, H, W, 3) RGB batch that the decoder produced and
  stays in FFCV's JIT stage, so a whole view (decode, crop, flip, colour, blur,
  solarise, normalise) compiles into one numba function per pipeline;
* draws its parameters per sample, independently of the other samples in the batch;
* takes every probability and strength as a plain argument.

Randomness and what is reproducible
-----------------------------------
ffcv's own random transforms (RandomResizedCropRGBImageDecoder,
RandomHorizontalFlip) call ``np.random`` inside compiled code. Numba keeps one
Mersenne-Twister state per thread and seeds each from ``os.urandom`` the first time
that thread draws; ffcv runs every epoch in a fresh producer thread and fans samples
out over numba's worker threads. With them the loader's ``seed`` fixes only the
*order* of the samples (``np.random.default_rng(seed + epoch).permutation``); crops and
flips differ from run to run and nothing outside the compiled code can seed them.

The decoder and operations here do not use that state. A sample's parameters are a
pure function of four integers, hashed with splitmix64 (a counter-based generator, so
no state is carried between calls or threads):

    u_j(sample) = splitmix64(seed_op ^ batch_key ^ golden * index) advanced j times,
    batch_key   = Σ_p splitmix64(golden * index_p + m2 * p)  (mod 2^64),

where ``index`` is the sample's position in the .beton file, ``p`` its position in the
batch and ``seed_op`` the operation's own seed. An epoch is not visible to compiled
code, so the batch composition stands in for it: with a RANDOM order every epoch
reshuffles the batches and hence redraws every sample's parameters, and the whole
sequence is reproducible given the loader seed, the operation seeds and the number of
processes. With a SEQUENTIAL order the batches repeat, so the same parameters repeat
every epoch. Within one run the results are independent of thread scheduling and of
``batches_ahead``, and identical with the numba compiler on or off (up to the
last-bit rounding that ``fastmath`` allows, i.e. at most ±1 in a pixel).

Grey images
-----------
For a grey image (R = G = B everywhere, e.g. Fashion-MNIST stored as RGB) saturation,
hue and grayscale are exact no-ops: the luma of (v, v, v) is v (the weights sum to
one, and the integer form used for grayscale is exact), blending with it returns v,
and a pixel without chroma keeps its value under any hue rotation. Brightness and
contrast act as on colour images, identically on the three channels, so the image
stays grey.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba.extending import register_jitable

__all__ = [
    "RandomResizedCrop",
    "RandomHorizontalFlip",
    "ColorJitter",
    "RandomGrayscale",
    "GaussianBlur",
    "Solarization",
    "uniforms",
    "jitter_order",
    "blur_radius",
    "crop_box",
    "CROP_UNIFORMS",
]

# splitmix64 constants (Steele, Lea & Flood 2014). Module-level np.uint64 values so
# that numba types every operand as uint64: a Python int would promote the
# arithmetic to float64 or int64.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S11 = np.uint64(11)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_TWO_POW_M53 = 1.0 / 9007199254740992.0

# Order of the colour-jitter steps, as in torchvision's ColorJitter.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3


@register_jitable
def _mix(z):
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic, no warnings)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@register_jitable
def uniforms(batch_indices, seed, n):
    """(B, n) float64 uniforms in [0, 1), a pure function of the batch and ``seed``.

    x_i = seed ^ batch_key ^ golden·index_i, u_ij = top53(mix(x_i + (j+1)·golden)) / 2^53,
    batch_key = Σ_p mix(golden·index_p + m2·p) mod 2^64 (see the module docstring).
    All arithmetic is on arrays so that numpy wraps silently when not compiled.
    """
    idx = batch_indices.astype(np.uint64)
    pos = np.arange(idx.shape[0]).astype(np.uint64)
    batch_key = _mix(idx * _GOLDEN + pos * _M2).sum()
    x = (idx * _GOLDEN) ^ batch_key ^ seed
    out = np.empty((idx.shape[0], n), dtype=np.float64)
    for j in range(n):
        x = x + _GOLDEN
        out[:, j] = (_mix(x) >> _S11).astype(np.float64) * _TWO_POW_M53
    return out


@register_jitable
def _clip255(v):
    return min(max(v, 0.0), 255.0)


@register_jitable
def _luma(r, g, b):
    """ITU-R 601-2 luma L = 0.299 R + 0.587 G + 0.114 B; L(v, v, v) = v."""
    return (299.0 * r + 587.0 * g + 114.0 * b) / 1000.0


@register_jitable
def jitter_image(img, buf, order, brightness, contrast, saturation, hue):
    """Colour-jitter one uint8 HWC image in place, steps in ``order``.

    With x the image in [0, 255], clipped to [0, 255] after every step and rounded to
    the nearest integer at the end (PIL rounds; torchvision's tensor path truncates):
      brightness  x ← b·x
      contrast    x ← c·x + (1 − c)·mean(L(x))
      saturation  x ← s·x + (1 − s)·L(x)            (L replicated to 3 channels)
      hue         H ← (H + h) mod 1 in HSV, S and V unchanged.
    A factor of 1 (or h = 0) skips its step. ``buf`` is float32 HWC scratch, used as
    three channel planes of H·W values between the steps.
    """
    n = img.shape[0] * img.shape[1]
    pixels = img.reshape(n, 3)
    # Channel planes make every step one contiguous loop over pixels, which LLVM
    # vectorises; the interleaved (x, c) loops with per-pixel branches it did not.
    planes = buf.reshape(3, n)
    red, green, blue = planes[0], planes[1], planes[2]
    for p in range(n):
        red[p], green[p], blue[p] = pixels[p, 0], pixels[p, 1], pixels[p, 2]
    for step in order:
        if step == _BRIGHTNESS and brightness != 1.0:
            for p in range(n):
                red[p] = _clip255(brightness * red[p])
                green[p] = _clip255(brightness * green[p])
                blue[p] = _clip255(brightness * blue[p])
        elif step == _CONTRAST and contrast != 1.0:
            total = 0.0
            for p in range(n):
                total += _luma(red[p], green[p], blue[p])
            offset = (1.0 - contrast) * total / n
            for p in range(n):
                red[p] = _clip255(contrast * red[p] + offset)
                green[p] = _clip255(contrast * green[p] + offset)
                blue[p] = _clip255(contrast * blue[p] + offset)
        elif step == _SATURATION and saturation != 1.0:
            for p in range(n):
                grey = (1.0 - saturation) * _luma(red[p], green[p], blue[p])
                red[p] = _clip255(saturation * red[p] + grey)
                green[p] = _clip255(saturation * green[p] + grey)
                blue[p] = _clip255(saturation * blue[p] + grey)
        elif step == _HUE and hue != 0.0:
            for p in range(n):
                r, g, b = red[p], green[p], blue[p]
                hi = max(r, g, b)
                d = hi - min(r, g, b)
                # A pixel without chroma (d = 0) has no hue and keeps its value. Selects,
                # not branches, and no helper returning a tuple: either stops LLVM
                # from vectorising this loop. Vectorised, fastmath turns _hue6's float32
                # division into a refined reciprocal estimate (≤ 1 ulp off), so a value
                # can round ±1 away from the uncompiled code (1 in 1.8e8 measured).
                chroma = d > 0.0
                h = _hue6(r, g, b, hi, d if chroma else np.float32(1.0)) / 6.0 + hue
                h6 = 6.0 * (h - math.floor(h))
                red[p] = _hue_channel(hi, d, 5.0 + h6) if chroma else r
                green[p] = _hue_channel(hi, d, 3.0 + h6) if chroma else g
                blue[p] = _hue_channel(hi, d, 1.0 + h6) if chroma else b
    for p in range(n):
        pixels[p, 0] = np.uint8(math.floor(red[p] + 0.5))
        pixels[p, 1] = np.uint8(math.floor(green[p] + 0.5))
        pixels[p, 2] = np.uint8(math.floor(blue[p] + 0.5))


@register_jitable
def jitter_order(u):
    """Permutation of the four jitter steps from three uniforms (Fisher–Yates).

    Start from (brightness, contrast, saturation, hue) = (0, 1, 2, 3); for k = 3, 2, 1
    swap entry k with entry ⌊u_{3−k}·(k + 1)⌋. Each of the 24 orders has probability 1/24.
    """
    order = np.arange(4)
    for k in range(3, 0, -1):
        j = int(u[3 - k] * (k + 1))
        order[k], order[j] = order[j], order[k]
    return order


@register_jitable
def _hue6(r, g, b, hi, d):
    """6·H of RGB → HSV for a pixel with max ``hi`` and chroma d = max − min > 0.

    6·H = (G − B)/d, (B − R)/d + 2 or (R − G)/d + 4 when the max is R, G or B; in
    [−1, 5], the caller takes H mod 1 after adding the shift.
    """
    num = g - b if hi == r else (b - r if hi == g else r - g)
    return (0.0 if hi == r else (2.0 if hi == g else 4.0)) + num / d


@register_jitable
def _hue_channel(hi, d, k):
    """HSV → RGB for one channel: V − d·clamp(min(k', 4 − k'), 0, 1), k' = k mod 6.

    With H the rotated hue in [0, 1), channel c ∈ {R, G, B} takes k = 5 − 2c + 6H ∈
    [0, 12), where k mod 6 is k or k − 6, both exact: the value of Python's ``%``
    (fmod) without a libm call per channel.
    """
    k = k - 6.0 if k >= 6.0 else k
    return _clip255(hi - d * min(max(min(k, 4.0 - k), 0.0), 1.0))


@register_jitable
def grayscale_image(img):
    """Replace one uint8 HWC image in place by its luma, replicated to 3 channels.

    L = (19595 R + 38470 G + 7471 B + 2^15) >> 16, PIL's integer form of
    0.299 R + 0.587 G + 0.114 B rounded; the weights sum to 2^16, so L(v, v, v) = v.
    """
    for y in range(img.shape[0]):
        for x in range(img.shape[1]):
            lum = (19595 * np.int32(img[y, x, 0]) + 38470 * np.int32(img[y, x, 1])
                   + 7471 * np.int32(img[y, x, 2]) + 32768) >> 16
            for c in range(3):
                img[y, x, c] = np.uint8(lum)


@register_jitable
def blur_radius(sigma, height, width):
    """Kernel radius r = ⌈3σ⌉, capped at min(H, W) − 1 so reflection stays inside."""
    return min(int(math.ceil(3.0 * sigma)), min(height, width) - 1)


@register_jitable
def blur_image(img, buf, sigma):
    """Gaussian-blur one uint8 HWC image in place with a separable kernel.

    w_t ∝ exp(−t² / 2σ²) for t = −r..r, r = blur_radius(σ), Σ w_t = 1; the image is
    padded by reflection (…, x2, x1 | x0, x1, x2, …), as torchvision does, filtered
    along rows into the float32 scratch ``buf`` and then along columns, and rounded.
    σ is in pixels of the output image, as in the reference (PIL's radius = σ).
    """
    height, width = img.shape[0], img.shape[1]
    radius = blur_radius(sigma, height, width)
    taps = 2 * radius + 1
    weights = np.exp(-0.5 * ((np.arange(taps) - radius) / sigma) ** 2).astype(np.float32)
    weights = weights / weights.sum()
    # Rows as flat runs of 3·W values (x, c interleaved; a tap moves by 3), so every
    # inner loop is one contiguous, branch-free loop that LLVM vectorises; reflection
    # is resolved once per row (padded copy) or once per (row, tap).
    n = 3 * width
    pixels = img.reshape(height, n)
    rows = buf.reshape(height, n)
    padded = np.empty(n + 6 * radius, dtype=np.float32)
    for y in range(height):
        for x in range(width + 2 * radius):
            xs = abs(x - radius)
            if xs >= width:
                xs = 2 * (width - 1) - xs
            for c in range(3):
                padded[3 * x + c] = img[y, xs, c]
        out = rows[y]
        for k in range(n):
            out[k] = 0.0
        for t in range(taps):
            w, src = weights[t], padded[3 * t:3 * t + n]
            for k in range(n):
                out[k] += w * src[k]
    acc = np.empty(n, dtype=np.float32)
    for y in range(height):
        for k in range(n):
            acc[k] = 0.0
        for t in range(taps):
            ys = abs(y + t - radius)
            if ys >= height:
                ys = 2 * (height - 1) - ys
            w, src = weights[t], rows[ys]
            for k in range(n):
                acc[k] += w * src[k]
        out = pixels[y]
        for k in range(n):
            out[k] = np.uint8(math.floor(_clip255(acc[k]) + 0.5))


@register_jitable
def solarize_image(img, threshold):
    """x ← 255 − x where x ≥ threshold, in place on one uint8 HWC image (PIL's rule)."""
    for y in range(img.shape[0]):
        for x in range(img.shape[1]):
            for c in range(3):
                if img[y, x, c] >= threshold:
                    img[y, x, c] = 255 - img[y, x, c]


#: Uniforms per sample used by ``crop_box``: two per attempt, then the top-left corner.
CROP_ATTEMPTS = 10
CROP_UNIFORMS = 2 * CROP_ATTEMPTS + 2


@register_jitable
def crop_box(height, width, scale_min, scale_max, ratio_min, ratio_max, u):
    """torchvision's RandomResizedCrop.get_params on the uniforms ``u`` → (i, j, h, w).

    For attempt k = 0..9, with a = H·W:
      s = scale_min + (scale_max − scale_min)·u_2k,
      r = exp(log ratio_min + (log ratio_max − log ratio_min)·u_2k+1),
      w = round(√(a·s·r)), h = round(√(a·s / r))   (round half to even, as Python);
    the first attempt with 0 < w ≤ W and 0 < h ≤ H is taken, its corner drawn uniformly
    among the H − h + 1 rows and W − w + 1 columns: i = ⌊u_20·(H − h + 1)⌋,
    j = ⌊u_21·(W − w + 1)⌋. If none fits, the central crop of the whole image clamped to
    the ratio range (torchvision's fallback): w = W, h = round(W / ratio_min) if
    W/H < ratio_min; h = H, w = round(H·ratio_max) if W/H > ratio_max; else the whole
    image; i = ⌊(H − h)/2⌋, j = ⌊(W − w)/2⌋. ``u`` needs CROP_UNIFORMS entries.
    """
    height, width = int(height), int(width)  # no unsigned arithmetic below
    area = float(height) * float(width)
    log_min, log_max = math.log(ratio_min), math.log(ratio_max)
    for k in range(CROP_ATTEMPTS):
        target = area * (scale_min + (scale_max - scale_min) * u[2 * k])
        aspect = math.exp(log_min + (log_max - log_min) * u[2 * k + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(u[2 * CROP_ATTEMPTS] * (height - h + 1))
            j = int(u[2 * CROP_ATTEMPTS + 1] * (width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < ratio_min:
        w = width
        h = int(round(w / ratio_min))
    elif in_ratio > ratio_max:
        h = height
        w = int(round(h * ratio_max))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@register_jitable
def flip_image(img):
    """Mirror one HWC image left–right in place: x ← W − 1 − x."""
    width = img.shape[1]
    for y in range(img.shape[0]):
        for x in range(width // 2):
            for c in range(img.shape[2]):
                img[y, x, c], img[y, width - 1 - x, c] = img[y, width - 1 - x, c], img[y, x, c]


def _check_probability(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must lie in [0, 1], got {p}")
    return float(p)


def _check_seed(seed: int) -> np.uint64:
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must lie in [0, 2^64), got {seed}")
    return np.uint64(seed)


class _RandomImageOp(Operation):
    """Shared plumbing: uint8 (H, W, 3) in, same out, in place, per-sample coin p."""

    #: float32 (H, W, 3) scratch per sample, for operations that need one.
    needs_scratch = False

    def __init__(self, p: float, seed: int):
        super().__init__()
        self.p = _check_probability(p)
        self.seed = _check_seed(seed)

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        shape = previous_state.shape
        if previous_state.dtype != np.dtype("u1") or len(shape) != 3 or shape[2] != 3:
            raise TypeError(f"{type(self).__name__} needs uint8 HWC RGB images, got "
                            f"{previous_state.dtype} {shape}; place it before NormalizeImage/ToTensor")
        scratch = AllocationQuery(tuple(shape), np.dtype("<f4")) if self.needs_scratch else None
        # Results are written into the decoder's buffer, so no output allocation.
        return replace(previous_state, jit_mode=True), scratch

    def _finish(self, code: Callable) -> Callable:
        code.is_parallel = True
        code.with_indices = True
        return code


class ColorJitter(_RandomImageOp):
    """With probability p, torchvision-style colour jitter in a random order per sample.

    Factors b, c, s ~ U[max(0, 1 − m), 1 + m] for the strengths m = brightness,
    contrast, saturation, and h ~ U[−hue, hue]; the four steps run in a uniformly
    random permutation (see ``jitter_image`` for each step's formula). A strength of 0
    disables its step. Grey images: saturation and hue are exact no-ops.

    Draws per sample, u = uniforms(indices, seed, 8)[i]: apply if u0 < p;
    b, c, s = low + (high − low)·(u1, u2, u3); h = hue·(2·u4 − 1);
    order = jitter_order(u5, u6, u7).
    """

    needs_scratch = True

    def __init__(self, p: float = 0.8, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1, *, seed: int = 0):
        super().__init__(p, seed)
        for name, value in (("brightness", brightness), ("contrast", contrast),
                            ("saturation", saturation)):
            if value < 0:
                raise ValueError(f"{name} must be ≥ 0, got {value}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5], got {hue}")
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.saturation, self.hue = float(saturation), float(hue)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        p, seed, hue = self.p, self.seed, self.hue
        lows = np.array([max(0.0, 1.0 - m) for m in (self.brightness, self.contrast, self.saturation)])
        spans = np.array([1.0 + m for m in (self.brightness, self.contrast, self.saturation)]) - lows

        def color_jitter(images, scratch, batch_indices):
            u = uniforms(batch_indices, seed, 8)
            for i in my_range(images.shape[0]):
                if u[i, 0] < p:
                    jitter_image(images[i], scratch[i], jitter_order(u[i, 5:]),
                                 lows[0] + spans[0] * u[i, 1], lows[1] + spans[1] * u[i, 2],
                                 lows[2] + spans[2] * u[i, 3], hue * (2.0 * u[i, 4] - 1.0))
            return images

        return self._finish(color_jitter)


class RandomGrayscale(_RandomImageOp):
    """With probability p, replace the image by its ITU-R 601-2 luma on 3 channels.

    L = 0.299 R + 0.587 G + 0.114 B, rounded (see ``grayscale_image``); an exact no-op
    on grey images. Applied if uniforms(indices, seed, 1)[i, 0] < p.
    """

    def __init__(self, p: float = 0.2, *, seed: int = 0):
        super().__init__(p, seed)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        p, seed = self.p, self.seed

        def random_grayscale(images, _, batch_indices):
            u = uniforms(batch_indices, seed, 1)
            for i in my_range(images.shape[0]):
                if u[i, 0] < p:
                    grayscale_image(images[i])
            return images

        return self._finish(random_grayscale)


class GaussianBlur(_RandomImageOp):
    """With probability p, blur with σ ~ U[sigma_min, sigma_max] pixels.

    Separable Gaussian of radius ⌈3σ⌉ (13 taps at σ = 2) with reflection padding; the
    reference blurs with PIL's GaussianBlur(radius=σ), whose σ is also in pixels and
    independent of the image size (see ``blur_image``).
    Draws per sample, u = uniforms(indices, seed, 2)[i]: apply if u0 < p;
    σ = sigma_min + (sigma_max − sigma_min)·u1.
    """

    needs_scratch = True

    def __init__(self, p: float = 1.0, sigma: Sequence[float] = (0.1, 2.0), *, seed: int = 0):
        super().__init__(p, seed)
        low, high = (float(s) for s in sigma)
        if not 0.0 < low <= high:
            raise ValueError(f"sigma range must satisfy 0 < min ≤ max, got {sigma}")
        self.sigma = (low, high)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        p, seed = self.p, self.seed
        low, span = self.sigma[0], self.sigma[1] - self.sigma[0]

        def gaussian_blur(images, scratch, batch_indices):
            u = uniforms(batch_indices, seed, 2)
            for i in my_range(images.shape[0]):
                if u[i, 0] < p:
                    blur_image(images[i], scratch[i], low + span * u[i, 1])
            return images

        return self._finish(gaussian_blur)


class Solarization(_RandomImageOp):
    """With probability p, x ← 255 − x for every channel value x ≥ threshold.

    Applied if uniforms(indices, seed, 1)[i, 0] < p.
    """

    def __init__(self, p: float = 0.2, threshold: int = 128, *, seed: int = 0):
        super().__init__(p, seed)
        if not 0 <= threshold <= 256:
            raise ValueError(f"threshold must lie in [0, 256], got {threshold}")
        self.threshold = int(threshold)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        p, seed, threshold = self.p, self.seed, self.threshold

        def solarization(images, _, batch_indices):
            u = uniforms(batch_indices, seed, 1)
            for i in my_range(images.shape[0]):
                if u[i, 0] < p:
                    solarize_image(images[i], threshold)
            return images

        return self._finish(solarization)


class RandomHorizontalFlip(_RandomImageOp):
    """With probability p, mirror the image left–right (in place).

    Applied if uniforms(indices, seed, 1)[i, 0] < p. Replaces ffcv's
    RandomHorizontalFlip, whose coin comes from numba's unseeded per-thread RNG.
    """

    def __init__(self, p: float = 0.5, *, seed: int = 0):
        super().__init__(p, seed)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        p, seed = self.p, self.seed

        def random_flip(images, _, batch_indices):
            u = uniforms(batch_indices, seed, 1)
            for i in my_range(images.shape[0]):
                if u[i, 0] < p:
                    flip_image(images[i])
            return images

        return self._finish(random_flip)


class RandomResizedCrop(ResizedCropRGBImageDecoder):
    """Decoder: decode, crop a random box and resize it to ``output_size`` (H, W).

    The box follows torchvision's RandomResizedCrop (10 attempts at an area fraction
    ~ U(scale) and a log aspect ratio ~ U(log ratio), then the central fallback; see
    ``crop_box``) on u = uniforms(indices, seed, CROP_UNIFORMS)[i], so it is
    reproducible like the other operations here, unlike ffcv's
    RandomResizedCropRGBImageDecoder. The resize is ffcv's (OpenCV INTER_AREA). Works
    on raw and JPEG fields of any image sizes; output uint8 (H, W, 3).
    """

    def __init__(self, output_size: Sequence[int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0), *, seed: int = 0):
        super().__init__(tuple(int(s) for s in output_size))
        scale = tuple(float(s) for s in scale)
        ratio = tuple(float(r) for r in ratio)
        if len(scale) != 2 or not 0.0 <= scale[0] <= scale[1] or scale[1] <= 0.0:
            raise ValueError(f"scale must satisfy 0 ≤ min ≤ max, max > 0, got {scale}")
        if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min ≤ max, got {ratio}")
        self.scale, self.ratio = scale, ratio
        self.seed = _check_seed(seed)

    @property
    def get_crop_generator(self):
        # Required by ffcv's abstract base; generate_code below calls crop_box directly.
        return crop_box

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        seed = self.seed
        (scale_min, scale_max), (ratio_min, ratio_max) = self.scale, self.ratio

        def random_resized_crop(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            u = uniforms(batch_indices, seed, CROP_UNIFORMS)
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    flat = temp_storage[dst_ix]
                    imdecode_c(image_data, flat, height, width, height, width,
                               0, 0, 1, 1, False, False)
                    image = flat.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                i, j, h, w = crop_box(height, width, scale_min, scale_max,
                                      ratio_min, ratio_max, u[dst_ix])
                resize_crop_c(image, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        random_resized_crop.is_parallel = True
        return random_resized_crop
