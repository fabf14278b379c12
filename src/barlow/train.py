"""The Barlow Twins pretraining loop: one code path for 1 CPU process, N CPU processes
(gloo) and N GPUs (nccl), resumable at any checkpointed step.

Per step t (0-based) of T = epochs · steps_per_epoch, with f = batch/256:
    lr_weights(t) = warmup_cosine(t, T, warmup_epochs · steps_per_epoch, lr_weights · f)
    lr_biases(t)  = the same with lr_biases · f
    z1, z2 = projector(backbone(view_a)), projector(backbone(view_b))
    loss   = Σ(1 − c_ii)² + λ Σ_{i≠j} c_ij²  over the global batch (barlow.distributed;
             loss.variant and loss.normalization choose the paper's ablations)

Resuming: the checkpoint holds model, optimiser, scaler, RNG and the logged history;
the loader is rebuilt with the same seed and seeks to the checkpoint's epoch and batch.
Order and augmentations are functions of (seed, epoch, batch) (barlow.data.loaders), so
the resumed run sees exactly the batches the uninterrupted one would have, and ends
with the same weights. Rank 0 decides whether to resume and every rank follows
(`resume_point`).

Pre-emption: asked to stop (``stop_requested``: SIGTERM or SIGUSR1 on any rank,
barlow.interrupt), the ranks agree at the end of the step (barlow.distributed.any_rank),
rank 0 checkpoints that step, and `pretrain` raises barlow.errors.Preempted: one step
and one checkpoint write after the signal, nothing is lost.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from barlow import distributed as dist
from barlow.checkpoint import (CheckpointError, code_hashes, load_resumable, non_finite_keys,
                               rng_state, save_atomic, set_rng_state)
from barlow.config import (AugmentConfig, LossConfig, ModelConfig, PretrainConfig, as_dict,
                           fingerprint)
from barlow.data.convert import normalisation, read_manifest
from barlow.data.loaders import (config_views, eval_loader, pretrain_loader,
                                 progressive_resolution, require_batches)
from barlow.errors import Preempted
from barlow.features import extract_features, knn_top1
from barlow.models import BarlowTwins, Projector, backbone_state_dict, build_backbone
from barlow.optim import build_optimizer, param_groups, scale_lr, warmup_cosine
from barlow.precision import AUTOCAST, resolve_precision
from barlow.progress import Progress

class TrainingFault(RuntimeError):
    """A run that must not export what it holds; the message says why."""


class NonFiniteLossError(TrainingFault):
    """The loss, or a weight, became NaN or Inf; training stops and the last checkpoint
    stays intact."""


class NoStepTaken(TrainingFault):
    """The run ended without one optimisation step: its weights are the initial ones."""


@dataclass(frozen=True)
class PretrainSetup:
    """All params sections the pretraining stage reads."""

    model: ModelConfig
    loss: LossConfig
    augment: AugmentConfig
    pretrain: PretrainConfig

    def resume_config(self, data: dict[str, Any], world_size: int) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: everything that changes the
        weights (operational knobs such as the checkpoint interval excluded).
        The world size is part of it: ffcv deals each epoch's order out by rank, so a
        resume on another process count (nodes × machine.devices) would see other
        batches than the interrupted run."""
        pretrain = as_dict(self.pretrain)
        pretrain.pop("checkpoint_every_steps")
        if self.resolution_at() is None:
            # Every epoch at full size, whatever the ramp's other values: the same
            # weights as a run of the code before progressive resizing, which resumes.
            pretrain.pop("progressive_resize")
        # Where the colour ops run changes no draw, only a rare last rounding (±1 grey
        # level, as compiled vs uncompiled): a run may resume on the other side.
        augment = as_dict(self.augment)
        augment.pop("colour_ops_on")
        return {"model": as_dict(self.model), "loss": as_dict(self.loss),
                "augment": augment, "pretrain": pretrain,
                "data": data, "world_size": world_size}

    def resolution_at(self) -> Callable[[int], int] | None:
        """Epoch → side of the views' crops under pretrain.progressive_resize
        (barlow.data.loaders.progressive_resolution), or None when every epoch crops at
        augment.resolution: min_resolution at or above it (so a smaller
        augment.resolution, -S augment.resolution=16, needs no second edit)."""
        resize, final = self.pretrain.progressive_resize, self.augment.resolution
        if resize.min_resolution >= final:
            return None
        return functools.partial(progressive_resolution, epochs=self.pretrain.epochs,
                                 resolution=final, min_resolution=resize.min_resolution,
                                 ramp=resize.ramp, step=resize.step)


def build_model(model: ModelConfig) -> BarlowTwins:
    backbone, dim = build_backbone(model.arch, model.width, model.layers)
    return BarlowTwins(backbone, Projector(dim, model.projector, model.projector_bn))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def knn_monitor(backbone: torch.nn.Module, loaders: tuple | None, num_classes: int,
                cfg: PretrainConfig, env: dist.DistEnv,
                autocast_dtype: torch.dtype | None) -> float:
    """Weighted kNN top-1 (%) of the query split against the bank's features, with the
    training run's autocast dtype (its resolved precision).

    Rank 0 alone computes it, the similarity search on its own device (a GPU does a
    50k bank in well under a second; the CPU took minutes, single-threaded, on every
    rank), and the others receive the figure, so every rank logs the same value."""
    top1 = None
    if env.is_main:
        bank_loader, query_loader = loaders
        kwargs = dict(device=env.device, channels_last=cfg.channels_last,
                      autocast_dtype=autocast_dtype)
        bank, bank_y = extract_features(backbone, bank_loader, **kwargs)
        query, query_y = extract_features(backbone, query_loader, **kwargs)
        top1 = knn_top1(bank.to(env.device), bank_y, query, query_y, num_classes=num_classes,
                        k=cfg.knn_k, temperature=cfg.knn_temperature)
    return dist.broadcast_object(top1)


def resume_point(path: Path, config: dict[str, Any], code: dict[str, str],
                 env: dist.DistEnv) -> dict[str, Any] | None:
    """The checkpoint every rank resumes from, or None to start: rank 0's decision
    (`load_resumable` on its ``path``), which every rank follows.

    A rank other than 0 reads its own ``path`` (a shared file system, or a copy on each
    node) only when rank 0 resumes, and must find the same step there. If it cannot,
    starting it afresh would train ranks at different steps side by side, so every rank
    raises the same CheckpointError naming the first rank that failed: a one-line error
    on every node instead of a run that drifts or hangs."""
    ckpt, problem = None, None
    if env.is_main:
        try:
            ckpt = load_resumable(path, config, code,
                                  log=lambda line: print(f"pretrain: {line}", flush=True))
        except CheckpointError as err:
            problem = str(err)
    # Rank 0's refusal (a checkpoint of other params) ends every rank alike.
    step, refused = dist.broadcast_object((None if ckpt is None else ckpt["step"], problem))
    if refused:
        raise CheckpointError(refused)
    if not env.is_main and step is not None:
        try:
            ckpt = load_resumable(path, config, code, log=lambda line: None)
        except CheckpointError as err:
            problem = str(err)
        else:
            if ckpt is None or ckpt["step"] != step:
                problem = (f"{path}: not found" if not path.is_file() else
                           f"{path}: holds step {ckpt['step']}" if ckpt else
                           f"{path}: a finished run of other params or code")
    problems = [(rank, p) for rank, p in enumerate(dist.all_objects(problem)) if p]
    if problems:
        rank, problem = problems[0]
        raise CheckpointError(
            f"rank {rank} cannot read the checkpoint rank 0 resumes from (step {step}):"
            f" {problem}; every rank must see the same file (a shared file system, or a"
            " copy on every node)")
    return ckpt


def pretrain(setup: PretrainSetup, train_beton: Path, test_beton: Path, out_dir: Path,
             env: dist.DistEnv, log: Callable[[int, dict[str, float]], None], *,
             num_workers: int, stop_after_steps: int | None = None,
             stop_requested: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train, checkpointing to ``out_dir/checkpoint.pt`` (rank 0); return the history.
    ``num_workers``: FFCV loader threads of this process (barlow.machine).

    ``log(step, metrics)`` is called on every rank with the same values (the caller
    logs on rank 0); on resume it is first replayed with the checkpoint's history, so
    the logs of an interrupted run equal those of an uninterrupted one.
    ``stop_after_steps`` ends the run early (tests of resume). ``stop_requested()``
    true on any rank at the end of a step (the ranks agree through one all-reduce per
    step): that step is checkpointed and Preempted raised on every rank once it is
    written."""
    cfg = setup.pretrain
    cfg.check_world(env.world_size)
    resolution_at = setup.resolution_at()
    manifest = read_manifest(train_beton)
    test_manifest = read_manifest(test_beton)
    mean, std = normalisation(manifest)
    # The data's identity: its inputs and how they were written (the .beton's own bytes
    # depend on ffcv's writer scheduling when several processes write it).
    resume_config = setup.resume_config({"inputs_sha256": manifest["inputs_sha256"],
                                         "ffcv": manifest["ffcv"]}, env.world_size)
    ckpt_path = out_dir / "checkpoint.pt"
    code = code_hashes()  # every module of the run is imported by now
    # Refused here, before any model or loader is built: a batch larger than the
    # training set (drop_last) would give epochs of no step and an untrained backbone.
    require_batches(manifest["num_images"], cfg.batch_size // env.world_size, env.world_size,
                    True, "pretrain.batch_size", f"{train_beton}")
    # Read (data only, barlow.checkpoint.load_data_only) before anything is built, and
    # applied once the model and optimiser exist.
    ckpt = resume_point(ckpt_path, resume_config, code, env)

    seed_everything(cfg.seed)
    if env.device.type == "cuda":
        # cuDNN picks the fastest convolution per shape (input shapes are fixed here);
        # its choice is not deterministic, which GPU runs are not anyway (README).
        # TF32 stays off for matmuls: the loss is computed in fp32 on purpose.
        torch.backends.cudnn.benchmark = True
    model = build_model(setup.model).to(env.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = dist.convert_sync_batchnorm(model, env)
    groups = param_groups(model, cfg.weight_decay)
    optimizer = build_optimizer(cfg.optimizer, groups, momentum=cfg.momentum, eta=cfg.eta)
    precision = resolve_precision(cfg.precision, env.device)
    if env.is_main and precision != cfg.precision:
        print(f"pretrain: precision {cfg.precision} -> {precision} on {env.device.type}",
              flush=True)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")

    local_batch = cfg.batch_size // env.world_size
    loader = pretrain_loader(str(train_beton), local_batch, num_workers,
                             config_views(setup.augment), mean, std, seed=cfg.seed,
                             distributed=env.world_size > 1, device=env.device,
                             channels_last=cfg.channels_last,
                             colour_ops_on=setup.augment.colour_ops_on,
                             resolution_at=resolution_at)
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps)
    base_lr = {"weights": scale_lr(cfg.lr_weights, cfg.batch_size),
               "biases": scale_lr(cfg.lr_biases, cfg.batch_size)}

    # `window`: sums of the loss terms since the last log line; checkpointed with the
    # rest so a resumed run logs the same averages as an uninterrupted one.
    step, history, window, window_steps = 0, [], {}, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        step, history = ckpt["step"], ckpt["history"]
        window, window_steps = ckpt["window"], ckpt["window_steps"]
        for row in history:
            log(row["step"], row["metrics"])
        print(f"pretrain: resumed from {ckpt_path} at step {step}/{total_steps}", flush=True)

    def save(path: Path) -> None:
        # The loss is checked before each update, so the update itself can still
        # write NaN (bf16 convolutions on 1x1 maps gave Inf gradients on the CPU):
        # no checkpoint, and so no exported backbone, ever holds one. Every rank checks
        # its own copy (DDP keeps them equal) and they pool the verdict, so all stop
        # here together: a rank stopping alone would leave the others in the next
        # step's collectives until the collective timeout (NCCL notices no dead peer).
        weights = model.state_dict()
        broken = next((keys for keys in dist.all_objects(non_finite_keys(weights)) if keys), [])
        if broken:
            raise NonFiniteLossError(
                f"pretrain: non-finite weights (NaN/Inf) in {len(broken)} tensors, first"
                f" {broken[0]}, after step {step}; the last good checkpoint {ckpt_path}"
                " is untouched")
        if env.is_main:
            save_atomic({"model": weights, "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "rng": rng_state(), "step": step,
                         "history": history, "window": window,
                         "window_steps": window_steps, "finished": step == total_steps,
                         "config": resume_config, "code": code,
                         "fingerprint": fingerprint(resume_config)}, path)

    ddp_model = dist.wrap_ddp(model, env, cfg.grad_allreduce)
    train_model = torch.compile(ddp_model) if cfg.compile else ddp_model
    knn_loaders = None
    if cfg.knn_every_epochs and env.is_main:
        # Built once, on rank 0 alone (knn_monitor): every FFCV loader compiles its
        # pipeline (seconds) on creation.
        res = setup.augment.resolution
        stored = manifest["resolution"]["height"][1]
        ratio = 1.0 if stored <= res else 224 / 256
        bank = np.linspace(0, manifest["num_images"] - 1,
                           min(cfg.knn_bank_size, manifest["num_images"])).astype(np.int64)
        common = dict(batch_size=256, num_workers=num_workers, resolution=res, mean=mean,
                      std=std, train_aug=False, crop_ratio=ratio, device=env.device,
                      channels_last=cfg.channels_last)
        knn_loaders = (eval_loader(str(train_beton), indices=np.unique(bank), **common),
                       eval_loader(str(test_beton), **common))

    autocast_dtype = AUTOCAST[precision]
    if env.is_main:
        print(f"pretrain: {cfg.epochs} epochs x {steps_per_epoch} steps, global batch"
              f" {cfg.batch_size} on {env.world_size} process(es), {precision} on"
              f" {env.device.type}", flush=True)
    # One line per epoch, and at the log points at most one per 10 s between them.
    progress = Progress("pretrain", total_steps, "step", start=step, enabled=env.is_main)
    amp = (torch.autocast(env.device.type, dtype=autocast_dtype) if autocast_dtype
           else contextlib.nullcontext())
    window_start = epoch_start = time.perf_counter()
    shown_side = None
    while step < total_steps:
        # Mid-epoch after a resume: skip the batches the checkpointed run trained on.
        epoch = step // steps_per_epoch
        loader.seek(epoch, step % steps_per_epoch)
        if resolution_at is not None:
            side = resolution_at(epoch)
            if env.is_main and side != shown_side:
                print(f"pretrain: epoch {epoch}: views cropped at {side} px", flush=True)
            shown_side = side
        model.train()
        for y1, y2 in loader:
            lrs = {name: warmup_cosine(step, total_steps, warmup_steps, lr, cfg.final_lr_ratio)
                   for name, lr in base_lr.items()}
            for group in optimizer.param_groups:
                group["lr"] = lrs[group["name"]]
            with amp:
                z1, z2 = train_model(y1, y2)
            terms = dist.distributed_barlow_twins_loss(z1, z2, setup.loss.lambd,
                                                       setup.loss.variant,
                                                       setup.loss.normalization)
            if not torch.isfinite(terms.loss):
                raise NonFiniteLossError(
                    f"pretrain: loss is {terms.loss.item()} at step {step} (epoch {epoch});"
                    f" the last good checkpoint {ckpt_path} is untouched")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms.loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1

            for key, value in (("loss", terms.loss), ("on_diag", terms.on_diag),
                               ("off_diag", terms.off_diag)):
                window[key] = window.get(key, 0.0) + float(value.detach())
            window_steps += 1
            epoch_done = step % steps_per_epoch == 0
            if step % cfg.log_every_steps == 0 or epoch_done:
                elapsed = time.perf_counter() - window_start
                metrics = {k: v / window_steps for k, v in window.items()}
                metrics.update(lr_weights=lrs["weights"], lr_biases=lrs["biases"],
                               epoch=step / steps_per_epoch,
                               pairs_per_s=window_steps * cfg.batch_size / elapsed)
                if resolution_at is not None:
                    metrics["resolution"] = side
                if epoch_done:
                    metrics["epoch_time_s"] = time.perf_counter() - epoch_start
                    if cfg.knn_every_epochs and (epoch + 1) % cfg.knn_every_epochs == 0:
                        metrics["knn_top1"] = knn_monitor(
                            model.backbone, knn_loaders, test_manifest["num_classes"], cfg, env,
                            autocast_dtype)
                history.append({"step": step, "metrics": metrics})
                log(step, metrics)
                shown = {"epoch": f"{metrics['epoch']:.2f}", "loss": metrics["loss"],
                         "pairs/s": round(metrics["pairs_per_s"])}
                if "knn_top1" in metrics:
                    shown["kNN top-1"] = metrics["knn_top1"]
                (progress.line if epoch_done else progress.update)(step, **shown)
                window, window_steps = {}, 0
                window_start = time.perf_counter()
            saved = epoch_done or step % cfg.checkpoint_every_steps == 0 or step == total_steps
            if saved:
                save(ckpt_path)
            if stop_after_steps is not None and step >= stop_after_steps:
                return {"step": step, "history": history, "model": model}
            if (stop_requested is not None and step < total_steps
                    and dist.any_rank(stop_requested())):
                if not saved:
                    save(ckpt_path)
                dist.barrier()  # no rank leaves (and no launcher reaps it) before the file exists
                raise Preempted(f"stopped on request at step {step}/{total_steps} (epoch"
                                f" {step / steps_per_epoch:.2f}); {ckpt_path} holds it, the"
                                " next run resumes there")
        epoch_start = time.perf_counter()
    if step == 0:
        # The last line of defence behind require_batches: never export an untrained
        # backbone as the run's product.
        raise NoStepTaken(f"pretrain: the run ended after 0 optimisation steps ({cfg.epochs}"
                          f" epochs x {steps_per_epoch} steps); nothing exported")
    return {"step": step, "history": history, "model": model}


def export(model: BarlowTwins, out_dir: Path, env: dist.DistEnv) -> None:
    """Rank 0 writes the backbone in torchvision layout (loads into
    torchvision.models.resnet50() with only fc.* missing)."""
    if env.is_main:
        # On the CPU whatever device trained it: a CPU-only user's plain torch.load works.
        save_atomic({k: v.detach().cpu() for k, v in backbone_state_dict(model).items()},
                    out_dir / "backbone.pt")

