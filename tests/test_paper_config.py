"""configs/paper.yaml is the paper's recipe, value by value, and applies cleanly."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from barlow.config import (AugmentConfig, DataConfig, LinearConfig, LossConfig, ModelConfig,
                           PretrainConfig, SemisupConfig, TransferConfig, from_mapping,
                           load_section)
from conftest import REPO

PAPER = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def section(cls, name):
    """The section as params.yaml would hold it after the profile is applied."""
    return from_mapping(cls, {**PARAMS[name], **PAPER[name]}, name)


def test_pretraining_recipe():
    model, loss = section(ModelConfig, "model"), section(LossConfig, "loss")
    assert (model.arch, model.projector, model.projector_bn) == ("resnet50", "8192-8192-8192",
                                                                 True)
    assert (loss.lambd, loss.variant, loss.normalization) == (0.005, "full", "batch")
    # Set in paper.yaml itself, not inherited from params.yaml's quick profile.
    assert PAPER["model"]["projector_bn"] is True and PAPER["loss"]["normalization"] == "batch"
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


def test_places205_and_inat18_epochs(tmp_path):
    """The paper's per-set epochs (Places-205 14, iNat18 84) are -S arguments in
    paper.yaml's comments, given with the sets' folders (transfer refuses epochs for a
    set it does not run): applied as DVC applies them, they load and pass the checks."""
    from dvc.utils.hydra import apply_overrides

    text = (REPO / "configs" / "paper.yaml").read_text()
    overrides = re.findall(r"^\s*#\s+-S (\+\S+=\S+)$", text, flags=re.MULTILINE)
    assert len(overrides) == 4
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    apply_overrides(str(params), overrides)
    data = load_section(DataConfig, "data", params)
    tr = load_section(TransferConfig, "transfer", params)
    assert set(data.transfer_folders) == {"places205", "inat18"}
    assert tr.epochs_per_dataset == {"places205": 14, "inat18": 84}
    tr.check_datasets(list(data.transfer_folders))


def test_ffcv_and_data_settings():
    ffcv = PAPER["data"]["ffcv"]
    assert ffcv == {"write_mode": "proportion", "max_resolution": 500,
                    "compress_probability": 0.5, "jpeg_quality": 90}
    assert PAPER["data"]["source"] == "imagefolder"


@pytest.mark.parametrize("profile", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_profiles_apply_to_params_yaml(profile):
    """Every profile key exists in params.yaml (the switch fails on a typo), and the
    arguments survive the unquoted $(...) of the documented command value for value."""
    script = f'printf "%s\\n" $("{sys.executable}" scripts/params_args.py configs/{profile})'
    result = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    args = result.stdout.splitlines()
    assert args and all(a.startswith("--set-param=") for a in args)
    parsed = {}
    for arg in args:
        key, value = arg[len("--set-param="):].split("=", 1)
        parsed[key] = yaml.safe_load(value)
    expected = {}

    def flatten(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                flatten(value, f"{prefix}{key}.")
            else:
                expected[f"{prefix}{key}"] = value

    flatten(yaml.safe_load((REPO / "configs" / profile).read_text()))
    assert parsed == expected


def test_dvc_set_param_floats_load_as_floats(tmp_path):
    """`dvc exp run -S pretrain.weight_decay=1.0e-6` makes DVC write `1e-06`, which
    YAML 1.1 (PyYAML's default) reads as a string; the stages read it as DVC does."""
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    apply_overrides(str(params), ["pretrain.weight_decay=1.0e-6", "loss.lambd=5e-3",
                                  "pretrain.batch_size=128"])
    assert "weight_decay: 1e-06" in params.read_text()  # DVC's spelling, no dot
    pre = load_section(PretrainConfig, "pretrain", params)
    assert pre.weight_decay == 1e-6 and pre.batch_size == 128
    assert load_section(LossConfig, "loss", params).lambd == 5e-3


@pytest.mark.parametrize("overrides, loss_norm, bn", [
    (["loss.normalization=feature"], "feature", True),
    (["model.projector_bn=false"], "batch", False),
    (["model.projector_bn=false", "loss.normalization=none"], "none", False),
])
def test_loss_ablation_rows_round_trip(tmp_path, overrides, loss_norm, bn):
    """Each loss-ablation row is a `dvc exp run -S` away: DVC's edit of params.yaml
    loads as the row's settings."""
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    apply_overrides(str(params), overrides)
    assert load_section(LossConfig, "loss", params).normalization == loss_norm
    assert load_section(ModelConfig, "model", params).projector_bn is bn


@pytest.mark.parametrize("override, message", [
    ("loss.normalization=layer", "loss.normalization: 'layer' is not one of"),
    ("model.projector_bn=maybe", "model.projector_bn: expected true or false, got 'maybe'"),
])
def test_loss_ablation_bad_values_refused_by_key(tmp_path, override, message):
    from dvc.utils.hydra import apply_overrides

    from barlow.errors import BadInput

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    apply_overrides(str(params), [override])
    cls, name = (LossConfig, "loss") if override.startswith("loss") else (ModelConfig, "model")
    with pytest.raises(BadInput, match=re.escape(message)):
        load_section(cls, name, params)
