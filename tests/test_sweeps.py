"""Sweeps on every device (barlow.device_pool, docs/experiments.md): claims that exclude
each other, and two queued experiments run at once by DVC's real queue on two fake
devices, each on its own, sharing the cache's .betons."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from barlow import device_pool
from barlow.config import merge_params
from conftest import REPO, TINY_PARAMS
from test_workflow import ENV, dvc, git, image_tree


def test_claims_take_free_ids_in_order_and_exclude_each_other(tmp_path):
    """Each lock is an open file: a second open of the same id is refused, even in the
    same process, until the holder closes it."""
    first = device_pool.try_claim(["a", "b"], tmp_path)
    second = device_pool.try_claim(["a", "b"], tmp_path)
    assert (first, second) == ("a", "b")
    assert device_pool.try_claim(["a", "b"], tmp_path) is None
    os.close(device_pool._held.pop(0))  # "a"'s holder ends
    assert device_pool.try_claim(["a", "b"], tmp_path) == "a"
    while device_pool._held:
        os.close(device_pool._held.pop())


@pytest.mark.slow
def test_a_killed_holder_frees_its_device(tmp_path):
    env = {**ENV, device_pool.POOL: "7", device_pool.LOCKS: str(tmp_path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from barlow import device_pool; "
         "device_pool.claim('t'); time.sleep(60)"],
        env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == f"t: on device 7 of {device_pool.POOL}\n"
    assert device_pool.try_claim(["7"], tmp_path) is None
    holder.kill()
    holder.wait()
    assert device_pool.try_claim(["7"], tmp_path) == "7"
    os.close(device_pool._held.pop())


def flock_holders(paths: list[Path]) -> dict[Path, int]:
    """Which of ``paths`` some process holds a flock on, and its pid, as /proc/locks
    lists them: read without taking a lock, so the stages' claims are not disturbed."""
    inodes = {}
    for path in paths:
        if path.exists():
            st = path.stat()
            inodes[f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"] = path
    held = {}
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "FLOCK" and fields[-3] in inodes:
            held[inodes[fields[-3]]] = int(fields[-4])
    return held


@pytest.mark.slow
def test_two_queued_experiments_run_at_once_each_on_its_own_device(tmp_path):
    """The project's convert and pretrain stages in a throw-away repository, convert
    committed; two experiments queued (pretrain.seed 0 and 1) and started with
    `dvc queue start -j 2` under BARLOW_DEVICE_POOL=0,1. While they run, both devices
    are held at once by two processes, and every experiment workspace's .betons are
    the cache's own files (one inode: no second copy); at the end both succeeded and
    `dvc exp show` lists each with the device it claimed, two different ones."""
    repo, locks = tmp_path / "repo", tmp_path / "locks"
    env = {**ENV, "HOME": str(tmp_path / "home"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    # 6 training images, 1 step of 4 per epoch: seconds of training, long enough to
    # overlap.
    images = image_tree(tmp_path / "images")
    repo.mkdir()
    for part in ("src", "stages"):
        shutil.copytree(REPO / part, repo / part, ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(
        {"stages": {name: stages[name] for name in ("convert", "pretrain")}}))
    params = merge_params(TINY_PARAMS, {
        "data": {"source": "imagefolder", "imagefolder_root": str(images)},
        "augment": {"resolution": 8},
        "pretrain": {"epochs": 40, "batch_size": 4, "knn_every_epochs": 0},
        "machine": {"devices": "auto"}})
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    git("init", "-q", cwd=repo)
    dvc("init", "-q", cwd=repo, env=env)
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    dvc("repro", "convert", cwd=repo, env=env)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "pipeline, converted", cwd=repo)
    dvc("exp", "run", "--queue", "-S", "pretrain.seed=0,1", "pretrain", cwd=repo, env=env)

    beton = repo / "data/ffcv/train.beton"
    cached = beton.stat().st_ino
    pool_env = {**env, device_pool.POOL: "0,1", device_pool.LOCKS: str(locks)}
    # Its workers are daemons that keep its stdout: a pipe (dvc()'s) would be read until
    # they end, after both experiments.
    with open(tmp_path / "queue-start.log", "w") as log:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], cwd=repo,
                       env=pool_env, stdout=log, stderr=subprocess.STDOUT, check=True)
    # Watched every 50 ms, while `dvc queue status` (seconds of CPU) runs beside.
    together, workspaces, deadline = None, {}, time.monotonic() + 600
    status, next_status = None, 0.0
    while time.monotonic() < deadline:
        held = flock_holders([locks / "0.lock", locks / "1.lock"])
        if len(held) == 2 and len(set(held.values())) == 2:
            together = held
        for path in (repo / ".dvc/tmp/exps").glob("*/data/ffcv/train.beton"):
            try:
                workspaces[path.parents[2]] = path.stat().st_ino
            except FileNotFoundError:  # the workspace was removed between glob and stat
                pass
        if status is None and time.monotonic() > next_status:
            status = subprocess.Popen([sys.executable, "-m", "dvc", "queue", "status"],
                                      cwd=repo, env=env, stdout=subprocess.PIPE, text=True)
        elif status is not None and status.poll() is not None:
            queue = status.stdout.read()
            if "Queued" not in queue and "Running" not in queue:
                break
            status, next_status = None, time.monotonic() + 3
        time.sleep(0.05)
    assert queue.count("Success") == 2, queue
    assert together is not None, "the two experiments never held both devices at once"
    assert len(workspaces) == 2 and set(workspaces.values()) == {cached}, (workspaces, cached)

    shown = json.loads(dvc("exp", "show", "--json", cwd=repo, env=env))
    runs = {p["pretrain"]["seed"]: m["device"] for rev in shown
            for exp in rev.get("experiments") or [] for run in exp["revs"]
            for p in [run["data"]["params"]["params.yaml"]["data"]]
            for m in [run["data"]["metrics"]["dvclive/pretrain/metrics.json"]["data"]]}
    assert sorted(runs) == [0, 1] and sorted(runs.values()) == ["0", "1"], runs
    table = dvc("exp", "show", "--no-pager", "--csv", cwd=repo, env=env)
    assert "device" in table.splitlines()[0]
