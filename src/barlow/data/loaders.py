"""FFCV loaders: two augmented views for pretraining, one view plus labels for evaluation.

Both read .beton files with the fields ``{'image': RGBImageField, 'label': IntField}``
and return a ``SeekableLoader`` (an ``ffcv.loader.Loader`` with ``seek``); iterate it once
per epoch.

Every pipeline decodes and crops in one step, with ``barlow.augment.RandomResizedCrop``
(a seeded version of ffcv's RandomResizedCrop decoder) or ffcv's CenterCrop decoder.
Both resize the crop with OpenCV's INTER_AREA (pixel-area averaging) inside ffcv's C
extension; there is no bicubic option, so the paper's
bicubic RandomResizedCrop becomes area interpolation here (close when downscaling,
blockier than bicubic when upscaling small crops).

The outputs are float images normalised with ``(x/255 − mean)/std`` in NCHW layout
(optionally channels_last memory format). On the CPU the normalisation is ffcv's
compiled lookup table, in float32. On CUDA the uint8 batch is copied with
``non_blocking=True`` (ffcv allocates pinned buffers) and normalised there in
``gpu_dtype``; ffcv's own GPU NormalizeImage needs cupy, which this project does not
install.

Where the colour operations run (``colour_ops_on``)
---------------------------------------------------
``"host"``: the whole view (decode, crop, flip, jitter, grayscale, blur, solarise) is
one compiled FFCV pipeline. ``"device"``: the pipeline stops after the flip and copies
the uint8 batch to ``device``; beside each view a second pipeline (on the 'label'
field, whose values it ignores) emits the colour operations' per-sample parameters
(``barlow.augment.ColourParams``, B × 13 float64 on the host), and the loader applies
them to the batch as batched tensor operations on ``device``
(``barlow.augment.apply_colour_ops``) and normalises in float32 before casting to
``gpu_dtype``. The parameters are the host path's (same seeds, indices and batches),
so the two settings give the same views within ±1 grey level in a rare pixel; on the
CPU ``"device"`` runs the tensor operations there. Batches are then fresh tensors, not
ffcv's reused buffers.

Reproducibility
---------------
Every random choice is a function of ``seed``: the sample order of epoch e is ffcv's,
drawn from (seed, e) (and the world size when distributed); the crop box, flip, colour,
grayscale, blur and solarisation parameters of a sample are functions of an
operation seed derived from (seed, view, operation), the sample's index in the .beton
file and the composition of its batch (see ``barlow.augment``), hence of (seed, epoch)
too. Nothing depends on thread scheduling, ``batches_ahead``, wall time or earlier
epochs, so on the CPU a loader built twice with the same arguments (``num_workers``
included: it switches ffcv between serial and parallel compiled code) yields
bit-identical batches, and epoch e can be produced without producing epochs 0..e−1:
``loader.seek(e, k)`` makes the next iteration epoch e from its batch k on, exactly the
batches k, k+1, … of an uninterrupted run (the first k are not decoded); setting
``loader.next_epoch = e`` and discarding k batches gives the same result, slower.
Compiled and uncompiled runs of one pipeline may differ by ±1 in a pixel (ffcv
compiles with ``fastmath``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.transforms import NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage

from barlow.augment import (ColorJitter, ColourParams, GaussianBlur, RandomGrayscale,
                            RandomHorizontalFlip, RandomResizedCrop, Solarization,
                            apply_colour_ops)
from barlow.config import AugmentConfig, require

__all__ = ["ViewSpec", "paper_views", "config_views", "view_operations", "colour_params",
           "pretrain_loader", "eval_loader", "SeekableLoader", "COLOUR_OPS_ON",
           "progressive_resolution"]

Order = Literal["random", "sequential", "quasi_random"]

#: Where a pretraining view's colour operations run (params.yaml augment.colour_ops_on).
COLOUR_OPS_ON = ("host", "device")

_ORDERS = {
    "random": OrderOption.RANDOM,
    "sequential": OrderOption.SEQUENTIAL,
    "quasi_random": OrderOption.QUASI_RANDOM,
}

#: Aspect-ratio range of torchvision's RandomResizedCrop, used by the reference.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class ViewSpec:
    """One view's augmentations; the defaults are the paper's view A at 224 px.

    A probability of 0 leaves its operation out of the pipeline altogether.
    """

    resolution: int = 224
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    crop_ratio: Tuple[float, float] = CROP_RATIO
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


def paper_views(resolution: int = 224) -> Tuple[ViewSpec, ViewSpec]:
    """The paper's (view A, view B): blur p 1.0 / 0.1, solarisation p 0.0 / 0.2."""
    view_a = ViewSpec(resolution=resolution)
    return view_a, replace(view_a, blur_p=0.1, solarize_p=0.2)


def config_views(cfg: AugmentConfig) -> Tuple[ViewSpec, ViewSpec]:
    """The two views of params.yaml's ``augment:`` section: A takes blur_p[0] and
    solarize_p[0], B blur_p[1] and solarize_p[1]; every other setting is shared."""
    common = dict(resolution=cfg.resolution, crop_scale=tuple(cfg.crop_scale),
                  flip_p=cfg.flip_p, jitter_p=cfg.jitter_p, brightness=cfg.brightness,
                  contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue,
                  grayscale_p=cfg.grayscale_p, blur_sigma=tuple(cfg.blur_sigma))
    view_a, view_b = (ViewSpec(**common, blur_p=cfg.blur_p[i], solarize_p=cfg.solarize_p[i])
                      for i in (0, 1))
    return view_a, view_b


def _op_seed(seed: int, view: int, op: int) -> int:
    """A 64-bit seed per (loader seed, view, operation), so no two operations share draws."""
    return int(np.random.SeedSequence([seed, view, op]).generate_state(1, np.uint64)[0])


# Operation numbers for _op_seed (stable: changing one changes every run's augmentations).
_JITTER, _GRAYSCALE, _BLUR, _SOLARIZE, _CROP, _FLIP = range(6)


def _colour_operations(view: ViewSpec, seed: int, view_index: int) -> dict:
    """The view's four colour operations, p = 0 included, seeded by (seed, view, op)."""
    def op_seed(op: int) -> int:
        return _op_seed(seed, view_index, op)

    return {"jitter": ColorJitter(view.jitter_p, view.brightness, view.contrast, view.saturation,
                                  view.hue, seed=op_seed(_JITTER)),
            "grayscale": RandomGrayscale(view.grayscale_p, seed=op_seed(_GRAYSCALE)),
            "blur": GaussianBlur(view.blur_p, view.blur_sigma, seed=op_seed(_BLUR)),
            "solarize": Solarization(view.solarize_p, seed=op_seed(_SOLARIZE))}


def view_operations(view: ViewSpec, seed: int, view_index: int = 0,
                    colour_ops: bool = True) -> list:
    """Decoder and uint8 augmentations of one view, in the reference's order.

    crop → flip → colour jitter → grayscale → blur → solarise, as torchvision's
    Compose in the reference; operations with probability 0 are omitted, and so are
    the four colour operations without ``colour_ops`` (see ``colour_params``).
    """
    ops: list = [RandomResizedCrop((view.resolution, view.resolution), scale=view.crop_scale,
                                   ratio=view.crop_ratio, seed=_op_seed(seed, view_index, _CROP))]
    if view.flip_p > 0:
        ops.append(RandomHorizontalFlip(view.flip_p, seed=_op_seed(seed, view_index, _FLIP)))
    if colour_ops:
        ops.extend(op for op in _colour_operations(view, seed, view_index).values() if op.p > 0)
    return ops


def colour_params(view: ViewSpec, seed: int, view_index: int = 0) -> ColourParams:
    """The operation emitting the per-sample parameters of the colour operations that
    ``view_operations`` would run on the host, for ``apply_colour_ops``."""
    return ColourParams(**_colour_operations(view, seed, view_index))


class _ColourOnDevice:
    """(uint8 view A, uint8 view B, parameters A, parameters B) → the two normalised views."""

    def __init__(self, thresholds: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 device: torch.device, dtype: torch.dtype, channels_last: bool):
        self.thresholds = tuple(thresholds)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, batch: tuple) -> tuple:
        images, params = batch[:2], batch[2:]
        return tuple(((apply_colour_ops(x, q, t) - self.mean) * self.inv_std)
                     .to(self.dtype, memory_format=self.memory_format)
                     for x, q, t in zip(images, params, self.thresholds, strict=True))


class NormalizeOnDevice(Operation):
    """(x − 255·mean) / (255·std) on a uint8 NCHW tensor, into a float buffer on its device.

    For CUDA, where ffcv's NormalizeImage would need cupy. The result goes into a
    buffer allocated by ffcv, which keeps it alive until the consumer is done with the
    batch (a fresh tensor made in ffcv's side stream could be recycled too early).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype,
                 channels_last: bool):
        super().__init__()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.dtype = dtype
        self.channels_last = channels_last

    def generate_code(self) -> Callable:
        mean, inv_std, channels_last = self.mean, self.inv_std, self.channels_last

        def normalize(images, dst):
            batch = images.shape[0]
            out = dst[:batch].permute(0, 3, 1, 2) if channels_last else dst[:batch]
            out.copy_(images)
            return out.sub_(mean).mul_(inv_std)

        return normalize

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        channels, height, width = previous_state.shape
        # Constants go to the device once here, not once per batch.
        self.mean = self.mean.to(previous_state.device, self.dtype)
        self.inv_std = self.inv_std.to(previous_state.device, self.dtype)
        shape = (height, width, channels) if self.channels_last else (channels, height, width)
        return (replace(previous_state, dtype=self.dtype),
                AllocationQuery(shape, self.dtype, previous_state.device))


def _image_tail(mean: Sequence[float], std: Sequence[float], device: torch.device,
                channels_last: bool, gpu_dtype: torch.dtype) -> list:
    """uint8 HWC batch → normalised float NCHW tensor on ``device``."""
    if device.type == "cpu":
        return [NormalizeImage(np.asarray(mean) * 255, np.asarray(std) * 255, np.float32),
                ToTensor(), ToTorchImage(channels_last=channels_last)]
    # ToTorchImage(channels_last=True) is a permuted view; with False it would copy
    # into a buffer that ffcv allocates in host memory, a round trip per batch. The
    # layout asked for is made on the device by NormalizeOnDevice's copy.
    return [ToTensor(), ToDevice(device, non_blocking=True),
            ToTorchImage(channels_last=True, convert_back_int16=False),
            NormalizeOnDevice(mean, std, gpu_dtype, channels_last)]


def progressive_resolution(epoch: int, epochs: int, resolution: int, min_resolution: int,
                           ramp: Tuple[float, float], step: int) -> int:
    """The side of epoch ``epoch``'s crops under progressive resizing (FFCV's ImageNet
    recipe), for epochs 0 … ``epochs`` − 1 ending at ``resolution``:

        t    = epoch / epochs,   f = clip((t − ramp[0]) / (ramp[1] − ramp[0]), 0, 1)
        r(e) = step · ⌊(min_resolution + f · (resolution − min_resolution)) / step + ½⌋

    clipped to [min_resolution, resolution]; from t ≥ ramp[1] on (also when ramp[0] =
    ramp[1]) the epochs crop at ``resolution`` exactly. A step's cost falls roughly
    as r², which is what the early epochs save; the features then adapt to the full
    side in the epochs after the ramp.
    """
    start, end = ramp
    t = epoch / epochs
    if t >= end:
        return resolution
    f = 0.0 if t <= start else (t - start) / (end - start)
    side = step * int((min_resolution + f * (resolution - min_resolution)) / step + 0.5)
    return min(max(side, min_resolution), resolution)


class SeekableLoader(Loader):
    """ffcv's Loader with ``seek``: resume at any (epoch, batch) of a run; with
    ``resolution_at``, the crop decoders ``crops`` output ``resolution_at(e)`` px in
    epoch e (progressive resizing)."""

    def __init__(self, *args, finish: Optional[Callable[[tuple], tuple]] = None,
                 crops: Sequence[RandomResizedCrop] = (),
                 resolution_at: Optional[Callable[[int], int]] = None, **kwargs):
        self._skip_batches = 0  # read by next_traversal_order, which Loader.__init__ calls
        #: Applied to every batch (pretrain_loader's colour_ops_on="device"), or None.
        self.finish = finish
        self.crops, self.resolution_at = tuple(crops), resolution_at
        super().__init__(*args, **kwargs)

    def __iter__(self):
        if self.resolution_at is not None:
            # ffcv sizes every buffer from the decoder's output_size when an epoch starts
            # (Loader.__iter__ → allocate_memory); the compiled code reads shapes from
            # its arrays, so a new side needs no recompilation.
            side = self.resolution_at(self.next_epoch)
            for crop in self.crops:
                crop.output_size = (side, side)
        batches = super().__iter__()
        return batches if self.finish is None else map(self.finish, batches)

    def seek(self, epoch: int, batch: int = 0) -> None:
        """Make the next ``iter`` yield epoch ``epoch`` from its batch ``batch`` on.

        Later iterations continue with epoch + 1, … as usual. The skipped batches are
        not decoded; since a batch's augmentations depend only on the seed and its
        samples, the rest equal the uninterrupted run's batches ``batch``, ``batch``+1, ….
        """
        if epoch < 0 or not 0 <= batch <= len(self):
            raise ValueError(f"need epoch ≥ 0 and 0 ≤ batch ≤ {len(self)}, got {epoch}, {batch}")
        self.next_epoch = int(epoch)
        self._skip_batches = int(batch)

    def next_traversal_order(self):
        order = super().next_traversal_order()
        skip, self._skip_batches = self._skip_batches, 0
        if skip:
            # Drop whole batches from the front of this epoch's (already truncated) order,
            # so that the remaining batches keep their composition.
            order = order[:len(self) * self.batch_size][skip * self.batch_size:]
        return order


def batches_per_epoch(images: int, batch_size: int, world_size: int = 1,
                      drop_last: bool = False) -> int:
    """The batches one process draws per epoch, as SeekableLoader's ``len``: of
    ``images`` rows each of ``world_size`` processes gets r = ⌈images / world_size⌉
    (torch's DistributedSampler, which ffcv's orders use, pads by repeating rows), and
    makes ⌊r / batch_size⌋ batches of ``batch_size`` with ``drop_last``, ⌈r / batch_size⌉
    without."""
    rows = -(-images // world_size)
    return rows // batch_size if drop_last else -(-rows // batch_size)


def require_batches(images: int, batch_size: int, world_size: int, drop_last: bool,
                    key: str, what: str) -> int:
    """batches_per_epoch, refusing none with a ConfigError naming ``key``: an epoch
    without a step trains nothing, and the run would report as if it had."""
    batches = batches_per_epoch(images, batch_size, world_size, drop_last)
    require(batches >= 1, key,
            f"{batch_size * world_size} exceeds the {images} images of {what}: an epoch"
            f" would take no step ({batch_size} per process x {world_size} process(es),"
            " whole batches only)")
    return batches


def _order(order: Order) -> OrderOption:
    try:
        return _ORDERS[order]
    except KeyError:
        raise ValueError(f"order must be one of {sorted(_ORDERS)}, got {order!r}") from None


def pretrain_loader(beton_path: str, batch_size: int, num_workers: int,
                    views: Tuple[ViewSpec, ViewSpec], mean: Sequence[float],
                    std: Sequence[float], seed: int, distributed: bool = False,
                    device: str | torch.device = "cpu", channels_last: bool = True,
                    drop_last: bool = True, order: Order = "random",
                    indices: Optional[Sequence[int]] = None,
                    gpu_dtype: torch.dtype = torch.float32, batches_ahead: int = 3,
                    colour_ops_on: str = "host",
                    resolution_at: Optional[Callable[[int], int]] = None) -> SeekableLoader:
    """A Loader yielding (view_a, view_b): two augmentations of the same images.

    Both views read the field 'image' (two PipelineSpecs with source 'image'); labels
    are not read. Each view is (B, 3, R, R) in float32 on the CPU or ``gpu_dtype`` on
    CUDA, normalised as (x/255 − mean)/std with mean and std in [0, 1] units.
    With ``distributed`` each process gets its 1/world_size share (needs an initialised
    process group); ``seed`` must then be the same on every process.
    ``colour_ops_on``: "host" or "device" (module docstring). ``resolution_at``: epoch →
    side of both views' crops (``progressive_resolution``); None: the views' resolution.
    """
    if colour_ops_on not in COLOUR_OPS_ON:
        raise ValueError(f"colour_ops_on must be one of {COLOUR_OPS_ON}, got {colour_ops_on!r}")
    device = torch.device(device)
    on_host = colour_ops_on == "host"
    pipelines = {"image": None, "label": None}
    params, thresholds, crops = {}, [], []
    for index, (name, view) in enumerate(zip(("view_a", "view_b"), views, strict=True)):
        ops = view_operations(view, seed, index, colour_ops=on_host)
        if on_host:
            tail = _image_tail(mean, std, device, channels_last, gpu_dtype)
        else:
            # uint8 NCHW on the device (a channels_last view of ffcv's NHWC buffer).
            tail = [ToTensor()] + ([ToDevice(device, non_blocking=True)] if device.type != "cpu" else [])
            tail.append(ToTorchImage(channels_last=True, convert_back_int16=False))
            colour = colour_params(view, seed, index)
            params[f"{name}_colour"] = PipelineSpec("label", decoder=IntDecoder(),
                                                    transforms=[colour, ToTensor()])
            thresholds.append(colour.solarize.threshold)
        pipelines[name] = PipelineSpec("image", decoder=ops[0], transforms=ops[1:] + tail)
        crops.append(ops[0])
    pipelines.update(params)  # after both views: the loader yields pipelines in this order
    finish = None if on_host else _ColourOnDevice(
        thresholds, mean, std, device, torch.float32 if device.type == "cpu" else gpu_dtype,
        channels_last)
    return SeekableLoader(str(beton_path), batch_size=batch_size, num_workers=num_workers,
                  order=_order(order), distributed=distributed, seed=seed,
                  indices=indices, pipelines=pipelines, drop_last=drop_last,
                  batches_ahead=batches_ahead, finish=finish, crops=crops,
                  resolution_at=resolution_at)


def eval_loader(beton_path: str, batch_size: int, num_workers: int, resolution: int,
                mean: Sequence[float], std: Sequence[float], train_aug: bool,
                crop_ratio: float = 224 / 256, train_crop_scale: Tuple[float, float] = (0.08, 1.0),
                seed: int = 0, distributed: bool = False,
                device: str | torch.device = "cpu", channels_last: bool = True,
                drop_last: bool = False, order: Order = "sequential",
                indices: Optional[Sequence[int]] = None,
                gpu_dtype: torch.dtype = torch.float32, batches_ahead: int = 3) -> SeekableLoader:
    """A Loader yielding (images, labels) for linear probing, fine-tuning and features.

    ``train_aug``: RandomResizedCrop(resolution, scale ``train_crop_scale``; the paper's
    0.08–1 at 224 px) and a horizontal flip with p = 0.5, seeded from ``seed`` like
    pretrain_loader's view 0. Otherwise the central square of side crop_ratio·min(H, W) resized to
    ``resolution`` — Resize(256) + CenterCrop(224) for crop_ratio = 224/256; pass
    crop_ratio = 1 to keep native small images (28 px) whole. Labels are int64 (B,).
    """
    device = torch.device(device)
    size = (resolution, resolution)
    if train_aug:
        image_ops = [RandomResizedCrop(size, scale=tuple(train_crop_scale), ratio=CROP_RATIO,
                                       seed=_op_seed(seed, 0, _CROP)),
                     RandomHorizontalFlip(0.5, seed=_op_seed(seed, 0, _FLIP))]
    else:
        image_ops = [CenterCropRGBImageDecoder(size, ratio=crop_ratio)]
    label_ops = [IntDecoder(), ToTensor(), Squeeze(1)]
    if device.type != "cpu":
        label_ops.append(ToDevice(device, non_blocking=True))
    pipelines = {"image": image_ops + _image_tail(mean, std, device, channels_last, gpu_dtype),
                 "label": label_ops}
    return SeekableLoader(str(beton_path), batch_size=batch_size, num_workers=num_workers,
                  order=_order(order), distributed=distributed, seed=seed,
                  indices=indices, pipelines=pipelines, drop_last=drop_last,
                  batches_ahead=batches_ahead)
