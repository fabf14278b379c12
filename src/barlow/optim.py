"""LARS, the two parameter groups, and the per-step learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

OPTIMIZERS = ("lars", "sgd", "adamw")


class LARS(torch.optim.Optimizer):
    """LARS as in the Barlow Twins reference code, with per-group switches.

    For every parameter p with gradient g, in a group with weight decay wd, trust
    coefficient η, momentum m and learning rate lr:

        lars_adaptation=True (weights):   u = g + wd·p
                                          q = η·‖p‖/‖u‖   (q = 1 if ‖p‖ = 0 or ‖u‖ = 0)
                                          u ← q·u
        lars_adaptation=False (biases, BN): u = g        (no weight decay either)
        μ ← m·μ + u   (μ starts at 0; no dampening, no Nesterov)
        p ← p − lr·μ
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 0.0,
                 weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001,
                 lars_adaptation: bool = True) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta <= 0:
            raise ValueError(f"invalid LARS settings: lr={lr}, weight_decay={weight_decay}, "
                             f"momentum={momentum}, eta={eta}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        lars_adaptation=lars_adaptation)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["lars_adaptation"]:
                updates = self._adapt(params, grads, group["weight_decay"], group["eta"])
            else:
                updates = grads
            bufs = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                bufs.append(state["mu"])
            # One kernel per operation over the whole group instead of one per tensor.
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, updates)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss

    @staticmethod
    def _adapt(params: list[Tensor], grads: list[Tensor], weight_decay: float,
               eta: float) -> list[Tensor]:
        """q·(g + wd·p) for every parameter, with all norms computed in one batch."""
        updates = (torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay
                   else [g.clone() for g in grads])
        param_norms = torch.stack(torch._foreach_norm(params))
        update_norms = torch.stack(torch._foreach_norm(updates))
        trust = torch.where((param_norms > 0) & (update_norms > 0),
                            eta * param_norms / update_norms, torch.ones_like(param_norms))
        torch._foreach_mul_(updates, list(trust.unbind()))
        return updates


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups, split by ndim, never by name.

    "weights" (ndim > 1: conv and linear kernels) get ``weight_decay`` and LARS
    adaptation; "biases" (ndim == 1: biases and batch-norm γ, β) get neither. The
    trainer sets each group's lr from its "name".
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        dict(name="weights", params=[p for p in trainable if p.ndim > 1],
             weight_decay=weight_decay, lars_adaptation=True),
        dict(name="biases", params=[p for p in trainable if p.ndim <= 1],
             weight_decay=0.0, lars_adaptation=False),
    ]


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float = 0.0,
                    momentum: float = 0.9, eta: float = 0.001) -> torch.optim.Optimizer:
    """An optimizer over `param_groups` output; each group keeps its own weight decay.

    "lars": `LARS` (momentum, η). "sgd": SGD with momentum; "adamw": AdamW with its
    default betas; for both, the weight decay is the group's (0 for biases and BN) and
    LARS's "lars_adaptation" key is carried but unused. ``lr`` is the initial value of
    every group's lr, which the trainer overwrites each step.
    """
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=eta)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer {name!r} is not one of {list(OPTIMIZERS)}")


def scale_lr(base_lr: float, batch_size: int, reference_batch: int = 256) -> float:
    """The paper's linear scaling rule: lr = base_lr · batch_size / reference_batch."""
    return base_lr * batch_size / reference_batch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float,
                  final_ratio: float = 0.001) -> float:
    """Learning rate at ``step`` (0-based): linear warmup from 0, then cosine decay.

        step < W:       lr = base · step / W
        W ≤ step < T:   q  = ½·(1 + cos(π·(step − W)/(T − W)))
                        lr = base · (r + (1 − r)·q)
        step ≥ T:       lr = r · base
    with T = total_steps, W = warmup_steps, r = final_ratio.
    """
    if step < 0 or total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"invalid schedule position: step={step}, "
                         f"total_steps={total_steps}, warmup_steps={warmup_steps}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return base_lr * final_ratio
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))
    return base_lr * (final_ratio + (1 - final_ratio) * q)
