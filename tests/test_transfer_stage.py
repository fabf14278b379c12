"""transfer stage: an end-to-end run on two tiny transfer sets (one stored at 8 px, resized
to the model's input), every metric present and sane, and the errors a wrong weights
file, an unknown params key or a missing data set must give; the multi-label VOC07 path
on a synthetic devkit (SVMs only), and the VOC07 SVM protocol's mAP on multi-label
targets with difficult entries; an ImageFolder set of data.transfer_folders with its
own epochs (transfer.epochs_per_dataset)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from barlow.config import DataConfig, TransferConfig, load_section
from barlow.data import sources
from barlow.data.convert import FfcvSettings, write_beton
from barlow.data.sources import Source
from barlow.voc07 import voc07_svm_map, voc_devkit_targets
from barlow.models import build_backbone
from barlow.probe import SUMMARY_KEYS
from conftest import NO_JIT, REPO, in_signal_mask, live_files, machine, repo_params
from stages import transfer
EMBEDDINGS = ("barlow", "random_init", "raw_pixels")
EPOCHS = 6
MODEL = {"arch": "small_resnet", "width": 4, "layers": [1, 1, 1, 1]}


def stripes(split: str, n: int, side: int, seed: int) -> Source:
    """n side×side grey images in 3 classes: a bright horizontal band at a class-given
    height over dim noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = rng.integers(0, 50, (n, side, side, 3), dtype=np.uint8)
    band = side // 3
    for i, c in enumerate(labels):
        images[i, band * c:band * (c + 1)] += 180
    return Source("stripes", split, ["top", "middle", "bottom"], labels.astype(np.int64),
                  lambda i: images[i], "0" * 64)


@pytest.fixture(scope="module")
def setup(tiny_ffcv, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("transfer")
    for name, side in (("small", 8), ("large", 24)):
        for split, n, seed in (("train", 60, 0), ("test", 30, 1)):
            write_beton(stripes(split, n, side, seed), root / "data" / f"{name}_{split}.beton",
                        FfcvSettings("raw"), 1)
    torch.manual_seed(1)
    backbone, _ = build_backbone(MODEL["arch"], MODEL["width"], MODEL["layers"])
    torch.save(backbone.state_dict(), root / "backbone.pt")
    return {"root": root, "pretrain": tiny_ffcv, "weights": root / "backbone.pt"}


def stage_args(setup: dict, tmp: Path, weights: Path | None = None, data: dict | None = None,
               devices: int = 1, run: str = "backbone", **transfer_overrides) -> list[str]:
    """The stage's command-line arguments, after writing its params file into ``tmp``:
    run "backbone" (--weights, into tmp/live) or "baselines" (into tmp/live_baselines)."""
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(repo_params(
        model=MODEL, augment={"resolution": 16}, data=data or {}, machine=machine(devices),
        transfer={"datasets": ["small", "large"], "epochs": EPOCHS, "batch_size": 16,
                  "lr": 0.05, "crop_ratio": 1.0, "svm_costs": [0.1, 10.0], "svm_folds": 2,
                  "extract_batch_size": 32, **transfer_overrides})))
    args = ["--params", str(params), "--data", str(setup["root"] / "data"),
            "--pretrain-data", str(setup["pretrain"]),
            *(["--weights", str(weights or setup["weights"])] if run == "backbone"
              else ["--baselines"]), "--live", str(tmp / LIVE[run])]
    return args


LIVE = {"backbone": "live", "baselines": "live_baselines"}


def invoke(setup: dict, tmp: Path, weights: Path | None = None, data: dict | None = None,
           run: str = "backbone", **transfer_overrides):
    return CliRunner().invoke(transfer.main, stage_args(setup, tmp, weights, data, run=run,
                                                        **transfer_overrides))


def merged(*trees: dict) -> dict:
    """Nested metrics trees merged key by key (the backbone's and the baselines')."""
    out: dict = {}
    for tree in trees:
        for key, value in tree.items():
            out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def invoke_both(setup: dict, tmp: Path, **kwargs) -> dict:
    """The backbone's run and the baselines' (the `transfer` and `transfer_baselines`
    stages), each checked to succeed: their outputs, and metrics per run and merged."""
    out: dict = {"outputs": {}, "runs": {}}
    for run in LIVE:
        result = invoke(setup, tmp, run=run, **kwargs)
        assert result.exit_code == 0, result.output + result.stderr + repr(result.exception)
        out["outputs"][run] = result.output
        out["runs"][run] = json.loads(
            (tmp / LIVE[run] / "metrics.json").read_text())["transfer"]
    out["metrics"] = merged(*out["runs"].values())
    out["output"] = "".join(out["outputs"].values())
    return out


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("transfer_run")
    return {**invoke_both(setup, tmp), "tmp": tmp}


@pytest.mark.slow
def test_every_metric_is_reported_and_sane(finished):
    metrics = finished["metrics"]
    assert set(metrics) == {"small", "large"}
    for dataset in ("small", "large"):
        assert set(metrics[dataset]) == {"linear", "svm"}
        assert set(metrics[dataset]["linear"]) == set(EMBEDDINGS)
        assert set(metrics[dataset]["svm"]) == set(EMBEDDINGS)
        for name in EMBEDDINGS:
            m = metrics[dataset]["linear"][name]
            assert set(SUMMARY_KEYS) <= set(m), f"{dataset}/{name}: {sorted(m)}"
            assert m["best_epoch"] in range(EPOCHS)
            for when in ("best", "last"):
                # Top-5 of 3 classes is top-3 (k capped at the class count): every image.
                assert m[f"top5_{when}"] == 100.0
            # Chance is 1/3 for top-1 and, per class, for AP (a third of the images are
            # positive). Measured with a random-init "barlow": top-1 >= 80, mAP >= 94.
            # A head or SVM fed features misaligned with their labels sits near chance.
            assert m["top1_best"] >= 60.0, (dataset, name, m["top1_best"])
            assert metrics[dataset]["svm"][name]["map"] >= 60.0, (dataset, name)
        # The band position is plain in the pixels: raw pixels must find it.
        assert metrics[dataset]["linear"]["raw_pixels"]["top1_best"] >= 80.0
        assert metrics[dataset]["svm"]["raw_pixels"]["map"] >= 90.0
    assert "transfer: large raw_pixels: linear top-1" in finished["output"]


@pytest.mark.slow
def test_each_run_writes_only_its_own_embeddings(finished):
    """--weights: the backbone's figures alone; --baselines: transfer.baselines' alone,
    under the same metric names."""
    for run, names in (("backbone", {"barlow"}), ("baselines", {"random_init", "raw_pixels"})):
        metrics = finished["runs"][run]
        for dataset in ("small", "large"):
            assert set(metrics[dataset]["linear"]) == names, run
            assert set(metrics[dataset]["svm"]) == names, run
        plots = finished["tmp"] / LIVE[run] / "plots" / "metrics" / "transfer" / "small" / "linear"
        assert {p.name for p in plots.iterdir()} == names, run


@pytest.mark.slow
def test_two_processes_under_torchrun_give_the_same_metrics(setup, finished, tmp_path):
    """Two gloo ranks (torchrun started directly, as on several nodes) extract a share of every split each, gather
    the features in one-process order and fit the same heads and SVMs on them: every
    metric equals the one-process run's, and rank 0 alone prints. The baselines' run:
    two embeddings, the raw pixels' SVMs the slowest to agree."""
    env = {**os.environ, **NO_JIT, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "stages.transfer", *stage_args(setup, tmp_path, devices=2, run="baselines")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "live_baselines" / "metrics.json").read_text())["transfer"]
    assert metrics == finished["runs"]["baselines"]
    assert result.stdout.count("transfer: large raw_pixels: linear top-1") == 1


@pytest.mark.slow
def test_a_stop_signal_ends_the_run_between_sub_runs_and_the_rerun_equals_uninterrupted(
        setup, tmp_path):
    """SIGTERM to the stage's command at the first step of its second sub-run's probe
    (small × raw_pixels, with --baselines): that sub-run finishes (probe and SVMs), the
    stage stops before the third (large × random_init) with exit 4 and one line,
    LIVE/checkpoint.pt written. The rerun logs the two sub-runs done again without
    building the small set's loaders, runs the other two, and ends with the dvclive
    files of an uninterrupted run byte for byte, and no checkpoint left."""
    env = {**os.environ, **NO_JIT, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}

    def run(tmp: Path, stop_at_step: int | None = None) -> subprocess.CompletedProcess:
        tmp.mkdir(exist_ok=True)
        hook = ({"PYTHONPATH": f"{REPO / 'tests' / 'stop_at_step'}:{REPO / 'src'}",
                 "STOP_AT_STEP": str(stop_at_step)} if stop_at_step else {})
        return subprocess.run([sys.executable, "-m", "stages.transfer",
                               *stage_args(setup, tmp, run="baselines")], cwd=REPO,
                              env={**env, **hook}, capture_output=True, text=True, timeout=600)

    reference = run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    # A probe's steps: 48 training rows (60 less the stratified 20 % that choose the
    # epoch) in batches of 16, EPOCHS times.
    stopped = run(tmp_path / "stopped", stop_at_step=EPOCHS * 3 + 1)
    live = tmp_path / "stopped" / LIVE["baselines"]
    assert stopped.returncode == 4, stopped.stderr[-3000:]
    assert [line for line in stopped.stderr.splitlines() if "stopped" in line] == [
        f"transfer: stopped on request in transfer/large/random_init at its start;"
        f" {live / 'checkpoint.pt'} holds it, the next run resumes there"]
    assert (live / "checkpoint.pt").is_file()
    resumed = run(tmp_path / "stopped")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"transfer: resumed from {live / 'checkpoint.pt'}: 2 run(s) done" in resumed.stdout
    redone = resumed.stdout + resumed.stderr
    assert "transfer/small/linear/random_init train features" not in redone
    assert "transfer/small/svm" not in redone
    assert live_files(live) == live_files(tmp_path / "reference" / LIVE["baselines"])
    assert not (live / "checkpoint.pt").exists()


@pytest.mark.slow
def test_a_baseline_this_machine_cannot_hold_is_refused_before_any_work(setup, tmp_path):
    """raw_pixels at a resolution r whose small set's 60 + 30 rows of 3·r² float32
    pixels exceed this machine's whole memory: one line naming transfer.baselines and
    the set, exit 2, before any feature is extracted or output written."""
    r = math.isqrt(psutil.virtual_memory().total // (90 * 3 * 4)) + 1
    args = stage_args(setup, tmp_path, run="baselines", baselines=["raw_pixels"])
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["augment"]["resolution"] = r
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(transfer.main, args)
    assert result.exit_code == 2, result.output + result.stderr
    assert result.stderr.startswith(
        "transfer: error: params: transfer.baselines: raw_pixels gathers 60 small train + 30"
        f" small test rows × {3 * r * r:,} float32 features on every rank: ")
    assert result.stderr.count("\n") == 1 and "features" not in result.stdout
    assert not (tmp_path / "live_baselines").exists()


@pytest.mark.slow
def test_curves_per_dataset_and_embedding(finished):
    for dataset in ("small", "large"):
        for name in EMBEDDINGS:
            live = LIVE["backbone" if name == "barlow" else "baselines"]
            plots = finished["tmp"] / live / "plots" / "metrics" / "transfer"
            rows = (plots / dataset / "linear" / name / "val_top1.tsv").read_text().splitlines()
            assert [int(r.split("\t")[0]) for r in rows[1:]] == list(range(EPOCHS))


def test_mismatching_weights_give_one_line_error(setup, tmp_path):
    wide, _ = build_backbone("small_resnet", 8, (1, 1, 1, 1))
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    result = invoke(setup, tmp_path, weights=tmp_path / "wide.pt")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "transfer: error:" in result.stderr and "does not fit the backbone" in result.stderr
    assert not (tmp_path / "live").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"svm_cost": [1.0]}, "params: transfer.svm_cost: unknown key"),
    ({"svm_costs": [0.0, 1.0]}, "transfer.svm_costs: must list at least one cost > 0"),
    ({"val_fraction": 1.0}, "transfer.val_fraction: must be in (0, 1)"),
])
def test_bad_params_are_named(setup, tmp_path, overrides, message):
    result = invoke(setup, tmp_path, **overrides)
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_missing_dataset_is_named(setup, tmp_path):
    result = invoke(setup, tmp_path, datasets=["small", "absent"])
    assert result.exit_code == 2
    assert "absent_test.beton: FFCV dataset not found" in result.stderr
    assert not (tmp_path / "live").exists()  # checked before the first set's work


def test_repo_params_section_loads():
    cfg = load_section(TransferConfig, "transfer", REPO / "params.yaml")
    assert cfg.datasets == ("digits", "elpv") and cfg.schedule == "step"
    assert cfg.epochs_per_dataset == {}


# ---------------------------------------------------------------- ImageFolder sets

FOLDER_EPOCHS = 3


@pytest.fixture(scope="module")
def scenes(setup, tmp_path_factory) -> dict:
    """scenes_{train,test}.beton beside the tiny sets, converted as convert_transfer
    converts a data.transfer_folders tree (data.ffcv's proportion mode), from an
    ImageFolder tree of 24 px stripes; the data params that name it."""
    from stages.convert import image_folder_splits

    tree = tmp_path_factory.mktemp("scenes")
    for split, folder, n, seed in (("train", "train", 60, 2), ("test", "val", 30, 3)):
        source = stripes(split, n, 24, seed)
        for i in range(n):
            path = tree / folder / source.class_names[source.labels[i]] / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(source.load(i)).save(path)
    cfg = load_section(DataConfig, "data", REPO / "params.yaml")
    for source in image_folder_splits(tree, cfg, 1):
        write_beton(source, setup["root"] / "data" / f"scenes_{source.split}.beton",
                    FfcvSettings(**vars(cfg.ffcv)), 1)
    return {"transfer_folders": {"scenes": str(tree)}}


@pytest.mark.slow
def test_folder_sets_run_last_with_their_own_epochs(setup, scenes, tmp_path):
    both = invoke_both(setup, tmp_path, data=scenes, datasets=["small"],
                       epochs_per_dataset={"scenes": FOLDER_EPOCHS})
    for output in both["outputs"].values():
        assert output.index("transfer: small") < output.index("transfer: scenes"), output
    metrics = both["metrics"]
    assert set(metrics) == {"small", "scenes"} and set(metrics["scenes"]) == {"linear", "svm"}
    for name in EMBEDDINGS:
        assert set(SUMMARY_KEYS) <= set(metrics["scenes"]["linear"][name])
        assert metrics["scenes"]["linear"][name]["best_epoch"] in range(FOLDER_EPOCHS)
        # Chance 1/3 (3 classes); measured 100 for every embedding.
        assert metrics["scenes"]["linear"][name]["top1_best"] >= 60.0, name
        assert metrics["scenes"]["svm"][name]["map"] >= 60.0, name
    assert metrics["scenes"]["svm"]["raw_pixels"]["map"] >= 90.0
    for dataset, epochs in (("small", EPOCHS), ("scenes", FOLDER_EPOCHS)):
        for name in EMBEDDINGS:
            live = LIVE["backbone" if name == "barlow" else "baselines"]
            plots = tmp_path / live / "plots" / "metrics" / "transfer"
            rows = (plots / dataset / "linear" / name / "val_top1.tsv").read_text().splitlines()
            assert [int(r.split("\t")[0]) for r in rows[1:]] == list(range(epochs))


@pytest.mark.parametrize("data, overrides, message", [
    ({}, {"epochs_per_dataset": {"scene": 3}},
     "transfer.epochs_per_dataset.scene: no such data set with a linear head in this run"
     " (transfer.datasets and data.transfer_folders: ['small', 'scenes'])"),
    ({"voc07_root": "/VOC2007"}, {"epochs_per_dataset": {"voc07": 3}},
     "transfer.epochs_per_dataset.voc07: no such data set with a linear head"),
    ({}, {"epochs_per_dataset": {"scenes": 0}}, "transfer.epochs_per_dataset.scenes: must be >= 1"),
    ({}, {"datasets": ["small", "scenes"]},
     "transfer.datasets: ['scenes'] are data.transfer_folders sets"),
])
def test_folder_set_params_are_checked_first(setup, tmp_path, data, overrides, message):
    data = {"transfer_folders": {"scenes": "/scenes"}, **data}
    result = invoke(setup, tmp_path, data=data, **{"datasets": ["small"], **overrides})
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "live").exists()


# ---------------------------------------------------------------- PASCAL VOC2007

@pytest.fixture(scope="module")
def voc(setup, tmp_path_factory) -> dict:
    """voc07_{train,test}.beton of the synthetic devkit beside the tiny sets, as
    convert_transfer writes them; the devkit's path for data.voc07_root."""
    from voc_devkit import make_devkit

    tmp = tmp_path_factory.mktemp("voc")
    make_devkit(tmp)
    root = tmp / "VOCdevkit" / "VOC2007"
    for split in ("train", "test"):
        write_beton(sources.voc07(root, split, False, 1),
                    setup["root"] / "data" / f"voc07_{split}.beton", FfcvSettings("raw"), 1)
    return {"voc07_root": str(root)}


@pytest.mark.slow
def test_voc07_gets_the_svm_protocol_only(setup, voc, tmp_path):
    both = invoke_both(setup, tmp_path, data=voc, datasets=["small"])
    metrics = both["metrics"]
    assert set(metrics) == {"small", "voc07"}
    assert set(metrics["voc07"]) == {"svm"}  # a softmax head has no place on 20 labels
    assert set(metrics["voc07"]["svm"]) == set(EMBEDDINGS)
    for name in EMBEDDINGS:
        assert set(metrics["voc07"]["svm"][name]) == {"map"}
        assert 0.0 < metrics["voc07"]["svm"][name]["map"] <= 100.0
    # Each class lights its own cell: raw pixels rank the images almost perfectly.
    assert metrics["voc07"]["svm"]["raw_pixels"]["map"] >= 90.0
    assert "transfer: voc07 raw_pixels: SVM mAP" in both["output"]
    for live in LIVE.values():
        assert not (tmp_path / live / "plots" / "metrics" / "transfer" / "voc07").exists()


def test_voc07_set_but_not_converted_is_named(setup, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("small_train.beton", "small_train.json", "small_test.beton", "small_test.json"):
        (data / name).symlink_to(setup["root"] / "data" / name)
    result = invoke({**setup, "root": tmp_path}, tmp_path, data={"voc07_root": "/VOC2007"},
                    datasets=["small"])
    assert result.exit_code == 2, result.output
    assert "voc07_test.beton: FFCV dataset not found (run the convert stage)" in result.stderr
    assert not (tmp_path / "live").exists()


def multilabel(n: int, seed: int) -> np.ndarray:
    """(n, 20) devkit labels: present p 0.3, difficult p 0.1, else absent."""
    u = np.random.default_rng(seed).random((n, 20))
    return np.where(u < 0.3, 1, np.where(u < 0.4, 0, -1))


def test_voc07_svm_multilabel_separable_and_noise():
    rng = np.random.default_rng(0)
    train, test = multilabel(200, 1), multilabel(600, 2)
    # Separable: one feature per class, 1 where present, 0.5 where difficult, 0 absent.
    tx, ttx = ((np.clip(y, 0, None) + 0.5 * (y == 0)) + 0.05 * rng.normal(size=y.shape)
               for y in (train, test))
    out = voc07_svm_map(tx, voc_devkit_targets(train), ttx, voc_devkit_targets(test),
                        costs=(0.1, 1.0, 10.0))
    assert out["map"] >= 99.0 and len(out["ap"]) == 20
    # Noise: AP is the positive share of the rows scored, difficult ones left out: 1/3.
    chance = 100 * (test == 1).sum() / (test != 0).sum()
    noise = voc07_svm_map(rng.normal(size=(200, 32)), voc_devkit_targets(train),
                          rng.normal(size=(600, 32)), voc_devkit_targets(test),
                          costs=(0.01, 1.0))
    assert abs(chance - 100 / 3) < 3.0 and abs(noise["map"] - chance) < 6.0


def test_voc07_svm_difficult_is_a_training_negative_and_left_out_of_the_test_ap():
    """As the benchmark (Goyal et al. 2019) does: train_svm_kfold.py trains on every
    image with targets ±1, difficult as −1; test_svm.py drops difficult rows."""
    rng = np.random.default_rng(3)
    train, test = multilabel(200, 4), multilabel(300, 5)
    x, tx = rng.normal(size=(200, 24)), rng.normal(size=(300, 24))
    x[:, :20] += 5.0 * (train == 1)
    tx[:, :20] += 5.0 * (test != -1)  # difficult test images look like positives
    kwargs = {"costs": (0.1, 1.0)}
    out = voc07_svm_map(x, voc_devkit_targets(train), tx, voc_devkit_targets(test), **kwargs)
    # Training: the same as if every difficult entry said absent.
    as_absent = voc07_svm_map(x, voc_devkit_targets(np.where(train == 0, -1, train)), tx,
                              voc_devkit_targets(test), **kwargs)
    assert out["ap"] == as_absent["ap"] and out["cv_ap"] == as_absent["cv_ap"]
    # Test: left out, not counted as negatives (which would cost their class AP).
    counted = voc07_svm_map(x, voc_devkit_targets(train), tx,
                            voc_devkit_targets(np.where(test == 0, -1, test)), **kwargs)
    assert out["map"] >= 95.0 and counted["map"] < out["map"] - 5.0


def test_devkit_targets_mapping():
    devkit = np.array([[1, -1, 0]])
    np.testing.assert_array_equal(voc_devkit_targets(devkit), [[1, 0, -1]])
    with pytest.raises(ValueError, match="must be 1, -1 or 0"):
        voc_devkit_targets(np.array([[2]]))


def ignores_sigterm(proc: psutil.Process) -> bool:
    """Whether ``proc`` ignores SIGTERM; False once it has ended."""
    try:
        return in_signal_mask(proc.pid, "SigIgn", signal.SIGTERM)
    except OSError:
        return False


@pytest.mark.slow
def test_svm_workers_outlive_a_stop_signal_sent_to_every_process():
    """A scheduler may signal every process of a job. The SVM search's joblib workers
    ignore SIGTERM once they run a fit, so a search whose two workers are signalled
    mid-way ends with the figures of one never signalled, where a worker ended by it
    would fail the search (TerminatedWorkerError); the stage stops on its own flag."""
    rng = np.random.default_rng(0)
    labels, test_labels = rng.integers(0, 4, 900), rng.integers(0, 4, 300)
    feats = rng.normal(size=(900, 128)) + 0.3 * np.eye(128)[labels]
    test_feats = rng.normal(size=(300, 128)) + 0.3 * np.eye(128)[test_labels]
    kwargs = {"costs": (1e-3, 0.1, 10.0, 100.0), "folds": 3, "max_iter": 3000}
    reference = voc07_svm_map(feats, labels, test_feats, test_labels, n_jobs=1, **kwargs)
    searching, signalled = threading.Event(), []

    def signal_the_workers() -> None:
        me = psutil.Process()
        while searching.is_set():
            workers = [p for p in me.children(recursive=True)
                       if "LokyProcess" in " ".join(p.cmdline()) and ignores_sigterm(p)]
            if len(workers) == 2:
                for worker in workers:
                    worker.send_signal(signal.SIGTERM)
                signalled.extend(workers)
                return
            time.sleep(0.01)

    searching.set()
    watcher = threading.Thread(target=signal_the_workers)
    watcher.start()
    try:
        out = voc07_svm_map(feats, labels, test_feats, test_labels, n_jobs=2, **kwargs)
    finally:
        searching.clear()
        watcher.join()
    assert len(signalled) == 2, "the search ended before both workers had run a fit"
    assert all(worker.is_running() for worker in signalled)
    assert {k: out[k] for k in ("map", "ap", "cv_ap", "cost")} == \
        {k: reference[k] for k in ("map", "ap", "cv_ap", "cost")}
