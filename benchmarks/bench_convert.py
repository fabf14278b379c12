"""The convert stage at scale: peak memory at N and 4N images, and throughput against a
bare FFCV writer.

Builds (once, under --root) a synthetic ImageFolder of 500-px JPEGs shaped like
ImageNet's (longest side 500, 4:3 landscape or 3:4 portrait, smooth colour fields with
noise, quality 90): ``train/`` with 4N images in --classes folders and ``val/`` with
--val images. The N-image tree is the first N of them, hard-linked.

1. Memory (--rss): the convert stage as DVC runs it (``python -m stages.convert dataset``
   with ``data.source: imagefolder`` and ffcv-imagenet's settings: proportion, 500 px,
   compress_probability 0.5, quality 90) on the N tree, then on the 4N tree. Three
   figures: the stage process's peak RSS (its VmHWM, read as it exits), the largest
   peak RSS among its child processes (the hashing pool, ffcv's writer processes:
   getrusage(RUSAGE_CHILDREN) as it exits, after multiprocessing has reaped them),
   and the peak of the summed PSS of the whole process tree (shared pages counted
   once), sampled every 0.1 s. Goal: the 4N run's figures within +10 % of the N
   run's.

2. Throughput (--rounds): on the N tree, alternating, the convert stage and a bare
   ffcv-imagenet ``write_imagenet.py``: torchvision ``ImageFolder`` (PIL loader) into
   ``DatasetWriter`` with RGBImageField(write_mode='proportion', max_resolution=500,
   compress_probability=0.5, jpeg_quality=90) and IntField, both splits, the same
   number of writer processes (machine.cores), each as a fresh process (start-up and
   imports included in both). images/s = (train + val images) / wall time; the ratio
   ours / bare is taken per round and its median reported. Goal: ≥ 0.8.

Run from the repository root:
    PYTHONPATH=src python benchmarks/bench_convert.py --images 2500 --scale 4
(add --no-rss or --rounds 0 to run one part). The trees stay under --root for reruns;
--clean removes them at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FFCV_IMAGENET = {"write_mode": "proportion", "max_resolution": 500,
                 "compress_probability": 0.5, "jpeg_quality": 90}


# --- the synthetic tree ----------------------------------------------------------------

def _write_jpeg(job: tuple[str, int]) -> None:
    """One 500-px JPEG: a bilinear-upsampled 1/16-scale random colour field plus noise
    (so files are ~ImageNet-sized, not trivially compressible), seeded by its index."""
    from PIL import Image

    path, seed = job
    rng = np.random.default_rng(seed)
    h, w = (375, 500) if seed % 4 else (500, 375)
    coarse = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8))
    image = np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.int16)
    image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(path, quality=90)


def make_tree(root: Path, train: int, val: int, classes: int, workers: int) -> None:
    """``root/train`` (``train`` images) and ``root/val`` (``val``), ``classes`` folders
    each; image i goes to class i mod classes. Skipped when ``root/done.json`` matches."""
    spec = {"train": train, "val": val, "classes": classes}
    marker = root / "done.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return
    shutil.rmtree(root, ignore_errors=True)
    jobs = []
    for split, n, offset in (("train", train, 0), ("val", val, 10**7)):
        for c in range(classes):
            (root / split / f"n{c:08d}").mkdir(parents=True)
        jobs += [(str(root / split / f"n{i % classes:08d}" / f"{split}_{i:08d}.JPEG"), offset + i)
                 for i in range(n)]
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_jpeg, jobs, chunksize=64))
    marker.write_text(json.dumps(spec))
    print(f"made {root}: {train} + {val} JPEGs in {time.perf_counter() - start:.0f} s")


def subset_tree(full: Path, root: Path, train: int) -> None:
    """``root``: the first ``train`` train images of ``full`` (hard links) and all its val."""
    marker = root / "done.json"
    spec = {"of": str(full), "train": train}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return
    shutil.rmtree(root, ignore_errors=True)
    for split in ("train", "val"):
        files = sorted((full / split).rglob("*.JPEG"), key=lambda p: p.name)
        if split == "train":
            files = files[:train]
        for c in sorted(d.name for d in (full / split).iterdir()):
            (root / split / c).mkdir(parents=True)
        for f in files:
            os.link(f, root / split / f.parent.name / f.name)
    marker.write_text(json.dumps(spec))


def count(root: Path) -> int:
    return sum(1 for _ in root.rglob("*.JPEG"))


# --- running and sampling one conversion -------------------------------------------------

def _tree_pss(proc: "psutil.Process") -> int:  # noqa: F821
    """Σ PSS over ``proc`` and its descendants, bytes."""
    import psutil

    pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            pss += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss


# Runs a module (-m) or script as __main__ and, as the very last exit handler (atexit
# runs them in reverse, so after multiprocessing's, which reaps the children), prints
# its own VmHWM and its children's largest peak RSS.
_WRAPPER = """
import atexit, json, resource, runpy, sys
def report():
    status = open("/proc/self/status").read()
    hwm = int(status.split("VmHWM:")[1].split()[0])
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print("MEMORY " + json.dumps({"self_kb": hwm, "children_kb": children}), file=sys.stderr)
atexit.register(report)
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


def run_measured(target: str, args: list[str], env: dict) -> dict:
    """Run module or script ``target`` with ``args``; wall seconds and memory (MB)."""
    import psutil

    start = time.perf_counter()
    popen = subprocess.Popen([sys.executable, "-c", _WRAPPER, target, *args], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    proc = psutil.Process(popen.pid)
    peak = [0]

    def sample() -> None:
        while popen.poll() is None:
            peak[0] = max(peak[0], _tree_pss(proc))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output, _ = popen.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if popen.returncode != 0:
        sys.exit(f"{target} {' '.join(args)} failed ({popen.returncode}):\n{output[-3000:]}")
    memory = json.loads(output.rsplit("MEMORY ", 1)[1].splitlines()[0])
    return {"wall_s": wall, "self_mb": memory["self_kb"] / 1024,
            "children_mb": memory["children_kb"] / 1024, "tree_pss_mb": peak[0] / 2**20}


def ours(root: Path, out: Path, workers: int, work: Path) -> dict:
    """The convert stage, exactly as dvc.yaml runs it, on ``root``."""
    import yaml

    params = work / f"params-{root.name}.yaml"
    params.write_text(yaml.safe_dump({"data": {
        "source": "imagefolder", "imagefolder_root": str(root), "ffcv": FFCV_IMAGENET},
        "machine": {"devices": 1, "cores": workers}}))
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'src'}"}
    return run_measured("stages.convert", ["dataset", "--params", str(params), "--out", str(out)],
                        env)


def bare(root: Path, out: Path, workers: int) -> dict:
    """ffcv-imagenet's write_imagenet.py on both splits of ``root``."""
    shutil.rmtree(out, ignore_errors=True)
    return run_measured(__file__, ["--bare-run", str(root), str(out), str(workers)],
                        dict(os.environ))


def bare_run(root: str, out: str, workers: int) -> None:
    """What write_imagenet.py does, per split (its chunk_size default: 100)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    Path(out).mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train"), ("val", "test")):
        dataset = ImageFolder(root=str(Path(root) / split))
        writer = DatasetWriter(str(Path(out) / f"{name}.beton"),
                               {"image": RGBImageField(**FFCV_IMAGENET), "label": IntField()},
                               num_workers=workers)
        writer.from_indexed_dataset(dataset, chunksize=100)


# --- main -----------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2500, help="N: train images, small tree")
    parser.add_argument("--scale", type=int, default=4, help="the large tree has scale·N")
    parser.add_argument("--val", type=int, default=250, help="val images (both trees)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="machine.cores and the writer's")
    parser.add_argument("--rounds", type=int, default=2, help="throughput rounds (0: none)")
    parser.add_argument("--no-rss", action="store_true", help="skip the N / scale·N memory runs")
    parser.add_argument("--root", type=Path, default=Path("/tmp/barlow_bench_convert"))
    parser.add_argument("--clean", action="store_true", help="remove --root at the end")
    parser.add_argument("--bare-run", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_run:
        bare_run(args.bare_run[0], args.bare_run[1], int(args.bare_run[2]))
        return

    big, small, work = args.root / "big", args.root / "small", args.root / "work"
    work.mkdir(parents=True, exist_ok=True)
    make_tree(big, args.images * args.scale, args.val, args.classes, args.workers)
    subset_tree(big, small, args.images)
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores; load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; workers {args.workers}")

    if not args.no_rss:
        print("\n== memory: the convert stage at N and scale·N train images ==")
        rows = {}
        for name, root in (("N", small), (f"{args.scale}N", big)):
            n = count(root)
            r = ours(root, work / f"out-{name}", args.workers, work)
            rows[name] = r
            beton_gb = sum(f.stat().st_size for f in (work / f"out-{name}").glob("*.beton")) / 1e9
            print(f"{name:>3}: {n:6d} images  {r['wall_s']:6.1f} s  {n / r['wall_s']:6.1f} img/s"
                  f"  stage {r['self_mb']:6.1f} MB  largest child {r['children_mb']:6.1f} MB"
                  f"  tree Σ PSS {r['tree_pss_mb']:6.1f} MB  .beton {beton_gb:.2f} GB")
            shutil.rmtree(work / f"out-{name}")
        for key, label in (("self_mb", "stage peak RSS"), ("children_mb", "largest child peak RSS"),
                           ("tree_pss_mb", "tree peak Σ PSS")):
            growth = rows[f"{args.scale}N"][key] / rows["N"][key] - 1
            print(f"{label}: {args.scale}N / N − 1 = {growth:+.1%} → "
                  f"{'meets' if growth <= 0.10 else 'misses'} the goal ≤ +10 %")

    if args.rounds:
        n = count(small)
        print(f"\n== throughput: {n} images (N tree, train + val), {args.rounds} rounds, "
              f"alternating ==")
        ratios = []
        for r in range(args.rounds):
            a = ours(small, work / "out-ours", args.workers, work)
            b = bare(small, work / "out-bare", args.workers)
            ratios.append(b["wall_s"] / a["wall_s"])
            print(f"round {r + 1}: ours {n / a['wall_s']:6.1f} img/s ({a['wall_s']:.1f} s), "
                  f"bare FFCV {n / b['wall_s']:6.1f} img/s ({b['wall_s']:.1f} s), "
                  f"ratio {ratios[-1]:.3f}")
        ratio = statistics.median(ratios)
        print(f"median ratio ours / bare = {ratio:.3f} → "
              f"{'meets' if ratio >= 0.8 else 'misses'} the goal ≥ 0.8; load average now "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for d in ("out-ours", "out-bare"):
            shutil.rmtree(work / d, ignore_errors=True)
    if args.clean:
        shutil.rmtree(args.root)


if __name__ == "__main__":
    main()
