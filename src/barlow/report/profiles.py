"""Finished runs of other profiles (e.g. configs/long.yaml), kept as committed snapshots
so that the report can set them beside this run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from barlow.data.sources import DataError
from barlow.report.ablations import format_value
from barlow.report.inputs import flatten
from barlow.report.seeds import is_operational


def profile_snapshot(name: str, rev: str, params: Mapping[str, Any],
                     metrics: Mapping[str, float]) -> dict[str, Any]:
    """A finished run of another profile (e.g. configs/long.yaml), kept as a committed
    file so that the report can set it beside this run: its name, the git revision
    holding its dvc.lock and metrics, its flattened params ("pretrain.epochs") and
    metrics ("linear/barlow/top1_best")."""
    return {"name": name, "rev": rev, "params": flatten(params, "."),
            "metrics": dict(sorted(metrics.items()))}


def load_profiles(folder: Path) -> list[dict[str, Any]]:
    """Every snapshot in ``folder`` (*.json, by file name); a file that is not a
    profile_snapshot is an error naming it."""
    snapshots = []
    for path in sorted(folder.glob("*.json")):
        try:
            snapshot = json.loads(path.read_text())
        except json.JSONDecodeError:
            snapshot = None
        if not (isinstance(snapshot, dict)
                and {"name", "rev", "params", "metrics"} <= snapshot.keys()):
            raise DataError(f"{path}: not a `report profile` snapshot")
        snapshots.append(snapshot)
    return snapshots


def profile_rows(this_params: Mapping[str, Any], this_metrics: Mapping[str, float],
                 profiles: Sequence[Mapping[str, Any]], metric_names: Sequence[str]
                 ) -> list[list[str]]:
    """Rows "quantity | this run | profile…": first every param on which any profile
    differs from this run (data paths and worker counts aside), then METRIC_NAMES."""
    mine = flatten(this_params, ".")
    keys = sorted({k for p in profiles for k, v in p["params"].items()
                   if v != mine.get(k) and not is_operational(k)})
    rows = [[k, format_value(mine.get(k, "—"))]
            + [format_value(p["params"].get(k, "—")) for p in profiles] for k in keys]

    def number(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f}"

    rows += [[m, number(this_metrics.get(m))] + [number(p["metrics"].get(m)) for p in profiles]
             for m in metric_names]
    return rows
