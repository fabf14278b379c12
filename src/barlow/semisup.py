"""Semi-supervised fine-tuning on a label subset (paper Table 2) and the supervised
from-scratch baseline: the `semisup` stage's protocol, beside barlow.probe (linear's).

One run fine-tunes a backbone plus a fresh linear head with barlow.evaluate.finetune,
chooses the epoch by top-1 on a validation split held out of the training data, and
scores the test split twice only: with the weights of that epoch (kept in memory) and
with the last ones. Two runs per subset, each in a stage of its own (`semisup` with
--weights, `semisup_scratch` with --baselines):
    barlow   the pretrained backbone, weights loaded strictly from a file
    scratch  the same architecture, randomly initialised from a seed
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from barlow import distributed as dist
from barlow.checkpoint import load_backbone_weights
from barlow.config import ModelConfig, SemisupConfig
from barlow.evaluate import Preemption, accuracy, finetune, linear_head
from barlow.features import Batches
from barlow.models import build_backbone
from barlow.precision import AUTOCAST

SCRATCH = "scratch"
RUNS = ("barlow", SCRATCH)


def run_backbone(run: str, model: ModelConfig, weights: str | Path,
                 seed: int) -> tuple[nn.Module, int]:
    """(backbone, feature dim) that run ``run`` starts from (see the module docstring).
    Only "scratch" seeds the global RNG, whose state build_backbone's initialisation
    draws from; "barlow" overwrites those values with the file's."""
    if run == "barlow":
        backbone, dim = build_backbone(model.arch, model.width, model.layers)
        load_backbone_weights(backbone, weights)
    elif run == "scratch":
        torch.manual_seed(seed)
        backbone, dim = build_backbone(model.arch, model.width, model.layers)
    else:
        raise ValueError(f"unknown run {run!r} (expected one of {RUNS})")
    return backbone, dim


def relative_change(before: dict[str, torch.Tensor], module: nn.Module) -> float:
    """‖θ − θ₀‖ / ‖θ₀‖ over the trainable parameters: how far fine-tuning moved them."""
    params = dict(module.named_parameters())
    diff = sum(float((params[k].detach().cpu() - v).pow(2).sum()) for k, v in before.items())
    norm = sum(float(v.pow(2).sum()) for v in before.values())
    return (diff / max(norm, 1e-12)) ** 0.5


def finetune_and_test(backbone: nn.Module, feat_dim: int, num_classes: int, train,
                      val: Batches, test: Batches, cfg: SemisupConfig, epochs: int,
                      lrs: tuple[float, float], env: dist.DistEnv,
                      log: Callable[[int, dict], None],
                      preemption: Preemption | None = None) -> dict[str, float]:
    """Fine-tune ``backbone`` plus a fresh head; test at the best-val and last epochs.
    ``train`` (a SeekableLoader, rewound here) holds this rank's share of every batch,
    ``val`` and ``test`` its share of the rows; every rank returns the same figures.
    ``lrs``: (backbone, head) learning rates; ``log(epoch, row)`` after each epoch.
    ``preemption`` (barlow.evaluate): stopped, the run checkpoints the best epoch's
    weights too; resumed, it logs the stopped run's rows again and seeks ``train`` to
    the batch after the stop.

    Returns top1/top5 at the best-val epoch (``*_best``) and at the last (``*_last``),
    ``best_epoch``, ``val_top1_best`` and ``weight_change`` (``relative_change``)."""
    autocast_dtype = AUTOCAST[cfg.precision]
    device = env.device
    backbone = backbone.to(device)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    head = linear_head(feat_dim, num_classes, cfg.seed).to(device)
    start = {k: p.detach().cpu().clone() for k, p in backbone.named_parameters()}
    resumed = preemption.start if preemption is not None else None
    best: dict = {} if resumed is None else dict(resumed["best"])

    def on_epoch(epoch: int, row: dict) -> None:
        log(epoch, row)
        # Keep the weights of the best-val epoch so that the test set is evaluated only
        # twice (best and last) instead of after every epoch. ">" keeps the first of
        # ties, as finetune's own choice of "best" does.
        if not best or row["val_top1"] > best["val_top1"]:
            best.update(epoch=epoch, val_top1=row["val_top1"], state=(
                {k: v.detach().clone() for k, v in backbone.state_dict().items()},
                {k: v.detach().clone() for k, v in head.state_dict().items()}))

    if resumed is None:
        # Every run of this subset sees the same sample order and augmentations.
        train.seek(0)
    else:
        train.seek(resumed["epoch"], resumed["batch"])
        for row in resumed["history"]:
            log(row["epoch"], row)
    result = finetune(backbone, head, train, val, epochs=epochs, lr_backbone=lrs[0],
                      lr_head=lrs[1], weight_decay=cfg.weight_decay, device=device,
                      momentum=cfg.momentum, schedule=cfg.schedule,
                      channels_last=cfg.channels_last, autocast_dtype=autocast_dtype,
                      on_epoch=on_epoch, env=env, recompute_bn=cfg.precise_bn,
                      preemption=None if preemption is None
                      else preemption.adding(lambda: {"best": best}))
    assert best["epoch"] == result["best"]["epoch"]  # same tie rule as finetune's
    change = relative_change(start, backbone)
    net = nn.Sequential(backbone, head)
    last = accuracy(net, test, device, cfg.channels_last, autocast_dtype)
    if best["epoch"] == result["last"]["epoch"]:
        at_best = last
    else:
        backbone.load_state_dict(best["state"][0])
        head.load_state_dict(best["state"][1])
        at_best = accuracy(net, test, device, cfg.channels_last, autocast_dtype)
    return {"top1_best": at_best["top1"], "top5_best": at_best["top5"],
            "top1_last": last["top1"], "top5_last": last["top5"],
            "best_epoch": result["best"]["epoch"], "val_top1_best": result["best"]["val_top1"],
            "weight_change": change}
