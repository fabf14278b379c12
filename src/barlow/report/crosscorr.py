"""The cross-correlation matrix of held-out pairs before and after training: the maths
(in float64), and reading the checkpoint and the FFCV test set it is computed from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from barlow.loss import standardize


def cross_correlation(z1: Tensor, z2: Tensor) -> Tensor:
    """c_ij = Σ_b ẑ1_bi ẑ2_bj / N with ẑ standardised per feature over the N rows — the
    matrix the loss drives to the identity (barlow.loss), here in float64 so that a
    few hundred rows give an exact picture."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"need two (N, D) tensors of one shape, got {tuple(z1.shape)}, "
                         f"{tuple(z2.shape)}")
    a, b = standardize(z1.double()), standardize(z2.double())
    return a.T @ b / z1.shape[0]


def cc_stats(c: Tensor) -> dict[str, float]:
    """Mean c_ii, and mean |c_ij| and RMS c_ij over i ≠ j (D² − D entries)."""
    d = c.shape[0]
    diag = torch.diagonal(c)
    off_sq = (c.pow(2).sum() - diag.pow(2).sum()) / max(d * d - d, 1)
    off_abs = (c.abs().sum() - diag.abs().sum()) / max(d * d - d, 1)
    return {"diag_mean": float(diag.mean()), "offdiag_abs_mean": float(off_abs),
            "offdiag_rms": float(off_sq.sqrt())}


@torch.no_grad()
def embed_pairs(model: torch.nn.Module, batches: Iterable[tuple[Tensor, Tensor]]
                ) -> tuple[Tensor, Tensor]:
    """Projector outputs of both views, in eval mode (BN with running statistics: a
    held-out diagnostic must not depend on how the images are batched)."""
    model.eval()
    z1s, z2s = [], []
    for y1, y2 in batches:
        z1, z2 = model(y1, y2)
        z1s.append(z1.float().cpu())
        z2s.append(z2.float().cpu())
    return torch.cat(z1s), torch.cat(z2s)


@dataclass
class CheckpointInfo:
    """What the report needs from models/pretrain/checkpoint.pt."""

    config: dict[str, Any]
    step: int | None
    finished: bool | None
    before: torch.nn.Module     # the architecture at the run's seeded random init
    after: torch.nn.Module      # the trained weights


def checkpoint_models(path: Path) -> CheckpointInfo:
    """Rebuild the pretrained BarlowTwins and its seeded initialisation from the config
    stored in the checkpoint (not params.yaml: the picture must show the run that made
    these weights, whatever params.yaml says now)."""
    from barlow.config import ModelConfig, from_mapping
    from barlow.train import build_model, seed_everything

    # Our own file; it holds numpy RNG state, which weights_only refuses.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    config = ckpt["config"]
    model_cfg = from_mapping(ModelConfig, config["model"], f"{path}: config.model")
    # barlow.train.pretrain seeds everything, then builds the model: the same two calls
    # give exactly the weights that training started from.
    seed_everything(int(config["pretrain"]["seed"]))
    before = build_model(model_cfg)
    after = build_model(model_cfg)
    after.load_state_dict(ckpt["model"], strict=True)
    return CheckpointInfo(config, ckpt.get("step"), ckpt.get("finished"), before, after)


def held_out_pairs(test_beton: Path, train_beton: Path, augment: Mapping[str, Any],
                   num_images: int, batch_size: int, views: str, seed: int,
                   workers: int, colour_ops_on: str) -> list[tuple[Tensor, Tensor]]:
    """The first NUM_IMAGES test images as (view A, view B) batches: the pretraining
    augmentations of ``augment`` (views="augmented"), or the whole image twice
    (views="identical": c_ii = 1 by construction, only the off-diagonal is informative).
    Normalised with the training set's statistics, as in pretraining. ``augment`` is a
    checkpoint's, which does not record where the colour ops ran (``colour_ops_on``,
    the report's own choice: the same draws either way)."""
    import numpy as np

    from barlow.config import AugmentConfig, from_mapping
    from barlow.data.convert import normalisation, read_manifest
    from barlow.data.loaders import config_views, eval_loader, pretrain_loader

    aug = from_mapping(AugmentConfig, {**augment, "colour_ops_on": colour_ops_on},
                       "checkpoint config.augment")
    mean, std = normalisation(read_manifest(train_beton))
    total = read_manifest(test_beton)["num_images"]
    n = min(num_images, total)
    batch_size = min(batch_size, n)
    n -= n % batch_size  # whole batches only (pretrain_loader drops the last partial one)
    indices = np.arange(n)
    if views == "augmented":
        loader = pretrain_loader(str(test_beton), batch_size, workers, config_views(aug), mean, std,
                                 seed=seed, order="sequential", indices=indices,
                                 channels_last=False, colour_ops_on=aug.colour_ops_on)
        return [(a.clone(), b.clone()) for a, b in loader]
    loader = eval_loader(str(test_beton), batch_size, workers, aug.resolution, mean, std,
                         train_aug=False, crop_ratio=1.0, order="sequential", indices=indices,
                         channels_last=False)
    return [(x.clone(), x.clone()) for x, _ in loader]


def cc_before_after(info: CheckpointInfo, pairs: list[tuple[Tensor, Tensor]], block: int
                    ) -> dict[str, Any]:
    """Cross-correlation of held-out pairs before and after training: stats over the
    whole D×D matrix and its top-left BLOCK×BLOCK corner for the picture."""
    out: dict[str, Any] = {"num_images": sum(len(a) for a, _ in pairs)}
    for name, model in (("before", info.before), ("after", info.after)):
        c = cross_correlation(*embed_pairs(model, pairs))
        out[name] = {"stats": cc_stats(c), "block": c[:block, :block].float().numpy(),
                     "dim": c.shape[0]}
    return out


def cc_section(checkpoint: Path, data_dir: Path, cfg: Any, skip_cc: bool,
               colour_ops_on: str, workers: int) -> dict[str, Any]:
    """The report's inputs about the checkpoint (barlow.report.build.ReportInputs
    fields): its config, step and size, c before and after training on held-out pairs
    (``cfg``: the report params), and the note saying how c was computed or why not.
    ``colour_ops_on``: where the held-out views' colour ops run (params.yaml
    augment.colour_ops_on; held_out_pairs); ``workers``: FFCV loader threads."""
    if not checkpoint.is_file():
        return {"cc_note": f"{checkpoint} does not exist (pretraining not run)"}
    info = checkpoint_models(checkpoint)
    fields: dict[str, Any] = {
        "checkpoint": {"config": info.config, "step": info.step, "finished": info.finished},
        "backbone_params": sum(p.numel() for p in info.after.backbone.parameters())}
    if skip_cc:
        return {**fields, "cc_note": "left out (--skip-cc)"}
    if not (data_dir / "test.beton").is_file():
        return {**fields, "cc_note": f"{data_dir / 'test.beton'} does not exist"}
    pairs = held_out_pairs(data_dir / "test.beton", data_dir / "train.beton",
                           info.config["augment"], cfg.cc_images, cfg.cc_batch_size,
                           cfg.cc_views, cfg.cc_seed, workers, colour_ops_on)
    cc = cc_before_after(info, pairs, cfg.cc_block)
    views = ("two augmented views (view A, view B of the pretraining "
             f"augmentations, seed {cfg.cc_seed})" if cfg.cc_views == "augmented"
             else "the whole image twice (identical views: c_ii = 1 by construction)")
    unfinished = "" if info.finished else f" The checkpoint is unfinished (step {info.step})."
    note = (f"c = standardised z1ᵀz2 / N over the first {cc['num_images']} "
            f"test images, {views}; models in eval mode. Before: the same "
            f"architecture at the run's seeded initialisation (pretrain.seed "
            f"{info.config['pretrain']['seed']}); after: the checkpoint's weights. With N "
            f"images, independent features still give |c_ij| of order 1/√N = "
            f"{cc['num_images'] ** -0.5:.3f}: the floor of the off-diagonal." + unfinished)
    return {**fields, "cc": cc, "cc_note": note}
