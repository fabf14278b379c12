"""linear stage: end-to-end runs on tiny data in both modes (every metric, curves, the
confusion matrix), the best-epoch bookkeeping of barlow.probe, the frozen backbone, and
the errors a wrong weights file or params key must give."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from barlow.config import LinearConfig, ModelConfig, load_section
from barlow.data.convert import read_manifest
from barlow.data.loaders import eval_loader
from barlow.features import extract_features
from barlow.models import build_backbone
from barlow.probe import SUMMARY_KEYS, Recipe, embedding, fit_and_test, probe_augmented
from barlow.data.convert import normalisation
from conftest import EVAL_MODEL as MODEL, LINEAR_EPOCHS as EPOCHS, REPO, linear_params
from stages import linear

EMBEDDINGS = ("barlow", "random_init", "raw_pixels")


@pytest.fixture(scope="module")
def setup(tiny_ffcv, tiny_subsets, pretrained_backbone) -> dict:
    """tiny_subsets' val.txt (16 of tiny_ffcv's 64 training images, 4 per class); the
    backbone of a short pretraining on tiny_ffcv, as the pretrain stage exports it."""
    return {"subsets": tiny_subsets, "data": tiny_ffcv, "weights": pretrained_backbone}


#: Where each run writes: the backbone's (--weights, the `linear` stage) and the
#: baselines' (--baselines, `linear_baselines`).
LIVE = {"backbone": "live", "baselines": "live_baselines"}


def invoke(setup: dict, tmp: Path, weights: Path | None = None, run: str = "backbone",
           **linear_overrides):
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(linear_params(setup["subsets"], **linear_overrides)))
    args = ["--params", str(params), "--data", str(setup["data"]),
            *(["--weights", str(weights or setup["weights"])] if run == "backbone"
              else ["--baselines"]), "--live", str(tmp / LIVE[run])]
    return CliRunner().invoke(linear.main, args)


@pytest.fixture(scope="module", params=["features", "augment"])
def finished(request, setup, tmp_path_factory) -> dict:
    """Both runs, the backbone's and the baselines', in one mode: their outputs, live
    folders and metrics (per run, and together as one name → figures mapping)."""
    tmp = tmp_path_factory.mktemp(f"linear_{request.param}")
    out: dict = {"mode": request.param, "output": "", "live": {}, "runs": {}}
    for run, live in LIVE.items():
        result = invoke(setup, tmp, run=run, mode=request.param)
        assert result.exit_code == 0, result.output + result.stderr + repr(result.exception)
        out["output"] += result.output
        out["live"][run] = tmp / live
        out["runs"][run] = json.loads((tmp / live / "metrics.json").read_text())["linear"]
    out["metrics"] = out["runs"]["backbone"] | out["runs"]["baselines"]
    return out


@pytest.mark.slow
def test_every_metric_is_reported_and_sane(finished):
    metrics = finished["metrics"]
    assert set(metrics) == set(EMBEDDINGS)
    for name in EMBEDDINGS:
        m = metrics[name]
        assert set(SUMMARY_KEYS) <= set(m), f"{name}: {sorted(m)}"
        assert m["best_epoch"] in range(EPOCHS)
        for when in ("best", "last"):
            # Top-5 of 4 classes is top-4 (k capped at the class count): every image.
            # It shows the cap and that top5 is not top1's copy, nothing more; top-k
            # itself is tested in test_evaluate.
            assert m[f"top5_{when}"] == 100.0
        if m["best_epoch"] == EPOCHS - 1:
            assert m["top1_best"] == m["top1_last"]
    # The class is a bright quadrant: raw pixels separate it, chance is 25%.
    assert metrics["raw_pixels"]["top1_best"] >= 75.0
    assert "linear: raw_pixels: test top-1" in finished["output"]


@pytest.mark.slow
def test_each_run_writes_only_its_own_embeddings(finished):
    """--weights: the backbone's probe alone (and its confusion matrix); --baselines:
    linear.baselines' probes alone, under the same metric names, no confusion matrix."""
    for run, names in (("backbone", {"barlow"}), ("baselines", {"random_init", "raw_pixels"})):
        assert set(finished["runs"][run]) == names, run
        plots = finished["live"][run] / "plots"
        assert {p.name for p in (plots / "metrics" / "linear").iterdir()} == names, run
        assert (plots / "sklearn").exists() == (run == "backbone"), run


@pytest.mark.slow
def test_pretrained_backbone_beats_its_random_init(finished):
    """The probe on the pretrained backbone's features beats the same architecture at
    random init (the weights pretraining started from) by 2 or more of the 32 test
    images: a stage that evaluated anything but --weights (a fresh backbone, weights
    loaded into a copy) would tie random_init. The margin's source: conftest's
    PRETRAIN_EPOCHS. Augment mode is left out: at 4 epochs of 16 px crops every
    backbone's probe is near chance (25-50 %), a noise comparison."""
    if finished["mode"] != "features":
        pytest.skip("augment mode: near chance at this size")
    metrics = finished["metrics"]
    assert metrics["random_init"]["top1_best"] >= 50.0  # the probe learns: chance is 25
    assert metrics["barlow"]["top1_best"] >= metrics["random_init"]["top1_best"] + 6.25


@pytest.mark.slow
def test_curves_and_confusion_matrix(finished, tiny_ffcv):
    for name in EMBEDDINGS:
        plots = finished["live"]["backbone" if name == "barlow" else "baselines"] / "plots"
        for key in ("train_loss", "val_loss", "val_top1", "val_top5"):
            rows = (plots / "metrics" / "linear" / name / f"{key}.tsv").read_text().splitlines()
            assert rows[0].split("\t") == ["step", key]
            assert [int(r.split("\t")[0]) for r in rows[1:]] == list(range(EPOCHS))
    plots = finished["live"]["backbone"] / "plots"
    matrix = json.loads((plots / "sklearn" / "confusion_matrix.json").read_text())
    manifest = read_manifest(tiny_ffcv / "test.beton")
    assert len(matrix) == manifest["num_images"]
    assert {row["actual"] for row in matrix} == set(manifest["class_names"])
    correct = 100.0 * sum(r["actual"] == r["predicted"] for r in matrix) / len(matrix)
    assert correct == pytest.approx(finished["metrics"]["barlow"]["top1_best"])


def test_test_figures_come_from_the_epochs_val_chose():
    """A fake trainer whose head is perfect on the test set at epoch 1 only, while the
    validation rows make epoch 2 the best: top-1 must be read at epoch 2 and at the last
    epoch (3), never at the test-best epoch 1."""
    test_feats = torch.eye(3).repeat(2, 1)
    test_labels = torch.tensor([0, 1, 2, 0, 1, 2])
    heads = {1: torch.eye(3),                              # all right
             2: torch.eye(3)[[1, 2, 0]].T.contiguous(),    # all wrong
             3: torch.eye(3)[[0, 2, 1]].T.contiguous()}    # class 0 right: 1/3

    def fit(head, callback, preemption):
        history = []
        for epoch, val_top1 in enumerate([10.0, 20.0, 90.0, 50.0]):
            with torch.no_grad():  # what the trainer made of the head this epoch
                head.weight.copy_(heads.get(epoch, torch.zeros(3, 3)))
                head.bias.zero_()
            row = {"epoch": epoch, "val_top1": val_top1}
            callback(epoch, row)
            history.append(row)
        return {"history": history, "best": history[2], "last": history[3]}

    seen = []
    out = fit_and_test(fit, nn.Linear(3, 3), (test_feats, test_labels), torch.device("cpu"),
                       lambda epoch, row: seen.append(epoch))
    assert seen == [0, 1, 2, 3]
    assert out["best_epoch"] == 2
    assert out["top1_best"] == 0.0
    assert out["top1_last"] == pytest.approx(100.0 / 3)
    assert out["test_pred_best"].tolist() == [1, 2, 0, 1, 2, 0]


@pytest.mark.slow
def test_augmented_probe_leaves_the_backbone_unchanged(setup, tiny_ffcv):
    """BN running statistics would move if the backbone ran in train mode; its weights
    would move if the head's optimiser reached them."""
    mean, std = normalisation(read_manifest(tiny_ffcv / "train.beton"))
    backbone = embedding("barlow", ModelConfig(**{**MODEL, "layers": (1, 1, 1, 1),
                                                  "projector": "32-32", "projector_bn": True}),
                         setup["weights"], 0, torch.device("cpu"))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}

    def loader(split, **kwargs):
        return eval_loader(str(tiny_ffcv / f"{split}.beton"), 16, 1, 16, mean, std,
                           crop_ratio=1.0, **kwargs)

    test = extract_features(backbone, loader("test", train_aug=False), "cpu")
    recipe = Recipe(2, 16, 0.3, 0.9, 1e-6, "cosine", 0)
    result = probe_augmented(backbone, loader("train", train_aug=True, order="random"),
                             loader("train", train_aug=False), test, 4, recipe,
                             torch.device("cpu"))
    assert len(result["history"]) == 2
    after = backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not backbone.training
    file = torch.load(setup["weights"])
    assert all(torch.equal(after[k], v) for k, v in file.items())


@pytest.mark.slow
def test_mismatching_weights_give_one_line_error(setup, tmp_path):
    wide, _ = build_backbone("small_resnet", 8, (1, 1, 1, 1))
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    result = invoke(setup, tmp_path, weights=tmp_path / "wide.pt")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "linear: error:" in result.stderr and "does not fit the backbone" in result.stderr
    result = invoke(setup, tmp_path, weights=tmp_path / "absent.pt")
    assert result.exit_code == 2 and "absent.pt: weights file not found" in result.stderr
    assert not (tmp_path / "live").exists()  # failed before any work


@pytest.mark.slow
def test_non_finite_weights_are_refused(setup, tmp_path):
    """A diverged run's backbone (NaN weights) used to evaluate to chance with exit 0."""
    state = torch.load(setup["weights"])
    state["layer2.0.conv1.weight"] = torch.full_like(state["layer2.0.conv1.weight"], float("nan"))
    torch.save(state, tmp_path / "diverged.pt")
    result = invoke(setup, tmp_path, weights=tmp_path / "diverged.pt")
    assert result.exit_code == 2, result.stderr
    assert result.stderr == (f"linear: error: {tmp_path / 'diverged.pt'}: non-finite weights"
                             " (NaN or Inf) in 1 tensors, first layer2.0.conv1.weight: the run"
                             " that wrote it diverged\n")
    assert not (tmp_path / "live").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [
    ("checkpoint", "a torch file holding objects other than tensors (a training checkpoint"
                   " such as checkpoint.pt?)"),
    ("garbage", "not a torch weights file (not a torch.save archive)"),
])
def test_weights_that_are_no_state_dict_are_named(setup, tmp_path, kind, message):
    """--weights given the pretraining checkpoint (numpy RNG state inside) or garbage:
    one line naming the file and what it is, not torch's advice to unpickle anyway."""
    path = tmp_path / f"{kind}.pt"
    if kind == "checkpoint":
        torch.save({"model": torch.load(setup["weights"]), "rng": np.random.get_state()}, path)
    else:
        path.write_bytes(b"\x00garbage" * 100)
    result = invoke(setup, tmp_path, weights=path)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith(f"linear: error: {path}: {message}")
    assert result.stderr.count("\n") == 1 and "weights_only" not in result.stderr
    assert not (tmp_path / "live").exists()


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    ({"lrr": 0.1}, "params: linear.lrr: unknown key"),
    ({"mode": "finetune"}, "linear.mode: 'finetune' is not one of"),
    ({"baselines": ["random_init", "random_init"]}, "linear.baselines: lists a baseline twice"),
    ({"weight_decay": "1.0e-6"}, "linear.weight_decay: expected a number"),
])
def test_bad_params_are_named(setup, tmp_path, overrides, message):
    result = invoke(setup, tmp_path, **overrides)
    assert result.exit_code == 2 and message in result.stderr, result.stderr


@pytest.mark.slow
def test_a_baseline_this_machine_cannot_hold_is_refused_before_any_work(setup, tmp_path):
    """raw_pixels at a resolution r whose 32 test rows (augment mode gathers the test
    split) of 3·r² float32 pixels exceed this machine's whole memory: one line naming
    linear.baselines, exit 2, before any feature is extracted or output written."""
    total = psutil.virtual_memory().total
    r = math.isqrt(total // (32 * 3 * 4)) + 1
    params = linear_params(setup["subsets"], mode="augment", baselines=["raw_pixels"])
    params["augment"]["resolution"] = r
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(linear.main, [
        "--params", str(tmp_path / "params.yaml"), "--data", str(setup["data"]),
        "--baselines", "--live", str(tmp_path / "live")])
    assert result.exit_code == 2, result.output + result.stderr
    assert result.stderr.startswith(
        f"linear: error: params: linear.baselines: raw_pixels gathers 32 test rows ×"
        f" {3 * r * r:,} float32 features on every rank: ")
    assert "of host memory available\n" in result.stderr and result.stderr.count("\n") == 1
    assert "features" not in result.stdout  # no extraction's progress line
    assert not (tmp_path / "live").exists()


@pytest.mark.slow
def test_missing_val_subset_is_named(setup, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(linear_params(tmp_path / "nowhere")))
    result = CliRunner().invoke(linear.main, [
        "--params", str(params), "--data", str(setup["data"]),
        "--weights", str(setup["weights"]), "--live", str(tmp_path / "live")])
    assert result.exit_code == 2 and "val.txt: subset file not found" in result.stderr


def test_repo_params_section_loads():
    cfg = load_section(LinearConfig, "linear", REPO / "params.yaml")
    assert cfg.mode == "features" and set(cfg.baselines) == {"random_init", "raw_pixels"}


def test_standardise_uses_the_training_split_statistics():
    from barlow.probe import standardise

    g = torch.Generator().manual_seed(0)
    train = (torch.randn(500, 3, generator=g) * torch.tensor([0.01, 1.0, 50.0]) + 7, torch.zeros(500))
    test = (train[0][:10] * 2, torch.zeros(10))
    (tx, _), (sx, _) = standardise(train, test)
    assert torch.allclose(tx.mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(tx.std(0), torch.ones(3), atol=1e-4)
    mu, sd = train[0].mean(0), train[0].std(0)
    assert torch.allclose(sx, (test[0] - mu) / sd)  # the train map, not the test's own
