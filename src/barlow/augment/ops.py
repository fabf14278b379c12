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

    #: Uniforms drawn per sample; u[:, 0] is the coin.
    draws = 1
    #: Names of the parameters ``derive_code`` writes after the coin.
    param_names: Tuple[str, ...] = ()

    def _fill_code(self) -> Optional[Callable]:
        """``fill(u, q)``: this operation's parameters from one sample's uniforms u into
        q[1:] (float64), in the order of ``param_names``; None when there are none."""
        return None

    def derive_code(self) -> Callable:
        """``derive(u)``: the (B, draws) uniforms → (B, 1 + len(param_names)) float64
        parameters; q[:, 0] = 1 where the operation applies (u0 < p), else 0, and the
        rest (from ``_fill_code``) only where it applies, 0 elsewhere. The one place
        where uniforms become parameters, for this operation (host) and for
        ``ColourParams`` (parameters for the batched tensor operations,
        barlow.augment.tensor_ops)."""
        p, width = self.p, 1 + len(self.param_names)
        fill = self._fill_code()
        if fill is None:
            def fill(_u, _q):
                pass
        fill = register_jitable(fastmath=True, nogil=True, error_model="numpy")(fill)

        def derive(u):
            q = np.zeros((u.shape[0], width))
            for i in range(u.shape[0]):
                if u[i, 0] < p:
                    q[i, 0] = 1.0
                    fill(u[i], q[i])
            return q

        return register_jitable(derive)

    def _per_sample(self, apply: Callable) -> Callable:
        """The code of every operation here: q = derive(uniforms(indices, seed, draws));
        where q[i, 0] = 1, ``apply(images[i], scratch, i, q[i])`` transforms sample i in
        place (``scratch`` None unless needs_scratch). ``apply`` compiles with ffcv's
        Compiler flags wherever the loop compiles (and stays Python where the loop
        does)."""
        my_range = Compiler.get_iterator()
        seed, draws = self.seed, self.draws
        derive = self.derive_code()
        apply = register_jitable(fastmath=True, nogil=True, error_model="numpy")(apply)

        def per_sample(images, scratch, batch_indices):
            q = derive(uniforms(batch_indices, seed, draws))
            for i in my_range(images.shape[0]):
                if q[i, 0] != 0.0:
                    apply(images[i], scratch, i, q[i])
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
    draws = 8
    param_names = ("brightness", "contrast", "saturation", "hue",
                   "order0", "order1", "order2", "order3")

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

    def _fill_code(self) -> Callable:
        hue = self.hue
        lows = np.array([max(0.0, 1.0 - m) for m in (self.brightness, self.contrast, self.saturation)])
        spans = np.array([1.0 + m for m in (self.brightness, self.contrast, self.saturation)]) - lows

        def fill(u, q):
            q[1] = lows[0] + spans[0] * u[1]
            q[2] = lows[1] + spans[1] * u[2]
            q[3] = lows[2] + spans[2] * u[3]
            q[4] = hue * (2.0 * u[4] - 1.0)
            q[5:9] = jitter_order(u[5:])

        return fill

    def generate_code(self) -> Callable:
        def color_jitter(image, scratch, i, q):
            jitter_image(image, scratch[i], q[5:9], q[1], q[2], q[3], q[4])

        return self._per_sample(color_jitter)


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

        return self._per_sample(random_grayscale)


class GaussianBlur(_RandomImageOp):
    """With probability p, blur with σ ~ U[sigma_min, sigma_max] pixels.

    Separable Gaussian of radius ⌈3σ⌉ (13 taps at σ = 2) with reflection padding; the
    reference blurs with PIL's GaussianBlur(radius=σ), whose σ is also in pixels and
    independent of the image size (see ``blur_image``).
    Draws per sample, u = uniforms(indices, seed, 2)[i]: apply if u0 < p;
    σ = sigma_min + (sigma_max − sigma_min)·u1.
    """

    needs_scratch = True
    draws = 2
    param_names = ("sigma",)

    def __init__(self, p: float = 1.0, sigma: Sequence[float] = (0.1, 2.0), *, seed: int = 0):
        super().__init__(p, seed)
        low, high = (float(s) for s in sigma)
        if not 0.0 < low <= high:
            raise ValueError(f"sigma range must satisfy 0 < min ≤ max, got {sigma}")
        self.sigma = (low, high)

    def _fill_code(self) -> Callable:
        low, span = self.sigma[0], self.sigma[1] - self.sigma[0]

        def fill(u, q):
            q[1] = low + span * u[1]

        return fill

    def generate_code(self) -> Callable:
        def gaussian_blur(image, scratch, i, q):
            blur_image(image, scratch[i], q[1])

        return self._per_sample(gaussian_blur)


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

        return self._per_sample(solarization)


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

        return self._per_sample(random_flip)


#: Columns of ColourParams' output: each colour operation's derive() block, in the
#: order the operations run (jitter, grayscale, blur, solarise).
COLOUR_COLUMNS = {"jitter": slice(0, 9), "grayscale": slice(9, 10), "blur": slice(10, 12),
                  "solarize": slice(12, 13)}
COLOUR_PARAMS = 13


class ColourParams(Operation):
    """The per-sample parameters of a view's four colour operations, not the operations.

    For running the colour operations elsewhere (barlow.augment.tensor_ops, on the
    training device): put it in a pipeline of any field (its values are ignored, only
    the batch's indices are read) and it emits float64 (B, COLOUR_PARAMS), the
    ``derive`` blocks of ``jitter``, ``grayscale``, ``blur`` and ``solarize`` side by
    side (COLOUR_COLUMNS), drawn from their seeds exactly as those operations draw them
    on the host. An operation with p = 0 gives all-zero columns.
    """

    def __init__(self, jitter: ColorJitter, grayscale: RandomGrayscale, blur: GaussianBlur,
                 solarize: Solarization):
        super().__init__()
        self.jitter, self.grayscale, self.blur, self.solarize = jitter, grayscale, blur, solarize
        for name, op in (("jitter", jitter), ("grayscale", grayscale), ("blur", blur),
                         ("solarize", solarize)):
            columns = COLOUR_COLUMNS[name]
            assert columns.stop - columns.start == 1 + len(op.param_names), name

    def generate_code(self) -> Callable:
        (dj, sj, nj), (dg, sg, ng), (db, sb, nb), (ds, ss, ns) = (
            (op.derive_code(), op.seed, op.draws)
            for op in (self.jitter, self.grayscale, self.blur, self.solarize))

        def colour_params(_values, dst, batch_indices):
            out = dst[:batch_indices.shape[0]]
            out[:, 0:9] = dj(uniforms(batch_indices, sj, nj))
            out[:, 9:10] = dg(uniforms(batch_indices, sg, ng))
            out[:, 10:12] = db(uniforms(batch_indices, sb, nb))
            out[:, 12:13] = ds(uniforms(batch_indices, ss, ns))
            return out

        colour_params.with_indices = True
        return colour_params

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        shape, dtype = (COLOUR_PARAMS,), np.dtype("<f8")
        return (replace(previous_state, shape=shape, dtype=dtype, jit_mode=True),
                AllocationQuery(shape, dtype))


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
