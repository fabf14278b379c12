"""The reproduction report: the paper's numbers beside this run's, its claims tested,
pretraining curves, evaluation bars, held-out cross-correlation matrices and ablations.

Everything here takes plain values (dicts of metrics, curves, parsed experiments) so
that the report can be built from fabricated files in tests; reading the checkpoint and
the FFCV test set lives in :func:`checkpoint_models` and :func:`held_out_pairs`, which
the stage calls. A missing input is never an error: its rows say "not run".
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from barlow.loss import standardize

#: The evaluation stages whose dvclive metrics the report reads, in report order.
STAGES = ("pretrain", "linear", "semisup", "transfer")
NOT_RUN = "not run"
HELD, NOT_HELD = "held", "not held"

# Claim statuses → CSS colour in the HTML (the Markdown prints the word only).
_STATUS_COLOUR = {HELD: "#1a7f37", NOT_HELD: "#cf222e", NOT_RUN: "#6e7781"}


# ---------------------------------------------------------------------- metrics files

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


def load_metrics(live_root: Path, stages: Sequence[str] = STAGES
                 ) -> tuple[dict[str, float], dict[str, str]]:
    """All numeric metrics of LIVE_ROOT/<stage>/metrics.json, flattened with "/", and
    each stage's status ("ok" or "not run"). dvclive's top-level "step" is dropped: it
    is the last logged step, not a result."""
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
        data.pop("step", None)
        found = {k: float(v) for k, v in flatten(data, "/").items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        status[stage] = "ok" if found else NOT_RUN
        metrics.update(found)
    return metrics, status


Curve = tuple[list[float], list[float]]


def load_curves(plots_dir: Path) -> dict[str, Curve]:
    """dvclive's per-metric TSVs under PLOTS_DIR (e.g. dvclive/pretrain/plots/metrics):
    {"pretrain/loss": (steps, values)}; the key is the file's path without .tsv."""
    curves: dict[str, Curve] = {}
    plots_dir = Path(plots_dir)
    if not plots_dir.is_dir():
        return curves
    for path in sorted(plots_dir.rglob("*.tsv")):
        steps, values = [], []
        with path.open(newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            header = next(reader, None)
            if not header or len(header) < 2:
                continue
            for row in reader:
                try:
                    steps.append(float(row[0]))
                    values.append(float(row[-1]))
                except (ValueError, IndexError):
                    continue  # a torn last line of a run still writing
        if steps:
            curves[path.relative_to(plots_dir).with_suffix("").as_posix()] = (steps, values)
    return curves


def profile_snapshot(name: str, rev: str, params: Mapping[str, Any],
                     metrics: Mapping[str, float]) -> dict[str, Any]:
    """A finished run of another profile (e.g. configs/long.yaml), kept as a committed
    file so that the report can set it beside this run: its name, the git revision
    holding its dvc.lock and metrics, its flattened params ("pretrain.epochs") and
    metrics ("linear/barlow/top1_best")."""
    return {"name": name, "rev": rev, "params": flatten(params, "."),
            "metrics": dict(sorted(metrics.items()))}


def profile_rows(this_params: Mapping[str, Any], this_metrics: Mapping[str, float],
                 profiles: Sequence[Mapping[str, Any]], metric_names: Sequence[str]
                 ) -> list[list[str]]:
    """Rows "quantity | this run | profile…": first every param on which any profile
    differs from this run (data paths and worker counts aside), then METRIC_NAMES."""
    mine = flatten(this_params, ".")
    skip = ("workers", "dir", "root", "nproc_per_node", "log_every_steps",
            "checkpoint_every_steps", "extract_batch_size", "eval_batch_size")
    keys = sorted({k for p in profiles for k, v in p["params"].items()
                   if v != mine.get(k) and not k.rsplit(".", 1)[-1].endswith(skip)})
    rows = [[k, format_value(mine.get(k, "—"))]
            + [format_value(p["params"].get(k, "—")) for p in profiles] for k in keys]

    def number(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f}"

    rows += [[m, number(this_metrics.get(m))] + [number(p["metrics"].get(m)) for p in profiles]
             for m in metric_names]
    return rows


#: The baselines reported beside each Barlow Twins metric ("…/barlow/…" → "…/<name>/…").
BASELINES = ("random_init", "raw_pixels", "scratch")


def is_seed_replica(this_params: Mapping[str, Any], profile: Mapping[str, Any]) -> bool:
    """A snapshot whose params differ from this run's only in keys named ``seed`` (and
    the operational keys profile_rows skips): the same experiment, another seed."""
    mine = flatten(this_params, ".")
    theirs = profile["params"]
    differ = {k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)}
    return bool(differ) and all(k.rsplit(".", 1)[-1] == "seed" for k in differ)


def seed_rows(this_metrics: Mapping[str, float], replicas: Sequence[Mapping[str, Any]],
              metric_names: Sequence[str]) -> list[list[str]]:
    """Rows "metric | mean ± std (n) | each seed's value" over this run and its seed
    replicas, for METRIC_NAMES and, beside each Barlow Twins metric, its baselines
    (the same name with random_init, raw_pixels or scratch for barlow) where logged.
    std is the sample standard deviation (n − 1)."""
    runs = [this_metrics] + [r["metrics"] for r in replicas]
    names = []
    for name in metric_names:
        names.append(name)
        if "/barlow/" in name:
            names += [name.replace("/barlow/", f"/{b}/") for b in BASELINES
                      if name.replace("/barlow/", f"/{b}/") in this_metrics]
    rows = []
    for name in names:
        values = [m[name] for m in runs if m.get(name) is not None]
        if values:
            rows.append([name, _stat(values).text()] + [f"{v:.2f}" for v in values])
    return rows


# ---------------------------------------------------------------------- cross-correlation

def cross_correlation(z1: Tensor, z2: Tensor) -> Tensor:
    """c_ij = Σ_b ẑ1_bi ẑ2_bj / N with ẑ standardised per feature over the N rows — the
    matrix the loss drives to the identity (barlow.loss), here in float64 so that a
    few hundred rows give an exact picture."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"need two (N, D) tensors of one shape, got {tuple(z1.shape)}, "
                         f"{tuple(z2.shape)}")
    a, b = standardize(z1.double()), standardize(z2.double())
    return a.T @ b / z1.shape[0]


def cc_stats(c: Tensor) -> dict[str, float]:
    """Mean c_ii, and mean |c_ij| and RMS c_ij over i ≠ j (D² − D entries)."""
    d = c.shape[0]
    diag = torch.diagonal(c)
    off_sq = (c.pow(2).sum() - diag.pow(2).sum()) / max(d * d - d, 1)
    off_abs = (c.abs().sum() - diag.abs().sum()) / max(d * d - d, 1)
    return {"diag_mean": float(diag.mean()), "offdiag_abs_mean": float(off_abs),
            "offdiag_rms": float(off_sq.sqrt())}


@torch.no_grad()
def embed_pairs(model: torch.nn.Module, batches: Iterable[tuple[Tensor, Tensor]]
                ) -> tuple[Tensor, Tensor]:
    """Projector outputs of both views, in eval mode (BN with running statistics: a
    held-out diagnostic must not depend on how the images are batched)."""
    model.eval()
    z1s, z2s = [], []
    for y1, y2 in batches:
        z1, z2 = model(y1, y2)
        z1s.append(z1.float().cpu())
        z2s.append(z2.float().cpu())
    return torch.cat(z1s), torch.cat(z2s)


@dataclass
class CheckpointInfo:
    """What the report needs from models/pretrain/checkpoint.pt."""

    config: dict[str, Any]
    step: int | None
    finished: bool | None
    before: torch.nn.Module     # the architecture at the run's seeded random init
    after: torch.nn.Module      # the trained weights


def checkpoint_models(path: Path) -> CheckpointInfo:
    """Rebuild the pretrained BarlowTwins and its seeded initialisation from the config
    stored in the checkpoint (not params.yaml: the picture must show the run that made
    these weights, whatever params.yaml says now)."""
    from barlow.config import ModelConfig, from_mapping
    from barlow.train import build_model, seed_everything

    # Our own file; it holds numpy RNG state, which weights_only refuses.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    config = ckpt["config"]
    model_cfg = from_mapping(ModelConfig, config["model"], f"{path}: config.model")
    # barlow.train.pretrain seeds everything, then builds the model: the same two calls
    # give exactly the weights that training started from.
    seed_everything(int(config["pretrain"]["seed"]))
    before = build_model(model_cfg)
    after = build_model(model_cfg)
    after.load_state_dict(ckpt["model"], strict=True)
    return CheckpointInfo(config, ckpt.get("step"), ckpt.get("finished"), before, after)


def held_out_pairs(test_beton: Path, train_beton: Path, augment: Mapping[str, Any],
                   num_images: int, batch_size: int, views: str, seed: int,
                   workers: int) -> list[tuple[Tensor, Tensor]]:
    """The first NUM_IMAGES test images as (view A, view B) batches: the pretraining
    augmentations of ``augment`` (views="augmented"), or the whole image twice
    (views="identical": c_ii = 1 by construction, only the off-diagonal is informative).
    Normalised with the training set's statistics, as in pretraining."""
    import numpy as np

    from barlow.config import AugmentConfig, from_mapping
    from barlow.data.convert import read_manifest
    from barlow.data.loaders import config_views, eval_loader, pretrain_loader
    from barlow.data.convert import normalisation

    aug = from_mapping(AugmentConfig, dict(augment), "checkpoint config.augment")
    mean, std = normalisation(read_manifest(train_beton))
    total = read_manifest(test_beton)["num_images"]
    n = min(num_images, total)
    batch_size = min(batch_size, n)
    n -= n % batch_size  # whole batches only (pretrain_loader drops the last partial one)
    indices = np.arange(n)
    if views == "augmented":
        loader = pretrain_loader(str(test_beton), batch_size, workers, config_views(aug), mean, std,
                                 seed=seed, order="sequential", indices=indices,
                                 channels_last=False)
        return [(a.clone(), b.clone()) for a, b in loader]
    loader = eval_loader(str(test_beton), batch_size, workers, aug.resolution, mean, std,
                         train_aug=False, crop_ratio=1.0, order="sequential", indices=indices,
                         channels_last=False)
    return [(x.clone(), x.clone()) for x, _ in loader]


def cc_before_after(info: CheckpointInfo, pairs: list[tuple[Tensor, Tensor]], block: int
                    ) -> dict[str, Any]:
    """Cross-correlation of held-out pairs before and after training: stats over the
    whole D×D matrix and its top-left BLOCK×BLOCK corner for the picture."""
    out: dict[str, Any] = {"num_images": sum(len(a) for a, _ in pairs)}
    for name, model in (("before", info.before), ("after", info.after)):
        c = cross_correlation(*embed_pairs(model, pairs))
        out[name] = {"stats": cc_stats(c), "block": c[:block, :block].float().numpy(),
                     "dim": c.shape[0]}
    return out


# ---------------------------------------------------------------------- ablations

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
        tree = dict((content or {}).get("data") or {})
        tree.pop("step", None)
        flat.update({k: float(v) for k, v in flatten(tree, "/").items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)})
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
class Stat:
    mean: float
    std: float
    n: int

    def text(self, digits: int = 1) -> str:
        if self.n == 1:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"


def _stat(values: Sequence[float]) -> Stat:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Stat(statistics.fmean(values), std, len(values))


@dataclass
class Ablations:
    """Finished experiments grouped per study: studies[param][value][metric] = Stat."""

    context: dict[str, Any] = field(default_factory=dict)   # params shared, ≠ baseline
    studies: dict[str, dict[str, dict[str, Stat]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)    # runs per state
    other_blocks: int = 0          # runs in other contexts (e.g. another epoch budget)
    unclassified: int = 0          # runs that change two swept params at once


def group_ablations(runs: Sequence[Mapping[str, Any]], sweep: Sequence[str],
                    seed_param: str, metrics: Sequence[str]) -> Ablations:
    """Group finished runs by the one swept param they change from their baseline.

    A run that changes no swept param (only the seed) is the baseline of every study.
    Runs are blocked by all their other params (absolute values, so runs queued from
    commits with other defaults, e.g. another precision, never mix); the block with the
    most finished runs is reported, and its context is how it differs from its baseline
    commit (e.g. an epoch budget)."""
    result = Ablations()
    for run in runs:
        result.counts[run["state"]] = result.counts.get(run["state"], 0) + 1
    done = [r for r in runs if r["state"] == "done"]
    blocks: dict[str, list] = {}
    for run in done:
        fixed = {k: v for k, v in run["params"].items() if k not in sweep and k != seed_param}
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
        changed = [p for p in sweep if params.get(p) != base.get(p)]
        if len(changed) > 1:
            result.unclassified += 1
            continue
        studies = changed or list(sweep)  # a baseline run belongs to every study
        for param in studies:
            value = format_value(params.get(param))
            slot = values.setdefault(param, {}).setdefault(value, {})
            for metric in metrics:
                if metric in run["metrics"]:
                    slot.setdefault(metric, []).append(run["metrics"][metric])
    result.studies = {p: {v: {m: _stat(xs) for m, xs in by_metric.items()}
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


def _order_key(value: str, order: str | None) -> float:
    if order == "first_int":
        match = re.match(r"\d+", value)
        return float(match.group()) if match else math.inf
    try:
        return float(value)
    except ValueError:
        return math.inf


# ---------------------------------------------------------------------- claims

@dataclass
class Verdict:
    status: str     # held | not held | not run
    detail: str


def _expand(pattern: str, keys: Iterable[str]) -> list[tuple[str, str | None]]:
    """Keys matching PATTERN, where "*" matches one "/"-free segment, with the bound
    segment (None when the pattern has no "*")."""
    if "*" not in pattern:
        return [(pattern, None)]
    regex = re.compile("^" + re.escape(pattern).replace(r"\*", "([^/]+)") + "$")
    return sorted((k, m.group(1)) for k in keys if (m := regex.match(k)))


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1 else f"{x:.1f}"


def evaluate_claim(claim: Mapping[str, Any], metrics: Mapping[str, float],
                   curves: Mapping[str, Curve], ablations: Ablations) -> Verdict:
    """Test one claim of the paper file against this run (see data/paper_results.yaml)."""
    kind = claim["kind"]
    margin = float(claim.get("margin", 0.0))
    if kind in ("greater", "less"):
        matches = [(k, b) for k, b in _expand(claim["metric"], metrics) if k in metrics]
        if not matches:
            return Verdict(NOT_RUN, f"no metric {claim['metric']}")
        parts, missing, ok = [], [], True
        for key, bound in matches:
            others = [t.replace("*", bound) if bound else t for t in claim["than"]]
            absent = [t for t in others if t not in metrics]
            if absent:
                missing += absent
                continue
            for other in others:
                a, b = metrics[key], metrics[other]
                holds = a > b + margin if kind == "greater" else a < b - margin
                ok &= holds
                sign = {("greater", True): ">", ("greater", False): "≯",
                        ("less", True): "<", ("less", False): "≮"}[kind, holds]
                parts.append(f"{key} {_fmt(a)} {sign} {other} {_fmt(b)}")
        if missing:
            return Verdict(NOT_RUN, "missing: " + ", ".join(missing))
        suffix = f" (margin {margin:g})" if margin else ""
        return Verdict(HELD if ok else NOT_HELD, "; ".join(parts) + suffix)
    if kind == "decreases":
        curve = curves.get(claim["curve"])
        if not curve or len(curve[1]) < 2:
            return Verdict(NOT_RUN, f"no curve {claim['curve']} with two or more points")
        first, last = curve[1][0], curve[1][-1]
        holds = first > last + margin
        return Verdict(HELD if holds else NOT_HELD,
                       f"{claim['curve']}: {_fmt(first)} at step {curve[0][0]:g} → "
                       f"{_fmt(last)} at step {curve[0][-1]:g}")
    if kind in ("spread", "increasing"):
        groups = ablations.studies.get(claim["param"], {})
        means = {v: s[claim["metric"]].mean for v, s in groups.items() if claim["metric"] in s}
        if len(means) < 2:
            return Verdict(NOT_RUN, f"fewer than two finished groups of {claim['param']}")
        ordered = sorted(means, key=lambda v: _order_key(v, claim.get("order")))
        listing = ", ".join(f"{v}: {_fmt(means[v])}" for v in ordered)
        if kind == "spread":
            spread = max(means.values()) - min(means.values())
            holds = spread <= float(claim["max_range"])
            return Verdict(HELD if holds else NOT_HELD,
                           f"range {_fmt(spread)} (limit {claim['max_range']:g}) over {listing}")
        tol = float(claim.get("tolerance", 0.0))
        falls = [(a, b) for a, b in zip(ordered, ordered[1:]) if means[b] < means[a] - tol]
        detail = listing + (f"; falls {', '.join(f'{a}→{b}' for a, b in falls)}" if falls else "")
        return Verdict(NOT_HELD if falls else HELD, detail + f" (tolerance {tol:g})")
    raise ValueError(f"claim {claim.get('id')}: unknown kind {kind!r}")


# ---------------------------------------------------------------------- paper vs ours

def resolve_ours(entry: Mapping[str, Any], metrics: Mapping[str, float],
                 ablations: Ablations, ablation_metric_names: Sequence[str]) -> str:
    """Our value(s) for one paper figure as text; "not run" / "out of scope" / "—"."""
    if entry.get("out_of_scope"):
        return "out of scope"
    ours = entry.get("ours")
    if not ours:
        return "—"
    texts = []
    for pattern in [ours] if isinstance(ours, str) else ours:
        if pattern.startswith(("ablation_spread/", "ablation_trend/")):
            param = pattern.split("/", 1)[1]
            groups = ablations.studies.get(param, {})
            metric = next((m for m in ablation_metric_names
                           if any(m in s for s in groups.values())), None)
            if metric is None:
                texts.append(NOT_RUN)
                continue
            means = {v: s[metric].mean for v, s in groups.items() if metric in s}
            if pattern.startswith("ablation_spread/"):
                texts.append(f"{_fmt(min(means.values()))}–{_fmt(max(means.values()))}")
            else:
                texts.append(", ".join(f"{v}: {_fmt(means[v])}" for v in
                                       sorted(means, key=lambda v: _order_key(v, "first_int"))))
            continue
        if pattern.startswith("ablation/"):
            param_value, metric = pattern[len("ablation/"):].split("/", 1)
            param, value = param_value.split("=", 1)
            stat = ablations.studies.get(param, {}).get(value, {}).get(metric)
            texts.append(stat.text() if stat else NOT_RUN)
            continue
        found = [(k, b) for k, b in _expand(pattern, metrics) if k in metrics]
        if not found:
            texts.append(NOT_RUN)
        for key, bound in found:
            texts.append(f"{bound}: {_fmt(metrics[key])}" if bound else _fmt(metrics[key]))
    return "; ".join(texts)


# ---------------------------------------------------------------------- document model

@dataclass
class Figure:
    name: str
    png: bytes
    caption: str


@dataclass
class Document:
    """Headings, paragraphs, tables, code and figures, rendered to Markdown and to one
    self-contained HTML file from the same content."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def bullets(self, items: Sequence[str]) -> None:
        self.blocks.append(("bullets", list(items)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", (list(header), [list(map(str, r)) for r in rows])))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def figure(self, figure: Figure) -> None:
        self.blocks.append(("figure", figure))

    def figures(self) -> list[Figure]:
        return [b for kind, b in self.blocks if kind == "figure"]

    def markdown(self, figure_dir: str) -> str:
        out = [f"# {self.title}", ""]
        for kind, body in self.blocks:
            if kind == "heading":
                out += [f"{'#' * body[0]} {body[1]}", ""]
            elif kind == "para":
                out += [body, ""]
            elif kind == "bullets":
                out += [f"- {item}" for item in body] + [""]
            elif kind == "table":
                header, rows = body
                cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
                out.append("| " + " | ".join(map(cell, header)) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
                out.append("")
            elif kind == "code":
                out += ["```", body, "```", ""]
            elif kind == "figure":
                out += [f"![{body.caption}]({figure_dir}/{body.name}.png)", "",
                        f"*{body.caption}*", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        esc = html.escape
        parts = [
            "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
            f"<title>{esc(self.title)}</title>",
            # Inline style only: the file must render with no network at all.
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
            "line-height:1.4}table{border-collapse:collapse;margin:1em 0;font-size:0.92em}"
            "th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}"
            "th{background:#f6f8fa}pre{background:#f6f8fa;padding:0.8em;overflow-x:auto}"
            "figure{margin:1em 0}img{max-width:100%}figcaption{color:#57606a;font-size:0.9em}"
            "</style>", "</head>", "<body>", f"<h1>{esc(self.title)}</h1>"]
        for kind, body in self.blocks:
            if kind == "heading":
                parts.append(f"<h{body[0]}>{esc(body[1])}</h{body[0]}>")
            elif kind == "para":
                parts.append(f"<p>{esc(body)}</p>")
            elif kind == "bullets":
                parts.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in body) + "</ul>")
            elif kind == "table":
                header, rows = body
                parts.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
                             + "</tr></thead><tbody>")
                for row in rows:
                    cells = []
                    for value in row:
                        colour = _STATUS_COLOUR.get(value)
                        style = f' style="color:{colour};font-weight:bold"' if colour else ""
                        cells.append(f"<td{style}>{esc(value)}</td>")
                    parts.append("<tr>" + "".join(cells) + "</tr>")
                parts.append("</tbody></table>")
            elif kind == "code":
                parts.append(f"<pre><code>{esc(body)}</code></pre>")
            elif kind == "figure":
                data = base64.b64encode(body.png).decode("ascii")
                parts.append(f'<figure><img alt="{esc(body.caption)}" '
                             f'src="data:image/png;base64,{data}">'
                             f"<figcaption>{esc(body.caption)}</figcaption></figure>")
        parts += ["</body>", "</html>"]
        return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------- figures

def _png(fig) -> bytes:
    buf = io.BytesIO()
    # No Software/date metadata: the same inputs give the same bytes.
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pretrain_figure(curves: Mapping[str, Curve]) -> Figure | None:
    panels = [("pretrain/loss", "loss", False), ("pretrain/on_diag", "on-diagonal Σ(1−c_ii)²", False),
              ("pretrain/off_diag", "off-diagonal Σ c_ij² (log)", True),
              ("pretrain/knn_top1", "kNN top-1 on test (%)", False)]
    present = [p for p in panels if p[0] in curves]
    if not present:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.0), squeeze=False)
    for ax, (key, title, log) in zip(axes[0], present):
        steps, values = curves[key]
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if log and min(values) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return Figure("pretrain_curves", _png(fig),
                  "Pretraining (dvclive/pretrain): loss, its two terms and the kNN monitor")


def bars_figure(name: str, caption: str, panels: Sequence[tuple[str, dict[str, dict[str, float]]]]
                ) -> Figure | None:
    """Grouped bars: each panel maps group (subset, data set) → {series: value}."""
    panels = [(t, g) for t, g in panels if g]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.2), squeeze=False)
    for ax, (title, groups) in zip(axes[0], panels):
        series = sorted({s for g in groups.values() for s in g},
                        key=lambda s: (s != "barlow", s))
        width = 0.8 / max(len(series), 1)
        for i, s in enumerate(series):
            xs = [j + i * width for j in range(len(groups))]
            ys = [groups[g].get(s, math.nan) for g in groups]
            bars = ax.bar(xs, ys, width, label=s)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(groups))],
                      list(groups))
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 105)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return Figure(name, _png(fig), caption)


def cc_figure(cc: Mapping[str, Any]) -> Figure:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.9))
    for ax, name in zip(axes, ("before", "after")):
        block = cc[name]["block"]
        im = ax.imshow(block, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        s = cc[name]["stats"]
        ax.set_title(f"{name} training\nmean c_ii {s['diag_mean']:.2f}, "
                     f"mean |c_ij| {s['offdiag_abs_mean']:.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    size = cc["before"]["block"].shape[0]
    return Figure("cross_correlation", _png(fig),
                  f"Cross-correlation c of held-out pairs, first {size}×{size} block of "
                  f"{cc['before']['dim']}×{cc['before']['dim']}; target: identity")


def ablation_figure(ablations: Ablations, metric: str) -> Figure | None:
    studies = {p: g for p, g in ablations.studies.items()
               if sum(metric in s for s in g.values()) >= 2}
    if not studies:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(studies), figsize=(3.6 * len(studies), 3.0), squeeze=False)
    for ax, (param, groups) in zip(axes[0], studies.items()):
        values = sorted((v for v in groups if metric in groups[v]),
                        key=lambda v: (_order_key(v, "first_int"), v))
        xs = range(len(values))
        ax.errorbar(xs, [groups[v][metric].mean for v in values],
                    yerr=[groups[v][metric].std for v in values], marker="o", capsize=3)
        ax.set_xticks(list(xs), values, rotation=30, fontsize=7)
        ax.set_title(param, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric, fontsize=8)
    fig.tight_layout()
    return Figure("ablations", _png(fig), f"Ablations: {metric}, mean ± std over seeds")


# ---------------------------------------------------------------------- the report

@dataclass
class ReportInputs:
    """Everything the report is built from, already read."""

    paper: dict[str, Any]
    params: dict[str, Any]
    metrics: dict[str, float]
    status: dict[str, str]
    curves: dict[str, Curve]
    runs: list[dict[str, Any]] | None        # parsed experiments; None: no snapshot
    cc: dict[str, Any] | None = None          # cc_before_after(...) or None
    cc_note: str = ""                         # how c was computed, or why it was not
    checkpoint: dict[str, Any] | None = None  # {"config", "step", "finished"} or None
    train_images: int | None = None
    backbone_params: int | None = None
    profiles: list[dict[str, Any]] = field(default_factory=list)  # profile_snapshot()s


def _scale_rows(inp: ReportInputs) -> list[list[str]]:
    paper = inp.paper.get("paper_setup", {})
    cfg = (inp.checkpoint or {}).get("config") or inp.params
    model, pre = cfg.get("model", {}), cfg.get("pretrain", {})
    data = inp.params.get("data", {})
    res = cfg.get("augment", {}).get("resolution", "?")
    epochs = pre.get("epochs", "?")
    ckpt = inp.checkpoint
    if ckpt and ckpt.get("finished") is False:
        epochs = f"{epochs} (checkpoint unfinished, at step {ckpt.get('step')})"
    arch = model.get("arch", "?")
    if arch == "small_resnet":
        arch = f"small ResNet (width {model.get('width')}, blocks {model.get('layers')})"
    if inp.backbone_params:
        arch += f", {inp.backbone_params / 1e6:.2f} M parameters (ResNet-50: 23.5 M)"
    images = f"{inp.train_images:,} images" if inp.train_images else "?"
    speed = inp.metrics.get("pretrain/pairs_per_s")
    return [
        ["data", paper.get("data", ""), f"{data.get('source', '?')} ({images}, {res} px)"],
        ["backbone", paper.get("backbone", ""), arch],
        ["projector", paper.get("projector", ""), str(model.get("projector", "?"))],
        ["pretraining epochs", str(paper.get("epochs", "")), str(epochs)],
        ["batch size", str(paper.get("batch_size", "")), str(pre.get("batch_size", "?"))],
        ["hardware", paper.get("hardware", ""),
         f"{speed:.0f} image pairs/s (last logged window)" if speed else "?"],
    ]


def build_document(inp: ReportInputs, report_cfg: Any) -> tuple[Document, dict[str, Any]]:
    """The report's content; also returns the claims' verdicts and the cc stats."""
    abl = (group_ablations(inp.runs, report_cfg.ablation_params, report_cfg.seed_param,
                           report_cfg.ablation_metrics) if inp.runs else Ablations())
    metrics = dict(inp.metrics)
    metrics.update(ablation_metrics(abl))
    if inp.cc:
        for name in ("before", "after"):
            for key, value in inp.cc[name]["stats"].items():
                metrics[f"report/cc/{name}/{key}"] = value

    doc = Document("Barlow Twins reproduction report")
    doc.para(f"Paper: {inp.paper.get('paper', '')}. Built by the `report` stage from the "
             "dvclive metrics of the pipeline, data/paper_results.yaml and params.yaml.")

    # -- scale
    doc.heading("Scale: this run is not the paper's experiment")
    doc.table(["", "paper", "this run"], _scale_rows(inp))
    doc.para("Every number below comes from a run far smaller than the paper's: a 28 px "
             "10-class data set instead of 224 px ImageNet-1k, a small ResNet instead of "
             "ResNet-50, and a few epochs instead of 1000. Absolute accuracies are therefore "
             "not comparable (10-class top-5 is near 100% for any model); what can be "
             "compared is each claim's direction, tested in the claims table against "
             "baselines run with the same recipe.")

    # -- stages
    doc.heading("Stages")
    doc.table(["stage", "metrics"], [[s, inp.status.get(s, NOT_RUN)] for s in STAGES])

    # -- claims
    verdicts = {}
    rows = []
    for claim in inp.paper.get("claims", []):
        verdict = evaluate_claim(claim, metrics, inp.curves, abl)
        verdicts[claim["id"]] = verdict
        rows.append([claim["statement"], claim.get("paper_basis", ""), verdict.status,
                     verdict.detail])
    doc.heading("Claims of the paper, tested at this scale")
    doc.table(["claim", "paper", "this run", "evidence"], rows)

    # -- paper vs ours
    doc.heading("Paper vs this run")
    rows = []
    for entry in inp.paper.get("results", []):
        unit = entry.get("unit", "%")
        paper_value = entry["paper"]
        paper_text = f"{paper_value}" + ("" if isinstance(paper_value, str) else f" {unit}")
        rows.append([entry["source"], entry["what"], paper_text,
                     resolve_ours(entry, metrics, abl, report_cfg.ablation_metrics),
                     entry.get("scope", "")])
    doc.table(["source", "quantity", "paper", "this run", "not the same experiment because"],
              rows)

    # -- seeds: snapshots of this very run with other seeds
    replicas = [p for p in inp.profiles if is_seed_replica(inp.params, p)]
    if replicas:
        doc.heading("Seeds: this run's figures as mean ± std")
        doc.para(f"This run and {len(replicas)} snapshot(s) of it that differ only in their "
                 "seeds (reports/profiles/: "
                 + ", ".join(f"{p['name']} at {str(p['rev'])[:10]}" for p in replicas)
                 + "). Sample standard deviation; each seed's value follows, this run first.")
        doc.table(["metric", "mean ± std", "this run"] + [p["name"] for p in replicas],
                  seed_rows(metrics, replicas, report_cfg.profile_metrics))
    others = [p for p in inp.profiles if p not in replicas]

    # -- other profiles
    if others:
        doc.heading("Profiles: this run beside the committed longer runs")
        doc.para("Each profile column is a snapshot of a finished run (reports/profiles/); "
                 "its dvc.lock and metrics are at the git revision named, so "
                 "`dvc metrics diff <rev>` compares it with the workspace. Params listed "
                 "are those on which a profile differs from this run.")
        doc.table(["quantity", "this run"] + [f"{p['name']} ({str(p['rev'])[:10]})"
                                              for p in others],
                  profile_rows(inp.params, metrics, others, report_cfg.profile_metrics))

    # -- pretraining
    doc.heading("Pretraining")
    fig = pretrain_figure(inp.curves)
    if fig:
        doc.figure(fig)
    else:
        doc.para(f"Pretraining curves: {NOT_RUN} (no dvclive/pretrain/plots).")

    # -- cross-correlation
    doc.heading("Cross-correlation matrix of held-out images")
    if inp.cc:
        doc.para(inp.cc_note)
        doc.figure(cc_figure(inp.cc))
        doc.table(["", "mean c_ii (target 1)", "mean |c_ij|, i≠j (target 0)", "RMS c_ij, i≠j"],
                  [[name] + [f"{inp.cc[name]['stats'][k]:.4f}"
                             for k in ("diag_mean", "offdiag_abs_mean", "offdiag_rms")]
                   for name in ("before", "after")])
    else:
        doc.para(f"{NOT_RUN}: {inp.cc_note or 'no pretraining checkpoint'}.")

    # -- evaluations
    doc.heading("Evaluations and their baselines")
    linear = {"linear": {e: metrics[f"linear/{e}/top1_best"]
                         for e in ("barlow", "random_init", "raw_pixels")
                         if f"linear/{e}/top1_best" in metrics}}
    semisup: dict[str, dict[str, float]] = {}
    transfer_lin: dict[str, dict[str, float]] = {}
    transfer_svm: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if parts[0] == "semisup" and len(parts) == 4 and parts[3] == "top1_best":
            semisup.setdefault(parts[1], {})[parts[2]] = value
        if parts[0] == "transfer" and len(parts) == 5:
            if parts[2] == "linear" and parts[4] == "top1_best":
                transfer_lin.setdefault(parts[1], {})[parts[3]] = value
            if parts[2] == "svm" and parts[4] == "map":
                transfer_svm.setdefault(parts[1], {})[parts[3]] = value
    for name, caption, panels in (
            ("linear", "Linear probe, test top-1 at the best-val epoch (Table 1 protocol)",
             [("linear probe top-1", linear if linear["linear"] else {})]),
            ("semisup", "Fine-tuning on label subsets vs from scratch, test top-1 (Table 2)",
             [("semi-supervised top-1", semisup)]),
            ("transfer", "Transfer on frozen features (Table 3 protocols)",
             [("linear top-1", transfer_lin), ("SVM mAP", transfer_svm)])):
        fig = bars_figure(f"eval_{name}", caption, panels)
        if fig:
            doc.figure(fig)
        else:
            doc.para(f"{name}: {NOT_RUN}.")

    # -- ablations
    doc.heading("Ablations")
    command = "make ablations   # queue and run; then: python -m stages.report ablations"
    if inp.runs is None or not inp.runs:
        doc.para(f"{NOT_RUN}: no experiments in the snapshot (reports/ablations.json). "
                 "Queue and run them, take a snapshot, and rebuild the report:")
        doc.code("make ablations     # dvc exp run --queue per study, then dvc queue start -j 1\n"
                 "PYTHONPATH=src python -m stages.report ablations   # dvc exp show --json → reports/ablations.json\n"
                 "dvc repro report")
    else:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(abl.counts.items()))
        context = ", ".join(f"{k}={format_value(v)}" for k, v in abl.context.items())
        doc.para(f"Experiments in the snapshot: {counts}. Reported context: "
                 f"{context or 'the committed params'}"
                 + (f"; {abl.other_blocks} finished runs with other params left out"
                    if abl.other_blocks else "")
                 + (f"; {abl.unclassified} runs change two swept params" if abl.unclassified
                    else "") + ". Runs that change no swept param are each study's baseline.")
        if not abl.studies:
            doc.para(f"No study has finished groups yet ({NOT_RUN}). {command}")
        for param, groups in abl.studies.items():
            doc.heading(param, 3)
            header = ["value"] + list(report_cfg.ablation_metrics)
            doc.table(header, [[v] + [groups[v][m].text() if m in groups[v] else NOT_RUN
                                      for m in report_cfg.ablation_metrics]
                               for v in sorted(groups, key=lambda v: (_order_key(v, "first_int"), v))])
        for metric in report_cfg.ablation_metrics:
            fig = ablation_figure(abl, metric)
            if fig:
                doc.figure(fig)
                break
    # -- determinism (what tests/test_reliability.py checks, and where it stops holding)
    doc.heading("Determinism")
    doc.para("On CPU the same seed gives bit-identical weights and metrics, also after kill -9 "
             "and resume (tests/test_reliability.py): order, crops and every augmentation are "
             "functions of (seed, epoch, sample, batch), and checkpoints carry every RNG. "
             "Settings that break bit-identity: any CUDA run (cuDNN picks convolution "
             "algorithms by timing and some backward kernels add atomically; the kNN "
             "monitor's scatter_add is atomic on GPU), NCCL (its reduction order depends on "
             "the topology), a different number of processes (another data order and "
             "floating-point summation order), possibly a different number of FFCV workers "
             "(serial vs parallel numba code; untested), torch.compile (fused kernels "
             "round differently), and bf16/fp16 autocast across hardware. Such runs agree in "
             "distribution, not bit for bit.")
    summary = {"claims": {k: {"status": v.status, "detail": v.detail} for k, v in verdicts.items()},
               "cc": {n: inp.cc[n]["stats"] for n in ("before", "after")} if inp.cc else None,
               "stages": inp.status}
    return doc, summary


def write_report(doc: Document, out_dir: Path, figure_subdir: str = "figures") -> None:
    """reports/report.md (+ PNGs in reports/figures/) and one self-contained report.html."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / figure_subdir
    fig_dir.mkdir(parents=True, exist_ok=True)
    keep = {f"{f.name}.png" for f in doc.figures()}
    for stale in fig_dir.glob("*.png"):
        if stale.name not in keep:
            stale.unlink()  # a figure no longer drawn must not linger in git
    for fig in doc.figures():
        (fig_dir / f"{fig.name}.png").write_bytes(fig.png)
    (out_dir / "report.md").write_text(doc.markdown(figure_subdir))
    (out_dir / "report.html").write_text(doc.html())

