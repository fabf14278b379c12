"""DVC stages `linear` and `linear_baselines`: linear evaluation of the frozen
pretrained backbone, and of the random-init and raw-pixel baselines under the same
recipe (barlow.probe).

    python -m stages.linear --data data/ffcv --weights models/pretrain/backbone.pt \
        --live dvclive/linear
    python -m stages.linear --data data/ffcv --baselines --live dvclive/linear_baselines

--weights evaluates the backbone alone; --baselines the embeddings of linear.baselines
alone, reading no weights, so that DVC runs them once per data, code and params and
not after every pretraining. An empty linear.baselines writes a metrics.json of ``{}``.

The head is fitted on train minus the validation split (barlow.data.subsets:
<data.subsets_dir>/val.txt, or an ImageFolder's hashed rule), its epoch chosen by val
top-1; the test split gives top-1/top-5 at that epoch and at the last one.

In machine.devices = N processes every rank
extracts features of its share of each split, the augmenting head trains under DDP on
B/N of every batch, and rank 0 alone writes (docs/multi-gpu.md).

SIGTERM or SIGUSR1 (a scheduler's pre-emption or time-limit warning): augment mode
finishes its step, writes LIVE/checkpoint.pt (barlow.eval_checkpoint) and exits 4;
features mode, whose head trains on features that a rerun extracts again anyway, stops
likewise before its next embedding. The next run skips the embeddings done, resumes
the one stopped and ends as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import click
import numpy as np

from barlow import distributed as dist
from barlow.config import (AugmentConfig, DataConfig, LinearConfig, ModelConfig, as_dict,
                           load_section)
from barlow.data.convert import normalisation, read_manifest
from barlow.data.loaders import eval_loader
from barlow.data.subsets import load_splits
from barlow.eval_checkpoint import EvalCheckpoint, identity
from barlow.footprint import check_fits, per_embedding
from barlow.interrupt import stop_requests
from barlow.probe import (Recipe, embedding, epoch_logger, gathered_features, log_summary,
                          probe_augmented, probe_features, split_rows)
from barlow.stage import (backbone_or_baselines, data_option, evaluated, live_option,
                          machine_shape, open_live, params_option, run_in_workers, run_stage,
                          write_no_evaluations)
from barlow.precision import AUTOCAST


@click.command()
@params_option
@data_option
@backbone_or_baselines
@live_option
def main(params: str, data_dir: Path, weights: Path | None,
         live_dir: Path) -> None:
    """Linear evaluation (paper Table 1) of the frozen WEIGHTS backbone on DATA, or
    (--baselines) of the baselines of linear.baselines.

    Reads DATA/{train,test}.beton and their manifests, <data.subsets_dir>/val.txt (the
    rows that choose the epoch), WEIGHTS, and the params linear, machine, model (arch,
    width, layers), augment.resolution and data.subsets_dir. Writes LIVE/metrics.json
    (linear/barlow/top1_best, top5_best, ...; with --baselines
    linear/<random_init|raw_pixels>/...) and LIVE/plots/ (per-epoch curves; the
    backbone's confusion matrix). Exit 2: bad options, params, data or weights; 4:
    pre-empted (SIGTERM/SIGUSR1), LIVE/checkpoint.pt written."""
    with run_stage("linear"), contextlib.ExitStack() as stack:
        cfg = load_section(LinearConfig, "linear", params)
        names = evaluated(weights, cfg.baselines)
        shape = machine_shape(params, device="linear")
        if not names:
            write_no_evaluations(live_dir)
            return
        cfg.check_world(shape.devices)  # before any process is started
        run_in_workers("stages.linear", shape.devices)
        # Until the process group is gone (as pretrain's).
        stop_requested = stack.enter_context(stop_requests())
        env = stack.enter_context(dist.process_group(shape.collective_timeout_s))
        cfg.check_world(env.world_size)
        model = load_section(ModelConfig, "model", params)
        resolution = load_section(AugmentConfig, "augment", params).resolution
        subsets_dir = Path(load_section(DataConfig, "data", params).subsets_dir)
        train_beton, test_beton = data_dir / "train.beton", data_dir / "test.beton"
        manifest = read_manifest(train_beton)
        test_manifest = read_manifest(test_beton)
        num_test = test_manifest["num_images"]
        val, _, val_origin = load_splits(subsets_dir, train_beton, manifest)
        if env.is_main:
            click.echo(f"linear: validation split: {len(val)} images ({val_origin})")
        mean, std = normalisation(manifest)
        device = env.device
        autocast = AUTOCAST[cfg.precision]
        recipe = Recipe(cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay,
                        cfg.schedule, cfg.seed)
        # Every embedding is built (and the weights file checked) before any long work.
        embeds = {name: embedding(name, model, weights, cfg.seed, device) for name in names}
        # And every embedding's gathered splits checked against the memory there is.
        gathered = {"test": num_test} | (
            {"train": manifest["num_images"]} if cfg.mode == "features" else {})
        check_fits(per_embedding(list(embeds), gathered, "linear", ("linear.mode", cfg.mode),
                                 model, resolution), device)
        checkpoint = EvalCheckpoint(live_dir / "checkpoint.pt", "linear", {
            "linear": as_dict(cfg), "model": [model.arch, model.width, list(model.layers)],
            "resolution": resolution,
            "data": [m["inputs_sha256"] for m in (manifest, test_manifest)],
            "ffcv": manifest["ffcv"], "world_size": env.world_size,
            "splits_and_weights": identity(val, *([weights] if weights else []))},
            env, stop_requested)

        def loader(beton: Path, batch_size: int = cfg.extract_batch_size, **kwargs):
            return eval_loader(str(beton), batch_size, shape.threads, resolution, mean, std,
                               crop_ratio=cfg.crop_ratio, seed=cfg.seed, device=device,
                               **kwargs)

        # Each loader compiles its pipeline once; every embedding reuses it. Evaluation
        # loaders read this rank's share of their rows (all of them in one process).
        test_loader = loader(test_beton, train_aug=False, indices=dist.shard(num_test, env))
        if cfg.mode == "features":
            # All training images in file order; val rows are split off in memory.
            train_loader = loader(train_beton, train_aug=False,
                                  indices=dist.shard(manifest["num_images"], env))
        else:
            fit_rows = np.setdiff1d(np.arange(manifest["num_images"]), val)
            train_loader = loader(train_beton, cfg.batch_size // env.world_size,
                                  train_aug=True, train_crop_scale=cfg.train_crop_scale,
                                  indices=fit_rows, order="random",
                                  distributed=env.world_size > 1)
            val_loader = loader(train_beton, train_aug=False, indices=dist.shard(val, env))

        live = open_live(live_dir, env)
        for name, embed in embeds.items():
            prefix = f"linear/{name}"
            log = epoch_logger(live, prefix, cfg.epochs)

            def features(batches, split: str):
                return gathered_features(embed, batches, device, autocast,
                                         label=f"{prefix} {split} features")

            result = checkpoint.done.get(name)
            if result is not None:  # a probe the stopped run completed: logged again
                for row in result["history"]:
                    log(row["epoch"], row)
            else:
                checkpoint.stop_if_requested(name)
                test = features(test_loader, "test")
                if cfg.mode == "features":
                    fit, held_out = split_rows(*features(train_loader, "train"), val)
                    result = probe_features(fit, held_out, test, manifest["num_classes"],
                                            recipe, device, log)
                else:
                    result = probe_augmented(embed, train_loader, val_loader, test,
                                             manifest["num_classes"], recipe, device, autocast,
                                             log, env, checkpoint.preemption(name))
                result["test_labels"] = test[1]
                checkpoint.complete(name, result)
                if env.is_main:
                    click.echo(f"linear: {name}: test top-1 {result['top1_best']:.2f} at"
                               f" best-val epoch {result['best_epoch']},"
                               f" {result['top1_last']:.2f} at the last")
            log_summary(live, prefix, result)
            if name == "barlow":
                classes = np.asarray(manifest["class_names"])
                live.log_sklearn_plot("confusion_matrix", classes[result["test_labels"].numpy()],
                                      classes[result["test_pred_best"].numpy()],
                                      name="confusion_matrix.json",
                                      title="linear probe, test, best-val epoch")
        live.end()
        checkpoint.finish()


if __name__ == "__main__":
    main()
