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

Where the colour operations run
-------------------------------
Crop and flip always run on the host, in the decoding pipeline. The colour operations
(jitter, grayscale, blur, solarisation) run either there too, or, with
``ColourParams`` emitting their per-sample parameters on the host and
``apply_colour_ops`` (barlow.augment.tensor_ops) applying them as batched tensor
operations, on the training device after the uint8 batch has been copied there. Both
sides derive the parameters with the same code from the same seeds, indices and
batches, so the views agree within ±1 grey level (tensor_ops says where and why).

Grey images
-----------
For a grey image (R = G = B everywhere, e.g. Fashion-MNIST stored as RGB) saturation,
hue and grayscale are exact no-ops: the luma of (v, v, v) is v (the weights sum to
one, and the integer form used for grayscale is exact), blending with it returns v,
and a pixel without chroma keeps its value under any hue rotation. Brightness and
contrast act as on colour images, identically on the three channels, so the image
stays grey.
"""

from barlow.augment.kernels import CROP_UNIFORMS, blur_radius, crop_box, jitter_order, uniforms
from barlow.augment.ops import (COLOUR_COLUMNS, COLOUR_PARAMS, ColorJitter, ColourParams,
                                GaussianBlur, RandomGrayscale, RandomHorizontalFlip,
                                RandomResizedCrop, Solarization)
from barlow.augment.tensor_ops import apply_colour_ops

__all__ = [
    "RandomResizedCrop",
    "RandomHorizontalFlip",
    "ColorJitter",
    "RandomGrayscale",
    "GaussianBlur",
    "Solarization",
    "ColourParams",
    "COLOUR_PARAMS",
    "COLOUR_COLUMNS",
    "apply_colour_ops",
    "uniforms",
    "jitter_order",
    "blur_radius",
    "crop_box",
    "CROP_UNIFORMS",
]
