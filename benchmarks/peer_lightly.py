"""The peer of time_to_accuracy.py: Barlow Twins pretraining written with lightly
(lightly-ai/lightly 1.6.0, MIT): its loss (`BarlowTwinsLoss`), projection head
(`BarlowTwinsProjectionHead`) and two views (`BYOLTransform`, as lightly's Barlow Twins
example uses them: blur p 1.0 / 0.1, solarisation p 0 / 0.2) on a torch DataLoader of
PIL images, with this project's backbone, batch, optimiser and schedule, so that only
the implementation differs. Its sizes come from params.yaml as the pretrain stage's do:
model (backbone, projector widths), loss.lambd, augment (resolution, crop scale, blur
σ), pretrain (epochs, batch, AdamW/LARS/SGD and its lrs, warm-up-cosine, seed, the kNN
monitor's bank, k, temperature and frequency). It trains in fp32 NCHW, as lightly's
example does on a CPU (the project's bf16 autocast would run lightly's loss in bf16).

    PYTHONPATH=src:$LIGHTLY python benchmarks/peer_lightly.py --data data/ffcv \\
        --out models/pretrain [--budget-s 300]

writes OUT/backbone.pt in the layout the linear stage loads, and prints the pretrain
stage's progress lines (a kNN top-1 every pretrain.knn_every_epochs epochs, from
barlow.train.knn_monitor on the same bank and test set), so time_to_accuracy.py reads
both alike. ``--budget-s``: stop after the first step past that many seconds of
training (not counting the monitor), then a last kNN. lightly is not a dependency of the
project; a copy beside it that leaves torch alone:

    pip install --target $LIGHTLY --no-deps lightly==1.6.0 lightning-utilities
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from lightly.transforms.byol_transform import (BYOLTransform, BYOLView1Transform,
                                               BYOLView2Transform)
from PIL import Image

from barlow import distributed as dist
from barlow.checkpoint import save_atomic
from barlow.config import (AugmentConfig, DataConfig, LossConfig, ModelConfig,
                           PretrainConfig, load_section, parse_projector_sizes)
from barlow.data.convert import normalisation, read_manifest
from barlow.data.loaders import eval_loader
from barlow.data.sources import fashion_mnist
from barlow.models import build_backbone
from barlow.optim import build_optimizer, param_groups, scale_lr, warmup_cosine
from barlow.progress import Progress
from barlow.train import knn_monitor, seed_everything


class TwoViews(torch.utils.data.Dataset):
    """Fashion-MNIST's training images as PIL RGB, each returned as lightly's two views
    (no label: pretraining has none)."""

    def __init__(self, directory: str, transform: BYOLTransform) -> None:
        self.source, self.transform = fashion_mnist(directory, "train"), transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.source.load(i)))


class PeerModel(torch.nn.Module):
    def __init__(self, model: ModelConfig) -> None:
        super().__init__()
        self.backbone, dim = build_backbone(model.arch, model.width, model.layers)
        hidden, *_, out = parse_projector_sizes(model.projector)
        self.projection_head = BarlowTwinsProjectionHead(dim, hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--data", type=Path, required=True, help="the converted data (manifests,"
                   " the kNN monitor's .betons)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, help="seconds of training, then stop")
    args = p.parse_args()
    data = load_section(DataConfig, "data", args.params)
    model_cfg = load_section(ModelConfig, "model", args.params)
    aug = load_section(AugmentConfig, "augment", args.params)
    cfg = load_section(PretrainConfig, "pretrain", args.params)
    lambd = load_section(LossConfig, "loss", args.params).lambd
    cores = len(os.sched_getaffinity(0))
    env = dist.init(timeout_s=60.0)

    manifest = read_manifest(args.data / "train.beton")
    mean, std = normalisation(manifest)
    views = dict(input_size=aug.resolution, min_scale=aug.crop_scale[0],
                 sigmas=tuple(aug.blur_sigma), normalize={"mean": mean, "std": std})
    transform = BYOLTransform(view_1_transform=BYOLView1Transform(**views),
                              view_2_transform=BYOLView2Transform(**views))
    seed_everything(cfg.seed)
    loader = torch.utils.data.DataLoader(
        TwoViews(data.fashion_mnist_dir, transform), batch_size=cfg.batch_size, shuffle=True,
        drop_last=True, num_workers=cores, persistent_workers=True)
    model = PeerModel(model_cfg)
    criterion = BarlowTwinsLoss(lambda_param=lambd)
    optimizer = build_optimizer(cfg.optimizer, param_groups(model, cfg.weight_decay),
                                momentum=cfg.momentum, eta=cfg.eta)
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps)
    base_lr = {"weights": scale_lr(cfg.lr_weights, cfg.batch_size),
               "biases": scale_lr(cfg.lr_biases, cfg.batch_size)}

    # The pretrain stage's monitor, as barlow.train builds it: the same bank and queries.
    bank = np.linspace(0, manifest["num_images"] - 1,
                       min(cfg.knn_bank_size, manifest["num_images"])).astype(np.int64)
    common = dict(batch_size=256, num_workers=cores, resolution=aug.resolution, mean=mean,
                  std=std, train_aug=False, crop_ratio=1.0, channels_last=False)
    knn_loaders = (eval_loader(str(args.data / "train.beton"), indices=np.unique(bank),
                               **common), eval_loader(str(args.data / "test.beton"), **common))
    num_classes = read_manifest(args.data / "test.beton")["num_classes"]

    print(f"pretrain (peer: lightly): {cfg.epochs} epochs x {steps_per_epoch} steps, batch"
          f" {cfg.batch_size}, {cores} DataLoader workers, fp32", flush=True)
    progress = Progress("pretrain", total_steps, "step")
    step, trained_s, stop = 0, 0.0, False
    for epoch in range(cfg.epochs):
        model.train()
        start = time.perf_counter()
        for x0, x1 in loader:
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, total_steps, warmup_steps,
                                            base_lr[group["name"]], cfg.final_lr_ratio)
            loss = criterion(model(x0), model(x1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            stop = args.budget_s is not None and trained_s + time.perf_counter() - start \
                >= args.budget_s
            if stop:
                break
        epoch_s = time.perf_counter() - start
        trained_s += epoch_s
        shown = {"epoch": f"{step / steps_per_epoch:.2f}", "loss": loss.item(),
                 "pairs/s": round((step - epoch * steps_per_epoch) * cfg.batch_size / epoch_s)}
        if stop or (cfg.knn_every_epochs and (epoch + 1) % cfg.knn_every_epochs == 0) \
                or epoch + 1 == cfg.epochs:
            shown["kNN top-1"] = knn_monitor(model.backbone, knn_loaders, num_classes, cfg,
                                             env, None)
        progress.line(step, **shown)
        if stop:
            break
    args.out.mkdir(parents=True, exist_ok=True)
    save_atomic({k: v.detach().cpu() for k, v in model.backbone.state_dict().items()},
                args.out / "backbone.pt")


if __name__ == "__main__":
    main()
