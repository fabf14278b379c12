"""The supervised trainers that evaluate learned representations: linear probe and
fine-tuning, with their top-k metrics.

The protocols (the paper's Tables 1-3):

- linear probe: frozen backbone in eval mode (BN statistics frozen), a linear head with
  weight ~ N(0, 0.01²) and zero bias, SGD momentum 0.9, cosine schedule, cross-entropy.
  Two paths share one training loop: ``train_linear_head`` runs the backbone on every
  (augmented) batch, as the paper does; ``fit_linear_on_features`` trains the same head
  on features extracted once without augmentation, which is much cheaper.
- transfer linear (Places-205, iNat18): the same trainer with ``schedule="step"``.
- semi-supervised fine-tuning and the supervised-from-scratch baseline: ``finetune``.

The other protocols live beside it: VOC07 classification by per-class linear SVMs in
barlow.voc07; frozen-feature extraction, the weighted-kNN monitor and the raw-pixel
baseline in barlow.features, whose *loader* and *backbone* conventions hold here too.

Several processes (torchrun; ``env`` a barlow.distributed.DistEnv with world_size W > 1):
each rank passes its own share of the batches. Training loaders are ffcv's distributed
ones (every rank the same number of equal batches, B/W rows each), and the trained
modules run under DDP, which averages the gradients: the step is the single-process
step on the union of the ranks' batches. Validation loaders hold disjoint shares
(barlow.distributed.shard) and the sums behind every reported figure (loss, hits,
counts) are all-reduced, so each validation sample counts exactly once and every rank
gets the same row, hence the same choice of the best epoch.

The trainers return a result dict, ready for dvclive::

    {"history": [row, ...],  # one row per epoch
     "best": row,            # the epoch with the highest val_top1 (first on ties)
     "last": row}
    row = {"epoch": int, "lr_<group>": float, "train_loss": float,
           "val_loss": float, "val_top1": float, "val_top5": float}

Accuracies are percentages. ``best`` holds the top-5 *of the best top-1 epoch*; the
reference evaluate.py instead reports the maxima of top-1 and top-5 independently.

Pre-emption (``preemption``, a `Preemption`): after every training step the ranks agree
whether any was asked to stop; if so the trainer hands its state to the stage's
checkpoint (barlow.eval_checkpoint), which writes it and raises barlow.errors.Preempted.
Given that state back, the trainer goes on with the next batch and ends as a run that
never stopped would: modules, optimiser, grad scaler, RNG, the history and each rank's
running loss sum are restored, and the caller seeks its loader to
(``state["epoch"]``, ``state["batch"]``) (barlow.data.loaders.SeekableLoader).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Literal, NoReturn, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from barlow import distributed as dist
from barlow.checkpoint import rng_state, set_rng_state
from barlow.features import Batches, autocast, eval_mode, to_input

Schedule = Literal["cosine", "step"]
OnEpoch = Callable[[int, dict], None]


@dataclass(frozen=True)
class Preemption:
    """A trainer's stop on request, and its resumption (module docstring).

    ``requested()``: whether this rank was asked to stop (barlow.interrupt.stop_requests).
    ``save(state, where)``: called on every rank with the trainer's state and where it
    stopped ("epoch 2, batch 3": 3 batches of epoch 2 done); writes the checkpoint and
    raises Preempted. ``start``: a state ``save`` was given, to resume from; None to
    start afresh."""

    requested: Callable[[], bool]
    save: Callable[[dict[str, Any], str], NoReturn]
    start: dict[str, Any] | None = None

    def adding(self, extra: Callable[[], dict[str, Any]]) -> Preemption:
        """This preemption, saving ``extra()``'s items beside the trainer's state: what
        a caller of the trainer needs to resume too."""
        return replace(self, save=lambda state, where: self.save({**state, **extra()}, where))


# ----------------------------------------------------------------------------- metrics
def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of rows whose label is among the k largest logits, for each k in ``ks``;
    k is capped at the number of classes (so top-5 of a 3-class problem counts every row)."""
    kmax = min(max(ks), logits.shape[1])
    hit = logits.topk(kmax, dim=1).indices.eq(labels.view(-1, 1))  # at most one hit per row
    return {k: int(hit[:, :min(k, kmax)].sum()) for k in ks}


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent: acc_k = 100 · |{i : y_i ∈ top-k(logits_i)}| / N."""
    if labels.numel() == 0:
        raise ValueError("topk_accuracy: no samples")
    return {k: 100.0 * c / labels.numel() for k, c in topk_correct(logits, labels, ks).items()}


# ------------------------------------------------------------------ supervised training
def lr_factor(schedule: Schedule, epoch: int, epochs: int) -> float:
    """Multiplier of the base learning rate during ``epoch`` (0-based) of ``epochs``.

    Applied once per epoch, as the reference evaluate.py steps CosineAnnealingLR:
        cosine: (1 + cos(π · e / E)) / 2
        step:   0.1 ^ ⌊3e / E⌋   (divided by 10 twice, at E/3 and 2E/3: the transfer
                                  recipe, e.g. 14 epochs → 5, 5, 4)."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        return 0.1 ** ((3 * epoch) // epochs)
    raise ValueError(f"unknown schedule {schedule!r} (expected 'cosine' or 'step')")


def linear_head(in_features: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """The linear classifier of the protocol: weight ~ N(0, 0.01²), bias = 0."""
    head = nn.Linear(in_features, num_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed))
        head.bias.zero_()
    return head


Net = Callable[[Tensor], Tensor]  # images or features -> logits


def _logits(net: Net, x, device, channels_last, autocast_dtype) -> Tensor:
    with autocast(device, autocast_dtype):
        # The loss and the metrics are computed in fp32 whatever the autocast dtype.
        return net(to_input(x, device, channels_last)).float()


def _train_epoch(net: Net, batches, optimizer, scaler, device, channels_last,
                 autocast_dtype, partial: tuple[Tensor, int] | None = None,
                 after_step: Callable[[Tensor, int], None] | None = None) -> float:
    """One pass of mini-batch SGD on cross-entropy; returns the mean per-sample loss
    over every rank's samples. ``partial``: this rank's (loss sum, samples) of the
    epoch's batches trained before a stop; ``after_step(loss sum, samples)`` after each
    step."""
    loss_sum = torch.zeros((), device=device)
    seen = 0
    if partial is not None:
        loss_sum, seen = partial[0].to(device, copy=True), partial[1]
    for x, y in batches:
        y = y.to(device, non_blocking=True)
        loss = F.cross_entropy(_logits(net, x, device, channels_last, autocast_dtype), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        # Summed on the device: a .item() per step would stall the GPU pipeline.
        loss_sum += loss.detach() * y.shape[0]
        seen += y.shape[0]
        if after_step is not None:
            after_step(loss_sum, seen)
    loss_total, seen_total = dist.reduce_sum(
        torch.stack([loss_sum.double(), loss_sum.new_tensor(seen, dtype=torch.float64)])).tolist()
    if seen_total == 0:
        raise ValueError("the training loader yielded no batches")
    return loss_total / seen_total


def accuracy(net: Net, batches: Batches, device: str | torch.device, channels_last: bool = False,
             autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Mean cross-entropy and top-1/top-5 accuracy (percent) of ``net`` (eval mode,
    no_grad) over ``batches``, pooled over all ranks:

        loss = Σ_ranks Σ_i CE_i / n,   top_k = 100 · Σ_ranks |{i : y_i ∈ top-k}| / n,

    n the total count. Each rank passes its own disjoint share of the samples
    (barlow.distributed.shard); the sums are all-reduced, so each sample counts once
    and every rank returns the same figures."""
    device = torch.device(device)
    loss_sum, seen, hits = 0.0, 0, {1: 0, 5: 0}
    # A plain callable (the trainers' closures) runs modules that _fit put in eval mode.
    mode = eval_mode(net) if isinstance(net, nn.Module) else contextlib.nullcontext()
    with mode, torch.no_grad():
        for x, y in batches:
            y = y.to(device, non_blocking=True)
            logits = _logits(net, x, device, channels_last, autocast_dtype)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            for k, c in topk_correct(logits, y, (1, 5)).items():
                hits[k] += c
            seen += y.shape[0]
    loss_sum, hits[1], hits[5], seen = dist.reduce_sum(
        torch.tensor([loss_sum, hits[1], hits[5], seen], dtype=torch.float64)).tolist()
    if seen == 0:
        raise ValueError("the validation loader yielded no batches")
    return {"loss": loss_sum / seen, "top1": 100.0 * hits[1] / seen,
            "top5": 100.0 * hits[5] / seen}


def _fit(
    train_net: Net,
    eval_net: Net,
    train_batches: Callable[[int], Batches],
    val_batches: Batches,
    optimizer: torch.optim.Optimizer,
    trained: Sequence[nn.Module],
    epochs: int,
    schedule: Schedule,
    device: torch.device,
    channels_last: bool,
    autocast_dtype: torch.dtype | None,
    on_epoch: OnEpoch | None,
    after_epoch: Callable[[], None] | None = None,
    before_val: Callable[[int], None] | None = None,
    preemption: Preemption | None = None,
) -> dict:
    """The loop every trainer here shares: per epoch, set the learning rates, train the
    modules in ``trained`` (train mode) through ``train_net``, validate (eval mode)
    through ``eval_net``, report one row. The two compute the same function; under
    several processes ``train_net`` is the DDP-wrapped one, whose forward joins
    collectives that the ranks' unequal validation shares must not call.

    ``train_batches(epoch)`` yields that epoch's batches; every optimiser group carries a
    ``name`` and its base ``lr``, logged as ``lr_<name>``; ``before_val(epoch)`` runs
    after training, modules still in train mode (the batch-norm re-estimation);
    ``after_epoch`` runs after validation (the frozen-backbone check). The modules are
    left in eval mode. ``preemption``: see the module docstring; ``train_batches`` of
    the epoch a resumed run starts in must yield the batches after the stop."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    # Loss scaling only matters for fp16; bf16 and fp32 have fp32's exponent range.
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    history, first_epoch, batch, partial = [], 0, 0, None
    start = preemption.start if preemption is not None else None
    if start is not None:
        for module, state in zip(trained, start["modules"]):
            module.load_state_dict(state)
        optimizer.load_state_dict(start["optimizer"])
        scaler.load_state_dict(start["scaler"])
        set_rng_state(start["rng"])
        history, first_epoch, batch = list(start["history"]), start["epoch"], start["batch"]
        partial = start["partial"][dist.rank()]

    def after_step(loss_sum: Tensor, seen: int) -> None:
        nonlocal batch
        batch += 1
        if dist.any_rank(preemption.requested()):
            # Each rank's own running sum: pooled only at the epoch's end, as unstopped.
            sums = dist.all_objects((loss_sum.detach().cpu(), seen))
            preemption.save({"modules": [m.state_dict() for m in trained],
                             "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "rng": rng_state(),
                             "epoch": epoch, "batch": batch, "history": history,
                             "partial": sums}, f"epoch {epoch}, batch {batch}")

    for epoch in range(first_epoch, epochs):
        factor = lr_factor(schedule, epoch, epochs)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        for module in trained:
            module.train()
        train_loss = _train_epoch(train_net, train_batches(epoch), optimizer, scaler,
                                  device, channels_last, autocast_dtype, partial,
                                  after_step if preemption is not None else None)
        batch, partial = 0, None
        if before_val is not None:
            before_val(epoch)
        for module in trained:
            module.eval()
        val = accuracy(eval_net, val_batches, device, channels_last, autocast_dtype)
        row = {"epoch": epoch,
               **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups},
               "train_loss": train_loss,
               **{f"val_{key}": value for key, value in val.items()}}
        if after_epoch is not None:
            after_epoch()
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row)
    best = max(history, key=lambda r: r["val_top1"])  # max() keeps the first of ties
    return {"history": history, "best": best, "last": history[-1]}


def _sgd(groups: list[dict], momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with momentum, no dampening or Nesterov (the reference evaluate.py); weight
    decay on every parameter, head bias included, as the reference does."""
    return torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)


def train_linear_head(
    backbone: nn.Module,
    train_loader: Batches,
    val_loader: Batches,
    *,
    feat_dim: int,
    num_classes: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    device: str | torch.device,
    momentum: float = 0.9,
    schedule: Schedule = "cosine",
    seed: int = 0,
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
    on_epoch: OnEpoch | None = None,
    head: nn.Linear | None = None,
    env: dist.DistEnv | None = None,
    preemption: Preemption | None = None,
) -> tuple[nn.Linear, dict]:
    """The paper's linear evaluation: a ``linear_head`` trained on the frozen backbone's
    features of every (augmenting) ``train_loader`` batch, validated each epoch.
    ``head``: train this head (already on ``device``) instead of a new
    ``linear_head(feat_dim, num_classes, seed)``, e.g. to read it after every epoch.
    ``env`` with several processes: the head trains under DDP (see the module
    docstring); each rank's backbone sees only its share of the batches.
    ``preemption``: stop and resume (module docstring).

    Objective: min_{W,b} E[CE(W·f(x) + b, y)] with f fixed; SGD(lr, momentum,
    weight_decay) with ``lr_factor(schedule)`` per epoch. The backbone runs in eval mode
    under no_grad; after every epoch its state_dict (parameters and buffers, BN running
    statistics included) is compared with a copy taken before training, and RuntimeError
    names the first entry that changed. Returns (head, result); see the module docstring."""
    device = torch.device(device)
    snapshot = {k: v.detach().clone() for k, v in backbone.state_dict().items()}

    def frozen_features(x: Tensor) -> Tensor:
        with torch.no_grad():
            return backbone(x)

    def check_unchanged() -> None:
        state = backbone.state_dict()
        if state.keys() != snapshot.keys():
            raise RuntimeError("frozen backbone changed during linear evaluation: its "
                               "state_dict keys differ from those before training")
        for key, value in state.items():
            if not torch.equal(value, snapshot[key]):
                raise RuntimeError(f"frozen backbone changed during linear evaluation: {key}")

    if head is None:
        head = linear_head(feat_dim, num_classes, seed).to(device)
    optimizer = _sgd([{"params": head.parameters(), "lr": lr, "name": "head"}],
                     momentum, weight_decay)
    train_head = head if env is None else dist.wrap_ddp(head, env)
    with eval_mode(backbone):
        result = _fit(lambda x: train_head(frozen_features(x)),
                      lambda x: head(frozen_features(x)), lambda epoch: train_loader,
                      val_loader, optimizer, [head], epochs, schedule, device,
                      channels_last, autocast_dtype, on_epoch, after_epoch=check_unchanged,
                      preemption=preemption)
    return head, result


def _feature_batches(feats: Tensor, labels: Tensor, batch_size: int,
                     order: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    order = torch.arange(feats.shape[0], device=feats.device) if order is None else order
    for start in range(0, feats.shape[0], batch_size):
        idx = order[start:start + batch_size]
        yield feats[idx], labels[idx]


def fit_linear_on_features(
    train_feats: Tensor,
    train_labels: Tensor,
    val_feats: Tensor,
    val_labels: Tensor,
    *,
    num_classes: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    momentum: float = 0.9,
    seed: int = 0,
    schedule: Schedule = "cosine",
    device: str | torch.device = "cpu",
    on_epoch: OnEpoch | None = None,
    head: nn.Linear | None = None,
) -> tuple[nn.Linear, dict]:
    """The fast linear probe: the same head, optimiser, schedule and loop as
    ``train_linear_head``, on features extracted once (no augmentation); ``head`` as
    there.

    Each epoch visits the training rows in a fresh permutation drawn from a generator
    seeded with ``seed`` (the last batch may be smaller), so a seed fixes the result on
    a given device. All features are moved to ``device`` once. Returns (head, result).

    Not distributed: under several processes each rank passes all rows (gathered after
    a sharded extraction, barlow.probe) and fits the same head, bit for bit that of one
    process. Sharding these steps would all-reduce D·C gradient values per step to save
    a B·D·C product that costs less than sending them."""
    device = torch.device(device)
    train_feats, train_labels = train_feats.float().to(device), train_labels.to(device)
    val_feats, val_labels = val_feats.float().to(device), val_labels.to(device)
    generator = torch.Generator().manual_seed(seed)

    def epoch_batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(train_feats.shape[0], generator=generator).to(device)
        return _feature_batches(train_feats, train_labels, batch_size, order)

    if head is None:
        head = linear_head(train_feats.shape[1], num_classes, seed).to(device)
    optimizer = _sgd([{"params": head.parameters(), "lr": lr, "name": "head"}],
                     momentum, weight_decay)
    result = _fit(head, head, epoch_batches,
                  list(_feature_batches(val_feats, val_labels, batch_size)),
                  optimizer, [head], epochs, schedule, device, False, None, on_epoch)
    return head, result


def precise_bn(net: nn.Module, batches: Batches, device: str | torch.device,
               channels_last: bool = False, autocast_dtype: torch.dtype | None = None) -> int:
    """Re-estimate the running statistics of every batch norm in ``net`` at its current
    weights (PreciseBN: Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", sec. 3).
    With K batches of per-batch statistics μ_k, σ²_k (σ² unbiased):

        running_mean = (1/K) Σ_k μ_k,    running_var = (1/K) Σ_k σ²_k

    in place of the exponential moving average that training leaves (momentum m = 0.1:
    mostly the last ~10 batches, each computed at different, older weights). When the
    weights move fast relative to the number of steps (a few epochs of fine-tuning on a
    small subset) the two differ enough to change the predictions in eval mode
    (docs/results.md, "Semi-supervised recipe"). No gradients, no weight changes; under
    several processes the converted batch norms pool every rank's batch, so each rank
    must pass its own equal share. Leaves ``net`` in train mode; returns K."""
    device = torch.device(device)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    net.train()
    count = 0
    with torch.no_grad():
        for x, _ in batches:
            _logits(net, x, device, channels_last, autocast_dtype)
            count += 1
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    if count == 0:
        raise ValueError("precise_bn: the loader yielded no batches")
    return count


def finetune(
    backbone: nn.Module,
    head: nn.Module,
    train_loader: Batches,
    val_loader: Batches,
    *,
    epochs: int,
    lr_backbone: float,
    lr_head: float,
    weight_decay: float,
    device: str | torch.device,
    momentum: float = 0.9,
    schedule: Schedule = "cosine",
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
    on_epoch: OnEpoch | None = None,
    env: dist.DistEnv | None = None,
    recompute_bn: bool = False,
    preemption: Preemption | None = None,
) -> dict:
    """Semi-supervised fine-tuning (paper Table 2), also the supervised-from-scratch
    baseline when ``backbone`` is randomly initialised.

    ``env`` with several processes: backbone and head train under one DDP, with the
    backbone's batch norms converted in place to global-batch statistics
    (barlow.distributed.convert_sync_batchnorm: SyncBatchNorm on CUDA, GlobalBatchNorm
    on the CPU), so a step normalises and averages over the union of the ranks' batches
    as one process does over the whole batch.

    min over backbone and head of E[CE(head(backbone(x)), y)]; both in train mode (BN
    statistics update); SGD with two groups, ``lr_backbone`` and ``lr_head``, momentum,
    ``weight_decay`` on both, ``lr_factor(schedule)`` per epoch. Trains ``backbone`` and
    ``head`` in place (both must be on ``device``) and leaves them in eval mode. Returns
    the result dict of the module docstring, with ``lr_backbone`` and ``lr_head`` rows.

    ``recompute_bn``: before each validation, replace the batch-norm running statistics
    by ``precise_bn`` over the epoch's own training batches again (an ffcv Loader is
    rewound to the epoch just trained and then set to the next one, so the training
    batches are those of a run without it).

    ``preemption``: stop and resume (module docstring)."""
    device = torch.device(device)
    if env is not None:
        backbone = dist.convert_sync_batchnorm(backbone, env)
    optimizer = _sgd([{"params": backbone.parameters(), "lr": lr_backbone, "name": "backbone"},
                      {"params": head.parameters(), "lr": lr_head, "name": "head"}],
                     momentum, weight_decay)
    net = nn.Sequential(backbone, head)
    train_net = net if env is None else dist.wrap_ddp(net, env)

    def recompute(epoch: int) -> None:
        # An ffcv Loader counts its own epochs: replay the one just trained. Iterating
        # it counts on again, so the next training epoch is the one it would have been.
        if hasattr(train_loader, "next_epoch"):
            train_loader.next_epoch -= 1
        precise_bn(backbone, train_loader, device, channels_last, autocast_dtype)

    return _fit(train_net, net, lambda epoch: train_loader, val_loader, optimizer,
                [backbone, head], epochs, schedule, device, channels_last, autocast_dtype,
                on_epoch, before_val=recompute if recompute_bn else None,
                preemption=preemption)
