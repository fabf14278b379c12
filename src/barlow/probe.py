"""Linear probes of a frozen backbone and their baselines: the `linear` and `transfer`
stages' shared protocol, built on barlow.evaluate's trainers.

The honest protocol: a linear head is fitted on a training split, the epoch is chosen by
top-1 on a validation split held out of the training data, and the test split only gives
the final figures: its top-1/top-5 at the chosen epoch and at the last epoch. Test
accuracy is measured after every epoch (that needs each epoch's head), but never
consulted for a choice.

Several processes (torchrun): each rank extracts the features of its share of a split
(barlow.distributed.shard) and `gathered_features` hands every rank all rows in the
order of one process; the head is then fitted on cached features by every rank alike,
or, in the augmenting probe, under DDP on each rank's share of every batch.

Embeddings compared under one recipe:
    barlow       the pretrained backbone, weights loaded strictly from a file
    random_init  the same architecture, randomly initialised from a seed, never trained
    raw_pixels   the normalised input image, flattened (barlow.features.raw_pixel_features
                 as a module, so the augmenting trainer can use it too)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from barlow import distributed as dist
from barlow.checkpoint import load_backbone_weights
from barlow.config import ModelConfig
from barlow.data.loaders import SeekableLoader
from barlow.evaluate import (OnEpoch, Preemption, Schedule, fit_linear_on_features,
                             linear_head, topk_accuracy, train_linear_head)
from barlow.features import Batches, extract_features
from barlow.models import build_backbone
from barlow.progress import Progress

Split = tuple[Tensor, Tensor]  # (features or images, labels)

#: What a probe reports, all on the test split except best_epoch.
SUMMARY_KEYS = ("top1_best", "top5_best", "top1_last", "top5_last", "best_epoch")
#: Per-epoch rows of barlow.evaluate's trainers that are logged as curves.
CURVE_KEYS = ("train_loss", "val_loss", "val_top1", "val_top5")


@dataclass(frozen=True)
class Recipe:
    """The head's optimisation: SGD with momentum, learning rate × lr_factor(schedule)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    schedule: Schedule
    seed: int


def embedding(name: str, model: ModelConfig, weights: str | Path, seed: int,
              device: torch.device) -> nn.Module:
    """The module mapping images to features for ``name`` (see the module docstring),
    on ``device`` in eval mode. ``weights`` is read for "barlow" only; a file that does
    not fit the ``model`` architecture raises CheckpointError."""
    if name == "raw_pixels":
        return nn.Flatten()
    if name not in ("barlow", "random_init"):
        raise ValueError(f"unknown embedding {name!r}")
    # build_backbone initialises from the global RNG: seeding it fixes the random baseline.
    torch.manual_seed(seed)
    backbone, _ = build_backbone(model.arch, model.width, model.layers)
    if name == "barlow":
        load_backbone_weights(backbone, weights)
    return backbone.to(device).eval()


def multilabel_batches(loader: Iterable) -> Iterator[Split]:
    """(images, targets (B, C)) from an eval loader over a multi-label .beton (fields
    image, label = row index, targets; barlow.data.convert). The loader decodes image and
    label as for any set and ffcv adds targets with its default pipeline, so its batches
    are (images, rows, targets). Like every batch, they live in buffers that ffcv reuses
    (extract_features copies them out)."""
    for images, _rows, targets in loader:
        yield images, torch.as_tensor(targets)


def gathered_features(embed: nn.Module, batches: Batches, device: torch.device,
                      autocast_dtype: torch.dtype | None = None, label: str | None = None) -> Split:
    """(features, labels) of ``embed`` over this rank's ``batches`` (its share of a split,
    barlow.distributed.shard), all-gathered: every rank gets the whole split's rows, each
    once, in rank order, i.e. in the order one process extracts them. On the CPU.
    ``label`` names the progress lines (barlow.features.extract_features)."""
    feats, labels = extract_features(embed, batches, device, channels_last=True,
                                     autocast_dtype=autocast_dtype, label=label)
    return dist.gather_rows(feats), dist.gather_rows(labels)


def split_rows(feats: Tensor, labels: Tensor, held_out: np.ndarray) -> tuple[Split, Split]:
    """(rows not in ``held_out``, rows in ``held_out``), each as (feats, labels)."""
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[torch.as_tensor(held_out, dtype=torch.long)] = True
    return (feats[~mask], labels[~mask]), (feats[mask], labels[mask])


Fit = Callable[[nn.Linear, OnEpoch, Preemption | None], dict]


def fit_and_test(fit: Fit, head: nn.Linear, test: Split, device: torch.device,
                 on_epoch: OnEpoch | None = None,
                 preemption: Preemption | None = None) -> dict[str, Any]:
    """Run ``fit(head, callback, preemption)``, a barlow.evaluate trainer of ``head`` that
    calls ``callback(epoch, row)`` after each epoch and returns its result dict, and
    score ``head`` on the test features ``test`` after every epoch.

    Returns the SUMMARY_KEYS (test accuracies in percent at the epoch of best val top-1,
    the first on ties, and at the last epoch), ``history`` (the trainer's rows) and
    ``test_pred_best`` (the predicted test classes at the best epoch, CPU).
    ``preemption`` (barlow.evaluate): the epochs' test scores are checkpointed with the
    trainer; resumed, the stopped run's rows go to ``on_epoch`` again first."""
    test_feats, test_labels = test[0].float().to(device), test[1].to(device)
    scores: list[tuple[float, float, Tensor]] = []
    if preemption is not None:
        resumed = preemption.start
        if resumed is not None:
            scores = list(resumed["scores"])
            for row in resumed["history"]:
                if on_epoch is not None:
                    on_epoch(row["epoch"], row)
        preemption = preemption.adding(lambda: {"scores": scores})

    def score(epoch: int, row: dict) -> None:
        with torch.no_grad():
            logits = head(test_feats)
        acc = topk_accuracy(logits, test_labels)
        scores.append((acc[1], acc[5], logits.argmax(dim=1).cpu()))
        if on_epoch is not None:
            on_epoch(epoch, row)

    result = fit(head, score, preemption)
    best, last = result["best"]["epoch"], result["last"]["epoch"]
    return {"top1_best": scores[best][0], "top5_best": scores[best][1],
            "top1_last": scores[last][0], "top5_last": scores[last][1],
            "best_epoch": best, "history": result["history"], "test_pred_best": scores[best][2]}


def standardise(train: Split, *others: Split) -> list[Split]:
    """Every split's features mapped by x ↦ (x − μ)/σ with the training split's per-feature
    mean and std. A fixed affine map composed with a linear head is still a linear head
    on the backbone's features; it only conditions SGD, whose one lr otherwise serves
    features of very different scales (a random-init backbone's are ~50× smaller)."""
    mu = train[0].mean(dim=0)
    sd = train[0].std(dim=0).clamp_min(1e-6)
    return [((x - mu) / sd, y) for x, y in (train, *others)]


def probe_features(train: Split, val: Split, test: Split, num_classes: int, recipe: Recipe,
                   device: torch.device, on_epoch: OnEpoch | None = None) -> dict[str, Any]:
    """The fast probe: the head fitted on features extracted once and standardised
    (fit_linear_on_features)."""
    train, val, test = standardise(train, val, test)

    def fit(head: nn.Linear, callback: OnEpoch, preemption: None) -> dict:
        return fit_linear_on_features(
            *train, *val, num_classes=num_classes, epochs=recipe.epochs, lr=recipe.lr,
            weight_decay=recipe.weight_decay, batch_size=recipe.batch_size,
            momentum=recipe.momentum, seed=recipe.seed, schedule=recipe.schedule,
            device=device, on_epoch=callback, head=head)[1]

    head = linear_head(train[0].shape[1], num_classes, recipe.seed).to(device)
    return fit_and_test(fit, head, test, device, on_epoch)


def probe_augmented(embed: nn.Module, train_loader: SeekableLoader, val_loader: SeekableLoader,
                    test: Split, num_classes: int, recipe: Recipe, device: torch.device,
                    autocast_dtype: torch.dtype | None = None,
                    on_epoch: OnEpoch | None = None,
                    env: dist.DistEnv | None = None,
                    preemption: Preemption | None = None) -> dict[str, Any]:
    """The paper's probe: ``embed`` runs on every augmented ``train_loader`` batch
    (train_linear_head, which also checks that the backbone never changes); ``test``
    holds the test features, extracted once since the backbone is frozen. The loader is
    rewound first, so every embedding sees the same augmented batches (resumed, it
    seeks to the batch after the stop instead: ``preemption``, barlow.evaluate). With
    ``env`` of several processes the loaders hold this rank's share and the head trains
    under DDP (barlow.evaluate); ``test`` holds every rank's rows."""
    resumed = preemption.start if preemption is not None else None
    if resumed is None:
        train_loader.seek(0)
    else:
        train_loader.seek(resumed["epoch"], resumed["batch"])

    def fit(head: nn.Linear, callback: OnEpoch, preemption: Preemption | None) -> dict:
        return train_linear_head(
            embed, train_loader, val_loader, feat_dim=test[0].shape[1],
            num_classes=num_classes, epochs=recipe.epochs, lr=recipe.lr,
            weight_decay=recipe.weight_decay, device=device, momentum=recipe.momentum,
            schedule=recipe.schedule, seed=recipe.seed, channels_last=True,
            autocast_dtype=autocast_dtype, on_epoch=callback, head=head, env=env,
            preemption=preemption)[1]

    head = linear_head(test[0].shape[1], num_classes, recipe.seed).to(device)
    return fit_and_test(fit, head, test, device, on_epoch, preemption)


def epoch_logger(live: Any, prefix: str, epochs: int | None = None,
                 keys: Sequence[str] | None = CURVE_KEYS) -> OnEpoch:
    """The trainers' on_epoch callback writing each row as points of the
    ``prefix/<key>`` curves of a dvclive Live, at step = epoch, and progress lines
    (barlow.progress) over ``epochs``. ``keys``: the row's keys to log; None, every key
    but "epoch" (the learning rates too), in the row's order."""
    progress = Progress(prefix, epochs, "epoch")

    def log(epoch: int, row: dict) -> None:
        live.step = epoch
        for key in (keys if keys is not None else [k for k in row if k != "epoch"]):
            live.log_metric(f"{prefix}/{key}", row[key])
        progress.update(epoch + 1, train_loss=row["train_loss"], val_top1=row["val_top1"])
    return log


def log_summary(live: Any, prefix: str, result: dict) -> None:
    """A probe's SUMMARY_KEYS as ``prefix/<key>`` in the Live's metrics.json."""
    for key in SUMMARY_KEYS:
        live.log_metric(f"{prefix}/{key}", result[key], plot=False)
