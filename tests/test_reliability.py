"""Interruptions, faults and bad input on the real stage commands.

Kills land on the stage commands exactly as dvc.yaml launches them (subprocesses, each
in a session of its own), with numba's JIT off (NUMBA_DISABLE_JIT=1: the FFCV pipelines
then start in a second instead of compiling) unless a test says otherwise. Kill points
come from a generator seeded with RELIABILITY_SEED (default 0) and are printed, so a
failure names them and a rerun with the same seed aims at the same steps. Every process
a test starts is killed when the test ends, passed or failed (the ``spawn`` fixture).
Errors that need no kill run in-process through click's CliRunner, and their exact
line is asserted. No test asserts a duration: a hang fails at a generous bound.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from barlow.stage import PREEMPTED
from conftest import (REPO, TINY_PARAMS, in_signal_mask, linear_params, live_files, machine,
                      repo_params, semisup_params)
from stages import convert, pretrain

# Every test runs a stage as a subprocess, most of them killing it part-way.
pytestmark = pytest.mark.slow

SEED = int(os.environ.get("RELIABILITY_SEED", "0"))
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NUMBA_DISABLE_JIT": "1",
       "OMP_NUM_THREADS": "1"}
TIMING = {"pairs_per_s", "epoch_time_s"}
HANG_S = 300  # a bound for runs that should have progressed or ended long before
# 4 epochs × 4 steps, checkpoints every 3 steps and at each epoch's end.
PARAMS = {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "epochs": 4}}
# What users run, less numba's JIT (minutes of compiling per process): precision auto
# (bf16 on a CPU with native bf16), 2 cores shared by the processes' FFCV threads, 2
# torch threads per process; 2 epochs × 4 steps, the cost of two processes on a 2-core
# CI runner.
USER_PARAMS = {**PARAMS, "pretrain": {**PARAMS["pretrain"], "precision": "auto", "epochs": 2},
               "machine": machine(1, cores=2)}
USER_ENV = {**ENV, "OMP_NUM_THREADS": "2"}


def kill_points(test: str, choices: range, size: int) -> list[int]:
    """``size`` distinct kill points from ``choices``, seeded and printed."""
    rng = np.random.default_rng([SEED, *test.encode()])
    points = sorted(int(p) for p in rng.choice(np.asarray(choices), size=size, replace=False))
    print(f"{test}: kill points {points} (RELIABILITY_SEED={SEED})")
    return points


def stage_cmd(params: Path, data: Path, run: Path, nproc: int = 0) -> list[str]:
    args = ["-m", "stages.pretrain", "--params", str(params), "--data", str(data),
            "--out", str(run / "out"), "--live", str(run / "live")]
    if nproc:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", *args]
    return [sys.executable, *args]


@pytest.fixture
def spawn(tmp_path) -> Callable[..., subprocess.Popen]:
    """Start a command in a session of its own, output to files under tmp_path; at the
    end of the test, kill it and every descendant it was seen with (``adopt`` records
    more: processes that a kill orphans leave its tree)."""
    started: list[psutil.Process] = []

    def start(cmd: list[str], env: dict = ENV, name: str = "run") -> subprocess.Popen:
        out = open(tmp_path / f"{name}.stdout", "w")  # noqa: SIM115 — closed with the test
        err = open(tmp_path / f"{name}.stderr", "w")  # noqa: SIM115
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err,
                                start_new_session=True)
        started.append(psutil.Process(proc.pid))
        proc.outputs = (tmp_path / f"{name}.stdout", tmp_path / f"{name}.stderr")
        return proc

    start.adopt = lambda procs: started.extend(procs)
    yield start
    for proc in started:
        try:
            victims = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            victims = [proc]
        for victim in victims:
            try:
                victim.kill()
            except psutil.NoSuchProcess:
                pass


def logged_step(run: Path) -> int:
    try:
        return json.loads((run / "live" / "metrics.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def wait_until(proc: subprocess.Popen, done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HANG_S
    while not done():
        if proc.poll() is not None:
            pytest.fail(f"ended before {what}: {proc.outputs[1].read_text()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {HANG_S} s")
        time.sleep(0.05)


def finish(cmd: list[str], env: dict = ENV) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def workers_of(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children(recursive=True)
            if "stages.pretrain" in " ".join(p.cmdline())]


def assert_all_end(procs: list[psutil.Process], what: str) -> None:
    _, alive = psutil.wait_procs(procs, timeout=60)
    assert not alive, f"{what} outlived their parent: {[p.cmdline() for p in alive]}"


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
    # What the run leaves: the two products, no partial file.
    assert sorted(p.name for p in (b / "out").iterdir()) == ["backbone.pt", "checkpoint.pt"]


def write_params(folder: Path, params: dict, name: str = "params.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def params_file(tmp_path_factory) -> Path:
    return write_params(tmp_path_factory.mktemp("params"), PARAMS)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, params_file, tiny_ffcv) -> Path:
    run = tmp_path_factory.mktemp("reference")
    finish(stage_cmd(params_file, tiny_ffcv, run))
    return run


# ---------------------------------------------------------------- kills of pretraining

def test_kill9_at_three_points_then_resume_equals_uninterrupted(
        reference_run, params_file, tiny_ffcv, tmp_path, spawn):
    cmd = stage_cmd(params_file, tiny_ffcv, tmp_path)
    rng = np.random.default_rng(SEED)
    for target in kill_points("kill9_one_process", range(2, 15, 2), 3):  # of 16 steps
        proc = spawn(cmd)
        wait_until(proc, lambda: logged_step(tmp_path) >= target, f"step {target}")
        time.sleep(rng.uniform(0, 0.3))  # somewhere inside a step, or a checkpoint write
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        (tmp_path / "live" / "metrics.json").unlink(missing_ok=True)
    result = finish(cmd)
    assert "pretrain: resumed from" in result.stdout
    assert_same_result(reference_run, tmp_path)


# The pretrain stage with one of its torch.save calls (all of them inside save_atomic)
# followed by SIGKILL: the file is written under its partial name, not yet renamed.
KILL_INSIDE_SAVE = """
import os, runpy, signal, sys
import torch
kill_at, calls, save = int(sys.argv[1]), [0], torch.save
def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
sys.argv = ["stages.pretrain", *sys.argv[2:]]
runpy.run_module("stages.pretrain", run_name="__main__")
"""


def test_kill_inside_the_atomic_checkpoint_write(reference_run, params_file, tiny_ffcv,
                                                  tmp_path, spawn):
    """The kill lands between the write of .checkpoint.pt.partial and its rename: the
    last complete checkpoint stays loadable, and the rerun resumes from it, replaces the
    partial file and ends as the uninterrupted run."""
    (kill_at,) = kill_points("kill_inside_save", range(2, 7), 1)  # of ~9 saves
    proc = spawn([sys.executable, "-c", KILL_INSIDE_SAVE, str(kill_at),
                  *stage_cmd(params_file, tiny_ffcv, tmp_path)[3:]])
    assert proc.wait(timeout=HANG_S) == -signal.SIGKILL
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [".checkpoint.pt.partial", "checkpoint.pt"]
    assert "step" in torch.load(out / "checkpoint.pt", weights_only=True)
    (tmp_path / "live" / "metrics.json").unlink(missing_ok=True)
    result = finish(stage_cmd(params_file, tiny_ffcv, tmp_path))
    assert "pretrain: resumed from" in result.stdout
    assert_same_result(reference_run, tmp_path)


@pytest.fixture(scope="module")
def user_params_file(tmp_path_factory) -> Path:
    return write_params(tmp_path_factory.mktemp("user_params"), USER_PARAMS)


def test_kill9_of_two_processes_then_resume_equals_uninterrupted(
        user_params_file, tiny_ffcv, tmp_path_factory, spawn):
    """2 gloo processes under torchrun with the users' precision and threads: SIGKILL
    to the launcher alone (its workers run in sessions of their own) ends the workers
    too, and the resumed run equals an uninterrupted one."""
    reference = tmp_path_factory.mktemp("reference_2p")
    finish(stage_cmd(user_params_file, tiny_ffcv, reference, nproc=2), USER_ENV)
    run = tmp_path_factory.mktemp("killed_2p")
    cmd = stage_cmd(user_params_file, tiny_ffcv, run, nproc=2)
    (target,) = kill_points("kill9_two_processes", range(4, 7), 1)  # of 8, past step 3's checkpoint
    proc = spawn(cmd, USER_ENV)
    wait_until(proc, lambda: logged_step(run) >= target, f"step {target}")
    workers = workers_of(proc)
    spawn.adopt(workers)
    assert len(workers) == 2
    proc.kill()
    assert_all_end(workers, "torchrun's workers")
    (run / "live" / "metrics.json").unlink(missing_ok=True)
    result = finish(cmd, USER_ENV)
    assert "pretrain: resumed from" in result.stdout
    assert_same_result(reference, run)


@pytest.mark.skipif(os.environ.get("RELIABILITY_JIT") != "1",
                    reason="numba's JIT compiles for minutes per process: RELIABILITY_JIT=1")
def test_kill9_with_the_jit_then_resume_equals_uninterrupted(
        user_params_file, tiny_ffcv, tmp_path_factory, spawn):
    """The users' run exactly: numba's JIT on as well (one process)."""
    env = {k: v for k, v in USER_ENV.items() if k != "NUMBA_DISABLE_JIT"}
    reference = tmp_path_factory.mktemp("reference_jit")
    finish(stage_cmd(user_params_file, tiny_ffcv, reference), env)
    run = tmp_path_factory.mktemp("killed_jit")
    cmd = stage_cmd(user_params_file, tiny_ffcv, run)
    (target,) = kill_points("kill9_jit", range(4, 7), 1)
    proc = spawn(cmd, env)
    wait_until(proc, lambda: logged_step(run) >= target, f"step {target}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (run / "live" / "metrics.json").unlink(missing_ok=True)
    assert "pretrain: resumed from" in finish(cmd, env).stdout
    assert_same_result(reference, run)


def test_a_killed_rank_ends_the_run_then_repro_resumes(params_file, tiny_ffcv, tmp_path, spawn):
    """2 gloo processes under torchrun; kill -9 one worker: the launcher ends (no hang),
    its report names the killed worker, and the next run resumes."""
    cmd = stage_cmd(params_file, tiny_ffcv, tmp_path, nproc=2)
    proc = spawn(cmd)
    wait_until(proc, lambda: logged_step(tmp_path) >= 4, "step 4")  # past epoch 1's checkpoint
    workers = workers_of(proc)
    spawn.adopt(workers)
    assert len(workers) == 2
    victim = max(workers, key=lambda p: int(p.environ().get("LOCAL_RANK", 0)))
    victim.kill()
    assert proc.wait(timeout=HANG_S) == 1
    assert f"Signal 9 (SIGKILL) received by PID {victim.pid}" in proc.outputs[1].read_text()
    result = finish(cmd)
    assert "pretrain: resumed from" in result.stdout
    assert logged_step(tmp_path) == 16  # global batch 16 = 2 × 8: 4 steps × 4 epochs


# ---------------------------------------------------------------- pre-emption

def with_processes(params: dict, n: int) -> dict:
    """``params`` run in ``n`` processes through the stage's own torchrun launch."""
    return {**params, "machine": machine(n)}


# 2 epochs × 4 steps, a log line at every step: the stop step is then known to one step.
STOP_PARAMS = {**PARAMS, "pretrain": {**PARAMS["pretrain"], "epochs": 2, "log_every_steps": 1}}
STOP_STEPS = 8  # 2 epochs × 4 steps


def stop_mid_run(launcher: subprocess.Popen, workers: list[psutil.Process], run: Path,
                 target: int, sig: signal.Signals) -> int:
    """Once ``run`` has logged step ``target``, freeze the run (SIGSTOP), read its last
    logged step L, send ``sig`` to ``launcher`` (the stage's command), and thaw the
    launcher, then its workers: the signal lands with rank 0 between the log of step L
    and that of L + 1. Returns L. Target 0: as soon as the launcher catches ``sig``
    (L = 0 unless a step was logged meanwhile)."""
    if target == 0:
        wait_until(launcher, lambda: in_signal_mask(launcher.pid, "SigCgt", sig),
                   f"a {sig.name} handler")
    while True:
        wait_until(launcher, lambda: logged_step(run) >= target, f"step {target}")
        frozen = [psutil.Process(launcher.pid), *workers]
        for proc in frozen:
            proc.suspend()
        last = max(0, logged_step(run))  # -1: nothing logged yet
        if last >= target:  # else metrics.json was caught half-written
            break
        for proc in frozen:
            proc.resume()
    launcher.send_signal(sig)
    for proc in frozen:
        proc.resume()
    return last


def assert_stopped_at(proc: subprocess.Popen, run: Path, last: int) -> None:
    """Exit 4, one line from rank 0, the checkpoint at the step the signal interrupted
    (last or last + 1), logged up to it."""
    assert proc.wait(timeout=HANG_S) == PREEMPTED, proc.outputs[1].read_text()[-3000:]
    step = torch.load(run / "out" / "checkpoint.pt", weights_only=False)["step"]
    assert last <= step <= last + 1, (last, step)
    assert logged_step(run) == step
    lines = [line for line in proc.outputs[1].read_text().splitlines() if "stopped" in line]
    assert lines == [f"pretrain: stopped on request at step {step}/{STOP_STEPS}"
                     f" (epoch {step / 4:.2f});"
                     f" {run / 'out' / 'checkpoint.pt'} holds it, the next run resumes there"]
    assert not (run / "out" / "backbone.pt").exists()


@pytest.mark.parametrize("nproc, sig", [(1, signal.SIGTERM), (2, signal.SIGTERM),
                                       (2, signal.SIGUSR1)],
                         ids=["1p-SIGTERM", "2p-SIGTERM", "2p-SIGUSR1"])
def test_a_stop_signal_checkpoints_the_step_and_the_rerun_equals_uninterrupted(
        nproc, sig, tiny_ffcv, tmp_path_factory, spawn):
    """SIGTERM (pre-emption) or SIGUSR1 (SLURM's time-limit warning) to the stage's
    command mid-epoch: with 2 gloo processes it reaches the launcher alone, which passes
    it on. The run stops after the step under way, checkpointed; the rerun resumes and
    ends with the weights, curves (each step once) and metrics of an uninterrupted
    run."""
    params = write_params(tmp_path_factory.mktemp("params"), with_processes(STOP_PARAMS, nproc))
    reference = tmp_path_factory.mktemp("reference")
    finish(stage_cmd(params, tiny_ffcv, reference))
    # One process steps in milliseconds on this data, faster than a poll of its log: the
    # signal lands as soon as the stage catches it, and stops it after its first step.
    (target,) = kill_points(f"{sig.name}_{nproc}p", range(1, 6), 1) if nproc > 1 else (0,)
    for _ in range(3):
        run = tmp_path_factory.mktemp("stopped")
        cmd = stage_cmd(params, tiny_ffcv, run)
        proc = spawn(cmd)
        workers = []
        if nproc > 1:
            wait_until(proc, lambda: len(workers_of(proc)) == nproc, "the workers")
            workers = workers_of(proc)
            spawn.adopt(workers)
        last = stop_mid_run(proc, workers, run, target, sig)
        if last < STOP_STEPS - 1:
            break
        # The poll saw the run only in its last step (a busy machine): a signal there
        # finds the training done, and the run ends whole. Start again.
        assert proc.wait(timeout=HANG_S) == 0, proc.outputs[1].read_text()[-3000:]
    else:
        pytest.fail(f"three runs passed step {STOP_STEPS - 2} before the test could stop them")
    assert_stopped_at(proc, run, last)
    assert_all_end(workers, "the stopped workers")
    result = finish(cmd)
    assert "pretrain: resumed from" in result.stdout
    assert_same_result(reference, run)


# ---------------------------------------------------------------- pre-emption of evaluations

#: On PYTHONPATH with STOP_AT_STEP=k: SIGTERM to the stage's command at the k-th SGD step.
STOP_HOOK = REPO / "tests" / "stop_at_step"
# Each run's sub-runs in order, as (name, epochs, batches per epoch) on tiny_ffcv with
# conftest's settings: semisup's with --weights (barlow) or --baselines (scratch); the
# linear stage's with --baselines in augment mode, 2 epochs, two baselines.
EVAL_RUNS = {("semisup", "weights"): [("1percent/barlow", 3, 1), ("10percent/barlow", 2, 2)],
             ("semisup", "baselines"): [("1percent/scratch", 3, 1),
                                        ("10percent/scratch", 2, 2)],
             ("linear", "baselines"): [("random_init", 2, 3), ("raw_pixels", 2, 3)]}


def eval_stop_point(stage: str, mode: str, step: int) -> str:
    """Where the run stops after its ``step``-th step: "<run> at epoch e, batch b"."""
    for run, epochs, batches in EVAL_RUNS[stage, mode]:
        if step <= epochs * batches:
            epoch, batch = divmod(step - 1, batches)
            return f"{run} at epoch {epoch}, batch {batch + 1}"
        step -= epochs * batches
    raise ValueError("past the last step")


@pytest.mark.parametrize("stage, mode, nproc", [
    ("semisup", "weights", 1), ("semisup", "baselines", 2), ("linear", "baselines", 1)],
    ids=["semisup-1p", "semisup-scratch-2p", "linear-augment-baselines-1p"])
def test_a_stop_signal_mid_evaluation_checkpoints_and_the_rerun_equals_uninterrupted(
        stage, mode, nproc, tiny_ffcv, tiny_subsets, random_backbone, tmp_path, spawn):
    """SIGTERM to the stage's command in a step of its second sub-run (2 processes: to
    the stage's launcher, which passes it on): exit 4, rank 0's one line,
    LIVE/checkpoint.pt. The rerun skips the sub-runs done, resumes mid-epoch and ends
    with the dvclive files of an uninterrupted run, byte for byte (every curve point
    once, the same metrics), and no checkpoint left. With --weights and with
    --baselines (whose checkpoint identifies no weights file)."""
    settings = (semisup_params(tiny_subsets, nproc) if stage == "semisup" else
                linear_params(tiny_subsets, nproc, mode="augment", epochs=2,
                              baselines=["random_init", "raw_pixels"]))
    params = write_params(tmp_path, settings)
    what = ["--weights", str(random_backbone)] if mode == "weights" else ["--baselines"]

    def cmd(live: Path) -> list[str]:
        return [sys.executable, "-m", f"stages.{stage}", "--params", str(params), "--data",
                str(tiny_ffcv), *what, "--live", str(live)]

    finish(cmd(tmp_path / "reference"))
    # A step of the second sub-run, not its last (semisup: 10percent's steps 1-3 of 4).
    choices = [4, 5, 6] if stage == "semisup" else [7, 8, 10, 11]
    (step,) = kill_points(f"{stage}_{mode}_{nproc}p", choices, 1)
    live = tmp_path / "live"
    proc = spawn(cmd(live), {**ENV, "PYTHONPATH": f"{STOP_HOOK}:{REPO / 'src'}",
                             "STOP_AT_STEP": str(step)})
    assert proc.wait(timeout=HANG_S) == PREEMPTED, proc.outputs[1].read_text()[-3000:]
    lines = [line for line in proc.outputs[1].read_text().splitlines() if "stopped" in line]
    assert lines == [f"{stage}: stopped on request in {stage}/{eval_stop_point(stage, mode, step)};"
                     f" {live / 'checkpoint.pt'} holds it, the next run resumes there"]
    assert (live / "checkpoint.pt").is_file()
    result = finish(cmd(live))
    assert f"{stage}: resumed from {live / 'checkpoint.pt'}" in result.stdout
    assert live_files(live) == live_files(tmp_path / "reference")


# ---------------------------------------------------------------- two launcher nodes

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_cmds(params: Path, data: Path, runs: list[Path], script: list[str]) -> list[list[str]]:
    """One torchrun per "node" on this machine (static rendezvous, 1 gloo process
    each), as docs/multi-gpu.md starts several nodes; node i writes under runs[i]
    (nodes without a shared file system). ``script``: what torchrun runs."""
    port = free_port()
    return [[sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(runs)}",
             f"--node_rank={i}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
             f"--master_port={port}", *script, "--params", str(params), "--data", str(data),
             "--out", str(run / "out"), "--live", str(run / "live")]
            for i, run in enumerate(runs)]


@pytest.fixture(scope="module")
def two_nodes(params_file, tiny_ffcv, tmp_path_factory) -> Path:
    """PARAMS trained to the end on 2 launcher nodes × 1 process, sharing one folder."""
    run = tmp_path_factory.mktemp("two_nodes")
    procs = [subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=open(run / f"node{i}.stderr", "w"))  # noqa: SIM115
             for i, cmd in enumerate(node_cmds(params_file, tiny_ffcv, [run, run],
                                               ["-m", "stages.pretrain"]))]
    try:
        for i, proc in enumerate(procs):
            assert proc.wait(timeout=HANG_S) == 0, \
                (run / f"node{i}.stderr").read_text()[-3000:]
    finally:
        for proc in procs:
            proc.kill()
    return run


def test_two_nodes_train_the_weights_of_one_node_of_two_processes(
        two_nodes, params_file, tiny_ffcv, tmp_path):
    """The same world size, ranks and shares, launched as 2 nodes × 1 process or as 1
    node × 2 (torchrun --standalone): the same backbone.pt bit for bit, the same curves
    and metrics. Only the launch differs (LOCAL_RANK 0 on both nodes, 0 and 1 on one),
    and no computation reads it on the CPU."""
    finish(stage_cmd(params_file, tiny_ffcv, tmp_path, nproc=2))
    assert_same_result(two_nodes, tmp_path)


def test_a_rank_that_cannot_read_rank_0s_checkpoint_stops_every_rank(
        two_nodes, params_file, tiny_ffcv, tmp_path, spawn):
    """Rank 0 resumes; the other node has no copy of the checkpoint. Starting that rank
    afresh would train two ranks at different steps: every rank stops with one line."""
    shared = tmp_path / "shared"
    shutil.copytree(two_nodes, shared)
    lone = tmp_path / "lone"
    procs = [spawn(cmd, name=f"node{i}") for i, cmd in
             enumerate(node_cmds(params_file, tiny_ffcv, [shared, lone],
                                 ["-m", "stages.pretrain"]))]
    line = (f"pretrain: error: rank 1 cannot read the checkpoint rank 0 resumes from (step"
            f" 16): {lone / 'out' / 'checkpoint.pt'}: not found; every rank must see the"
            " same file (a shared file system, or a copy on every node)")
    for proc in procs:
        assert proc.wait(timeout=HANG_S) != 0
        assert line in proc.outputs[1].read_text().splitlines()
    assert not (lone / "out").exists()


# The pretrain stage with rank 0's check of its weights before a checkpoint failing:
# an error that rank 0 alone sees, while the other ranks go on into the next step.
FAIL_ON_RANK_0 = """
import os, runpy, sys
sys.path.insert(0, os.getcwd())  # the repository, for stages.*: torchrun runs a script
from barlow import train
if os.environ["RANK"] == "0":
    train.non_finite_keys = lambda weights: ["layer1.0.conv1.weight"]
sys.argv = ["stages.pretrain", *sys.argv[1:]]
runpy.run_module("stages.pretrain", run_name="__main__")
"""


def test_a_fault_rank_0_alone_sees_stops_every_node_with_its_line(tiny_ffcv, tmp_path, spawn):
    """Rank 0's check of the weights before a checkpoint fails there alone. With a
    collective timeout far beyond the test's bound, the other node's rank must stop
    with the same line at the same point, not wait in the next step's collectives (or
    die of a torn connection, as gloo's do when the peer's process ends)."""
    params = write_params(tmp_path, {**PARAMS, "machine": {**PARAMS["machine"],
                                                           "collective_timeout_s": 3600.0}})
    script = tmp_path / "fail_on_rank_0.py"
    script.write_text(FAIL_ON_RANK_0)
    procs = [spawn(cmd, name=f"node{i}") for i, cmd in enumerate(
        node_cmds(params, tiny_ffcv, [tmp_path / "run"] * 2, [str(script)]))]
    line = ("pretrain: error: pretrain: non-finite weights (NaN/Inf) in 1 tensors, first"
            " layer1.0.conv1.weight, after step 3; the last good checkpoint"
            f" {tmp_path / 'run' / 'out' / 'checkpoint.pt'} is untouched")
    for proc in procs:
        assert proc.wait(timeout=HANG_S) != 0
        stderr = proc.outputs[1].read_text()
        assert line in stderr.splitlines() and "Connection closed" not in stderr, stderr[-3000:]
    assert not (tmp_path / "run" / "out").exists()


def test_a_fault_on_one_node_ends_every_node_within_seconds(tiny_ffcv, tmp_path, spawn):
    """Node 1's copy of the data is damaged (a byte of train.beton flipped), which its
    rank alone reads, once the process group is up. That rank exits 2 with its line;
    the rank on node 0, waiting for it in a collective whose timeout (900 s) lies far
    beyond the test's bound (120 s), stops within seconds with status 6 and one line
    naming rank 1 and its reason. (Without the failure watch gloo's rank 0 died of the
    torn connection, with a traceback; NCCL's would wait out the timeout.)"""
    params = write_params(tmp_path, {**PARAMS, "machine": {**PARAMS["machine"],
                                                           "collective_timeout_s": 900.0}})
    damaged = shutil.copytree(tiny_ffcv, tmp_path / "damaged")
    blob = bytearray((damaged / "train.beton").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # a byte of image data: same size, same header
    (damaged / "train.beton").write_bytes(bytes(blob))
    cmds = node_cmds(params, tiny_ffcv, [tmp_path / "node0", tmp_path / "node1"],
                     ["-m", "stages.pretrain"])
    cmds[1][cmds[1].index("--data") + 1] = str(damaged)
    procs = [spawn(cmd, name=f"node{i}") for i, cmd in enumerate(cmds)]
    for proc in procs:
        assert proc.wait(timeout=120) != 0
    reason = (f"{damaged / 'train.beton'}: sha256 differs from its manifest's beton_sha256:"
              " changed since the convert stage wrote it; re-run the convert stage")
    stderr = [proc.outputs[1].read_text() for proc in procs]
    assert f"pretrain: error: {reason}" in stderr[1].splitlines(), stderr[1][-3000:]
    assert f"pretrain: stopping: rank 1 failed: {reason}" in stderr[0].splitlines(), \
        stderr[0][-3000:]
    # The workers' statuses in torchrun's report; no worker's traceback, no torn connection.
    assert "(exitcode: 6)" in stderr[0] and "(exitcode: 2)" in stderr[1]
    for err in stderr:
        assert "[rank" not in err and "Connection closed" not in err, err[-3000:]

# ---------------------------------------------------------------- kills of convert

def image_tree(root: Path, per_class: dict[str, int], size: int = 12) -> Path:
    """An ImageFolder tree root/{train,val}/<class>/<i>.png of flat grey images."""
    for split in ("train", "val"):
        for label, (name, n) in enumerate(per_class.items()):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.full((size, size, 3), 40 * label + i, np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def convert_params(folder: Path, tree: Path, cores: int = 2, **data) -> Path:
    return write_params(folder, repo_params(data={
        "source": "imagefolder", "imagefolder_root": str(tree), **data},
        machine=machine(1, cores=cores)))


# The convert stage with FFCV's writer blocking on one image: a kill that lands
# mid-write, with the writer processes and the resource tracker alive.
BLOCK_IN_WRITER = """
import os, runpy, sys, time
from pathlib import Path
from barlow.data import convert
marker, block_at, get = Path(sys.argv[1]), int(sys.argv[2]), convert._Samples.__getitem__
def blocking(self, i):
    if i == block_at:
        marker.write_text(str(os.getpid()))
        time.sleep(3600)
    return get(self, i)
convert._Samples.__getitem__ = blocking
sys.argv = ["stages.convert", *sys.argv[3:]]
runpy.run_module("stages.convert", run_name="__main__")
"""


def test_kill9_of_convert_leaves_no_process_and_the_rerun_no_debris(tmp_path, spawn):
    tree = image_tree(tmp_path / "tree", {"a": 20, "b": 20})
    params = convert_params(tmp_path, tree)
    out = tmp_path / "ffcv"
    args = ["dataset", "--params", str(params), "--out", str(out)]
    (block_at,) = kill_points("kill9_convert", range(40), 1)
    marker = tmp_path / "blocked"
    proc = spawn([sys.executable, "-c", BLOCK_IN_WRITER, str(marker), str(block_at), *args])
    wait_until(proc, marker.exists, "the writer blocking")
    children = psutil.Process(proc.pid).children(recursive=True)
    spawn.adopt(children)
    assert any("resource_tracker" in " ".join(p.cmdline()) for p in children), children
    proc.kill()  # kill -9 of the stage's process alone, as a user's kill does
    assert proc.wait(timeout=HANG_S) == -signal.SIGKILL
    assert_all_end(children, "the writer processes and the resource tracker")
    assert (out / ".train.beton.partial").is_file()  # found by name by the rerun
    result = CliRunner().invoke(convert.cli, args)
    assert result.exit_code == 0, result.output + result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        f"{split}.{ext}" for split in ("test", "train") for ext in ("beton", "files.txt", "json")]


# ---------------------------------------------------------------- outputs DVC owns

def covered(path: str, outs: list) -> bool:
    """Whether dvc.yaml ``outs`` (strings or {path: options}) include ``path``."""
    names = [o if isinstance(o, str) else next(iter(o)) for o in outs]
    return any(path == name or path.startswith(name.rstrip("/") + "/") for name in names)


def test_every_file_convert_writes_is_a_dvc_output(tmp_path):
    """DVC removes a stage's outputs before it reruns and restores them together; a
    file the stage writes undeclared (the ImageFolder file lists) can outlive the data
    it describes."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["convert"]
    out_arg = stage["cmd"].split("--out ")[1].split()[0]
    tree = image_tree(tmp_path / "tree", {"a": 3, "b": 3})
    result = CliRunner().invoke(convert.cli, ["dataset", "--params",
                                              str(convert_params(tmp_path, tree, cores=1)),
                                              "--out", str(tmp_path / "repo" / out_arg)])
    assert result.exit_code == 0, result.output + result.stderr
    written = [p.relative_to(tmp_path / "repo").as_posix()
               for p in (tmp_path / "repo").rglob("*") if p.is_file()]
    assert "data/ffcv/train.files.txt" in written
    assert [p for p in written if not covered(p, stage["outs"])] == []


# ---------------------------------------------------------------- bad input, one line

def run_pretrain(params: Path, data: Path, run: Path):
    return CliRunner().invoke(pretrain.main, ["--params", str(params), "--data", str(data),
                                              "--out", str(run / "out"),
                                              "--live", str(run / "live")])


def assert_refused(result, run: Path, line: str) -> None:
    assert (result.exit_code, result.stderr) == (2, f"pretrain: error: {line}\n"), result.stderr
    assert not (run / "out").exists() and not (run / "live").exists()


@pytest.mark.parametrize("section, change, message", [
    ("loss", {"lambd": -0.1}, "loss.lambd: -0.1 is negative"),
    ("loss", {"lamda": 0.1}, "loss.lamda: unknown key (known keys: lambd, normalization,"
     " variant)"),
    ("loss", {"normalization": "layer"}, "loss.normalization: 'layer' is not one of"
     " ['batch', 'feature', 'none']"),
    ("loss", {"variant": "both"}, "loss.variant: 'both' is not one of"
     " ['full', 'invariance', 'redundancy']"),
    ("model", {"projector_bn": "no"}, "model.projector_bn: expected true or false, got 'no'"),
    ("augment", {"grayscale_p": 1.2}, "augment.grayscale_p: 1.2 is not a probability in [0, 1]"),
    ("augment", {"blur_p": [1.0, -0.1]}, "augment.blur_p[1]: -0.1 is not a probability in [0, 1]"),
    ("pretrain", {"batch_size": "big"}, "pretrain.batch_size: expected an integer, got 'big'"),
    ("pretrain", {"weight_decay": "1.5e-6"}, "pretrain.weight_decay: expected a number, got the"
     " string '1.5e-6' (write numbers unquoted, e.g. 1.0e-3)"),
    ("pretrain", {"optimizer": "adam"}, "pretrain.optimizer: 'adam' is not one of"
     " ['lars', 'sgd', 'adamw']"),
    ("model", {"arch": "vit"}, "model.arch: 'vit' is not one of ['resnet50', 'small_resnet']"),
    ("model", {"projector": "512-x"}, "model.projector: projector sizes '512-x': expected"
     " positive integers joined by '-', e.g. '8192-8192-8192'"),
    # Non-finite numbers: refused by the one type check every float goes through.
    ("loss", {"lambd": float("inf")}, "loss.lambd: inf is not finite"),
    ("loss", {"lambd": float("nan")}, "loss.lambd: nan is not finite"),
    ("pretrain", {"lr_weights": float("inf")}, "pretrain.lr_weights: inf is not finite"),
    ("pretrain", {"warmup_epochs": -float("inf")}, "pretrain.warmup_epochs: -inf is not finite"),
])
def test_bad_params_stop_before_any_work(tmp_path, tiny_ffcv, section, change, message):
    params = write_params(tmp_path, {**PARAMS, section: {**PARAMS[section], **change}})
    assert_refused(run_pretrain(params, tiny_ffcv, tmp_path), tmp_path, f"params: {message}")


def test_a_number_beyond_float_range_is_not_finite(tmp_path, tiny_ffcv):
    """1e400 reads as inf (YAML 1.2 floats, as DVC writes them)."""
    params = write_params(tmp_path, PARAMS)
    params.write_text(params.read_text().replace("lambd: 0.0051", "lambd: 1e400"))
    assert_refused(run_pretrain(params, tiny_ffcv, tmp_path), tmp_path,
                   "params: loss.lambd: inf is not finite")


def test_an_unknown_section_is_refused(tmp_path, tiny_ffcv):
    """`los:` for `loss:` was ignored, and the loss section's defaults used."""
    params = write_params(tmp_path, {**{k: v for k, v in PARAMS.items() if k != "loss"},
                                     "los": PARAMS["loss"]})
    assert_refused(run_pretrain(params, tiny_ffcv, tmp_path), tmp_path,
                   f"params: los: unknown section in {params} (known sections: data, loss,"
                   " model, augment, pretrain, semisup, linear, transfer, machine, report)")


def test_a_missing_key_is_refused_not_defaulted(tmp_path, tiny_ffcv):
    """A missing pretrain.epochs used to take the paper's 1000."""
    pre = {k: v for k, v in PARAMS["pretrain"].items() if k != "epochs"}
    params = write_params(tmp_path, {**PARAMS, "pretrain": pre})
    assert_refused(run_pretrain(params, tiny_ffcv, tmp_path), tmp_path,
                   "params: pretrain.epochs: missing (params.yaml must hold every key)")


def test_missing_dataset_is_named(params_file, tmp_path):
    assert_refused(run_pretrain(params_file, tmp_path / "nodata", tmp_path), tmp_path,
                   f"{tmp_path / 'nodata' / 'train.beton'}: FFCV dataset not found"
                   " (run the convert stage)")


@pytest.mark.parametrize("damage, message", [
    ("flip", "sha256 differs from its manifest's beton_sha256"),
    ("truncate", "bytes do not match its header (truncated or appended to?)"),
    ("append", "bytes do not match its header (truncated or appended to?)"),
])
def test_a_beton_changed_since_convert_is_refused(params_file, tiny_ffcv, tmp_path, damage,
                                                  message):
    """Outside DVC nothing else compares the file with its manifest."""
    data = shutil.copytree(tiny_ffcv, tmp_path / "data")
    beton = data / "train.beton"
    blob = bytearray(beton.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0xFF  # a byte of image data: same size, same header
    elif damage == "truncate":
        del blob[-10:]
    else:
        blob += b"\0" * 7
    beton.write_bytes(bytes(blob))
    result = run_pretrain(params_file, data, tmp_path)
    size = f"{len(blob)} " if damage != "flip" else ""
    assert_refused(result, tmp_path, f"{beton}: {size}{message}: changed since the convert"
                   " stage wrote it; re-run the convert stage")


def test_foreign_checkpoint_is_refused_by_the_stage(params_file, tiny_ffcv, tmp_path):
    """An interrupted run's checkpoint made with other params: exit 2, keys named."""
    (tmp_path / "out").mkdir()
    torch.save({"config": {"loss": {"lambd": 0.5}}, "fingerprint": "other", "finished": False},
               tmp_path / "out" / "checkpoint.pt")
    result = run_pretrain(params_file, tiny_ffcv, tmp_path)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith(f"pretrain: error: {tmp_path / 'out' / 'checkpoint.pt'}:"
                                    " made with another config; differing keys: ")
    assert "loss.lambd: 0.5 != 0.0051" in result.stderr
    assert not (tmp_path / "live").exists()


def test_a_class_left_empty_by_skip_bad_is_refused(tmp_path):
    """data.skip_bad drops a class's only image: the class would be kept with none."""
    tree = image_tree(tmp_path / "tree", {"a": 3, "b": 1})
    (tree / "train" / "b" / "0.png").write_bytes(b"not a png")
    params = convert_params(tmp_path, tree, skip_bad=True, cores=1)
    result = CliRunner().invoke(convert.cli, ["dataset", "--params", str(params),
                                              "--out", str(tmp_path / "ffcv")])
    assert (result.exit_code, result.stderr) == (2, (
        f"convert: error: imagefolder:{tree / 'train'} train: no images of class b"
        " (1 skipped by data.skip_bad)\n")), result.stderr
    assert not list((tmp_path / "ffcv").glob("*"))


def unraisable_from(filename: str, error: type[Exception]):
    """What sys.unraisablehook receives when a weakref finalizer named ``finalizer``,
    compiled as if it lived in ``filename``, raises ``error`` (as numba's dispatcher
    finalizer does when the garbage collector frees a compiled FFCV pipeline)."""
    scope: dict = {}
    exec(compile(f"def finalizer():\n    raise {error.__name__}('key')\n", filename, "exec"),
         scope)
    seen, hook = [], sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        owner = type("Owner", (), {})()
        weakref.finalize(owner, scope["finalizer"])
        del owner
    finally:
        sys.unraisablehook = hook
    (args,) = seen
    return args


def test_numbas_finalizer_key_error_is_dropped_and_every_other_printed(capsys):
    """The stages' unraisable hook drops the KeyError of numba's dispatcher finalizer
    (a harmless traceback that `transfer` printed mid-run) and passes every other
    unraisable error, another file's or another type's, to Python's hook."""
    from barlow.stage import _unraisable, numba_finalizer_error
    numba = str(Path("site-packages") / "numba" / "core" / "dispatcher.py")
    cases = {"numba's KeyError": unraisable_from(numba, KeyError),
             "numba's ValueError": unraisable_from(numba, ValueError),
             "another file's KeyError": unraisable_from(str(REPO / "x.py"), KeyError)}
    assert [numba_finalizer_error(args) for args in cases.values()] == [True, False, False]
    for args in cases.values():
        _unraisable(args)
    printed = capsys.readouterr().err
    assert printed.count("Exception ignored") == 2
    assert "ValueError: key" in printed and "KeyError: 'key'" in printed


def test_a_non_finite_metric_is_refused_and_leaves_no_metrics(tmp_path, capsys):
    """Every stage logs through barlow.stage.open_live: a NaN figure (a diverged head,
    say) stops the stage with one line and status 3, and the metrics written so far
    are removed, so nothing that looks like a result is left."""
    from barlow import distributed as dist
    from barlow.stage import open_live, run_stage

    env = dist.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(SystemExit) as exit_info, run_stage("linear"):
        live = open_live(tmp_path / "live", env)
        live.step = 0
        live.log_metric("linear/barlow/top1", 50.0)
        live.next_step()
        assert (tmp_path / "live" / "metrics.json").is_file()
        live.log_metric("linear/barlow/top1", float("nan"))
    assert exit_info.value.code == 3
    assert capsys.readouterr().err.strip() == (
        "linear: error: metric linear/barlow/top1 is nan; no metrics were kept")
    assert not (tmp_path / "live" / "metrics.json").exists()


# ---------------------------------------------------------------- crafted files, no work, full disks

class RunsCode:
    """Pickled as a call of open(marker, "w"): the marker file appears if and only if
    loading the pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_checkpoint_runs_no_code(params_file, tiny_ffcv, tmp_path):
    """A checkpoint.pt in the output folder (dvc pull, a copied run folder) is read as
    data only, by the stage and by the report alike: refused unread, exit 2."""
    from barlow.checkpoint import CheckpointError
    from barlow.report.crosscorr import checkpoint_models

    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "out" / "checkpoint.pt"
    ckpt.parent.mkdir()
    torch.save({"model": RunsCode(marker), "config": {}, "finished": False}, ckpt)
    result = run_pretrain(params_file, tiny_ffcv, tmp_path)
    assert not marker.exists()
    assert (result.exit_code, result.stderr) == (2, (
        f"pretrain: error: {ckpt}: holds objects other than tensors and plain containers,"
        " which could run code as they are rebuilt; refused unread (expected a pretraining"
        " checkpoint of this project). Delete it to start over\n")), result.stderr
    assert not (tmp_path / "live").exists()
    with pytest.raises(CheckpointError, match="refused unread"):
        checkpoint_models(ckpt)
    assert not marker.exists()


def test_a_batch_larger_than_the_training_set_is_refused(tmp_path, tiny_ffcv):
    """With whole batches only (drop_last) an epoch of 64 images has no step of 128:
    the run trained nothing and exported its initial weights with exit 0."""
    params = write_params(tmp_path, {**PARAMS, "pretrain": {**PARAMS["pretrain"],
                                                            "batch_size": 128}})
    assert_refused(run_pretrain(params, tiny_ffcv, tmp_path), tmp_path,
                   f"params: pretrain.batch_size: 128 exceeds the 64 images of"
                   f" {tiny_ffcv / 'train.beton'}: an epoch would take no step (128 per"
                   " process x 1 process(es), whole batches only)")


@pytest.fixture
def no_jit():
    """Pipelines as plain Python in this process: seconds instead of a numba compile."""
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(True)


def test_a_full_disk_is_one_line_and_keeps_the_checkpoint(params_file, tiny_ffcv, tmp_path,
                                                          no_jit):
    """The first checkpoint write (step 3) meets a full disk: exit 5, one line naming the
    file and the bytes it needed, no partial file, no backbone. The full disk is
    /dev/full, which the kernel answers with ENOSPC on every write, as a full file
    system does: the partial file's fixed name is a link to it (no root needed, no
    write is mocked)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".checkpoint.pt.partial").symlink_to("/dev/full")
    result = run_pretrain(params_file, tiny_ffcv, tmp_path)
    assert result.exit_code == 5, result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"pretrain: error: {out / 'checkpoint.pt'}: cannot write:"
                                    " no space left on the device: needs ")
    needed = int(result.stderr.split("needs ")[1].split(" bytes")[0].replace(",", ""))
    assert needed > 10_000  # the tiny model, its optimiser state and the history
    assert list(out.iterdir()) == []


def test_a_refused_write_leaves_the_previous_file_whole(tmp_path):
    """save_atomic, the atomic write of every checkpoint and backbone, on a full disk
    (/dev/full, as above): the bytes needed are those torch.save writes."""
    from barlow.checkpoint import save_atomic
    from barlow.errors import WriteRefused

    path = tmp_path / "checkpoint.pt"
    save_atomic({"step": torch.tensor(1)}, path)
    before = path.read_bytes()
    (tmp_path / ".checkpoint.pt.partial").symlink_to("/dev/full")
    state = {"step": torch.tensor(2), "model": torch.zeros(1000)}
    with pytest.raises(WriteRefused) as refused:
        save_atomic(state, path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert str(refused.value).startswith(f"{path}: cannot write: no space left on the device:"
                                         f" needs {len(buffer.getvalue()):,} bytes, ")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_saved_file_holds_the_bytes_earlier_exports_held(tmp_path):
    """save_atomic saves by file name, as the exports DVC hashed in dvc.lock were: torch
    names the archive's inner folder after the file, so the same weights give the same
    bytes (a file object would name it "archive", and every hash would move)."""
    import zipfile

    from barlow.checkpoint import save_atomic

    state = {"conv1.weight": torch.arange(12.0).reshape(3, 4)}
    save_atomic(state, tmp_path / "backbone.pt")
    (tmp_path / "earlier").mkdir()
    torch.save(state, tmp_path / "earlier" / ".backbone.pt.partial")
    assert (tmp_path / "backbone.pt").read_bytes() == \
        (tmp_path / "earlier" / ".backbone.pt.partial").read_bytes()
    assert zipfile.ZipFile(tmp_path / "backbone.pt").namelist()[0] == ".backbone.pt/data.pkl"

