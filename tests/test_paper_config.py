"""configs/*.yaml applied as the README applies them, through DVC itself: each profile's
-S arguments from scripts/params_args.py, word-split by the shell, queued by `dvc exp
run` in a scratch git+DVC repository; the params.yaml DVC writes is then checked key by
key (value and type), and configs/paper.yaml's result against the paper, value by value."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from barlow.config import (SECTIONS, AugmentConfig, DataConfig, LinearConfig, LossConfig,
                           ModelConfig, PretrainConfig, SemisupConfig, TransferConfig,
                           from_mapping, load_section, read_params)
from conftest import REPO

PROFILES = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def typed(value: object) -> object:
    """``value`` with the type of every scalar beside it: 10 and 10.0, or 1e-06 and
    '1e-06', compare unequal."""
    if isinstance(value, list):
        return [typed(v) for v in value]
    return (type(value).__name__, value)


def dvc_applied(profile: str, tmp: Path) -> tuple[Path, str]:
    """params.yaml as `dvc exp run --queue $(python scripts/params_args.py
    configs/<profile>)` leaves it in the queued experiment, and DVC's console output.

    The scratch repository holds what the command reads (params.yaml, the profile, the
    script; the library that reads them comes from this checkout's src/) and a one-stage
    dvc.yaml: queueing stashes the workspace with DVC's -S edits applied and runs
    nothing."""
    repo = tmp / "repo"
    (repo / "configs").mkdir(parents=True)
    (repo / "scripts").mkdir()
    shutil.copy(REPO / "params.yaml", repo)
    shutil.copy(REPO / "configs" / profile, repo / "configs")
    shutil.copy(REPO / "scripts" / "params_args.py", repo / "scripts")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(
        {"stages": {"noop": {"cmd": "true", "params": sorted(SECTIONS)}}}))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp / "site"),
           "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost",
           "PY": sys.executable, "PROFILE": profile, "PYTHONPATH": str(REPO / "src")}
    script = """set -e
        git init -q && git config user.name test && git config user.email test@localhost
        "$PY" -m dvc init -q && git add -A && git commit -qm baseline
        "$PY" -m dvc exp run --queue -n profile $("$PY" scripts/params_args.py "configs/$PROFILE")
        git show refs/exps/celery/stash:params.yaml > applied.yaml"""
    result = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return repo / "applied.yaml", result.stdout


@pytest.fixture(scope="module")
def switched(tmp_path_factory):
    """profile -> {path, output, params}: each profile queued once per module."""
    done: dict[str, dict] = {}

    def get(profile: str) -> dict:
        if profile not in done:
            path, output = dvc_applied(profile, tmp_path_factory.mktemp(profile))
            done[profile] = {"profile": profile, "path": path, "output": output,
                             "params": read_params(path)}  # as every stage reads it
        return done[profile]
    return get


@pytest.fixture(params=PROFILES)
def applied(request, switched) -> dict:
    return switched(request.param)


@pytest.mark.slow
def test_every_profile_key_lands_with_its_value_and_type(applied):
    """The stages see exactly the profile's values and types (an int where the profile
    says 10.0 would be a different params hash and, for some keys, a refused type), and
    every other key of params.yaml is left as it was."""
    wanted = flatten(yaml.safe_load((REPO / "configs" / applied["profile"]).read_text()))
    base = flatten(read_params(REPO / "params.yaml"))
    got = flatten(applied["params"])
    assert wanted and set(wanted) <= set(base)
    assert {k: typed(got.get(k)) for k in wanted} == {k: typed(v) for k, v in wanted.items()}
    assert {k: v for k, v in got.items() if k not in wanted} == \
           {k: v for k, v in base.items() if k not in wanted}
    assert "Queued experiment 'profile'" in applied["output"]


@pytest.mark.slow
def test_every_section_loads_after_the_switch(applied):
    for name, cls in SECTIONS.items():
        load_section(cls, name, applied["path"])


@pytest.mark.slow
def test_the_batch_jobs_params_file_is_dvcs(applied, tmp_path):
    """`params_args.py --write`, the SLURM script's way to apply a profile, writes the
    params.yaml that DVC writes for the profile's -S arguments: every value and type, so
    a job trains with what the experiment would record (docs/multi-gpu.md, SLURM)."""
    out = tmp_path / "params.yaml"
    subprocess.run([sys.executable, "scripts/params_args.py", "--write", str(out),
                    f"configs/{applied['profile']}"], cwd=REPO, check=True)
    got, want = flatten(read_params(out)), flatten(applied["params"])
    assert {k: typed(v) for k, v in got.items()} == {k: typed(v) for k, v in want.items()}


def test_write_applies_profiles_then_overrides_in_order(tmp_path):
    """Later items win; values are read as YAML (as -S reads them); +key adds a key;
    an unknown key is refused naming it, and nothing is written."""
    out = tmp_path / "params.yaml"

    def write(*items: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "scripts/params_args.py", "--write", str(out),
                               *items], cwd=REPO, capture_output=True, text=True)

    assert write("configs/paper.yaml", "pretrain.epochs=3", "loss.lambd=1e-3",
                 "+transfer.epochs_per_dataset.places205=14").returncode == 0
    params = read_params(out)
    assert (params["model"]["arch"], params["pretrain"]["epochs"]) == ("resnet50", 3)
    assert typed(params["loss"]["lambd"]) == ("float", 1e-3)
    assert params["transfer"]["epochs_per_dataset"] == {"places205": 14}
    out.unlink()
    refused = write("pretrain.epoch=3")
    assert (refused.returncode, refused.stderr) == (
        1, "pretrain.epoch=3: keys not in params.yaml: pretrain.epoch\n")
    assert not out.exists()


@pytest.fixture
def paper(switched) -> dict:
    """params.yaml after the paper switch, read as the stages read it."""
    return switched("paper.yaml")["params"]


def section(params: dict, cls, name):
    return from_mapping(cls, params[name], name)


@pytest.mark.slow
def test_pretraining_recipe(paper):
    model, loss = section(paper, ModelConfig, "model"), section(paper, LossConfig, "loss")
    assert (model.arch, model.projector, model.projector_bn) == ("resnet50", "8192-8192-8192",
                                                                 True)
    assert (loss.lambd, loss.variant, loss.normalization) == (0.005, "full", "batch")
    # Set in paper.yaml itself, not inherited from params.yaml's quick profile.
    own = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    assert own["model"]["projector_bn"] is True and own["loss"]["normalization"] == "batch"
    p = section(paper, PretrainConfig, "pretrain")
    assert (p.epochs, p.warmup_epochs, p.batch_size, p.optimizer) == (1000, 10.0, 2048, "lars")
    assert (p.lr_weights, p.lr_biases, p.eta, p.momentum) == (0.2, 0.0048, 0.001, 0.9)
    assert p.weight_decay == 1.5e-6 and p.final_lr_ratio == 0.001


@pytest.mark.slow
def test_augmentations(paper):
    a = section(paper, AugmentConfig, "augment")
    assert (a.resolution, a.crop_scale, a.flip_p) == (224, (0.08, 1.0), 0.5)
    assert (a.jitter_p, a.brightness, a.contrast, a.saturation, a.hue) == (0.8, 0.4, 0.4, 0.2, 0.1)
    assert a.grayscale_p == 0.2
    assert (a.blur_p, a.blur_sigma, a.solarize_p) == ((1.0, 0.1), (0.1, 2.0), (0.0, 0.2))
    assert a.colour_ops_on == "device"  # not the paper's: where the same draws are applied


@pytest.mark.slow
def test_evaluation_recipes(paper):
    lin = section(paper, LinearConfig, "linear")
    assert (lin.mode, lin.epochs, lin.batch_size, lin.lr, lin.momentum, lin.weight_decay,
            lin.schedule, lin.train_crop_scale) == \
           ("augment", 100, 256, 0.3, 0.9, 1e-6, "cosine", (0.08, 1.0))
    # Not the paper's: no raw-pixel baseline at 224 px (30 GB of test pixels per rank).
    assert lin.baselines == ("random_init",)
    semi = section(paper, SemisupConfig, "semisup")
    assert (tuple(semi.epochs), semi.lr_backbone, semi.lr_head, semi.weight_decay,
            semi.train_crop_scale) == ((20, 20), 0.005, 0.5, 0.0, (0.08, 1.0))
    tr = section(paper, TransferConfig, "transfer")
    assert (tr.epochs, tr.lr, tr.weight_decay, tr.schedule) == (14, 0.01, 5e-4, "step")
    assert tr.baselines == ("random_init",)


@pytest.mark.slow
def test_ffcv_and_data_settings(paper):
    data = section(paper, DataConfig, "data")
    assert dataclasses.asdict(data.ffcv) == {"write_mode": "proportion", "max_resolution": 500,
                               "compress_probability": 0.5, "jpeg_quality": 90}
    assert data.source == "imagefolder"


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
