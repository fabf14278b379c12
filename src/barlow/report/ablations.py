"""The ablation experiments: `dvc exp show --json` parsed into one record per run, and
finished runs grouped per study (the swept param each changes) as mean ± std over seeds."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from barlow.report.inputs import flatten, numeric_metrics, parse_tsv
from barlow.report.seeds import Stat, is_operational, with_implied


def _run_state(entry: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    executor = entry.get("executor") or {}
    if executor.get("state") in ("queued", "running", "failed"):
        return executor["state"]
    if entry.get("error"):
        return "failed"
    return "done" if metrics else "no metrics"


def _params_of(data: Mapping[str, Any]) -> dict[str, Any]:
    params = (data.get("params") or {}).get("params.yaml") or {}
    return with_implied(flatten(params.get("data") or {}, "."))


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


def curve_path(name: str, live_root: str = "dvclive") -> str:
    """Where a run's dvclive curve NAME ("pretrain/knn_top1") lies in its commit: each
    stage logs into <live_root>/<stage> (dvc.yaml), the TSVs under plots/metrics."""
    return f"{live_root}/{name.split('/', 1)[0]}/plots/metrics/{name}.tsv"


def attach_curves(runs: Sequence[dict[str, Any]], names: Sequence[str],
                  read: Callable[[str, str], str | None]) -> None:
    """Add each finished run's curves NAMES against the epoch, read from its experiment
    commit with READ(rev, path) → the file's text or None, as run["curves"][name] =
    [epochs, values]. dvclive logs against the optimiser step, whose length differs
    between runs of other batch sizes, so each step becomes an epoch through the same
    stage's "<stage>/epoch" curve; a run without it, or without the curve (a kNN
    monitor switched off), gets none."""
    for run in runs:
        if run["state"] != "done" or not run.get("rev"):
            continue
        found, epoch_of = {}, {}
        for name in names:
            stage = name.split("/", 1)[0]
            if stage not in epoch_of:  # one epoch curve per stage, however many curves
                epoch_text = read(run["rev"], curve_path(f"{stage}/epoch"))
                epoch_of[stage] = parse_tsv(epoch_text) if epoch_text else None
            text = read(run["rev"], curve_path(name))
            curve = parse_tsv(text) if text else None
            epochs = epoch_of[stage]
            if curve and epochs:
                at = dict(zip(*epochs))
                found[name] = [[round(at[x], 6) for x in curve[0] if x in at],
                               [y for x, y in zip(*curve) if x in at]]
        if found:
            run["curves"] = found


def merge_runs(fresh: Sequence[dict[str, Any]], kept: Sequence[dict[str, Any]]
               ) -> list[dict[str, Any]]:
    """FRESH runs and the finished or failed runs of KEPT (an earlier snapshot) whose
    experiment is not among them: runs whose experiments were since removed (`dvc exp
    remove`/`gc`) stay in the snapshot, a run in both is taken fresh, and a run that was
    queued or running then and is gone now is dropped (it will never finish)."""
    revs = {r.get("rev") for r in fresh}
    return list(fresh) + [r for r in kept if r.get("rev") not in revs
                          and r.get("state") not in ("queued", "running")]


def format_value(value: Any) -> str:
    """A param value as it appears in `-S key=value` and in metric keys (0.0051, 256)."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


#: Per-seed curves of one group: [(steps, values), …], one entry per finished run.
SeedCurves = list[tuple[list[float], list[float]]]


@dataclass
class Block:
    """Finished runs that share every param but the swept ones and the seed."""

    context: dict[str, Any]        # how the shared params differ from the baseline commit
    budget_param: str
    budget: Any                    # the block's value of budget_param (None: absent)
    runs: int
    studies: dict[str, dict[str, dict[str, Stat]]]        # [study][value][metric]
    curves: dict[str, dict[str, dict[str, SeedCurves]]]   # [study][value][curve]

    @property
    def label(self) -> str:
        return f"{self.budget_param}={format_value(self.budget)}"


@dataclass
class Ablations:
    """Finished experiments grouped per study: studies[param][value][metric] = Stat, each
    study taken from the block it is judged at (``source``: group_ablations)."""

    studies: dict[str, dict[str, dict[str, Stat]]] = field(default_factory=dict)
    source: dict[str, Block] = field(default_factory=dict)  # study → the block reported
    blocks: list[Block] = field(default_factory=list)       # with a study, by budget
    counts: dict[str, int] = field(default_factory=dict)    # runs per state
    other_blocks: int = 0          # finished runs in blocks where no study ran
    unclassified: int = 0          # runs whose changed params match no study


def _budget_key(value: Any) -> tuple[int, Any]:
    """Orders budgets: numbers by value, anything else (absent, text) before them."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value))
    return (0, 0.0)


def group_ablations(runs: Sequence[Mapping[str, Any]], sweep: Sequence[str],
                    seed_param: str, metrics: Sequence[str], budget_param: str) -> Ablations:
    """Group finished runs by the study they belong to: the entry of ``sweep`` whose
    params are exactly those the run changes from its baseline. An entry is one param
    ("loss.lambd") or several joined by "+" ("model.projector_bn+loss.normalization",
    a row of the paper that changes two settings at once; its values read "False+none").

    A run that changes no swept param (only the seed) is the baseline of every study.
    Runs are blocked by all their other params but the operational ones (worker counts,
    folders: seeds.OPERATIONAL), by absolute value, so runs queued from commits with
    other defaults (e.g. another precision) never mix; a block's context
    is how it differs from its baseline commit (e.g. an epoch budget). Of the blocks
    where a study has the most values (always more than its baseline), it is judged at
    the one with the largest ``budget_param`` (ties: more runs): a longer run of part of
    a sweep (batch 512 at 10 epochs) does not replace the whole sweep at a shorter
    budget (batch 32 to 512 at 1 epoch) as the evidence for a claim about all of it.
    The others stay in ``blocks``, so a study run at two budgets shows how its groups
    move with training length."""
    result = Ablations()
    for run in runs:
        result.counts[run["state"]] = result.counts.get(run["state"], 0) + 1
    done = [r for r in runs if r["state"] == "done"]
    members = {study: frozenset(study.split("+")) for study in sweep}
    swept = frozenset().union(*members.values())
    by_fixed: dict[str, list] = {}
    for run in done:
        fixed = {k: v for k, v in run["params"].items()
                 if k not in swept and k != seed_param and not is_operational(k)}
        by_fixed.setdefault(json.dumps(fixed, sort_keys=True, default=str), []).append(run)
    for key, block_runs in by_fixed.items():
        block, unclassified = _block(block_runs, json.loads(key), members, swept, metrics,
                                     budget_param)
        result.unclassified += unclassified
        if block.studies:
            result.blocks.append(block)
        else:
            result.other_blocks += len(block_runs)
    result.blocks.sort(key=lambda b: (_budget_key(b.budget), b.runs))
    for block in result.blocks:  # ascending: a later block wins with as many values
        for study, groups in block.studies.items():
            if len(groups) >= len(result.studies.get(study, ())):
                result.studies[study] = groups
                result.source[study] = block
    result.studies = {s: result.studies[s] for s in sweep if s in result.studies}
    return result


def _block(runs: Sequence[Mapping[str, Any]], fixed: Mapping[str, Any],
           members: Mapping[str, frozenset], swept: frozenset, metrics: Sequence[str],
           budget_param: str) -> tuple[Block, int]:
    first = runs[0]
    context = {k: v for k, v in fixed.items() if first["baseline_params"].get(k) != v}
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    curves: dict[str, dict[str, dict[str, SeedCurves]]] = {}
    unclassified = 0
    for run in runs:
        base, params = run["baseline_params"], run["params"]
        changed = frozenset(p for p in swept if params.get(p) != base.get(p))
        studies = [study for study, keys in members.items() if keys == changed]
        if changed and not studies:
            unclassified += 1
            continue
        for study in studies or list(members):  # a baseline run belongs to every study
            value = "+".join(format_value(params.get(p)) for p in study.split("+"))
            slot = values.setdefault(study, {}).setdefault(value, {})
            for metric in metrics:
                if metric in run["metrics"]:
                    slot.setdefault(metric, []).append(run["metrics"][metric])
            for name, (steps, ys) in (run.get("curves") or {}).items():
                (curves.setdefault(study, {}).setdefault(value, {})
                 .setdefault(name, []).append((list(steps), list(ys))))
    studies = {p: {v: {m: Stat.of(xs) for m, xs in by_metric.items()}
                   for v, by_metric in by_value.items()}
               for p, by_value in values.items()}
    # Only studies where something besides the baseline ran are studies.
    studies = {p: v for p, v in studies.items() if len(v) > 1}
    curves = {p: c for p, c in curves.items() if p in studies}
    return (Block(context, budget_param, fixed.get(budget_param), len(runs), studies, curves),
            unclassified)


def mean_curve(seed_curves: SeedCurves) -> tuple[list[float], list[float]]:
    """The mean over seeds at each step that every seed logged (a run cut short or
    logging other steps contributes only where all agree)."""
    common = set(seed_curves[0][0]) if seed_curves else set()
    for steps, _ in seed_curves[1:]:
        common &= set(steps)
    steps = sorted(common)
    rows = [dict(zip(s, ys)) for s, ys in seed_curves]
    return steps, [sum(r[x] for r in rows) / len(rows) for x in steps]


def budget_note(ablations: Ablations, studies: Sequence[str]) -> str:
    """" (at pretrain.epochs=10)": the budget the STUDIES are judged at, "" if none ran."""
    labels = sorted({ablations.source[s].label for s in studies if s in ablations.source})
    return f" (at {', '.join(labels)})" if labels else ""


def ablation_metrics(ablations: Ablations) -> dict[str, float]:
    """Group means as metric keys ablation/<param>=<value>/<metric> for the claims."""
    return {f"ablation/{param}={value}/{metric}": stat.mean
            for param, by_value in ablations.studies.items()
            for value, by_metric in by_value.items()
            for metric, stat in by_metric.items()}


def sorted_values(values: Iterable[str]) -> list[str]:
    """A study's values in table and plot order: by their leading integer (batch sizes,
    projector widths), then as text."""
    return sorted(values, key=lambda v: (order_key(v, "first_int"), v))


def order_key(value: str, order: str | None) -> float:
    if order == "first_int":
        match = re.match(r"\d+", value)
        return float(match.group()) if match else math.inf
    try:
        return float(value)
    except ValueError:
        return math.inf
