"""Pretraining end to end on tiny data: it runs, exports, resumes exactly, refuses a
checkpoint from another config, stops on a non-finite loss, and runs under torchrun
with 2 gloo processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from barlow import distributed as dist
from barlow.checkpoint import CheckpointError
from barlow.config import (AugmentConfig, ConfigError, LossConfig, ModelConfig,
                           PretrainConfig, from_mapping)
from barlow.models import small_resnet
from barlow.train import NonFiniteLossError, PretrainSetup, export, pretrain
from conftest import NO_JIT, REPO, TINY_PARAMS, machine

TIMING = {"pairs_per_s", "epoch_time_s"}
PARAMS = TINY_PARAMS


@pytest.fixture(scope="module")
def data_dir(tiny_ffcv) -> Path:
    return tiny_ffcv


@pytest.fixture(autouse=True, scope="module")
def no_jit():
    """Pipelines run as plain Python: seconds to start instead of a numba compile per
    loader, and bit-for-bit the same from run to run."""
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(True)


def setup_from(params: dict) -> PretrainSetup:
    return PretrainSetup(model=from_mapping(ModelConfig, params["model"], "model"),
                         loss=from_mapping(LossConfig, params["loss"], "loss"),
                         augment=from_mapping(AugmentConfig, params["augment"], "augment"),
                         pretrain=from_mapping(PretrainConfig, params["pretrain"], "pretrain"))


ENV = dist.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def run(setup: PretrainSetup, data_dir: Path, out: Path, **kwargs) -> dict:
    logged = []
    result = pretrain(setup, data_dir / "train.beton", data_dir / "test.beton", out, ENV,
                      lambda step, m: logged.append((step, m)), num_workers=1, **kwargs)
    result["logged"] = logged
    return result


def strip_timing(rows):
    return [(step, {k: v for k, v in m.items() if k not in TIMING}) for step, m in rows]


def assert_same_weights(a: dict, b: dict) -> None:
    """Two runs' models hold bit-identical tensors."""
    for key, value in a["model"].state_dict().items():
        assert torch.equal(value, b["model"].state_dict()[key]), key


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return run(setup_from(PARAMS), data_dir, out), out


@pytest.mark.slow
def test_runs_logs_and_exports(uninterrupted):
    result, out = uninterrupted
    assert result["step"] == 8  # 64 images / batch 16 × 2 epochs
    steps = [step for step, _ in result["logged"]]
    assert steps == [2, 4, 6, 8]
    last = result["logged"][-1][1]
    for key in ("loss", "on_diag", "off_diag", "lr_weights", "lr_biases", "pairs_per_s",
                "epoch_time_s", "knn_top1"):
        assert np.isfinite(last[key]), key
    # The lr of the last step, t = 7 of T = 8 with 4 warm-up steps, base 0.2 × 16/256:
    base = 0.2 * 16 / 256
    assert last["lr_weights"] == pytest.approx(
        base * (0.001 + 0.999 * 0.5 * (1 + np.cos(np.pi * 3 / 4))))
    assert result["logged"][0][1]["lr_weights"] == pytest.approx(base * 1 / 4)  # t = 1
    assert result["logged"][0][1]["loss"] == pytest.approx(
        result["logged"][0][1]["on_diag"] + 0.0051 * result["logged"][0][1]["off_diag"])
    export(result["model"], out, ENV)
    backbone, _ = small_resnet(width=4, layers=(1, 1, 1, 1))
    backbone.load_state_dict(torch.load(out / "backbone.pt"))  # strict: torchvision layout
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["step"] == 8
    assert {"model", "optimizer", "scaler", "rng", "config", "fingerprint"} <= set(ckpt)


@pytest.mark.slow
def test_resume_equals_uninterrupted(uninterrupted, data_dir, tmp_path):
    full, _ = uninterrupted
    setup = setup_from(PARAMS)
    first = run(setup, data_dir, tmp_path, stop_after_steps=5)  # mid-epoch; ckpt at 3
    assert first["step"] == 5
    resumed = run(setup, data_dir, tmp_path)
    assert resumed["step"] == 8
    assert_same_weights(full, resumed)
    assert strip_timing(resumed["logged"]) == strip_timing(full["logged"])


PROGRESSIVE = {**PARAMS, "pretrain": {**PARAMS["pretrain"], "progressive_resize": {
    "min_resolution": 8, "ramp": [0.5, 0.5], "step": 4}}}  # epochs 0, 1 at 8, 16 px


@pytest.mark.slow
def test_progressive_resizing_crops_smaller_early_and_resumes_exactly(data_dir, tmp_path,
                                                                       capsys):
    """min_resolution 8 and a jump at half the epochs: epoch 0 trains on 8 px views,
    epoch 1 on augment.resolution's 16; the logged side says so, and a run resumed
    in epoch 0 (checkpoint at step 3) ends with the uninterrupted run's weights."""
    setup = setup_from(PROGRESSIVE)
    full = run(setup, data_dir, tmp_path / "full")
    assert [(step, m["resolution"]) for step, m in full["logged"]] == [
        (2, 8), (4, 8), (6, 16), (8, 16)]
    out = capsys.readouterr().out
    assert "epoch 0: views cropped at 8 px" in out and "epoch 1: views cropped at 16 px" in out
    run(setup, data_dir, tmp_path / "resumed", stop_after_steps=3)
    resumed = run(setup, data_dir, tmp_path / "resumed")
    assert_same_weights(full, resumed)
    assert strip_timing(resumed["logged"]) == strip_timing(full["logged"])


@pytest.mark.parametrize("min_resolution, on", [(8, True), (15, True), (16, False), (28, False)])
def test_progressive_resizing_is_off_from_the_final_side_up(min_resolution, on):
    params = {**PROGRESSIVE, "pretrain": {**PROGRESSIVE["pretrain"], "progressive_resize": {
        "min_resolution": min_resolution, "ramp": [0.0, 0.5], "step": 1}}}
    setup = setup_from(params)
    resolution_at = setup.resolution_at()  # augment.resolution: 16
    assert (resolution_at is not None) == on
    # Off, the ramp changes no weight: checkpoints of runs before the key existed resume.
    assert ("progressive_resize" in setup.resume_config({}, 1)["pretrain"]) == on
    if on:
        assert [resolution_at(e) for e in (0, 1)] == [min_resolution, 16]


def with_other_code(path: Path, **changes) -> None:
    """Rewrite a checkpoint as if written by other code: barlow.loss's hash changed."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["code"] = {**ckpt["code"], "barlow.loss": "0" * 16}
    for key, value in changes.items():
        ckpt[key] = value
    torch.save(ckpt, path)


@pytest.mark.slow
def test_a_finished_run_of_other_code_starts_over(uninterrupted, data_dir, tmp_path, capsys):
    """The checkpoint is a persistent DVC output: after a code change DVC reruns the
    stage, which must train with the new code, not re-export the old run's weights."""
    full, out = uninterrupted
    ckpt_path = tmp_path / "checkpoint.pt"
    ckpt_path.write_bytes((out / "checkpoint.pt").read_bytes())
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["finished"] and "barlow.loss" in ckpt["code"]
    stale = {k: torch.zeros_like(v) if v.is_floating_point() else v
             for k, v in ckpt["model"].items()}  # weights no training would give
    with_other_code(ckpt_path, model=stale)
    rerun = run(setup_from(PARAMS), data_dir, tmp_path)
    assert "a finished run of other code (changed: barlow.loss); starting over" in capsys.readouterr().out
    assert_same_weights(full, rerun)
    assert torch.load(ckpt_path, weights_only=True)["code"]["barlow.loss"] != "0" * 16


@pytest.mark.slow
def test_an_interrupted_run_of_other_code_resumes_and_says_so(uninterrupted, data_dir,
                                                               tmp_path, capsys):
    full, _ = uninterrupted
    setup = setup_from(PARAMS)
    run(setup, data_dir, tmp_path, stop_after_steps=5)
    with_other_code(tmp_path / "checkpoint.pt")
    resumed = run(setup, data_dir, tmp_path)
    output = capsys.readouterr().out
    assert "resuming an interrupted run although the code changed since" in output
    assert "resumed from" in output and resumed["step"] == 8
    assert_same_weights(full, resumed)


@pytest.mark.slow
def test_checkpoint_from_another_config_is_refused(data_dir, tmp_path):
    run(setup_from(PARAMS), data_dir, tmp_path, stop_after_steps=3)
    other = setup_from({**PARAMS, "loss": {**PARAMS["loss"], "lambd": 0.01}})
    with pytest.raises(CheckpointError, match=r"loss\.lambd: 0\.0051 != 0\.01"):
        run(other, data_dir, tmp_path)


@pytest.mark.slow
def test_ablation_and_allreduce_params_reach_the_model_the_loss_and_ddp(data_dir, tmp_path,
                                                                       monkeypatch):
    """The paper's "no BN in the MLP, no normalisation" row: the projector is built
    without batch norm and every step's loss gets the normalization; the gradient
    all-reduce dtype reaches DDP's wrapper (what it does there: tests/test_distributed.py)."""
    setup = setup_from({**PARAMS, "model": {**PARAMS["model"], "projector_bn": False},
                        "loss": {**PARAMS["loss"], "normalization": "none"},
                        "pretrain": {**PARAMS["pretrain"], "grad_allreduce": "bf16"}})
    import barlow.train as train

    real, real_wrap = train.dist.distributed_barlow_twins_loss, train.dist.wrap_ddp
    seen, wrapped = [], []

    def recorded(z1, z2, lambd, variant, normalization):
        seen.append((variant, normalization))
        return real(z1, z2, lambd, variant, normalization)

    def recorded_wrap(model, env, grad_allreduce):
        wrapped.append(grad_allreduce)
        return real_wrap(model, env, grad_allreduce)

    monkeypatch.setattr(train.dist, "distributed_barlow_twins_loss", recorded)
    monkeypatch.setattr(train.dist, "wrap_ddp", recorded_wrap)
    result = run(setup, data_dir, tmp_path, stop_after_steps=2)
    assert seen == [("full", "none")] * 2
    assert wrapped == ["bf16"]
    projector = result["model"].projector
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for m in projector.modules())


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch):
    setup = setup_from(PARAMS)
    run(setup, data_dir, tmp_path, stop_after_steps=3)
    import barlow.train as train

    real = train.dist.distributed_barlow_twins_loss
    calls = {"n": 0}

    def poisoned(z1, z2, lambd, variant, normalization):
        calls["n"] += 1
        terms = real(z1, z2, lambd, variant, normalization)
        return terms._replace(loss=terms.loss * float("nan")) if calls["n"] == 2 else terms

    monkeypatch.setattr(train.dist, "distributed_barlow_twins_loss", poisoned)
    # Resumed at step 3; step 3 trains and checkpoints (end of epoch 1); step 4 is NaN.
    with pytest.raises(NonFiniteLossError, match="at step 4"):
        run(setup, data_dir, tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and not ckpt["finished"]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    monkeypatch.undo()
    assert run(setup, data_dir, tmp_path)["step"] == 8  # and the run goes on from there


@pytest.mark.slow
def test_nan_weights_after_an_update_are_never_checkpointed(data_dir, tmp_path, monkeypatch):
    """A finite loss whose update writes NaN (the last step's, say) stops the run
    before that state is saved: the checkpoint stays the last good one."""
    setup = setup_from(PARAMS)
    run(setup, data_dir, tmp_path, stop_after_steps=3)
    import barlow.train as train

    real_build = train.build_optimizer
    calls = {"n": 0}

    def build(*args, **kwargs):
        optimizer = real_build(*args, **kwargs)
        real_step = optimizer.step

        def poisoned_step(*a, **k):
            out = real_step(*a, **k)
            calls["n"] += 1
            if calls["n"] == 1:  # resumed at 3: step 4 ends epoch 1, a checkpoint follows
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].fill_(float("nan"))
            return out

        optimizer.step = poisoned_step
        return optimizer

    monkeypatch.setattr(train, "build_optimizer", build)
    with pytest.raises(train.NonFiniteLossError, match=r"non-finite weights .* after step 4"):
        run(setup, data_dir, tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_batch_must_split_over_processes():
    cfg = from_mapping(PretrainConfig, {**PARAMS["pretrain"], "batch_size": 10}, "pretrain")
    with pytest.raises(ValueError, match=r"pretrain.batch_size: 10 is not divisible by the number of processes \(4\)"):
        cfg.check_world(4)


def test_grad_allreduce_is_fp32_or_bf16():
    with pytest.raises(ConfigError, match=r"^params: pretrain.grad_allreduce: 'fp16' is not one"
                                          r" of \['fp32', 'bf16'\]$"):
        from_mapping(PretrainConfig, {**PARAMS["pretrain"], "grad_allreduce": "fp16"}, "pretrain")


@pytest.mark.slow
def test_stage_under_torchrun_with_two_processes(data_dir, tmp_path):
    """The dvc.yaml launch path: the stage starts its 2 gloo workers through torchrun's
    launcher; global BN and the sharded loss; rank 0 alone writes."""
    params = {**PARAMS, "pretrain": {**PARAMS["pretrain"], "knn_every_epochs": 0},
              "machine": machine(2)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, **NO_JIT, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "stages.pretrain", "--params", str(tmp_path / "params.yaml"),
           "--data", str(data_dir), "--out", str(tmp_path / "out"),
           "--live", str(tmp_path / "live")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "backbone.pt").is_file()
    metrics = yaml.safe_load((tmp_path / "live" / "metrics.json").read_text())
    assert metrics["step"] == 8 and np.isfinite(metrics["pretrain"]["loss"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["backbone.pt", "checkpoint.pt"]


@pytest.mark.slow
def test_fp16_overflow_is_absorbed_by_the_grad_scaler(data_dir, tmp_path, monkeypatch):
    """A loss scale far too large for fp16 makes the first backward passes overflow:
    the scaler skips those steps and lowers its scale; training goes on, weights finite."""
    import barlow.train as train

    real = torch.amp.GradScaler
    monkeypatch.setattr(train.torch.amp, "GradScaler",
                        lambda device, enabled: real(device, init_scale=2.0 ** 40, enabled=enabled))
    params = {**PARAMS, "pretrain": {**PARAMS["pretrain"], "precision": "fp16",
                                     "knn_every_epochs": 0}}
    result = run(setup_from(params), data_dir, tmp_path)
    assert result["step"] == 8
    scaler = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["scaler"]
    assert scaler["scale"] < 2.0 ** 40  # overflow seen and handled, not fatal
    assert all(np.isfinite(m["loss"]) for _, m in result["logged"])
    assert all(torch.isfinite(v).all() for v in result["model"].state_dict().values()
               if v.is_floating_point())


CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbogomips\t: 1\n"


@pytest.mark.parametrize("extra, native", [("avx512_bf16", True), ("amx_bf16 amx_tile", True),
                                           ("avx512_vnni", False), ("", False)])
def test_native_bf16_read_from_cpu_flags(extra, native):
    from barlow.precision import cpu_has_native_bf16

    assert cpu_has_native_bf16(CPUINFO.format(extra=extra)) is native
    assert cpu_has_native_bf16("no flags line") is False


def test_auto_precision_follows_the_cpu(monkeypatch):
    import barlow.precision as precision

    cpu = torch.device("cpu")
    for given in ("fp32", "bf16", "fp16"):
        assert precision.resolve_precision(given, cpu) == given
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", cpu) == "fp32"


@pytest.mark.slow
def test_bf16_autocast_run_trains_and_matches_fp32_closely(data_dir, tmp_path, monkeypatch):
    """precision auto on a CPU with native bf16: the run trains in bf16 (fp32 loss), its
    losses stay within a few per cent of the fp32 run's over the same steps."""
    import barlow.precision

    monkeypatch.setattr(barlow.precision, "cpu_has_native_bf16", lambda: True)
    runs = {}
    for precision in ("fp32", "auto"):
        params = {**PARAMS, "pretrain": {**PARAMS["pretrain"], "precision": precision,
                                         "knn_every_epochs": 0}}
        runs[precision] = run(setup_from(params), data_dir, tmp_path / precision)
    fp32 = np.array([m["loss"] for _, m in runs["fp32"]["logged"]])
    bf16 = np.array([m["loss"] for _, m in runs["auto"]["logged"]])
    assert np.all(np.isfinite(bf16)) and not np.array_equal(fp32, bf16)  # bf16 really ran
    np.testing.assert_allclose(bf16, fp32, rtol=0.05)


@pytest.mark.parametrize("capability, precision", [((7, 0), "fp16"), ((7, 5), "fp16"),
                                                   ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_on_a_gpu_follows_its_tensor_cores(capability, precision):
    """V100 (7.0) and T4 (7.5) emulate bf16, which torch.cuda.is_bf16_supported()
    counts as support: "auto" must pick fp16 there, bf16 from Ampere (8.0) on."""
    from barlow.precision import cuda_precision

    assert cuda_precision(capability) == precision


def test_rng_state_restores_without_the_gpus_it_was_saved_with():
    """A checkpoint written on a GPU machine (one 'cuda' generator state: the saving
    rank's device) restores on a machine with fewer or no GPUs, and the CPU-side
    generators come back exactly."""
    from barlow.checkpoint import rng_state, set_rng_state

    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3))
    state["cuda"] = torch.zeros(16, dtype=torch.uint8)  # as saved on a GPU machine
    if not torch.cuda.is_available():
        set_rng_state(state)
        assert torch.equal(torch.rand(3), expected[0])
        assert np.array_equal(np.random.rand(3), expected[1])


def test_world_size_is_part_of_the_resume_fingerprint():
    """ffcv deals an epoch's order out by rank: a resume on another process count sees
    other batches, so it must not pass as the same run."""
    from barlow.config import fingerprint

    setup = setup_from(PARAMS)
    one, two = (setup.resume_config({"inputs_sha256": "x"}, w) for w in (1, 2))
    assert fingerprint(one) != fingerprint(two)
