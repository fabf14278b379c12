"""The timing loop every benchmark uses: warm-up, A/B alternation, medians, ratios, the
machine, JSON out.

A variant is a callable that does one unit of measured work (a step, an epoch, a
batch) and returns how many items it processed (pairs, images; ``None`` counts 1).
``compare`` runs each variant ``warmup`` times untimed (JIT, caches, lazy
initialisation), then ``rounds`` rounds that call every variant once in turn (A, B, A,
B, …), so load on a shared machine falls on all variants alike, and keeps each call's
wall time. A variant that runs on a GPU synchronises before it returns.

    from harness import compare, parser, report
    args = parser(__doc__).parse_args()
    results = compare({"ours": ours, "baseline": baseline}, args.rounds, args.warmup)
    report(results, "items/s", baseline="baseline", json_path=args.json, args=vars(args))
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable


@dataclass
class Result:
    """One variant's timed calls: wall seconds and items processed, call by call."""

    seconds: list[float]
    items: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        """Median items per second over the calls."""
        return statistics.median(n / s for n, s in zip(self.items, self.seconds))


def compare(variants: dict[str, Callable[[], float | None]], rounds: int,
            warmup: int = 1) -> dict[str, Result]:
    """Each variant warmed up, then timed in ``rounds`` alternating rounds."""
    for run in variants.values():
        for _ in range(warmup):
            run()
    results = {name: Result([], []) for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            items = run()
            results[name].seconds.append(time.perf_counter() - start)
            results[name].items.append(1.0 if items is None else float(items))
    return results


def machine() -> dict[str, Any]:
    """Where the figures come from: CPU model and cores, load, GPU, torch, the time."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                   if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    out = {"cpu": cpu, "cores": os.cpu_count(), "load": os.getloadavg()[0],
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import torch

        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return out


def machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if "gpu" in m else ""
    torch = f", torch {m['torch']}" if "torch" in m else ""
    return (f"machine: {m['cpu']}, {m['cores']} cores{gpu}{torch}; load {m['load']:.2f}; "
            f"{m['date']}")


def report(results: dict[str, Result], unit: str, baseline: str | None = None,
           json_path: str | None = None, args: dict[str, Any] | None = None,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Print the machine line and one row per variant (median ms per call, median rate,
    ratio of rates to ``baseline``); write everything to ``json_path`` if given."""
    m = machine()
    print(machine_line(m))
    rounds = len(next(iter(results.values())).seconds)
    print(f"median of {rounds} alternating rounds")
    width = max(len(name) for name in results)
    print(f"{'':{width}s} {'ms/call':>10s} {unit:>12s}" + (f" {'ratio':>7s}" if baseline else ""))
    rows = {}
    for name, r in results.items():
        ratio = r.rate / results[baseline].rate if baseline else None
        print(f"{name:{width}s} {r.median_s * 1e3:10.1f} {r.rate:12.1f}"
              + (f" {ratio:6.2f}x" if ratio is not None else ""))
        rows[name] = {"median_s": r.median_s, "rate": r.rate, "ratio": ratio,
                      "seconds": r.seconds, "items": r.items}
    out = {"machine": m, "args": args or {}, "unit": unit, "baseline": baseline,
           "results": rows, **({"extra": extra} if extra else {})}
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2))
    return out


def parser(doc: str, rounds: int = 5, warmup: int = 1) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=rounds, help="timed alternating rounds")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed calls per variant first")
    p.add_argument("--json", help="also write the machine, arguments and figures here")
    return p
