"""The CUDA path, run where a GPU is (benchmarks/gpu_check.sh runs this file on the GPU
machine; on CPU-only machines, CI included, every test here is skipped).

Each test pins one thing the CPU suite cannot see: the device pipeline's output equals
the CPU pipeline's, the loss on the GPU equals the CPU's, "auto" precision on the
GPU, a pretraining run on the GPU resumes to the uninterrupted run's step, and the
exported backbone is on the CPU whatever trained it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from barlow import distributed as dist
from barlow.data.convert import read_manifest
from barlow.data.loaders import eval_loader, paper_views, pretrain_loader
from barlow.loss import barlow_twins_loss
from barlow.data.convert import normalisation
from barlow.precision import resolve_precision
from barlow.train import export, pretrain
from conftest import TINY_PARAMS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda:0")


@pytest.fixture(autouse=True, scope="module")
def no_jit():
    """The CPU half of each pipeline as plain Python (what is checked here is the device
    half), so the module runs in seconds instead of a numba compile per loader."""
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(True)


@pytest.mark.parametrize("channels_last", [True, False])
def test_device_pipeline_equals_the_cpu_pipeline(tiny_ffcv, channels_last):
    """uint8 → GPU → normalised float in the layout asked for, never through host
    memory (ToTorchImage's NCHW copy would allocate there): the same values as the CPU
    pipeline's NormalizeImage."""
    mean, std = normalisation(read_manifest(tiny_ffcv / "train.beton"))
    common = dict(batch_size=16, num_workers=1, resolution=16, mean=mean, std=std,
                  train_aug=False, crop_ratio=1.0, channels_last=channels_last)
    cpu = [(x.clone(), y.clone()) for x, y in eval_loader(str(tiny_ffcv / "train.beton"), **common)]
    gpu = [(x.clone(), y.clone()) for x, y in
           eval_loader(str(tiny_ffcv / "train.beton"), device=CUDA, **common)]
    assert len(cpu) == len(gpu) == 4
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.device.type == "cuda" and yg.device.type == "cuda"
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert xg.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-5)
        assert torch.equal(yg.cpu(), yc)


def test_colour_ops_on_the_gpu_give_the_host_views(tiny_ffcv):
    """pretrain_loader(colour_ops_on="device") on CUDA: the colour ops as tensor ops on
    the GPU give the CPU host pipeline's views, within ±1 grey level in a rare pixel
    (tests/test_tensor_ops.py says why), in bf16 as asked for, channels_last."""
    mean, std = normalisation(read_manifest(tiny_ffcv / "train.beton"))
    views = tuple(replace(v, crop_scale=(0.3, 1.0), blur_sigma=(0.1, 0.8), solarize_p=0.5)
                  for v in paper_views(16))
    common = dict(batch_size=16, num_workers=1, views=views, mean=mean, std=std, seed=7)
    host = [tuple(t.clone() for t in pair)
            for pair in pretrain_loader(str(tiny_ffcv / "train.beton"), **common)]
    gpu = [tuple(t.clone() for t in pair) for pair in pretrain_loader(
        str(tiny_ffcv / "train.beton"), device=CUDA, colour_ops_on="device",
        gpu_dtype=torch.float32, **common)]
    scale = torch.tensor(std).view(1, 3, 1, 1) * 255
    assert len(host) == len(gpu) == 4
    for pair_h, pair_g in zip(host, gpu):
        for xh, xg in zip(pair_h, pair_g):
            assert xg.device.type == "cuda" and xg.is_contiguous(memory_format=torch.channels_last)
            diff = ((xg.cpu().double() - xh.double()) * scale).abs()
            assert diff.max() <= 1.001 and (diff > 0.5).float().mean() <= 1e-3


def test_loss_on_the_gpu_equals_the_cpu_loss():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
    cpu = barlow_twins_loss(z1.double(), z2.double(), 0.005).loss
    gpu = dist.distributed_barlow_twins_loss(z1.to(CUDA), z2.to(CUDA), 0.005).loss
    torch.testing.assert_close(gpu.double().cpu(), cpu, rtol=1e-4, atol=0)


def test_auto_precision_is_bf16_on_this_gpu_when_it_has_bf16_tensor_cores():
    want = "bf16" if torch.cuda.get_device_capability(CUDA) >= (8, 0) else "fp16"
    assert resolve_precision("auto", CUDA) == want


def test_pretraining_on_the_gpu_resumes_and_exports_to_the_cpu(tiny_ffcv, tmp_path):
    from test_train import setup_from

    params = {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "precision": "auto"}}
    env = dist.DistEnv(rank=0, local_rank=0, world_size=1, device=CUDA)
    logged = []

    def run(out: Path, **kwargs):
        return pretrain(setup_from(params), tiny_ffcv / "train.beton",
                        tiny_ffcv / "test.beton", out, env,
                        lambda step, m: logged.append((step, m)), **kwargs)

    first = run(tmp_path / "a", stop_after_steps=5)
    assert first["step"] == 5
    resumed = run(tmp_path / "a")
    assert resumed["step"] == 8
    assert all(np.isfinite(m["loss"]) for _, m in logged)
    assert any("knn_top1" in m for _, m in logged)
    export(resumed["model"], tmp_path / "a", env)
    state = torch.load(tmp_path / "a" / "backbone.pt", map_location=None)
    assert all(v.device.type == "cpu" for v in state.values())
