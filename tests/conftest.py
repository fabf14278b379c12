"""Shared fixtures: a tiny labelled image set as FFCV datasets, the tiny model and run
settings the pretraining tests use, and the subsets, backbone and settings of the
evaluation stages' tests; what the stop-signal tests read of a run (its dvclive files, a
process's signal masks)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from barlow.config import merge_params, read_params
from barlow.data.convert import FfcvSettings, write_beton
from barlow.data.sources import Source

REPO = Path(__file__).resolve().parents[1]
#: For the stage processes a test starts: FFCV's pipelines run uncompiled. numba compiles
#: every pipeline in every process (10-20 s each on 2 cores); test_loaders, test_augment
#: and test_tensor_ops pin the compiled kernels to the Python code they replace.
NO_JIT = {"NUMBA_DISABLE_JIT": "1"}


def repo_params(**changes: dict[str, Any]) -> dict[str, Any]:
    """The repository's params.yaml with ``changes`` (section -> keys) applied: a whole
    params file, as every stage requires (no key may be missing)."""
    return merge_params(read_params(REPO / "params.yaml"), changes)


def machine(devices: int = 1, cores: int | None = None) -> dict[str, Any]:
    """The machine section for ``devices`` CPU processes on ``cores`` cores (default:
    one loader thread each)."""
    return {"devices": devices, "cores": cores or devices, "collective_timeout_s": 60.0}


# Runs of 2 epochs × 4 steps on 64 images, small enough for CPU tests.
TINY_PARAMS = repo_params(**{
    "model": {"arch": "small_resnet", "width": 4, "layers": [1, 1, 1, 1], "projector": "32-32"},
    "loss": {"lambd": 0.0051},
    "augment": {"resolution": 16, "crop_scale": [0.3, 1.0], "blur_sigma": [0.1, 0.5]},
    "pretrain": {"epochs": 2, "batch_size": 16, "warmup_epochs": 1.0,
                 "checkpoint_every_steps": 3, "log_every_steps": 2, "knn_every_epochs": 1,
                 "knn_k": 5, "knn_bank_size": 32, "precision": "fp32",
                 # The paper's optimiser: the one path the quick profile does not take.
                 "optimizer": "lars", "lr_weights": 0.2, "lr_biases": 0.0048,
                 "weight_decay": 1.5e-6},
    "machine": machine(1),
})


def tiny_source(split: str, n: int, seed: int) -> Source:
    """n 16×16 images in 4 classes: a bright square whose corner encodes the class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    images = rng.integers(0, 60, (n, 16, 16, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        r, q = divmod(int(c), 2)
        images[i, 8 * r:8 * r + 8, 8 * q:8 * q + 8] += 150
    return Source("tiny", split, ["a", "b", "c", "d"], labels.astype(np.int64),
                  lambda i: images[i], "0" * 64)


@pytest.fixture(scope="session")
def tiny_ffcv(tmp_path_factory) -> Path:
    """A folder with train.beton (64 images) and test.beton (32), manifests beside."""
    out = tmp_path_factory.mktemp("tiny_ffcv")
    write_beton(tiny_source("train", 64, 0), out / "train.beton", FfcvSettings("raw"), 1)
    write_beton(tiny_source("test", 32, 1), out / "test.beton", FfcvSettings("raw"), 1)
    return out


# A backbone that has learnt something: 6 epochs × 4 steps of TINY_PARAMS pretraining
# (pretrain.seed 0, so it starts from the weights the stages' random_init baseline
# draws). On the linear stage's features probe it scored 90.6 top-1 to random_init's
# 81.25; over pretrain seeds 0-3 the gap was 6.25-18.75 points (2-6 of 32 test images).
# 4 epochs gave gaps of 3.1 points: too close to assert on.
PRETRAIN_EPOCHS = 6


@pytest.fixture(scope="session")
def pretrained_backbone(tiny_ffcv, tmp_path_factory) -> Path:
    """backbone.pt exported by a short pretraining on tiny_ffcv (~8 s on one core)."""
    import torch
    from ffcv.pipeline.compiler import Compiler

    from barlow import distributed as dist
    from barlow.config import (AugmentConfig, LossConfig, ModelConfig, PretrainConfig,
                               from_mapping, merge_params)
    from barlow.train import PretrainSetup, export, pretrain

    params = merge_params(TINY_PARAMS, {"pretrain": {"epochs": PRETRAIN_EPOCHS, "seed": 0}})
    setup = PretrainSetup(*(from_mapping(cls, params[name], name) for cls, name in (
        (ModelConfig, "model"), (LossConfig, "loss"), (AugmentConfig, "augment"),
        (PretrainConfig, "pretrain"))))
    env = dist.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    out = tmp_path_factory.mktemp("pretrained")
    # Plain-Python pipelines: seconds instead of a numba compile, and repeatable.
    enabled = Compiler.is_enabled
    Compiler.set_enabled(False)
    try:
        result = pretrain(setup, tiny_ffcv / "train.beton", tiny_ffcv / "test.beton", out,
                          env, lambda step, metrics: None, num_workers=1)
    finally:
        Compiler.set_enabled(enabled)
    export(result["model"], out, env)
    return out / "backbone.pt"


# The evaluation stages on tiny_ffcv: a tiny backbone, 3 and 2 epochs of fine-tuning on
# the 8 and 16 images of tiny_subsets' "1percent" and "10percent" (1 and 2 batches of 8
# per epoch), LINEAR_EPOCHS of the linear probe on the 48 training images outside val
# (3 batches of 16).
EVAL_MODEL = {"arch": "small_resnet", "width": 4, "layers": [1, 1, 1, 1]}
SEMISUP_EPOCHS = [3, 2]
LINEAR_EPOCHS = 4


def semisup_params(subsets_dir: Path, devices: int = 1, **semisup: Any) -> dict[str, Any]:
    """Whole params for the semisup stage on tiny_ffcv, ``semisup`` keys changed."""
    return repo_params(
        data={"subsets_dir": str(subsets_dir)}, model=EVAL_MODEL,
        semisup={"subsets": ["1percent", "10percent"], "epochs": SEMISUP_EPOCHS,
                 "batch_size": 8, "eval_batch_size": 32, "resolution": 16,
                 "eval_crop_ratio": 1.0, "channels_last": False, **semisup},
        machine=machine(devices))


def linear_params(subsets_dir: Path, devices: int = 1, **linear: Any) -> dict[str, Any]:
    """Whole params for the linear stage on tiny_ffcv, ``linear`` keys changed."""
    return repo_params(
        data={"subsets_dir": str(subsets_dir)}, model=EVAL_MODEL, augment={"resolution": 16},
        machine=machine(devices),
        linear={"mode": "features", "epochs": LINEAR_EPOCHS, "batch_size": 16, "lr": 0.3,
                "crop_ratio": 1.0, "extract_batch_size": 32, **linear})


@pytest.fixture(scope="session")
def tiny_subsets(tmp_path_factory) -> Path:
    """Subset files over tiny_ffcv's 64 training images (labels i % 4): val 4 per class,
    "1percent" 2 per class, "10percent" 4 per class, disjoint from val."""
    subsets = tmp_path_factory.mktemp("subsets")
    (subsets / "val.txt").write_text("# val\n" + "".join(f"{i}\n" for i in range(16)))
    (subsets / "1percent.txt").write_text("".join(f"{i}\n" for i in range(16, 24)))
    (subsets / "10percent.txt").write_text("".join(f"{i}\n" for i in range(16, 32)))
    return subsets


@pytest.fixture(scope="session")
def random_backbone(tmp_path_factory) -> Path:
    """A tiny EVAL_MODEL backbone at random init (torch seed 1), saved as a plain state
    dict, as the pretrain stage exports one."""
    import torch

    from barlow.models import build_backbone

    torch.manual_seed(1)
    backbone, _ = build_backbone(EVAL_MODEL["arch"], EVAL_MODEL["width"], EVAL_MODEL["layers"])
    path = tmp_path_factory.mktemp("random_backbone") / "backbone.pt"
    torch.save(backbone.state_dict(), path)
    return path


def live_files(live: Path) -> dict[str, bytes]:
    """Every file under a dvclive folder, by relative path: what two runs compare."""
    return {str(p.relative_to(live)): p.read_bytes() for p in sorted(live.rglob("*"))
            if p.is_file()}


def in_signal_mask(pid: int, mask: str, sig: signal.Signals) -> bool:
    """Whether ``sig`` is in process ``pid``'s ``mask`` of /proc/PID/status ("SigCgt":
    a handler catches it, "SigIgn": ignored); OSError once the process has ended."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{mask}:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False
