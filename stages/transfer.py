"""DVC stages `transfer` and `transfer_baselines`: frozen-feature transfer of the
pretrained backbone to the offline transfer sets, to PASCAL VOC2007 when
data.voc07_root is set, and to the ImageFolder sets of data.transfer_folders
(Places-205, iNat18; paper Table 3 protocols), and of the random-init and raw-pixel
baselines.

    python -m stages.transfer --data data/transfer --pretrain-data data/ffcv \
        --weights models/pretrain/backbone.pt --live dvclive/transfer
    python -m stages.transfer --data data/transfer --pretrain-data data/ffcv \
        --baselines --live dvclive/transfer_baselines

--weights evaluates the backbone alone; --baselines the embeddings of
transfer.baselines alone, reading no weights, so that DVC runs them once per data, code
and params and not after every pretraining. An empty transfer.baselines writes a
metrics.json of ``{}``.

Per data set NAME (NAME_train.beton / NAME_test.beton under --data: transfer.datasets,
then voc07, then data.transfer_folders' names) and embedding:
- linear: a head with the Places-205 recipe (SGD, lr ÷10 twice), fitted on the train
  set minus a stratified validation share that chooses the epoch (barlow.probe), for
  transfer.epochs_per_dataset[NAME] epochs, else transfer.epochs; single-label sets
  only;
- svm: the VOC07 protocol, one linear SVM per class on L2-normalised features, C by
  cross-validation on the whole train set, mAP on the test set. A multi-label set
  (VOC2007) gets this protocol only, as in the paper: a softmax head picks one class.
Images (ImageNet-size ones too) are centre-cropped to transfer.crop_ratio, resized to
the model's input resolution and normalised with the pretraining data's statistics, as
transfer protocols use the ImageNet statistics for every set.

In machine.devices = N processes the feature
extraction, the GPU's part, is split over the ranks and gathered (barlow.probe); every
rank then fits the same heads on all rows, the ranks share the SVM fits
(barlow.voc07.svm_share), the results are one process's, and rank 0 alone writes
(docs/multi-gpu.md).

A stop signal (SIGTERM, SIGUSR1) ends the run before the next sub-run (a set and an
embedding) with status 4; LIVE/checkpoint.pt keeps the sub-runs done, which the next
run logs again without redoing them (barlow.eval_checkpoint).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import click
from torch import nn

from barlow import distributed as dist
from barlow.config import AugmentConfig, DataConfig, ModelConfig, TransferConfig, load_section
from barlow.data.convert import normalisation, read_manifest
from barlow.data.loaders import SeekableLoader, eval_loader
from barlow.data.sources import split_indices
from barlow.eval_checkpoint import EvalCheckpoint, identity
from barlow.evaluate import OnEpoch
from barlow.footprint import check_fits, per_embedding
from barlow.interrupt import stop_requests
from barlow.params import as_dict
from barlow.probe import (Recipe, embedding, epoch_logger, gathered_features, log_summary,
                          multilabel_batches, probe_features, split_rows)
from barlow.stage import (backbone_or_baselines, evaluated, live_option, machine_shape,
                          open_live, params_option, run_in_workers, run_stage,
                          write_no_evaluations)
from barlow.precision import AUTOCAST
from barlow.voc07 import voc07_svm_map, voc_devkit_targets


@click.command()
@params_option
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="folder with NAME_train.beton and NAME_test.beton per transfer.datasets"
                   " (and voc07 when data.voc07_root is set, and each data.transfer_folders"
                   " name)")
@click.option("--pretrain-data", "pretrain_dir", required=True, type=click.Path(path_type=Path),
              help="folder with the pretraining train.beton; its manifest gives the "
                   "normalisation the backbone was trained with")
@backbone_or_baselines
@live_option
def main(params: str, data_dir: Path, pretrain_dir: Path, weights: Path | None,
         live_dir: Path) -> None:
    """Transfer evaluations (paper Table 3 protocols) of the frozen WEIGHTS backbone, or
    (--baselines) of the baselines of transfer.baselines.

    Reads DATA/NAME_{train,test}.beton for each set (transfer.datasets, voc07 when
    data.voc07_root is set, data.transfer_folders' names), PRETRAIN_DATA/train.json (the
    normalisation), WEIGHTS, and the params transfer, machine, model (arch, width,
    layers), augment.resolution, data.voc07_root and data.transfer_folders. Writes
    LIVE/metrics.json (transfer/NAME/linear/EMBEDDING/top1_best, ...,
    transfer/NAME/svm/EMBEDDING/map; EMBEDDING barlow, or with --baselines each of
    transfer.baselines) and LIVE/plots/ (per-epoch curves). Exit 2: bad options, params,
    data or weights; 4: pre-empted (SIGTERM/SIGUSR1) between two sub-runs (a set and an
    embedding), LIVE/checkpoint.pt written."""
    with run_stage("transfer"), contextlib.ExitStack() as stack:
        cfg = load_section(TransferConfig, "transfer", params)
        names = evaluated(weights, cfg.baselines)
        shape = machine_shape(params, device="transfer")
        if not names:
            write_no_evaluations(live_dir)
            return
        run_in_workers("stages.transfer", shape.devices)
        # Until the process group is gone (as linear's).
        stop_requested = stack.enter_context(stop_requests())
        env = stack.enter_context(dist.process_group(shape.collective_timeout_s))
        model = load_section(ModelConfig, "model", params)
        resolution = load_section(AugmentConfig, "augment", params).resolution
        data = load_section(DataConfig, "data", params)
        cfg.check_datasets(list(data.transfer_folders))
        mean, std = normalisation(read_manifest(pretrain_dir / "train.beton"))
        voc07 = ("voc07",) if data.voc07_root else ()
        sets = {name: (data_dir / f"{name}_train.beton", data_dir / f"{name}_test.beton")
                for name in (*cfg.datasets, *voc07, *data.transfer_folders)}
        manifests, test_manifests = {}, {}
        for name, (train, test) in sets.items():
            test_manifests[name] = read_manifest(test)  # missing: fails now, not later
            manifests[name] = read_manifest(train)
        sizes = {name: (manifests[name]["num_images"], test_manifests[name]["num_images"])
                 for name in sets}
        device = env.device
        embeds = {name: embedding(name, model, weights, cfg.seed, device) for name in names}
        # Each set's splits, gathered per embedding, checked against the memory there is
        # before any set is read; the backbone's features named by the set's key.
        check_fits([g for name in sets for g in per_embedding(
            list(embeds), {f"{name} train": sizes[name][0], f"{name} test": sizes[name][1]},
            "transfer",
            ("transfer.datasets" if name in cfg.datasets else
             "data.voc07_root" if name == "voc07" else "data.transfer_folders", name),
            model, resolution)], device)

        checkpoint = EvalCheckpoint(live_dir / "checkpoint.pt", "transfer", {
            "transfer": as_dict(cfg), "model": [model.arch, model.width, list(model.layers)],
            "resolution": resolution, "normalisation": [mean, std],
            "data": {name: [[m["inputs_sha256"], m["ffcv"]]
                            for m in (manifests[name], test_manifests[name])] for name in sets},
            "world_size": env.world_size,
            "weights": identity(*([weights] if weights else []))}, env, stop_requested)

        live = open_live(live_dir, env)
        for dataset, betons in sets.items():
            multilabel = manifests[dataset].get("multilabel", False)
            recipe = Recipe(cfg.epochs_per_dataset.get(dataset, cfg.epochs), cfg.batch_size,
                            cfg.lr, cfg.momentum, cfg.weight_decay, cfg.schedule, cfg.seed)
            loaders = None
            for name, embed in embeds.items():
                prefix = f"transfer/{dataset}/linear/{name}"
                log = epoch_logger(live, prefix, recipe.epochs)
                # A sub-run is one set and one embedding: its linear probe, then its SVMs.
                done = checkpoint.done.get(f"{dataset}/{name}")
                if done is not None:  # one the stopped run completed: logged again
                    for row in done["linear"]["history"] if done["linear"] else ():
                        log(row["epoch"], row)
                else:
                    checkpoint.stop_if_requested(f"{dataset}/{name}")
                    if loaders is None:  # each compiles its pipeline once, for every embedding
                        # Whole images (crop_ratio 1 keeps 8 px digits whole) resized to the
                        # model's input; sequential order, so rows line up across
                        # embeddings; this rank's share.
                        loaders = [eval_loader(str(beton), cfg.extract_batch_size,
                                               shape.threads, resolution, mean, std,
                                               train_aug=False, crop_ratio=cfg.crop_ratio,
                                               device=device, indices=dist.shard(size, env))
                                   for beton, size in zip(betons, sizes[dataset])]
                    done = evaluate_set(embed, loaders, multilabel, cfg, recipe,
                                        manifests[dataset]["num_classes"], shape.threads, env,
                                        prefix, f"transfer/{dataset}/svm/{name}", log)
                    checkpoint.complete(f"{dataset}/{name}", done)
                    if env.is_main:
                        echo_results(dataset, name, done, cfg.svm_max_iter)
                if done["linear"]:
                    log_summary(live, prefix, done["linear"])
                live.log_metric(f"transfer/{dataset}/svm/{name}/map", done["svm"]["map"],
                                plot=False)
        live.end()
        checkpoint.finish()


def evaluate_set(embed: nn.Module, loaders: list[SeekableLoader], multilabel: bool,
                 cfg: TransferConfig, recipe: Recipe, num_classes: int, jobs: int,
                 env: dist.DistEnv, prefix: str, svm_label: str, log: OnEpoch) -> dict:
    """One sub-run: ``embed``'s features of the set's (train, test) ``loaders``, its
    linear probe (single-label sets; curves through ``log``) and its SVMs. Returns
    {"linear": the probe's result or None, "svm": voc07_svm_map's}."""
    device = env.device

    def features(loader, split: str):
        batches = multilabel_batches(loader) if multilabel else loader
        feats, labels = gathered_features(embed, batches, device, AUTOCAST[cfg.precision],
                                          label=f"{prefix} {split} features")
        return feats, voc_devkit_targets(labels) if multilabel else labels

    train, test = (features(loader, split) for loader, split in zip(loaders, ("train", "test")))
    linear = None
    if not multilabel:
        held_out = split_indices(train[1].numpy(), cfg.val_fraction, cfg.seed)[1]
        fit, val = split_rows(*train, held_out)
        linear = probe_features(fit, val, test, num_classes, recipe, device, log)
    svm = voc07_svm_map(*train, *test, costs=cfg.svm_costs, folds=cfg.svm_folds,
                        seed=cfg.seed, max_iter=cfg.svm_max_iter, n_jobs=jobs,
                        label=svm_label, env=env)
    return {"linear": linear, "svm": {"map": svm["map"],
                                      "not_converged": svm["not_converged"]}}


def echo_results(dataset: str, name: str, done: dict, max_iter: int) -> None:
    """Rank 0's lines for a sub-run: its figures, and the SVM fits that stopped at
    ``max_iter``."""
    probe = done["linear"]
    linear = (f"linear top-1 {probe['top1_best']:.2f} (best-val epoch {probe['best_epoch']}), "
              if probe else "")
    click.echo(f"transfer: {dataset} {name}: {linear}SVM mAP {done['svm']['map']:.2f}")
    missed = done["svm"]["not_converged"]
    if missed:
        # Expected where features are far from separable (raw pixels at large C): one
        # line instead of scikit-learn's warning per fit.
        at = ", ".join(f"C={c:g}: {n}" for c, n in sorted(missed.items()))
        click.echo(f"transfer: {dataset} {name}: {sum(missed.values())} SVM fits stopped at"
                   f" transfer.svm_max_iter={max_iter} without converging ({at})")


if __name__ == "__main__":
    main()
