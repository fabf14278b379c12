"""configs/paper.yaml is the paper's recipe, value by value, and applies cleanly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from barlow.config import (AugmentConfig, LinearConfig, LossConfig, ModelConfig,
                           PretrainConfig, SemisupConfig, TransferConfig, from_mapping)
from conftest import REPO

PAPER = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def section(cls, name):
    """The section as params.yaml would hold it after the profile is applied."""
    return from_mapping(cls, {**PARAMS[name], **PAPER[name]}, name)


def test_pretraining_recipe():
    model, loss = section(ModelConfig, "model"), section(LossConfig, "loss")
    assert (model.arch, model.projector) == ("resnet50", "8192-8192-8192")
    assert loss.lambd == 0.0051 and loss.variant == "full"
    p = section(PretrainConfig, "pretrain")
    assert (p.epochs, p.warmup_epochs, p.batch_size, p.optimizer) == (1000, 10.0, 2048, "lars")
    assert (p.lr_weights, p.lr_biases, p.eta, p.momentum) == (0.2, 0.0048, 0.001, 0.9)
    assert p.weight_decay == 1.5e-6 and p.final_lr_ratio == 0.001


def test_augmentations():
    a = section(AugmentConfig, "augment")
    assert (a.resolution, a.crop_scale, a.flip_p) == (224, (0.08, 1.0), 0.5)
    assert (a.jitter_p, a.brightness, a.contrast, a.saturation, a.hue) == (0.8, 0.4, 0.4, 0.2, 0.1)
    assert a.grayscale_p == 0.2
    assert (a.blur_p, a.blur_sigma, a.solarize_p) == ((1.0, 0.1), (0.1, 2.0), (0.0, 0.2))


def test_evaluation_recipes():
    lin = section(LinearConfig, "linear")
    assert (lin.mode, lin.epochs, lin.batch_size, lin.lr, lin.momentum, lin.weight_decay,
            lin.schedule, lin.train_crop_scale) == \
           ("augment", 100, 256, 0.3, 0.9, 1e-6, "cosine", (0.08, 1.0))
    semi = section(SemisupConfig, "semisup")
    assert (tuple(semi.epochs), semi.lr_backbone, semi.lr_head, semi.weight_decay,
            semi.train_crop_scale) == ((20, 20), 0.005, 0.5, 0.0, (0.08, 1.0))
    tr = section(TransferConfig, "transfer")
    assert (tr.epochs, tr.lr, tr.weight_decay, tr.schedule) == (14, 0.01, 5e-4, "step")


def test_ffcv_and_data_settings():
    ffcv = PAPER["data"]["ffcv"]
    assert ffcv == {"write_mode": "proportion", "max_resolution": 500,
                    "compress_probability": 0.5, "jpeg_quality": 90}
    assert PAPER["data"]["source"] == "imagefolder"


@pytest.mark.parametrize("profile", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_profiles_apply_to_params_yaml(profile):
    """Every profile key exists in params.yaml (the switch fails on a typo)."""
    result = subprocess.run([sys.executable, "scripts/params_args.py", f"configs/{profile}"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--set-param=" in result.stdout
