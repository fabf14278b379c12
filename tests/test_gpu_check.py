"""The GPU check's CPU-checkable parts (benchmarks/gpu_check.py runs on a GPU machine;
here: its arguments, its params merge and the ImageNet-shaped tree it converts)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402
from barlow.config import merge_params  # noqa: E402
import imagenet_like  # noqa: E402


@pytest.mark.slow
def test_unknown_section_is_refused_by_name(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path),
                           "--sections", "env,warp"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown sections ['warp']" in proc.stderr


def test_every_section_has_a_limit_and_a_function():
    assert set(gpu_check.LIMITS) == set(gpu_check.SECTIONS)
    assert all(callable(getattr(gpu_check, f"section_{name}")) for name in gpu_check.SECTIONS)
    assert sum(gpu_check.LIMITS.values()) <= 720  # one device command is at most 10 min


def test_merge_sets_leaves_like_dvc_set_params():
    base = {"pretrain": {"epochs": 16, "batch_size": 256}, "loss": {"lambd": 0.005},
            "augment": {"crop_scale": [0.2, 1.0]}}
    out = merge_params(base, {"pretrain": {"epochs": 1000}},
                           {"augment": {"crop_scale": [0.08, 1.0]}})
    assert out == {"pretrain": {"epochs": 1000, "batch_size": 256}, "loss": {"lambd": 0.005},
                   "augment": {"crop_scale": [0.08, 1.0]}}
    assert base["pretrain"]["epochs"] == 16  # the base is not modified


def test_paper_params_are_the_paper_switch_with_size_overrides_only(tmp_path):
    params = gpu_check.fixture_params(tmp_path, smoke=False)
    paper = gpu_check.read_yaml(REPO / "configs/paper.yaml")
    assert params["model"]["arch"] == paper["model"]["arch"] == "resnet50"
    assert params["pretrain"]["optimizer"] == "lars"
    assert params["augment"]["resolution"] == 224
    assert params["augment"]["crop_scale"] == paper["augment"]["crop_scale"]
    assert params["data"]["source"] == "imagefolder"
    assert params["machine"]["devices"] == 1


def test_imagenet_like_tree_has_imagenet_shape(tmp_path):
    sizes = imagenet_like.class_sizes(10, 40)
    assert max(sizes) == 40 and min(sizes) == 23  # ⌈0.563 × 40⌉, ImageNet's 732/1300
    counts = imagenet_like.make_tree(tmp_path, classes=3, max_per_class=5, val_per_class=2)
    classes = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert classes == sorted(p.name for p in (tmp_path / "val").iterdir())
    assert all(len(c) == 9 and c.startswith("n") and c[1:].isdigit() for c in classes)
    assert counts == {"train": sum(imagenet_like.class_sizes(3, 5)), "val": 6}
    first = sorted((tmp_path / "train" / classes[0]).iterdir())[0]
    assert first.name.startswith(classes[0] + "_") and first.suffix == ".JPEG"
    with Image.open(first) as image:
        assert image.format == "JPEG" and sorted(image.size) == [375, 500]


def test_imagenet_like_tree_is_reproducible(tmp_path):
    for run in ("a", "b"):
        imagenet_like.make_tree(tmp_path / run, classes=2, max_per_class=2, val_per_class=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.JPEG"))
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
                         for f in files)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_gpu.py", "gpu_check.py", "imagenet_like.py"])
def test_help(script):
    env = {**os.environ, "PYTHONPATH": "src"}  # as benchmarks/README.md runs them
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=REPO,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "usage" in proc.stdout
