"""The colour operations of a view as batched tensor operations, for the training device.

``apply_colour_ops(images, params, threshold)`` takes a view's uint8 (B, 3, H, W) batch
after crop and flip, wherever it lives (on CUDA after the copy, or on the CPU), and the
float64 (B, COLOUR_PARAMS) parameters that ``barlow.augment.ColourParams`` drew on the
host for the same samples, from the same seeds and with the same ``derive`` code as the
host operations (ColorJitter, RandomGrayscale, GaussianBlur, Solarization), and applies
those four operations in the host pipeline's order.

The formulas are the kernels' and are not restated here: ``jitter_image`` (each jitter
step), ``grayscale_image``, ``blur_image`` (its ``blur_radius`` and ``blur_weights``
are called from here) and ``solarize_image`` in barlow.augment.kernels. Each step runs
on the sub-batch of samples it applies to (for jitter: per position of the drawn
order, the samples whose step there is brightness, contrast, …), chosen from the
parameters on the host, so nothing waits for the device.

Agreement with the host path (tests/test_tensor_ops.py): grayscale and solarisation are
integer arithmetic and equal exactly; jitter and blur agree within ±1 grey level in a
rare pixel. The kernels compute the jitter's per-pixel arithmetic in float64 (float32
values times float64 factors, stored back as float32 between steps) and accumulate the
blur in float32 with fastmath (fused multiply-adds, reassociated sums); here all of it
is float32, so a value within ~1e-5 of k + ½ can round to the other side.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from barlow.augment.kernels import blur_radius, blur_weights
from barlow.augment.ops import COLOUR_COLUMNS, COLOUR_PARAMS

__all__ = ["apply_colour_ops"]

#: Jitter steps by number (kernels: brightness 0, contrast 1, saturation 2, hue 3) and
#: the factor that makes each one skip (the kernel skips a factor of 1, a hue of 0).
_IDENTITY = (1.0, 1.0, 1.0, 0.0)


def _luma(x: Tensor) -> Tensor:
    return (299.0 * x[:, 0:1] + 587.0 * x[:, 1:2] + 114.0 * x[:, 2:3]) / 1000.0


def _brightness(x: Tensor, f: Tensor) -> Tensor:
    return (f * x).clamp_(0.0, 255.0)


def _contrast(x: Tensor, f: Tensor) -> Tensor:
    mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
    return (f * x + (1.0 - f) * mean).clamp_(0.0, 255.0)


def _saturation(x: Tensor, f: Tensor) -> Tensor:
    return (f * x + (1.0 - f) * _luma(x)).clamp_(0.0, 255.0)


def _hue(x: Tensor, shift: Tensor) -> Tensor:
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    hi = torch.maximum(torch.maximum(r, g), b)
    d = hi - torch.minimum(torch.minimum(r, g), b)
    chroma = d > 0
    safe = torch.where(chroma, d, torch.ones_like(d))
    is_r, is_g = hi == r, hi == g
    num = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    base = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    h = (base + num / safe) / 6.0 + shift
    h6 = 6.0 * (h - torch.floor(h))
    k = torch.tensor((5.0, 3.0, 1.0), device=x.device).view(1, 3, 1, 1) + h6
    k = torch.where(k >= 6.0, k - 6.0, k)
    out = (hi - d * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)).clamp_(0.0, 255.0)
    return torch.where(chroma, out, x)


_STEPS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (_brightness, _contrast, _saturation, _hue)


def apply_colour_ops(images: Tensor, params: Tensor, threshold: int) -> Tensor:
    """Jitter, grayscale, blur and solarise a uint8 (B, 3, H, W) batch with ``params``
    (ColourParams' (B, COLOUR_PARAMS), any device: read on the host) and the
    solarisation ``threshold``; returns float32 (B, 3, H, W) on ``images``' device
    holding the uint8 result's integer values (ready to normalise)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise TypeError(f"need a uint8 (B, 3, H, W) batch, got {images.dtype} {tuple(images.shape)}")
    if tuple(params.shape) != (images.shape[0], COLOUR_PARAMS):
        raise ValueError(f"need ({images.shape[0]}, {COLOUR_PARAMS}) parameters, got {tuple(params.shape)}")
    q = params.detach().to("cpu", torch.float64)
    device = images.device

    def rows(mask: Tensor) -> Optional[Tensor]:
        idx = torch.nonzero(mask).flatten()
        return idx.to(device, non_blocking=True) if len(idx) else None

    def values(column: Tensor) -> Tensor:
        return column.to(torch.float32).view(-1, 1, 1, 1).to(device, non_blocking=True)

    x = images.float()
    jitter = q[:, COLOUR_COLUMNS["jitter"]]
    applied = jitter[:, 0] != 0
    if applied.any():
        factors, order = jitter[:, 1:5], jitter[:, 5:9]
        for position in range(4):
            for step, run in enumerate(_STEPS):
                mask = applied & (order[:, position] == step) & (factors[:, step] != _IDENTITY[step])
                idx = rows(mask)
                if idx is not None:
                    x[idx] = run(x[idx], values(factors[mask, step]))
        x.add_(0.5).floor_()  # integers stay integers: only jittered samples change

    idx = rows(q[:, COLOUR_COLUMNS["grayscale"]][:, 0] != 0)
    if idx is not None:
        v = x[idx].to(torch.int32)
        lum = (19595 * v[:, 0:1] + 38470 * v[:, 1:2] + 7471 * v[:, 2:3] + 32768) >> 16
        x[idx] = lum.expand(-1, 3, -1, -1).float()

    blur = q[:, COLOUR_COLUMNS["blur"]]
    height, width = x.shape[-2:]
    radius = torch.tensor([blur_radius(s, height, width) if a else -1
                           for a, s in blur.tolist()])
    # One sub-batch per kernel radius (≤ 7 for σ ≤ 2): every tap does work.
    for r in torch.unique(radius[radius >= 0]).tolist():
        mask = radius == r
        weights = torch.stack([torch.from_numpy(blur_weights(s, r))
                               for s in blur[mask, 1].tolist()]).to(device, non_blocking=True)
        idx = rows(mask)
        x[idx] = _blur(x[idx], weights, r)

    idx = rows(q[:, COLOUR_COLUMNS["solarize"]][:, 0] != 0)
    if idx is not None:
        v = x[idx]
        x[idx] = torch.where(v >= threshold, 255.0 - v, v)
    return x


def _blur(x: Tensor, weights: Tensor, radius: int) -> Tensor:
    """blur_image on a float (n, 3, H, W) sub-batch, with weights (n, 2·radius + 1)."""
    height, width = x.shape[-2:]
    taps = [weights[:, t].view(-1, 1, 1, 1) for t in range(2 * radius + 1)]
    padded = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    rows = taps[0] * padded[..., 0:width]
    for t in range(1, len(taps)):
        rows.addcmul_(padded[..., t:t + width], taps[t])
    padded = F.pad(rows, (0, 0, radius, radius), mode="reflect")
    out = taps[0] * padded[..., 0:height, :]
    for t in range(1, len(taps)):
        out.addcmul_(padded[..., t:t + height, :], taps[t])
    return out.clamp_(0.0, 255.0).add_(0.5).floor_()
