"""The GPU check: every CUDA figure and check of this project in one prepared run of
under 8 minutes on one GPU (written for an H100/H200).

    bash benchmarks/gpu_check.sh [OUT]          # on the GPU machine, repository root

Sections, each in its own process with its own time limit (a failure is reported and
the next section runs; a CUDA fault cannot poison the rest):

  env      the GPU, torch, ffcv, numba, host cores
  tests    tests/test_cuda.py: device pipeline = CPU pipeline, loss on the GPU, "auto"
           precision, a GPU run that resumes and exports its backbone to the CPU
  step     benchmarks/bench_gpu.py: the pretraining step (ResNet-50, 224 px, bf16,
           channels_last, 8192³ projector) on tensors already on the GPU: pairs/s and
           the fraction of the GPU's dense bf16 peak (goal ≥ 2,000 pairs/s)
  fixture  an ImageNet-shaped ImageFolder (benchmarks/imagenet_like.py) converted by
           the convert stage with ffcv-imagenet's settings
  paper    the paper switch (params.yaml ⊕ configs/paper.yaml: ResNet-50, 8192³
           projector, LARS, bf16) on that .beton at 224 px through FFCV's device
           pipeline, with only size overrides (batch, epochs, one process): end-to-end
           pairs/s, a checkpoint at half-way and a resume from it
  loader   the paper's two views at 224 px from the same .beton, loader alone, with 8
           and with every host core, with the colour ops on the host and on the GPU
           (augment.colour_ops_on): pairs/s and pairs/s per core
  default  the embedded default (params.yaml: Fashion-MNIST, small ResNet, AdamW)
           pretrained a few epochs at GPU speed (kNN monitor included)

The pretraining runs call barlow.train.pretrain, the library function the pretrain
stage calls, with params files written like params.yaml (the GPU machine has no DVC,
so the stage's dvclive logging is replaced by printed lines). Every figure is printed
and collected in OUT/gpu_check.json. ``--smoke`` shrinks every size so the whole flow
runs on a CPU in a test (tests/test_gpu_check.py); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "step", "tests", "fixture", "paper", "default", "loader")
#: The most seconds each section may take on the GPU machine; together they run in
#: about 5 minutes (numba compiles each ffcv pipeline once: ~10 s a loader) and must fit
#: 12 (tests/test_gpu_check.py). loader: four loaders (colour ops on host and device).
LIMITS = {"env": 60, "step": 90, "tests": 90, "fixture": 60, "paper": 180, "default": 120,
          "loader": 120}


def sizes(smoke: bool) -> dict:
    """Every size the sections use; --smoke: small enough for a 2-core CPU test;
    GPU_CHECK_PAPER_STEPS (set by --paper-steps) shortens the paper run."""
    steps = os.environ.get("GPU_CHECK_PAPER_STEPS")
    if steps:
        return {**_sizes(smoke), "paper_steps": int(steps)}
    return _sizes(smoke)


def _sizes(smoke: bool) -> dict:
    if smoke:
        return dict(classes=4, max_per_class=8, val_per_class=2, paper_resolution=32,
                    paper_batch=8, paper_steps=4, paper_projector="64-64-64",
                    loader_resolution=32, loader_epochs=1, default_epochs=1,
                    default_images=512, bench_batch=4, bench_steps=2)
    return dict(classes=100, max_per_class=40, val_per_class=10, paper_resolution=224,
                paper_batch=256, paper_steps=120, paper_projector="8192-8192-8192",
                loader_resolution=224, loader_epochs=3, default_epochs=4,
                default_images=None, bench_batch=256, bench_steps=20)


# ---------------------------------------------------------------------- helpers

def read_yaml(path: Path) -> dict:
    import yaml

    from barlow.config import ParamsLoader

    return yaml.load(path.read_text(), Loader=ParamsLoader)


def write_params(params: dict, path: Path) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def record(out: Path, section: str, figures: dict) -> None:
    """Print a section's figures and add them to OUT/gpu_check.json."""
    path = out / "gpu_check.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[section] = figures
    path.write_text(json.dumps(results, indent=2))
    for key, value in figures.items():
        print(f"  {section}.{key} = {value}", flush=True)


def convert(params_path: Path, out_dir: Path) -> None:
    """The convert stage, as dvc.yaml runs it."""
    subprocess.run([sys.executable, "-m", "stages.convert", "dataset", "--params",
                    str(params_path), "--out", str(out_dir)], cwd=REPO, check=True)


def run_pretrain(params_path: Path, data_dir: Path, out_dir: Path,
                 stop_after_steps: int | None = None) -> list[tuple[int, dict]]:
    """barlow.train.pretrain with the sections the pretrain stage reads; one printed
    line per logged step (rank 0 of one process)."""
    from barlow import distributed as dist
    from barlow.config import (AugmentConfig, LossConfig, MachineConfig, ModelConfig,
                               PretrainConfig, load_section)
    from barlow.machine import node_shape
    from barlow.train import PretrainSetup, export, pretrain

    shape = node_shape(load_section(MachineConfig, "machine", params_path))
    setup = PretrainSetup(model=load_section(ModelConfig, "model", params_path),
                          loss=load_section(LossConfig, "loss", params_path),
                          augment=load_section(AugmentConfig, "augment", params_path),
                          pretrain=load_section(PretrainConfig, "pretrain", params_path))
    env = dist.init(timeout_s=shape.collective_timeout_s)
    logged = []

    def log(step: int, metrics: dict) -> None:
        logged.append((step, metrics))
        shown = {k: round(v, 4) for k, v in metrics.items()
                 if k in ("epoch", "loss", "pairs_per_s", "epoch_time_s", "knn_top1")}
        print(f"    step {step}: {shown}", flush=True)

    result = pretrain(setup, data_dir / "train.beton", data_dir / "test.beton", out_dir, env,
                      log, num_workers=shape.threads, stop_after_steps=stop_after_steps)
    if stop_after_steps is None:
        export(result["model"], out_dir, env)
    return logged


def steady_rate(logged: list[tuple[int, dict]]) -> float:
    """Median pairs/s of the logged windows after the first (which holds the numba
    compilation and cuDNN's autotuning)."""
    import statistics

    rates = [m["pairs_per_s"] for _, m in logged[1:]] or [m["pairs_per_s"] for _, m in logged]
    return round(statistics.median(rates), 1)


# ---------------------------------------------------------------------- sections

def section_env(out: Path, smoke: bool) -> None:
    import numba
    import torch

    import ffcv  # noqa: F401  (imports the compiled extension)

    figures = {"torch": torch.__version__, "cuda": torch.version.cuda,
               "numba": numba.__version__, "host_cores": os.cpu_count(),
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if torch.cuda.is_available():
        figures["capability"] = list(torch.cuda.get_device_capability(0))
        figures["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    record(out, "env", figures)


def section_tests(out: Path, smoke: bool) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_cuda.py"], cwd=REPO, capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
    record(out, "tests", {"exit": proc.returncode,
                          "summary": (proc.stdout.strip().splitlines() or [""])[-1]})
    if proc.returncode not in (0, 5):
        sys.exit(1)


def section_step(out: Path, smoke: bool) -> None:
    s = sizes(smoke)
    cmd = [sys.executable, "benchmarks/bench_gpu.py", "--batch", str(s["bench_batch"]),
           "--rounds", str(s["bench_steps"]), "--json", str(out / "bench_gpu.json")]
    if smoke:
        cmd.append("--smoke")
    subprocess.run(cmd, cwd=REPO, check=True)
    record(out, "step", json.loads((out / "bench_gpu.json").read_text())["extra"])


def fixture_params(out: Path, smoke: bool) -> dict:
    """params.yaml ⊕ configs/paper.yaml ⊕ the size overrides of this check."""
    from imagenet_like import class_sizes

    from barlow.config import merge_params

    s = sizes(smoke)
    steps_per_epoch = sum(class_sizes(s["classes"], s["max_per_class"])) // s["paper_batch"]
    epochs = max(2, -(-s["paper_steps"] // max(steps_per_epoch, 1)))
    return merge_params(read_yaml(REPO / "params.yaml"), read_yaml(REPO / "configs/paper.yaml"), {
        "data": {"imagefolder_root": str(out / "imagenet_like")},
        "machine": {"devices": 1, "cores": "auto"},
        "model": {"projector": s["paper_projector"]},
        "augment": {"resolution": s["paper_resolution"]},
        "pretrain": {"epochs": epochs, "batch_size": s["paper_batch"], "warmup_epochs": 1.0,
                     "checkpoint_every_steps": max(1, (epochs * steps_per_epoch) // 2),
                     "log_every_steps": max(1, steps_per_epoch), "knn_every_epochs": epochs,
                     "knn_bank_size": 10_000},
    })


def section_fixture(out: Path, smoke: bool) -> None:
    import imagenet_like

    s = sizes(smoke)
    start = time.perf_counter()
    counts = imagenet_like.make_tree(out / "imagenet_like", s["classes"], s["max_per_class"],
                                     s["val_per_class"], workers=os.cpu_count() or 1)
    made = time.perf_counter() - start
    params = write_params(fixture_params(out, smoke), out / "params_paper.yaml")
    start = time.perf_counter()
    convert(params, out / "ffcv_paper")
    converted = time.perf_counter() - start
    record(out, "fixture", {"train_images": counts["train"], "val_images": counts["val"],
                            "generate_s": round(made, 1), "convert_s": round(converted, 1),
                            "convert_images_per_s": round(sum(counts.values()) / converted, 1)})


def section_paper(out: Path, smoke: bool) -> None:
    import torch

    params = out / "params_paper.yaml"
    cfg = read_yaml(params)["pretrain"]
    half = cfg["checkpoint_every_steps"]
    run_dir = out / "paper_run"
    start = time.perf_counter()
    first = run_pretrain(params, out / "ffcv_paper", run_dir, stop_after_steps=half)
    rest = run_pretrain(params, out / "ffcv_paper", run_dir)
    wall = time.perf_counter() - start
    ckpt = run_dir / "checkpoint.pt"
    figures = {"steps": rest[-1][0], "resumed_at": half, "batch": cfg["batch_size"],
               "pairs_per_s_end_to_end": steady_rate(rest[len(first):] or rest),
               "wall_s": round(wall, 1),
               "checkpoint_gib": round(ckpt.stat().st_size / 2**30, 2),
               "final_loss": round(rest[-1][1]["loss"], 2),
               "knn_top1": rest[-1][1].get("knn_top1")}
    if torch.cuda.is_available():
        figures["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    record(out, "paper", figures)


def section_loader(out: Path, smoke: bool) -> None:
    import torch

    from barlow.config import AugmentConfig, load_section
    from barlow.data.convert import read_manifest
    from barlow.data.loaders import config_views, pretrain_loader
    from barlow.data.convert import normalisation
    from harness import compare

    s = sizes(smoke)
    beton = out / "ffcv_paper" / "train.beton"
    views = config_views(load_section(AugmentConfig, "augment", out / "params_paper.yaml"))
    mean, std = normalisation(read_manifest(beton))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cores = os.cpu_count() or 1

    def epoch(loader) -> int:
        pairs = sum(y1.shape[0] for y1, _y2 in loader)
        torch.cuda.synchronize() if device.type == "cuda" else None
        return pairs

    loaders = {(where, workers): pretrain_loader(
        str(beton), 256 if not smoke else 8, workers, views, mean, std, seed=0, device=device,
        channels_last=True, colour_ops_on=where)
        for where in ("host", "device") for workers in sorted({min(8, cores), cores})}
    # The warm-up epoch compiles each pipeline.
    results = compare({key: lambda loader=loader: epoch(loader) for key, loader in loaders.items()},
                      s["loader_epochs"])
    figures = {}
    for (where, workers), result in results.items():
        figures[f"pairs_per_s_{workers}_cores_colour_{where}"] = round(result.rate, 1)
        figures[f"pairs_per_s_per_core_{workers}_cores_colour_{where}"] = round(
            result.rate / workers, 1)
    figures["resolution"] = views[0].resolution
    record(out, "loader", figures)


def section_default(out: Path, smoke: bool) -> None:
    from barlow.config import merge_params

    s = sizes(smoke)
    fmnist = Path(os.environ.get("FASHION_MNIST_DIR", REPO / ".gpu" / "fashion-mnist"))
    base = read_yaml(REPO / "params.yaml")
    params = merge_params(base, {"data": {"fashion_mnist_dir": str(fmnist)},
                           "pretrain": {"epochs": s["default_epochs"]},
                           "machine": {"devices": 1, "cores": "auto"}})
    path = write_params(params, out / "params_default.yaml")
    data = out / "ffcv_default"
    convert(path, data)
    start = time.perf_counter()
    logged = run_pretrain(path, data, out / "default_run")
    knn = [m["knn_top1"] for _, m in logged if "knn_top1" in m]
    record(out, "default", {"epochs": s["default_epochs"], "steps": logged[-1][0],
                            "pairs_per_s": steady_rate(logged),
                            "epoch_time_s": [round(m["epoch_time_s"], 2) for _, m in logged
                                             if "epoch_time_s" in m],
                            "wall_s": round(time.perf_counter() - start, 1),
                            "knn_top1": knn[-1] if knn else None,
                            "cpu_reference": "≈ 2,000 pairs/s, 30 s per epoch on 2 AMD EPYC "
                                             "cores (benchmarks/README.md)"})


# ---------------------------------------------------------------------- driver

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results and data")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, CPU allowed: checks the flow, not the figures")
    parser.add_argument("--paper-steps", type=int,
                        help="steps of the paper run (default 120; a checkpoint at half-way)")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # one section, in a child
    args = parser.parse_args()
    sys.path[:0] = [str(REPO / "src"), str(REPO / "benchmarks"), str(REPO)]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.section:
        globals()[f"section_{args.section}"](args.out, args.smoke)
        return
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    if args.paper_steps:
        os.environ["GPU_CHECK_PAPER_STEPS"] = str(args.paper_steps)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), str(REPO / "benchmarks"), str(REPO),
         os.environ.get("PYTHONPATH", "")])}
    failed = []
    for name in chosen:
        print(f"== {name} (limit {LIMITS[name]} s)", flush=True)
        start = time.perf_counter()
        # Its own process group: a section over its limit is stopped with everything it
        # started (the convert stage, ffcv's writer, pytest).
        proc = subprocess.Popen([sys.executable, __file__, "--out", str(args.out), "--section",
                                 name] + (["--smoke"] if args.smoke else []),
                                cwd=REPO, env=env, start_new_session=True)
        try:
            ok = proc.wait(timeout=None if args.smoke else LIMITS[name]) == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            ok = False
            print(f"== {name}: over its {LIMITS[name]} s limit, stopped", flush=True)
        print(f"== {name}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s",
              flush=True)
        if not ok:
            failed.append(name)
    print(f"gpu_check: {len(chosen) - len(failed)} sections ok, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else ""), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
