"""The ablation experiments: `dvc exp show --json` parsed into one record per run, and
finished runs grouped per study (the swept param each changes) as mean ± std over seeds."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from barlow.report.inputs import flatten, numeric_metrics
from barlow.report.seeds import Stat


def _run_state(entry: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    executor = entry.get("executor") or {}
    if executor.get("state") in ("queued", "running", "failed"):
        return executor["state"]
    if entry.get("error"):
        return "failed"
    return "done" if metrics else "no metrics"


def _params_of(data: Mapping[str, Any]) -> dict[str, Any]:
    params = (data.get("params") or {}).get("params.yaml") or {}
    return flatten(params.get("data") or {}, ".")


def _metrics_of(data: Mapping[str, Any]) -> dict[str, float]:
    flat: dict[str, float] = {}
    for content in (data.get("metrics") or {}).values():
        flat.update(numeric_metrics((content or {}).get("data") or {}))
    return flat


def parse_exp_show(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`dvc exp show --json` (DVC 3) → one record per experiment: name, rev, state,
    flattened params ("loss.lambd") and metrics ("linear/barlow/top1_best"), and the
    params of the commit it branched from (the baseline it is compared with)."""
    runs = []
    for commit in rows:
        if commit.get("rev") == "workspace":
            continue  # the workspace is not an experiment of the ablation queue
        base = _params_of(commit.get("data") or {})
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                metrics = _metrics_of(data)
                runs.append({"name": rev.get("name") or exp.get("name"),
                             "rev": rev.get("rev"), "baseline_rev": commit.get("rev"),
                             "state": _run_state({**exp, "error": rev.get("error")}, metrics),
                             "params": _params_of(data), "metrics": metrics,
                             "baseline_params": base})
    return runs


def format_value(value: Any) -> str:
    """A param value as it appears in `-S key=value` and in metric keys (0.0051, 256)."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


@dataclass
class Ablations:
    """Finished experiments grouped per study: studies[param][value][metric] = Stat."""

    context: dict[str, Any] = field(default_factory=dict)   # params shared, ≠ baseline
    studies: dict[str, dict[str, dict[str, Stat]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)    # runs per state
    other_blocks: int = 0          # runs in other contexts (e.g. another epoch budget)
    unclassified: int = 0          # runs whose changed params match no study


def group_ablations(runs: Sequence[Mapping[str, Any]], sweep: Sequence[str],
                    seed_param: str, metrics: Sequence[str]) -> Ablations:
    """Group finished runs by the study they belong to: the entry of ``sweep`` whose
    params are exactly those the run changes from its baseline. An entry is one param
    ("loss.lambd") or several joined by "+" ("model.projector_bn+loss.normalization",
    a row of the paper that changes two settings at once; its values read "False+none").

    A run that changes no swept param (only the seed) is the baseline of every study.
    Runs are blocked by all their other params (absolute values, so runs queued from
    commits with other defaults, e.g. another precision, never mix); the block with the
    most finished runs is reported, and its context is how it differs from its baseline
    commit (e.g. an epoch budget)."""
    result = Ablations()
    for run in runs:
        result.counts[run["state"]] = result.counts.get(run["state"], 0) + 1
    done = [r for r in runs if r["state"] == "done"]
    members = {study: frozenset(study.split("+")) for study in sweep}
    swept = frozenset().union(*members.values())
    blocks: dict[str, list] = {}
    for run in done:
        fixed = {k: v for k, v in run["params"].items() if k not in swept and k != seed_param}
        blocks.setdefault(json.dumps(fixed, sort_keys=True, default=str), []).append(run)
    if not blocks:
        return result
    key = max(blocks, key=lambda k: len(blocks[k]))
    first = blocks[key][0]
    result.context = {k: v for k, v in json.loads(key).items()
                      if first["baseline_params"].get(k) != v}
    result.other_blocks = sum(len(v) for k, v in blocks.items() if k != key)
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in blocks[key]:
        base, params = run["baseline_params"], run["params"]
        changed = frozenset(p for p in swept if params.get(p) != base.get(p))
        studies = [study for study, keys in members.items() if keys == changed]
        if changed and not studies:
            result.unclassified += 1
            continue
        for study in studies or list(sweep):  # a baseline run belongs to every study
            value = "+".join(format_value(params.get(p)) for p in study.split("+"))
            slot = values.setdefault(study, {}).setdefault(value, {})
            for metric in metrics:
                if metric in run["metrics"]:
                    slot.setdefault(metric, []).append(run["metrics"][metric])
    result.studies = {p: {v: {m: Stat.of(xs) for m, xs in by_metric.items()}
                          for v, by_metric in by_value.items()}
                      for p, by_value in values.items()}
    # Only studies where something besides the baseline ran are studies.
    result.studies = {p: v for p, v in result.studies.items() if len(v) > 1}
    return result


def ablation_metrics(ablations: Ablations) -> dict[str, float]:
    """Group means as metric keys ablation/<param>=<value>/<metric> for the claims."""
    return {f"ablation/{param}={value}/{metric}": stat.mean
            for param, by_value in ablations.studies.items()
            for value, by_metric in by_value.items()
            for metric, stat in by_metric.items()}


def order_key(value: str, order: str | None) -> float:
    if order == "first_int":
        match = re.match(r"\d+", value)
        return float(match.group()) if match else math.inf
    try:
        return float(value)
    except ValueError:
        return math.inf
