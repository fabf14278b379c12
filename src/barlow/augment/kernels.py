"""The numba kernels behind barlow.augment's operations: the counter-based uniforms
(splitmix64) every random draw comes from, and the per-image transforms (colour jitter,
grayscale, blur, solarisation, flip) and crop box, each a pure function of an image
and its drawn parameters, compiled into whichever FFCV pipeline calls them
(register_jitable) and plain numpy when the compiler is off. Formulas and the
reproducibility argument: the package docstring (barlow.augment).
"""

from __future__ import annotations

import math

import numpy as np
from numba.extending import register_jitable

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
def blur_weights(sigma, radius):
    """float32 taps w_t = exp(−t² / 2σ²) / Σ_s exp(−s² / 2σ²), t = −r..r."""
    weights = np.exp(-0.5 * ((np.arange(2 * radius + 1) - radius) / sigma) ** 2).astype(np.float32)
    return weights / weights.sum()


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
    weights = blur_weights(sigma, radius)
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
