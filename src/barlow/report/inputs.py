"""The dvclive files the report reads: each stage's metrics.json, flattened, with the
stage's status, and the pretraining curves (per-metric TSVs)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

#: The stages whose dvclive metrics the report reads, in report order: each evaluation,
#: then the stage of its baselines (the same metric names, "…/random_init/…",
#: "…/raw_pixels/…", "…/scratch/…", in a stage that does not read the backbone).
STAGES = ("pretrain", "linear", "linear_baselines", "semisup", "semisup_scratch", "transfer",
          "transfer_baselines")
#: Stages whose params may list no baseline: they then write a metrics.json of {}.
BASELINE_STAGES = ("linear_baselines", "transfer_baselines")
NOT_RUN = "not run"
NO_BASELINES = "ok (no baselines listed)"


def flatten(tree: Mapping[str, Any], sep: str, prefix: str = "") -> dict[str, Any]:
    """Nested mapping → {"a<sep>b<sep>c": leaf}; dvclive nests "linear/barlow/top1" keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, sep, name))
        else:
            flat[name] = value
    return flat


def numeric_metrics(tree: Mapping[str, Any]) -> dict[str, float]:
    """A dvclive metrics.json tree → its numeric leaves, flattened with "/". dvclive's
    top-level "step" is dropped: it is the last logged step, not a result."""
    results = {k: v for k, v in tree.items() if k != "step"}
    return {k: float(v) for k, v in flatten(results, "/").items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def load_metrics(live_root: Path, stages: Sequence[str] = STAGES
                 ) -> tuple[dict[str, float], dict[str, str]]:
    """All numeric metrics of LIVE_ROOT/<stage>/metrics.json, flattened with "/", and
    each stage's status ("ok", "not run", or NO_BASELINES for a baseline stage whose
    params list none: its metrics.json holds no metric)."""
    metrics: dict[str, float] = {}
    status: dict[str, str] = {}
    for stage in stages:
        path = Path(live_root) / stage / "metrics.json"
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            # A stage that has not run (or died while writing) is reported, not fatal.
            status[stage] = NOT_RUN
            continue
        found = numeric_metrics(data)
        status[stage] = ("ok" if found else
                         NO_BASELINES if stage in BASELINE_STAGES and not data else NOT_RUN)
        metrics.update(found)
    return metrics, status


Curve = tuple[list[float], list[float]]


def parse_tsv(text: str) -> Curve | None:
    """One dvclive TSV (header, then step … value rows) → (steps, values); None when it
    holds no row."""
    steps, values = [], []
    reader = csv.reader(io.StringIO(text), delimiter="\t")
    header = next(reader, None)
    if not header or len(header) < 2:
        return None
    for row in reader:
        try:
            steps.append(float(row[0]))
            values.append(float(row[-1]))
        except (ValueError, IndexError):
            continue  # a torn last line of a run still writing
    return (steps, values) if steps else None


def load_curves(plots_dir: Path) -> dict[str, Curve]:
    """dvclive's per-metric TSVs under PLOTS_DIR (e.g. dvclive/pretrain/plots/metrics):
    {"pretrain/loss": (steps, values)}; the key is the file's path without .tsv."""
    curves: dict[str, Curve] = {}
    plots_dir = Path(plots_dir)
    if not plots_dir.is_dir():
        return curves
    for path in sorted(plots_dir.rglob("*.tsv")):
        curve = parse_tsv(path.read_text())
        if curve:
            curves[path.relative_to(plots_dir).with_suffix("").as_posix()] = curve
    return curves
