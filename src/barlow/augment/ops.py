"""The FFCV operations of a view (barlow.augment): five in-place operations on the
uint8 (B, H, W, 3) batch, each applying its kernel (barlow.augment.kernels) to a sample
with probability p, and the cropping decoder ``RandomResizedCrop``.
"""

from __future__ import annotations

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

from barlow.augment.kernels import (CROP_UNIFORMS, blur_image, crop_box, flip_image,
                                    grayscale_image, jitter_image, jitter_order,
                                    solarize_image, uniforms)


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

    def _per_sample(self, draws: int, apply: Callable) -> Callable:
        """The code of every operation here: ``draws`` uniforms per sample, u =
        uniforms(indices, seed, draws); where u[i, 0] < p, ``apply(images[i], scratch,
        i, u[i])`` transforms sample i in place (``scratch`` None unless needs_scratch).
        ``apply`` compiles with ffcv's Compiler flags wherever the loop compiles (and
        stays Python where the loop does), so the parameter arithmetic it holds compiles
        as it did when written inline in the loop."""
        my_range = Compiler.get_iterator()
        p, seed = self.p, self.seed
        apply = register_jitable(fastmath=True, nogil=True, error_model="numpy")(apply)

        def per_sample(images, scratch, batch_indices):
            u = uniforms(batch_indices, seed, draws)
            for i in my_range(images.shape[0]):
                if u[i, 0] < p:
                    apply(images[i], scratch, i, u[i])
            return images

        per_sample.is_parallel = True
        per_sample.with_indices = True
        return per_sample


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
        hue = self.hue
        lows = np.array([max(0.0, 1.0 - m) for m in (self.brightness, self.contrast, self.saturation)])
        spans = np.array([1.0 + m for m in (self.brightness, self.contrast, self.saturation)]) - lows

        def color_jitter(image, scratch, i, u):
            jitter_image(image, scratch[i], jitter_order(u[5:]),
                         lows[0] + spans[0] * u[1], lows[1] + spans[1] * u[2],
                         lows[2] + spans[2] * u[3], hue * (2.0 * u[4] - 1.0))

        return self._per_sample(8, color_jitter)


class RandomGrayscale(_RandomImageOp):
    """With probability p, replace the image by its ITU-R 601-2 luma on 3 channels.

    L = 0.299 R + 0.587 G + 0.114 B, rounded (see ``grayscale_image``); an exact no-op
    on grey images. Applied if uniforms(indices, seed, 1)[i, 0] < p.
    """

    def __init__(self, p: float = 0.2, *, seed: int = 0):
        super().__init__(p, seed)

    def generate_code(self) -> Callable:
        def random_grayscale(image, _scratch, _i, _u):
            grayscale_image(image)

        return self._per_sample(1, random_grayscale)


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
        low, span = self.sigma[0], self.sigma[1] - self.sigma[0]

        def gaussian_blur(image, scratch, i, u):
            blur_image(image, scratch[i], low + span * u[1])

        return self._per_sample(2, gaussian_blur)


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
        threshold = self.threshold

        def solarization(image, _scratch, _i, _u):
            solarize_image(image, threshold)

        return self._per_sample(1, solarization)


class RandomHorizontalFlip(_RandomImageOp):
    """With probability p, mirror the image left–right (in place).

    Applied if uniforms(indices, seed, 1)[i, 0] < p. Replaces ffcv's
    RandomHorizontalFlip, whose coin comes from numba's unseeded per-thread RNG.
    """

    def __init__(self, p: float = 0.5, *, seed: int = 0):
        super().__init__(p, seed)

    def generate_code(self) -> Callable:
        def random_flip(image, _scratch, _i, _u):
            flip_image(image)

        return self._per_sample(1, random_flip)


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
