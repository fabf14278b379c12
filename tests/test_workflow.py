"""Working with the pipeline day to day: progress lines, one-line errors under the
launcher, every stage's --help, the SVM search's convergence summary, and the DVC remote
round trip (push, fresh clone, pull, nothing to reproduce) with the real DVC."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from barlow.progress import Progress, duration
from conftest import REPO, TINY_PARAMS, machine

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NUMBA_DISABLE_JIT": "1",
       "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}


# ------------------------------------------------------------------------------ progress
def test_duration_reads_as_minutes_and_hours():
    assert [duration(s) for s in (4.4, 185, 3725)] == ["4s", "3m05s", "1h02m"]


def test_progress_prints_plain_lines_throttled_and_the_last():
    out = io.StringIO()
    progress = Progress("probe", 10, "epoch", every_s=3600, enabled=True, stream=out)
    for epoch in range(1, 11):
        progress.update(epoch, val_top1=50.0 + epoch)
    progress.finish(10)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 1  # throttled: only the last, and finish does not repeat it
    assert lines[0].startswith("probe: epoch 10/10 (100%) | val top1 60 | ")
    assert lines[0].endswith(", done")


def test_progress_estimates_time_left_and_stays_quiet_off_rank_0(monkeypatch):
    out = io.StringIO()
    Progress("pretrain", 100, "step", start=50, stream=out).line(75, loss=1.5)
    assert "pretrain: step 75/100 (75%) | loss 1.5 | " in out.getvalue()
    assert "left" in out.getvalue()
    monkeypatch.setenv("RANK", "1")
    quiet = io.StringIO()
    Progress("pretrain", 100, "step", stream=quiet).line(75)
    assert quiet.getvalue() == ""


def image_tree(root: Path) -> Path:
    """An ImageFolder tree: train/ and val/, 2 classes × 3 small PNGs each."""
    for split in ("train", "val"):
        for c, colour in enumerate(("red", "blue")):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (12, 10 + i), colour).save(root / split / f"c{c}" / f"{i}.png")
    return root


def test_imagefolder_scan_reports_progress(tmp_path, capsys):
    from barlow.data.sources import image_folder

    root = image_tree(tmp_path / "images")
    image_folder(root / "train", "train", None, False, 1)
    assert f"scan {root / 'train'}: image 6/6 (100%) | " in capsys.readouterr().out


def test_svm_search_counts_unconverged_fits_instead_of_warning():
    from barlow.voc07 import voc07_svm_map

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(90, 20)), np.arange(90) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ConvergenceWarning would fail the test
        out = voc07_svm_map(x, y, x[:30], y[:30], costs=(100.0,), max_iter=2, n_jobs=1)
    # 3 classes × (3 folds + the refit), none converging in 2 iterations.
    assert out["not_converged"] == {100.0: 12}


# ---------------------------------------------------------------------------- stage edge
@pytest.mark.parametrize("module, command", [
    ("stages.convert", "dataset"), ("stages.convert", "transfer"), ("stages.pretrain", None),
    ("stages.linear", None), ("stages.semisup", None), ("stages.transfer", None),
    ("stages.report", "build")])
def test_every_stage_help_says_what_it_reads_and_writes(module, command):
    import importlib

    cli = importlib.import_module(module)
    cli = getattr(cli, "cli", None) or cli.main
    result = CliRunner().invoke(cli, [*([command] if command else []), "--help"])
    assert result.exit_code == 0
    assert "Reads" in result.output and "Writes" in result.output, result.output
    assert "--params" in result.output


def run_pretrain(params: dict, data: Path, tmp: Path) -> subprocess.CompletedProcess:
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "stages.pretrain", "--params", str(tmp / "params.yaml"),
           "--data", str(data), "--out", str(tmp / "out"), "--live", str(tmp / "live")]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bad_params_for_two_processes_stop_in_one_line_before_any_process(tmp_path):
    params = {**TINY_PARAMS, "loss": {**TINY_PARAMS["loss"], "lambd": -0.1},
              "machine": machine(2)}
    result = run_pretrain(params, tmp_path / "nodata", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "pretrain: error: params: loss.lambd: -0.1 is negative"


@pytest.mark.slow
def test_a_workers_known_error_is_one_line_and_status_2(tmp_path):
    """Both workers meet the missing dataset: the launcher prints the first one's line
    once, without torchrun's failure report, and exits 2."""
    params = {**TINY_PARAMS, "machine": machine(2)}
    result = run_pretrain(params, tmp_path / "nodata", tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [f"pretrain: error: {tmp_path}/nodata/train.beton: FFCV dataset not"
                      " found (run the convert stage)"], result.stderr[-3000:]


@pytest.mark.slow
def test_pretraining_prints_a_line_per_epoch(tiny_ffcv, tmp_path):
    params = {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "knn_every_epochs": 0}}
    result = run_pretrain(params, tiny_ffcv, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split(" | ")[0]: line for line in result.stdout.splitlines()
             if line.startswith("pretrain: step")}
    # One per epoch (4 steps each); log points between them at most every 10 s.
    first, last = lines["pretrain: step 4/8 (50%)"], lines["pretrain: step 8/8 (100%)"]
    assert all("loss" in line and "pairs/s" in line for line in lines.values())
    assert "left" in first and last.endswith("done")


# ---------------------------------------------------------------------------- DVC remote
def dvc(*args: str, cwd: Path, env: dict) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.slow
def test_push_fresh_clone_pull_and_nothing_to_reproduce(tmp_path):
    """The project's .dvc/config (its default remote under ~, HOME moved to tmp), the
    convert stage of its dvc.yaml on a tiny ImageFolder tree: repro, push; a fresh git
    clone pulls the .betons, and finds the pipeline up to date."""
    home, repo, clone = tmp_path / "home", tmp_path / "repo", tmp_path / "clone"
    env = {**ENV, "HOME": str(home), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    images = image_tree(tmp_path / "images")

    repo.mkdir()
    for part in ("src", "stages"):
        shutil.copytree(REPO / part, repo / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"convert": stages["convert"]}}))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source="imagefolder", imagefolder_root=str(images))
    params["machine"]["cores"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    git("init", "-q", cwd=repo)
    dvc("init", "-q", cwd=repo, env=env)
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "pipeline", cwd=repo)

    dvc("repro", cwd=repo, env=env)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "results", cwd=repo)
    dvc("push", cwd=repo, env=env)
    assert any((home / "barlow-dvc-remote").rglob("*")), "nothing pushed to ~/barlow-dvc-remote"

    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    dvc("pull", cwd=clone, env=env)
    for name in ("train", "test"):
        assert (clone / "data/ffcv" / f"{name}.beton").read_bytes() == \
               (repo / "data/ffcv" / f"{name}.beton").read_bytes()
    assert json.loads(dvc("status", "--json", cwd=clone, env=env)) == {}
    assert "didn't change, skipping" in dvc("repro", cwd=clone, env=env)


# ------------------------------------------------------------------------------- sweeps
@pytest.mark.slow
def test_make_ablations_queues_studies_in_dvcs_grammar(tmp_path):
    """The Makefile's `dvc exp run --queue` lines, run by bash with the real DVC in a
    copy of the project's pipeline: the baseline, the λ study and the loss-term rows
    (whose last line is a two-param grid), one experiment per value and seed, each with
    exactly its change (the other studies' lines are alike)."""
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for name in ("dvc.yaml", "params.yaml", "Makefile"):
        shutil.copy(REPO / name, tmp_path / name)
    git("init", "-q", cwd=tmp_path)
    dvc("init", "-q", cwd=tmp_path, env=env)
    git("add", "-A", cwd=tmp_path)
    git("commit", "-qm", "pipeline", cwd=tmp_path)
    # --no-print-directory: under `make test` (CI) a nested make would add its
    # "Leaving directory" line to what is compared.
    printed = subprocess.run(["make", "--no-print-directory", "-n", "ablations", "SEEDS=0,1"],
                             cwd=tmp_path, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    queue = [line for line in printed if line.startswith("dvc exp run --queue")]
    assert len(queue) == 7 and printed[-1] == "dvc queue start -j 1"
    # The baseline, the λ study and the two lines of the loss-term rows that -S grids make.
    subprocess.run(["bash", "-euc", "\n".join(queue[:2] + queue[-2:])], cwd=tmp_path, env=env,
                   check=True, capture_output=True)
    shown = json.loads(dvc("exp", "show", "--json", cwd=tmp_path, env=env))
    runs = sorted((p["loss"]["lambd"], p["loss"]["normalization"], p["model"]["projector_bn"],
                   p["pretrain"]["seed"], p["linear"]["baselines"])
                  for rev in shown for exp in rev.get("experiments") or []
                  for run in exp["revs"]
                  for p in [run["data"]["params"]["params.yaml"]["data"]])
    lambd_study = [(lambd, "batch", True) for lambd in (0.002, 0.005, 0.0051, 0.01, 0.02)]
    # Feature-dim normalisation; no BN in the projector; no BN and no normalisation.
    loss_rows = [(0.005, "feature", True), (0.005, "batch", False), (0.005, "none", False)]
    assert runs == sorted((*row, seed, []) for row in lambd_study + loss_rows
                          for seed in (0, 1))
