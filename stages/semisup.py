"""DVC stages `semisup` and `semisup_scratch`: semi-supervised fine-tuning on label
subsets (paper Table 2), and the supervised-from-scratch baseline with the same recipe.

    PYTHONPATH=src python -m stages.semisup --data data/ffcv \
        --weights models/pretrain/backbone.pt --live dvclive/semisup
    PYTHONPATH=src python -m stages.semisup --data data/ffcv --baselines \
        --live dvclive/semisup_scratch

For each subset S of ``semisup.subsets`` (files ``<data.subsets_dir>/S.txt``, indices
into train.beton or ImageNet file names, read and checked by barlow.data.subsets) one
run (barlow.semisup): with ``--weights``, ``barlow`` starts from that backbone; with
``--baselines``, ``scratch`` from a random one seeded with ``semisup.seed``, reading no
weights, so that DVC runs it once per data, code and params and not after every
pretraining. Both see the same batches (the subset's loader, seeded and rewound), pick
the epoch with the best top-1 on ``val_subset`` and report test top-1/top-5 at that
epoch and at the last one. Metrics: ``semisup/<S>/<run>/{top1_best, top5_best,
top1_last, top5_last, best_epoch, val_top1_best, weight_change}`` in
LIVE/metrics.json; per-epoch curves (losses, val accuracies, lrs) under LIVE/plots.

In machine.devices = N processes backbone and
head train under DDP with synchronised batch norm on B/N of every batch, val and test
are scored on disjoint shares with pooled counts, and rank 0 alone writes
(docs/multi-gpu.md).

SIGTERM or SIGUSR1 (a scheduler's pre-emption or time-limit warning): the run finishes
its step, writes LIVE/checkpoint.pt (barlow.eval_checkpoint) and exits 4; the next run
skips the runs done, resumes the one stopped and ends as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import click

from barlow import distributed as dist
from barlow.checkpoint import load_backbone_weights
from barlow.config import DataConfig, ModelConfig, SemisupConfig, as_dict, load_section
from barlow.data.convert import normalisation, read_manifest
from barlow.data.loaders import eval_loader
from barlow.data.sources import DataError
from barlow.data.subsets import load_splits
from barlow.eval_checkpoint import EvalCheckpoint, identity
from barlow.interrupt import stop_requests
from barlow.models import build_backbone
from barlow.probe import epoch_logger
from barlow.semisup import SCRATCH, finetune_and_test, run_backbone
from barlow.stage import (backbone_or_baselines, data_option, evaluated, live_option,
                          machine_shape, open_live, params_option, run_in_workers, run_stage)


@click.command()
@params_option
@data_option
@backbone_or_baselines
@live_option
def main(params: str, data_dir: Path, weights: Path | None,
         live_dir: Path) -> None:
    """Semi-supervised fine-tuning (paper Table 2) of WEIGHTS, or (--baselines) from
    scratch.

    Reads DATA/{train,test}.beton and their manifests, <data.subsets_dir>/S.txt for each
    subset S of semisup.subsets and semisup.val_subset, WEIGHTS, and the params semisup,
    machine, model (arch, width, layers) and data.subsets_dir. Writes LIVE/metrics.json
    (semisup/S/barlow/top1_best, ...; with --baselines semisup/S/scratch/...) and
    LIVE/plots/ (per-epoch curves). Exit 2: bad options, params, data, subsets or
    weights; 4: pre-empted (SIGTERM/SIGUSR1), LIVE/checkpoint.pt written."""
    with run_stage("semisup"), contextlib.ExitStack() as stack:
        cfg = load_section(SemisupConfig, "semisup", params)
        runs = evaluated(weights, [SCRATCH])
        shape = machine_shape(params, device="semisup")
        cfg.check_world(shape.devices)  # before any process is started
        run_in_workers("stages.semisup", shape.devices)
        # Until the process group is gone (as pretrain's).
        stop_requested = stack.enter_context(stop_requests())
        env = stack.enter_context(dist.process_group(shape.collective_timeout_s))
        cfg.check_world(env.world_size)
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
        if env.is_main:
            click.echo(f"semisup: validation split: {len(val_idx)} images ({val_origin})")

        if weights is not None:  # checked before any loader is compiled: fails fast
            load_backbone_weights(build_backbone(model.arch, model.width, model.layers)[0],
                                  weights)
        checkpoint = EvalCheckpoint(live_dir / "checkpoint.pt", "semisup", {
            "semisup": as_dict(cfg), "model": [model.arch, model.width, list(model.layers)],
            "data": [m["inputs_sha256"] for m in (manifest, test_manifest)],
            "ffcv": manifest["ffcv"], "world_size": env.world_size,
            "splits_and_weights": identity(val_idx, *subsets.values(),
                                           *([weights] if weights else []))},
            env, stop_requested)

        mean, std = normalisation(manifest)
        common = dict(resolution=cfg.resolution, mean=mean, std=std, device=env.device,
                      channels_last=cfg.channels_last, num_workers=shape.threads)
        # Few loaders, reused: each one costs a numba compilation (~15-30 s on a CPU).
        # Val and test: this rank's share of their rows (all of them in one process).
        val = eval_loader(str(train_beton), cfg.eval_batch_size, train_aug=False,
                          crop_ratio=cfg.eval_crop_ratio, indices=dist.shard(val_idx, env),
                          **common)
        test = eval_loader(str(test_beton), cfg.eval_batch_size, train_aug=False,
                           crop_ratio=cfg.eval_crop_ratio,
                           indices=dist.shard(test_manifest["num_images"], env), **common)

        live = open_live(live_dir, env)
        for name, epochs in zip(cfg.subsets, cfg.epochs):
            train = None
            for run in runs:
                key, prefix = f"{name}/{run}", f"semisup/{name}/{run}"
                rows: list[dict] = []
                log_row = epoch_logger(live, prefix, epochs, keys=None)

                def log(epoch: int, row: dict) -> None:
                    rows.append(row)
                    log_row(epoch, row)

                done = checkpoint.done.get(key)
                if done is not None:  # a run the stopped run completed: logged again
                    for row in done["rows"]:
                        log(row["epoch"], row)
                    metrics = done["metrics"]
                else:
                    checkpoint.stop_if_requested(key)
                    if train is None:  # built only for a subset with a run to do
                        train = eval_loader(str(train_beton), cfg.batch_size // env.world_size,
                                            train_aug=True, seed=cfg.seed,
                                            train_crop_scale=cfg.train_crop_scale,
                                            order="random", indices=subsets[name],
                                            distributed=env.world_size > 1, **common)
                    backbone, dim = run_backbone(run, model, weights, cfg.seed)
                    lrs = ((cfg.lr_backbone, cfg.lr_head) if run == "barlow"
                           else (cfg.scratch_lr_backbone, cfg.scratch_lr_head))
                    started = time.perf_counter()
                    metrics = finetune_and_test(backbone, dim, num_classes, train, val, test,
                                                cfg, epochs, lrs, env, log,
                                                checkpoint.preemption(key))
                    checkpoint.complete(key, {"rows": rows, "metrics": metrics})
                    if env.is_main:
                        click.echo(f"semisup: {name} {run} ({len(subsets[name])} images,"
                                   f" {epochs} epochs, {time.perf_counter() - started:.0f}"
                                   f" s): test top-1 {metrics['top1_best']:.2f} at best-val"
                                   f" epoch {metrics['best_epoch']},"
                                   f" {metrics['top1_last']:.2f} at the last")
                for metric, value in metrics.items():
                    live.log_metric(f"{prefix}/{metric}", value, plot=False)
        live.end()
        checkpoint.finish()


if __name__ == "__main__":
    main()
