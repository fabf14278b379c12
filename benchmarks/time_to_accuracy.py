"""Time to accuracy: the pipeline's stages for two commits (or two params variants of
one), run side by side on this machine, each stage's wall time and the accuracies.

    python benchmarks/time_to_accuracy.py --a main --b HEAD            # pretrain + linear
    python benchmarks/time_to_accuracy.py --set-b pretrain.knn_every_epochs=4 \\
        -S pretrain.epochs=2 -S linear.epochs=5 --knn-target 65 70    # a cheap check
    python benchmarks/time_to_accuracy.py --peer --peer-budget-s 300   # B: lightly's
    python benchmarks/time_to_accuracy.py --only-a --stages pretrain linear semisup transfer
    python benchmarks/time_to_accuracy.py --only-a --stages linear_baselines semisup_scratch \
        transfer_baselines                                              # the baselines

Each variant is a detached git worktree of its commit under --work, with params.yaml
rewritten by scripts/params_args.py --write (the common -S overrides, then its own
--set-a/--set-b), and data/ffcv and data/transfer linked to this checkout's converted
sets (run `dvc repro convert convert_transfer` here first; both variants read the same
.betons). Each stage runs its own commit's dvc.yaml command, in its worktree, after its
outputs are removed (a pretraining checkpoint would resume). Rounds alternate A, B, A, B
(benchmarks/harness.py), so load on a shared machine falls on both alike.

Per variant, medians over the rounds of: each stage's wall time (process start to exit,
start-up included) and the chain's; pretraining's kNN top-1 (the monitor's last value)
and pairs/s (its last progress line); the linear probe's best validation top-1 and its
test top-1 at that epoch (linear/barlow/top1_best). Time to kNN is read from
pretraining's own per-epoch lines (``... | kNN top-1 74.2 | ...``), each stamped on
arrival with the seconds since the pretraining process started:

    t_knn(target) = min { t_e : kNN_e ≥ target }   (None when no epoch reached it)

for each --knn-target, so it counts start-up, the loader's compile and the monitor's own
time, as a user waits for them. Ratios are B / A of the times (below 1: B is faster).
The log of every stage, each line stamped, is kept under --work when it is given.

--peer makes B's pretraining benchmarks/peer_lightly.py (lightly's Barlow Twins loss,
head and views on a torch DataLoader, with B's params: this project's backbone, batch,
optimiser and kNN monitor), optionally stopped after --peer-budget-s seconds of
training; B's other stages are the project's own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from harness import compare, machine, machine_line, parser

ROOT = Path(__file__).resolve().parents[1]
# What each stage writes; removed before it runs so that nothing resumes or is reused.
# The baselines' stages (linear_baselines, semisup_scratch, transfer_baselines) read no
# backbone: --stages names them to time them too.
OUTPUTS = {"pretrain": ["models/pretrain", "dvclive/pretrain"],
           "linear": ["dvclive/linear"], "linear_baselines": ["dvclive/linear_baselines"],
           "semisup": ["dvclive/semisup"], "semisup_scratch": ["dvclive/semisup_scratch"],
           "transfer": ["dvclive/transfer"],
           "transfer_baselines": ["dvclive/transfer_baselines"]}
KNN = re.compile(r"\|\s*kNN top-1 ([0-9.]+)")
PAIRS = re.compile(r"\|\s*pairs/s ([0-9.]+)")


@dataclass
class Run:
    """One variant's chain, one round: wall seconds per stage, the kNN curve as
    (seconds since pretraining started, kNN top-1), and the final figures."""

    stages: dict[str, float] = field(default_factory=dict)
    knn_curve: list[tuple[float, float]] = field(default_factory=list)
    pairs_per_s: float | None = None
    linear: dict[str, float] = field(default_factory=dict)


def parse_epoch_line(line: str) -> tuple[float | None, float | None]:
    """(kNN top-1, pairs/s) of a pretraining progress line; None where absent."""
    knn, pairs = KNN.search(line), PAIRS.search(line)
    return (float(knn.group(1)) if knn else None, float(pairs.group(1)) if pairs else None)


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first time the curve reaches ``target`` (see the module's t_knn)."""
    return next((t for t, value in curve if value >= target), None)


def median_or_none(values: list[float | None]) -> float | None:
    """The median of the values, or None if any round did not reach its figure."""
    return None if not values or any(v is None for v in values) else statistics.median(values)


def ratio(b: float | None, a: float | None) -> float | None:
    return None if a is None or b is None or a == 0 else b / a


def summary(runs: list[Run], stages: list[str],
            knn_targets: list[float]) -> dict[str, float | None]:
    """Medians over the rounds of one variant's figures."""
    out: dict[str, float | None] = {f"{s}_s": median_or_none([r.stages.get(s) for r in runs])
                                    for s in stages}
    out["chain_s"] = median_or_none([sum(r.stages.values()) for r in runs])
    out["knn_top1"] = median_or_none([r.knn_curve[-1][1] if r.knn_curve else None
                                      for r in runs]) if "pretrain" in stages else None
    for target in knn_targets:
        out[f"time_to_knn_{target:g}_s"] = (
            median_or_none([time_to(r.knn_curve, target) for r in runs])
            if "pretrain" in stages else None)
    out["pairs_per_s"] = (median_or_none([r.pairs_per_s for r in runs])
                          if "pretrain" in stages else None)
    for key in ("val_top1_best", "test_top1_at_best_val"):
        out[f"linear_{key}"] = (median_or_none([r.linear.get(key) for r in runs])
                                if "linear" in stages else None)
    return out


def linear_figures(tree: Path) -> dict[str, float]:
    """The probe's best validation top-1 (its per-epoch plot) and the test top-1 at that
    epoch (metrics.json's top1_best)."""
    metrics = json.loads((tree / "dvclive/linear/metrics.json").read_text())["linear"]["barlow"]
    val = (tree / "dvclive/linear/plots/metrics/linear/barlow/val_top1.tsv").read_text()
    rows = [line.split("\t") for line in val.splitlines()[1:] if line.strip()]
    return {"val_top1_best": max(float(value) for _, value in rows),
            "test_top1_at_best_val": float(metrics["top1_best"])}


def stage_command(tree: Path, stage: str, peer: bool, budget_s: float | None) -> str:
    if peer and stage == "pretrain":
        # lightly comes from the caller's PYTHONPATH (the peer script's docstring).
        cmd = (f"PYTHONPATH=src:$PYTHONPATH python {ROOT / 'benchmarks/peer_lightly.py'}"
               " --data data/ffcv --out models/pretrain")
        return cmd + (f" --budget-s {budget_s}" if budget_s else "")
    cmd = yaml.safe_load((tree / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    if "${" in cmd:
        sys.exit(f"{tree}/dvc.yaml: stage {stage}'s command interpolates params; not supported")
    return cmd


def run_stage(tree: Path, stage: str, cmd: str, log: Path, run: Run) -> None:
    """The stage's command in ``tree``; each output line stamped and logged."""
    for out in OUTPUTS[stage]:
        shutil.rmtree(tree / out, ignore_errors=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = time.perf_counter()
    with log.open("a", buffering=1) as sink:  # by line: it can be followed
        sink.write(f"$ {cmd}\n")
        proc = subprocess.Popen(cmd, shell=True, cwd=tree, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout:
            t = time.perf_counter() - start
            sink.write(f"[{t:8.1f}s] {line}")
            if stage == "pretrain":
                knn, pairs = parse_epoch_line(line)
                if knn is not None:
                    run.knn_curve.append((t, knn))
                if pairs is not None:
                    run.pairs_per_s = pairs
    if proc.wait() != 0:
        sys.exit(f"{stage} in {tree} exited {proc.returncode}; its output: {log}")
    run.stages[stage] = time.perf_counter() - start
    if stage == "linear":
        run.linear = linear_figures(tree)


def worktree(ref: str, path: Path, overrides: list[str]) -> str:
    """A detached worktree of ``ref`` at ``path`` with its params rewritten; the commit."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT,
                   check=True, capture_output=True)
    for name in ("ffcv", "transfer"):
        if (ROOT / "data" / name).exists():
            (path / "data" / name).symlink_to(ROOT / "data" / name)
    subprocess.run([sys.executable, str(ROOT / "scripts/params_args.py"), "--write",
                    "params.yaml", *overrides], cwd=path, check=True)
    return commit


def main() -> None:
    p = parser(__doc__, rounds=1, warmup=0)
    p.add_argument("--a", default="HEAD", help="commit of variant A")
    p.add_argument("--b", default="HEAD", help="commit of variant B")
    p.add_argument("-S", "--set", dest="common", action="append", default=[],
                   metavar="KEY=VALUE", help="params override for both variants")
    p.add_argument("--set-a", action="append", default=[], metavar="KEY=VALUE",
                   help="params override for A, after -S")
    p.add_argument("--set-b", action="append", default=[], metavar="KEY=VALUE",
                   help="params override for B, after -S")
    p.add_argument("--stages", nargs="+", default=["pretrain", "linear"],
                   choices=list(OUTPUTS),
                   help="in the chain's order, from pretrain (the others need its backbone)")
    p.add_argument("--knn-target", type=float, nargs="+", default=[75.0],
                   help="kNN top-1 (%%) values to time")
    p.add_argument("--peer", action="store_true",
                   help="B pretrains with benchmarks/peer_lightly.py")
    p.add_argument("--peer-budget-s", type=float,
                   help="stop the peer's training after this many seconds")
    p.add_argument("--only-a", action="store_true",
                   help="run A alone: its per-stage times, no ratio")
    p.add_argument("--work", type=Path, help="worktrees and stamped logs, kept here;"
                   " without it a temp dir, removed at the end")
    args = p.parse_args()
    if not (ROOT / "data/ffcv/train.beton").exists():
        sys.exit("data/ffcv/train.beton missing: run `dvc repro convert convert_transfer` first")

    work = args.work or Path(tempfile.mkdtemp(prefix="tta-"))
    work.mkdir(parents=True, exist_ok=True)
    variants = {"A": (args.a, args.common + args.set_a, False),
                "B": (args.b, args.common + args.set_b, args.peer)}
    if args.only_a:
        del variants["B"]
    trees, commits, runs = {}, {}, {name: [] for name in variants}
    try:
        for name, (ref, overrides, _) in variants.items():
            trees[name] = work / name
            commits[name] = worktree(ref, trees[name], overrides)

        def chain(name: str):
            tree, peer = trees[name], variants[name][2]
            run = Run()
            for stage in args.stages:
                run_stage(tree, stage, stage_command(tree, stage, peer, args.peer_budget_s),
                          work / f"{name}.log", run)
            runs[name].append(run)
            print(f"{name}: " + ", ".join(f"{s} {t:.0f} s" for s, t in run.stages.items())
                  + (f", kNN {run.knn_curve[-1][1]}" if run.knn_curve else "")
                  + (f", linear test {run.linear['test_top1_at_best_val']}"
                     if run.linear else ""), flush=True)

        compare({name: (lambda name=name: chain(name)) for name in variants},
                args.rounds, args.warmup)
    finally:
        if args.work is None:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                               capture_output=True)
            shutil.rmtree(work, ignore_errors=True)

    m = machine()
    print(machine_line(m))
    print(f"A = {args.a} ({commits['A'][:10]}) {' '.join(variants['A'][1])}".rstrip())
    if "B" in variants:
        print(f"B = {args.b} ({commits['B'][:10]}) {' '.join(variants['B'][1])}"
              f"{' [peer: lightly]' if args.peer else ''}".rstrip())
    print(f"median of {args.rounds} alternating round(s); ratio = B / A")
    medians = {name: summary(r, args.stages, args.knn_target) for name, r in runs.items()}
    for key in medians["A"]:
        a, b = medians["A"][key], medians.get("B", {}).get(key)
        if a is None and b is None:
            continue
        r = ratio(b, a)
        show = (lambda v: "—" if v is None else f"{v:.2f}")
        print(f"{key:32s} {show(a):>10s} {show(b):>10s}"
              + (f" {r:6.2f}x" if r is not None and key.endswith("_s") else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": m, "args": {k: str(v) if isinstance(v, Path) else v
                                    for k, v in vars(args).items()},
             "commits": commits, "medians": medians,
             "runs": {name: [asdict(r) for r in rs] for name, rs in runs.items()}}, indent=2))


if __name__ == "__main__":
    main()
