"""DVC stage `semisup`: semi-supervised fine-tuning on label subsets (paper Table 2) and
the supervised-from-scratch baseline with the same recipe.

    PYTHONPATH=src python -m stages.semisup --data data/ffcv \
        --weights models/pretrain/backbone.pt --live dvclive/semisup

For each subset S of ``semisup.subsets`` (files ``<data.subsets_dir>/S.txt``, indices
into train.beton or ImageNet file names, read and checked by barlow.data.subsets) two
runs of ``barlow.evaluate.finetune``:
``barlow`` starts from the ``--weights`` backbone, ``scratch`` from a random one seeded
with ``semisup.seed``. Both see the same batches (one loader per subset, rewound), pick
the epoch with the best top-1 on ``val_subset`` and report test top-1/top-5 at that
epoch and at the last one. Metrics: ``semisup/<S>/<run>/{top1_best, top5_best,
top1_last, top5_last, best_epoch, val_top1_best, weight_change}`` in
LIVE/metrics.json; per-epoch curves (losses, val accuracies, lrs) under LIVE/plots.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import click
import torch
from torch import nn

from barlow.checkpoint import load_backbone_weights
from barlow.config import DataConfig, ModelConfig, SemisupConfig, load_section
from barlow.data.convert import read_manifest
from barlow.data.loaders import eval_loader
from barlow.data.sources import DataError
from barlow.data.subsets import load_splits
from barlow.evaluate import extract_features, finetune, linear_head, topk_accuracy
from barlow.models import build_backbone
from barlow.stage import (data_option, live_option, params_option, run_stage,
                          weights_option)
from barlow.train import AUTOCAST, normalisation

RUNS = ("barlow", "scratch")


def relative_change(before: dict[str, torch.Tensor], module: nn.Module) -> float:
    """‖θ − θ₀‖ / ‖θ₀‖ over the trainable parameters: how far fine-tuning moved them."""
    params = dict(module.named_parameters())
    diff = sum(float((params[k].detach().cpu() - v).pow(2).sum()) for k, v in before.items())
    norm = sum(float(v.pow(2).sum()) for v in before.values())
    return (diff / max(norm, 1e-12)) ** 0.5


def accuracy_on(backbone: nn.Module, head: nn.Module, loader, device: torch.device,
                  channels_last: bool, autocast_dtype) -> dict[int, float]:
    logits, labels = extract_features(nn.Sequential(backbone, head), loader, device,
                                      channels_last, autocast_dtype)
    return topk_accuracy(logits, labels, (1, 5))


def run_once(backbone: nn.Module, feat_dim: int, num_classes: int, train, val, test,
             cfg: SemisupConfig, epochs: int, lrs: tuple[float, float], device: torch.device,
             log: Callable[[int, dict], None]) -> dict[str, float]:
    """Fine-tune ``backbone`` plus a fresh head; test at the best-val and last epochs."""
    autocast_dtype = AUTOCAST[cfg.precision]
    backbone = backbone.to(device)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    head = linear_head(feat_dim, num_classes, cfg.seed).to(device)
    start = {k: p.detach().cpu().clone() for k, p in backbone.named_parameters()}
    best: dict = {}

    def on_epoch(epoch: int, row: dict) -> None:
        log(epoch, row)
        # Keep the weights of the best-val epoch so that the test set is evaluated only
        # twice (best and last) instead of after every epoch. ">" keeps the first of
        # ties, as finetune's own choice of "best" does.
        if not best or row["val_top1"] > best["val_top1"]:
            best.update(epoch=epoch, val_top1=row["val_top1"], state=(
                {k: v.detach().clone() for k, v in backbone.state_dict().items()},
                {k: v.detach().clone() for k, v in head.state_dict().items()}))

    # Every run of this subset sees the same sample order and augmentations.
    train.seek(0)
    result = finetune(backbone, head, train, val, epochs=epochs, lr_backbone=lrs[0],
                      lr_head=lrs[1], weight_decay=cfg.weight_decay, device=device,
                      momentum=cfg.momentum, schedule=cfg.schedule,
                      channels_last=cfg.channels_last, autocast_dtype=autocast_dtype,
                      on_epoch=on_epoch)
    assert best["epoch"] == result["best"]["epoch"]  # same tie rule as finetune's
    change = relative_change(start, backbone)
    last = accuracy_on(backbone, head, test, device, cfg.channels_last, autocast_dtype)
    if best["epoch"] == result["last"]["epoch"]:
        at_best = last
    else:
        backbone.load_state_dict(best["state"][0])
        head.load_state_dict(best["state"][1])
        at_best = accuracy_on(backbone, head, test, device, cfg.channels_last, autocast_dtype)
    return {"top1_best": at_best[1], "top5_best": at_best[5],
            "top1_last": last[1], "top5_last": last[5],
            "best_epoch": result["best"]["epoch"], "val_top1_best": result["best"]["val_top1"],
            "weight_change": change}


@click.command()
@params_option
@data_option
@weights_option
@live_option
def main(params: str, data_dir: Path, weights: Path, live_dir: Path) -> None:
    with run_stage("semisup"):
        cfg = load_section(SemisupConfig, "semisup", params)
        model = load_section(ModelConfig, "model", params)
        subsets_dir = Path(load_section(DataConfig, "data", params).subsets_dir)
        train_beton, test_beton = data_dir / "train.beton", data_dir / "test.beton"
        manifest, test_manifest = read_manifest(train_beton), read_manifest(test_beton)
        num_classes = manifest["num_classes"]
        if test_manifest["num_classes"] != num_classes:
            raise DataError(f"{test_beton}: {test_manifest['num_classes']} classes, but"
                            f" {train_beton} has {num_classes}")
        val_idx, subsets, val_origin = load_splits(subsets_dir, train_beton, manifest,
                                                   cfg.subsets, cfg.val_subset)
        click.echo(f"semisup: validation split: {len(val_idx)} images ({val_origin})")

        # Check the weights file before any loader is compiled: a mismatch fails fast.
        load_backbone_weights(build_backbone(model.arch, model.width, model.layers)[0], weights)

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        mean, std = normalisation(manifest)
        common = dict(resolution=cfg.resolution, mean=mean, std=std, device=device,
                      channels_last=cfg.channels_last, num_workers=cfg.workers)
        # Few loaders, reused: each one costs a numba compilation (~15-30 s on a CPU).
        val = eval_loader(str(train_beton), cfg.eval_batch_size, train_aug=False,
                          crop_ratio=cfg.eval_crop_ratio, indices=val_idx, **common)
        test = eval_loader(str(test_beton), cfg.eval_batch_size, train_aug=False,
                           crop_ratio=cfg.eval_crop_ratio, **common)

        from dvclive import Live

        live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
        for name, epochs in zip(cfg.subsets, cfg.epochs):
            train = eval_loader(str(train_beton), cfg.batch_size, train_aug=True, seed=cfg.seed,
                                train_crop_scale=cfg.train_crop_scale, order="random",
                                indices=subsets[name], **common)
            for run in RUNS:
                prefix = f"semisup/{name}/{run}"

                def log(epoch: int, row: dict, prefix: str = prefix) -> None:
                    live.step = epoch
                    for key, value in row.items():
                        if key != "epoch":
                            live.log_metric(f"{prefix}/{key}", value)

                if run == "barlow":
                    backbone, dim = build_backbone(model.arch, model.width, model.layers)
                    load_backbone_weights(backbone, weights)
                    lrs = (cfg.lr_backbone, cfg.lr_head)
                else:
                    torch.manual_seed(cfg.seed)
                    backbone, dim = build_backbone(model.arch, model.width, model.layers)
                    lrs = (cfg.scratch_lr_backbone, cfg.scratch_lr_head)
                started = time.perf_counter()
                metrics = run_once(backbone, dim, num_classes, train, val, test, cfg, epochs,
                                   lrs, device, log)
                for key, value in metrics.items():
                    live.log_metric(f"{prefix}/{key}", value, plot=False)
                click.echo(f"semisup: {name} {run} ({len(subsets[name])} images, {epochs}"
                           f" epochs, {time.perf_counter() - started:.0f} s): test top-1"
                           f" {metrics['top1_best']:.2f} at best-val epoch"
                           f" {metrics['best_epoch']}, {metrics['top1_last']:.2f} at the last")
        live.end()


if __name__ == "__main__":
    main()
