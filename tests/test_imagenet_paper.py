"""The paper's switch end to end, as a user runs it: in a fresh git copy of this
repository, ``dvc exp run`` with configs/paper.yaml's arguments (scripts/params_args.py)
plus size-only overrides, on an ImageNet-shaped tree (tests/imagenet_tree.py) with
SimCLR's vendored lists cut to its classes. Every stage runs: convert (ImageFolder),
convert_transfer, pretrain (ResNet-50, LARS, 2 gloo processes, 2 steps), linear in
augment mode, semisup on 1% and 10%, transfer, report; ``dvc exp show`` must then list
the metrics of every stage.

Marked ``paper_e2e`` (the longest test of the suite, ResNet-50 on CPU): run it with
``python -m pytest -m paper_e2e tests/test_imagenet_paper.py`` (docs/imagenet.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from barlow.data.subsets import VAL_PER_CLASS
from imagenet_tree import make_tree, sample_synsets

REPO = Path(__file__).resolve().parents[1]
CLASSES = 2
VAL_IMAGES = 4          # per class in val/ (the test split)
# Only sizes change: resolution, epochs, batches, projector width, bank and report
# sizes. Everything else is configs/paper.yaml's, and the one override of a one-GPU
# machine (one process per stage; on this CPU the same as machine.devices: auto).
SIZE_OVERRIDES = {
    "machine.devices": 1,
    "model.projector": "64-64-64",
    # 32 px, not less: at 16 px ResNet-50's layer4 sees 1x1 maps, where PyTorch's bf16
    # CPU convolution gives Inf weight gradients (the paper's precision is bf16).
    "augment.resolution": 32,
    "pretrain.epochs": 1,
    "pretrain.warmup_epochs": 1.0,
    "pretrain.checkpoint_every_steps": 1,
    "pretrain.log_every_steps": 1,
    "pretrain.knn_every_epochs": 1,
    "pretrain.knn_k": 5,
    "pretrain.knn_bank_size": 64,
    "linear.epochs": 1,
    "linear.batch_size": 64,
    "linear.extract_batch_size": 128,
    "semisup.epochs": "[1,1]",
    "semisup.batch_size": 64,
    "semisup.eval_batch_size": 128,
    "semisup.resolution": 32,
    "transfer.epochs": 1,
    "transfer.extract_batch_size": 256,
    "transfer.svm_costs": "[0.1,1.0]",
    "transfer.svm_folds": 2,
    "transfer.svm_max_iter": 50,
    "report.cc_images": 8,
    "report.cc_batch_size": 8,
    "report.cc_block": 8,
}


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{cmd[:3]}: {result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def fresh_copy(dest: Path, env: dict) -> None:
    """This checkout's files as git sees them (committed, modified, new but not
    ignored), copied to ``dest`` and committed there: a clone of the working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        run(cmd, dest, env)


@pytest.mark.paper_e2e
@pytest.mark.timeout(2400)  # 7.5-13.5 min measured on 2 shared cores
def test_paper_switch_runs_every_stage_through_dvc(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "NUMBA_THREADING_LAYER": "workqueue"}
    repo = tmp_path / "repo"
    fresh_copy(repo, env)
    # The ImageNet folder a user would give, and the vendored lists cut to its classes.
    tree = tmp_path / "imagenet"
    names = make_tree(tree, sample_synsets(CLASSES), spare=VAL_PER_CLASS + 1,
                      val_per_class=VAL_IMAGES, subsets_out=repo / "data/subsets/imagenet")
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam",
         "lists cut to the test tree's classes"], repo, env)
    images = sum(len(v) for v in names.values())

    switch = run([sys.executable, "scripts/params_args.py", "configs/paper.yaml"], repo,
                 env).split()
    sizes = {**SIZE_OVERRIDES, "data.imagefolder_root": str(tree),
             # Two steps of one epoch.
             "pretrain.batch_size": images // 4 * 2}
    args = switch + [f"--set-param={k}={v}" for k, v in sizes.items()]
    run(["dvc", "exp", "run", "-n", "paper-tiny", *args], repo, env, timeout=1800)

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env))
    exp = next(r for e in shown for x in (e.get("experiments") or [])
               for r in x["revs"] if r.get("name") == "paper-tiny")
    metrics = {path: m["data"] for path, m in exp["data"]["metrics"].items()}
    pretrain = metrics["dvclive/pretrain/metrics.json"]["pretrain"]
    assert pretrain["epoch"] == 1.0 and "knn_top1" in pretrain
    linear = metrics["dvclive/linear/metrics.json"]["linear"]
    baselines = metrics["dvclive/linear_baselines/metrics.json"]["linear"]
    # The backbone's probe in `linear`; every baseline the switch lists, and no more (it
    # leaves out the raw-pixel baseline), in `linear_baselines`.
    paper = yaml.safe_load((REPO / "configs/paper.yaml").read_text())
    assert set(linear) == {"barlow"}
    assert set(baselines) == set(paper["linear"]["baselines"]) == {"random_init"}
    for stage, run_name in (("semisup", "barlow"), ("semisup_scratch", "scratch")):
        semisup = metrics[f"dvclive/{stage}/metrics.json"]["semisup"]
        assert set(semisup) == {"1percent", "10percent"}, stage
        assert all(set(semisup[s]) == {run_name} for s in semisup), stage
    for stage, names in (("transfer", {"barlow"}), ("transfer_baselines", {"random_init"})):
        transfer = metrics[f"dvclive/{stage}/metrics.json"]["transfer"]
        assert {"digits", "elpv"} <= set(transfer), stage
        assert set(transfer["digits"]["svm"]) == names, stage
    params = exp["data"]["params"]["params.yaml"]["data"]
    assert params["model"]["arch"] == "resnet50" and params["pretrain"]["optimizer"] == "lars"
    assert params["linear"]["mode"] == "augment"
    assert (repo / "reports/report.md").is_file()
    # The deps follow data.subsets_dir: DVC tracked the lists the stages read.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage in ("linear", "semisup", "linear_baselines", "semisup_scratch"):
        assert "data/subsets/imagenet" in [d["path"] for d in lock[stage]["deps"]], stage
