"""scripts/slurm/pretrain.sbatch run as SLURM runs it, on this machine: 2 "nodes" × 1
gloo process, through stand-ins for `srun` and `scontrol` that start real processes.

The stand-ins (written into a bin folder put first on PATH) do what the script needs
of SLURM: `srun` starts its command once per node, each a process of its own with
SLURM_NODEID and SLURM_PROCID set, passes SIGUSR1 and SIGTERM on to them, and exits
with their highest status; `scontrol show hostnames` names 127.0.0.1 once per node
(every "node" is this machine); `scontrol requeue` records the job id, and the test
then runs the script again, as SLURM would. The script's SLURM_SUBMIT_DIR is a folder
of links to this checkout, so the params file it writes stays in the test's folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO
from test_reliability import (ENV, HANG_S, STOP_PARAMS, assert_same_result, kill_points,
                              free_port, spawn, stop_mid_run, wait_until, write_params)

pytestmark = pytest.mark.slow

__all__ = ["spawn"]  # the fixture, imported for the tests below

SCRIPT = REPO / "scripts" / "slurm" / "pretrain.sbatch"
NODES = 2

SRUN = f"""#!{sys.executable}
# srun's stand-in: its own options (--name=value) dropped, the command run once per node.
import os, signal, subprocess, sys
args = sys.argv[1:]
while args[0].startswith("--"):
    args.pop(0)
nodes = [subprocess.Popen(args, start_new_session=True, env={{
    **os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i), "SLURM_LOCALID": "0"}})
    for i in range(int(os.environ["SLURM_NNODES"]))]
def forward(signum, frame):
    for node in nodes:
        node.send_signal(signum)
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, forward)
codes = [node.wait() for node in nodes]
sys.exit(max(code if code >= 0 else 128 - code for code in codes))
"""

SCONTROL = """#!/bin/bash
# scontrol's stand-in: every node is this machine.
case "$1 $2" in
    "show hostnames") for ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done ;;
    "requeue "*) echo "$2" >> "$REQUEUED" ;;
    *) echo "scontrol stand-in: $*: not handled" >&2; exit 1 ;;
esac
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Path:
    """A folder with bin/ (the stand-ins) and submit/ (this checkout, linked)."""
    root = tmp_path_factory.mktemp("cluster")
    (root / "bin").mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (root / "bin" / name).write_text(text)
        (root / "bin" / name).chmod(0o755)
    (root / "submit").mkdir()
    for name in ("params.yaml", "scripts", "src", "stages"):
        (root / "submit" / name).symlink_to(REPO / name)
    return root


def job_env(cluster: Path, job_id: int, data: Path, run: Path) -> dict[str, str]:
    """What SLURM gives a batch script of ``NODES`` nodes, and where it writes."""
    return {**ENV, "PATH": f"{cluster / 'bin'}{os.pathsep}{ENV['PATH']}",
            "SLURM_JOB_ID": str(job_id), "SLURM_NNODES": str(NODES),
            "SLURM_JOB_NODELIST": f"node[0-{NODES - 1}]",
            "SLURM_SUBMIT_DIR": str(cluster / "submit"), "MASTER_PORT": str(free_port()),
            "REQUEUED": str(run / "requeued"), "DATA": str(data),
            "OUT": str(run / "out"), "LIVE": str(run / "live")}


def batch(profile: Path) -> list[str]:
    # A profile and an override, as `sbatch pretrain.sbatch configs/paper.yaml key=value`.
    return ["bash", str(SCRIPT), str(profile), "pretrain.log_every_steps=1"]


def ranks(job: subprocess.Popen) -> dict[int, str]:
    """The job's torchrun workers (pid -> RANK)."""
    found = {}
    for proc in psutil.Process(job.pid).children(recursive=True):
        try:
            if "RANK" in (environ := proc.environ()):
                found[proc.pid] = environ["RANK"]
        except psutil.Error:  # ended meanwhile
            pass
    return found


def run_job(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=HANG_S)


def test_a_preempted_job_requeues_and_ends_as_an_uninterrupted_one(
        cluster, tiny_ffcv, tmp_path_factory, spawn):
    """SIGUSR1 to the batch script mid-run (SLURM's --signal=B:USR1 before the time
    limit): both nodes stop at one step, checkpointed, the script requeues the job, and
    the requeued run resumes and ends with the weights, curves and metrics of an
    uninterrupted 2-node job."""
    # Every key of the tiny run: params.yaml with it applied is the tiny run, but for the
    # override on the command line.
    profile = write_params(tmp_path_factory.mktemp("profile"),
                           {**STOP_PARAMS, "pretrain": {**STOP_PARAMS["pretrain"],
                                                        "log_every_steps": 2}})
    reference = tmp_path_factory.mktemp("reference")
    done = run_job(batch(profile), job_env(cluster, 1, tiny_ffcv, reference))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (reference / "requeued").exists()
    assert (cluster / "submit" / "slurm-1.params.yaml").is_file()

    run = tmp_path_factory.mktemp("preempted")
    env = job_env(cluster, 2, tiny_ffcv, run)
    proc = spawn(batch(profile), env)
    wait_until(proc, lambda: len(ranks(proc)) == NODES, "both nodes' workers")
    assert sorted(ranks(proc).values()) == ["0", "1"]
    processes = psutil.Process(proc.pid).children(recursive=True)
    spawn.adopt(processes)
    (target,) = kill_points("slurm_usr1", range(1, 6), 1)  # of 8 steps
    last = stop_mid_run(proc, processes, run, target, signal.SIGUSR1)
    assert proc.wait(timeout=HANG_S) == 4, proc.outputs[1].read_text()[-3000:]
    stderr = proc.outputs[1].read_text()
    assert "pretrain: stopped before the time limit; requeueing job 2" in stderr
    assert (run / "requeued").read_text() == "2\n"
    step = torch.load(run / "out" / "checkpoint.pt", weights_only=True)["step"]
    assert last <= step < 8
    assert not (run / "out" / "backbone.pt").exists()

    requeued = run_job(batch(profile), {**env, "SLURM_RESTART_COUNT": "1"})
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"pretrain: resumed from {run / 'out' / 'checkpoint.pt'}" in requeued.stdout
    assert (run / "requeued").read_text() == "2\n"  # not requeued again
    assert_same_result(reference, run)
