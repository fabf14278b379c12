"""Interruptions, faults and bad input on the real pretraining stage command.

The stage runs in subprocesses exactly as dvc.yaml launches it, with numba's JIT off
(NUMBA_DISABLE_JIT=1: the FFCV pipelines then start in a second instead of compiling)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from conftest import REPO, TINY_PARAMS

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NUMBA_DISABLE_JIT": "1",
       "OMP_NUM_THREADS": "1"}
TIMING = {"pairs_per_s", "epoch_time_s"}
# 4 epochs × 4 steps, checkpoints every 3 steps and at each epoch's end.
PARAMS = {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "epochs": 4}}


def stage_cmd(params: Path, data: Path, run: Path, nproc: int = 0) -> list[str]:
    args = ["-m", "stages.pretrain", "--params", str(params), "--data", str(data),
            "--out", str(run / "out"), "--live", str(run / "live")]
    if nproc:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", *args]
    return [sys.executable, *args]


def launch(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def logged_step(run: Path) -> int:
    try:
        return json.loads((run / "live" / "metrics.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def wait_for_step(proc: subprocess.Popen, run: Path, target: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while logged_step(run) < target:
        assert proc.poll() is None, f"ended early: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run to progress"
        time.sleep(0.05)


def finish(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def curves(run: Path) -> dict[str, list[tuple[str, str]]]:
    """Every logged curve as (step, value) rows, timing curves left out."""
    out = {}
    for tsv in sorted((run / "live" / "plots" / "metrics" / "pretrain").glob("*.tsv")):
        if tsv.stem not in TIMING:
            rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
            out[tsv.stem] = [(r["step"], r[tsv.stem]) for r in rows]
    return out


def assert_same_result(a: Path, b: Path) -> None:
    wa, wb = torch.load(a / "out" / "backbone.pt"), torch.load(b / "out" / "backbone.pt")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert curves(a) == curves(b)
    ma = json.loads((a / "live" / "metrics.json").read_text())["pretrain"]
    mb = json.loads((b / "live" / "metrics.json").read_text())["pretrain"]
    assert {k: v for k, v in ma.items() if k not in TIMING} == \
           {k: v for k, v in mb.items() if k not in TIMING}


@pytest.fixture(scope="module")
def params_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(PARAMS))
    return path


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, params_file, tiny_ffcv) -> Path:
    run = tmp_path_factory.mktemp("reference")
    finish(stage_cmd(params_file, tiny_ffcv, run))
    return run


def test_same_seed_twice_gives_identical_results(reference_run, params_file, tiny_ffcv, tmp_path):
    finish(stage_cmd(params_file, tiny_ffcv, tmp_path))
    assert_same_result(reference_run, tmp_path)


def test_kill9_at_three_points_then_resume_equals_uninterrupted(
        reference_run, params_file, tiny_ffcv, tmp_path):
    rng = np.random.default_rng()
    targets = sorted(rng.choice(np.arange(2, 15, 2), size=3, replace=False))  # of 16 steps
    cmd = stage_cmd(params_file, tiny_ffcv, tmp_path)
    for target in targets:
        proc = launch(cmd)
        wait_for_step(proc, tmp_path, int(target))
        time.sleep(rng.uniform(0, 0.3))  # somewhere inside a step, or a checkpoint write
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        (tmp_path / "live" / "metrics.json").unlink(missing_ok=True)
    result = finish(cmd)
    assert "resumed from" in result.stdout, f"targets {targets}"
    assert_same_result(reference_run, tmp_path)


def test_a_killed_rank_ends_the_run_then_repro_resumes(params_file, tiny_ffcv, tmp_path):
    """2 gloo processes under torchrun; kill -9 one worker: the run ends with a message
    naming the failure well within 60 s (no hang), and the next run resumes."""
    cmd = stage_cmd(params_file, tiny_ffcv, tmp_path, nproc=2)
    proc = launch(cmd)
    wait_for_step(proc, tmp_path, 4)  # past the first epoch's checkpoint
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "stages.pretrain" in " ".join(p.cmdline())]
    assert len(workers) == 2
    victim = max(workers, key=lambda p: int(p.environ().get("LOCAL_RANK", 0)))
    killed_at = time.monotonic()
    victim.kill()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - killed_at < 60
    assert proc.returncode != 0
    assert "Signal 9" in stderr or "SIGKILL" in stderr or "exitcode" in stderr, stderr[-2000:]
    result = finish(cmd)
    assert "resumed from" in result.stdout
    assert logged_step(tmp_path) == 16  # global batch 16 = 2 × 8: 4 steps × 4 epochs


@pytest.mark.parametrize("section, change, message", [
    ("loss", {"lambd": -0.1}, "loss.lambd: -0.1 is negative"),
    ("loss", {"lamda": 0.1}, "loss.lamda: unknown key"),
    ("augment", {"grayscale_p": 1.2}, "augment.grayscale_p: 1.2 is not a probability"),
    ("augment", {"blur_p": [1.0, -0.1]}, r"augment.blur_p[1]: -0.1 is not a probability"),
    ("pretrain", {"batch_size": "big"}, "pretrain.batch_size: expected an integer"),
    ("pretrain", {"weight_decay": "1.5e-6"}, "write numbers unquoted"),
    ("pretrain", {"optimizer": "adam"}, "pretrain.optimizer: 'adam' is not one of"),
    ("model", {"projector": "512-x"}, "model.projector"),
    ("model", {"arch": "vit"}, "model.arch: 'vit' is not one of"),
])
def test_bad_params_stop_before_any_work(tmp_path, tiny_ffcv, section, change, message):
    params = {**PARAMS, section: {**PARAMS[section], **change}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(stage_cmd(tmp_path / "params.yaml", tiny_ffcv, tmp_path),
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "live").exists()


def test_missing_dataset_is_named(params_file, tmp_path):
    result = subprocess.run(stage_cmd(params_file, tmp_path / "nodata", tmp_path), cwd=REPO,
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "nodata/train.beton: FFCV dataset not found" in result.stderr


def test_foreign_checkpoint_is_refused_by_the_stage(params_file, tiny_ffcv, tmp_path):
    """An interrupted run's checkpoint made with other params: exit 2, keys named."""
    (tmp_path / "out").mkdir()
    torch.save({"config": {"loss": {"lambd": 0.5}}, "fingerprint": "other", "finished": False},
               tmp_path / "out" / "checkpoint.pt")
    result = subprocess.run(stage_cmd(params_file, tiny_ffcv, tmp_path), cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "made with another config" in result.stderr and "loss.lambd: 0.5 != 0.0051" in result.stderr
