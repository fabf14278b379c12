"""DVC stage `linear`: linear evaluation of the frozen pretrained backbone, with the
random-init and raw-pixel baselines under the same recipe (barlow.probe).

    python -m stages.linear --data data/ffcv --weights models/pretrain/backbone.pt \
        --live dvclive/linear

The head is fitted on train minus the validation split (barlow.data.subsets:
<data.subsets_dir>/val.txt, or an ImageFolder's hashed rule), its epoch chosen by val
top-1; the test split gives top-1/top-5 at that epoch and at the last one.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import torch

from barlow.config import (AugmentConfig, DataConfig, LinearConfig, ModelConfig,
                           load_section)
from barlow.data.convert import read_manifest
from barlow.data.loaders import eval_loader
from barlow.data.subsets import load_splits
from barlow.evaluate import extract_features
from barlow.probe import (Recipe, embedding, epoch_logger, log_summary, probe_augmented,
                          probe_features, split_rows)
from barlow.stage import (data_option, live_option, params_option, run_stage,
                          weights_option)
from barlow.train import AUTOCAST, normalisation


@click.command()
@params_option
@data_option
@weights_option
@live_option
def main(params: str, data_dir: Path, weights: Path, live_dir: Path) -> None:
    with run_stage("linear"):
        cfg = load_section(LinearConfig, "linear", params)
        model = load_section(ModelConfig, "model", params)
        resolution = load_section(AugmentConfig, "augment", params).resolution
        subsets_dir = Path(load_section(DataConfig, "data", params).subsets_dir)
        train_beton, test_beton = data_dir / "train.beton", data_dir / "test.beton"
        manifest = read_manifest(train_beton)
        read_manifest(test_beton)
        val, _, val_origin = load_splits(subsets_dir, train_beton, manifest)
        click.echo(f"linear: validation split: {len(val)} images ({val_origin})")
        mean, std = normalisation(manifest)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        autocast = AUTOCAST[cfg.precision]
        recipe = Recipe(cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay,
                        cfg.schedule, cfg.seed)
        # Every embedding is built (and the weights file checked) before any long work.
        embeds = {name: embedding(name, model, weights, cfg.seed, device)
                  for name in ("barlow", *cfg.baselines)}

        def loader(beton: Path, batch_size: int = cfg.extract_batch_size, **kwargs):
            return eval_loader(str(beton), batch_size, cfg.workers, resolution, mean, std,
                               crop_ratio=cfg.crop_ratio, seed=cfg.seed, device=device,
                               **kwargs)

        # Each loader compiles its pipeline once; every embedding reuses it.
        test_loader = loader(test_beton, train_aug=False)
        if cfg.mode == "features":
            # All training images in file order; val rows are split off in memory.
            train_loader = loader(train_beton, train_aug=False)
        else:
            fit_rows = np.setdiff1d(np.arange(manifest["num_images"]), val)
            train_loader = loader(train_beton, cfg.batch_size, train_aug=True,
                                  train_crop_scale=cfg.train_crop_scale, indices=fit_rows,
                                  order="random")
            val_loader = loader(train_beton, train_aug=False, indices=val)

        from dvclive import Live

        live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
        for name, embed in embeds.items():
            prefix = f"linear/{name}"

            def features(batches):
                return extract_features(embed, batches, device, channels_last=True,
                                        autocast_dtype=autocast)

            test = features(test_loader)
            if cfg.mode == "features":
                fit, held_out = split_rows(*features(train_loader), val)
                result = probe_features(fit, held_out, test, manifest["num_classes"], recipe,
                                        device, epoch_logger(live, prefix))
            else:
                result = probe_augmented(embed, train_loader, val_loader, test,
                                         manifest["num_classes"], recipe, device, autocast,
                                         epoch_logger(live, prefix))
            log_summary(live, prefix, result)
            if name == "barlow":
                classes = np.asarray(manifest["class_names"])
                live.log_sklearn_plot("confusion_matrix", classes[test[1].numpy()],
                                      classes[result["test_pred_best"].numpy()],
                                      name="confusion_matrix.json",
                                      title="linear probe, test, best-val epoch")
            click.echo(f"linear: {name}: test top-1 {result['top1_best']:.2f} at best-val "
                       f"epoch {result['best_epoch']}, {result['top1_last']:.2f} at the last")
        live.end()


if __name__ == "__main__":
    main()
