"""The paper's claims tested on this run's metrics (the rules are documented in
data/paper_results.yaml), and our value for each of the paper's figures."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from barlow.report.ablations import Ablations, budget_note, order_key
from barlow.report.inputs import NOT_RUN, Curve

HELD, NOT_HELD = "held", "not held"


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


def _not_finite(inputs: Mapping[str, float]) -> Verdict | None:
    """"not run", naming the inputs that are NaN or infinite; None when all are finite.
    Every comparison with a NaN is false, so unchecked it would pass for evidence: "not
    held" for one side of a "greater", "held" for an "increasing" that never falls."""
    bad = [name for name, x in inputs.items() if not math.isfinite(x)]
    return Verdict(NOT_RUN, "not finite: " + ", ".join(bad)) if bad else None


def evaluate_claim(claim: Mapping[str, Any], metrics: Mapping[str, float],
                   curves: Mapping[str, Curve], ablations: Ablations) -> Verdict:
    """Test one claim of the paper file against this run (see data/paper_results.yaml)."""
    kind = claim["kind"]
    margin = float(claim.get("margin", 0.0))
    if kind in ("greater", "less"):
        matches = [(k, b) for k, b in _expand(claim["metric"], metrics) if k in metrics]
        if not matches:
            return Verdict(NOT_RUN, f"no metric {claim['metric']}")
        pairs, missing = [], []
        for key, bound in matches:
            others = [t.replace("*", bound) if bound else t for t in claim["than"]]
            absent = [t for t in others if t not in metrics]
            missing += absent
            if not absent:
                pairs += [(key, other) for other in others]
        if missing:
            return Verdict(NOT_RUN, "missing: " + ", ".join(missing))
        invalid = _not_finite({k: metrics[k] for pair in pairs for k in pair})
        if invalid:
            return invalid
        parts, ok = [], True
        for key, other in pairs:
            a, b = metrics[key], metrics[other]
            holds = a > b + margin if kind == "greater" else a < b - margin
            ok &= holds
            sign = {("greater", True): ">", ("greater", False): "≯",
                    ("less", True): "<", ("less", False): "≮"}[kind, holds]
            parts.append(f"{key} {_fmt(a)} {sign} {other} {_fmt(b)}")
        suffix = f" (margin {margin:g})" if margin else ""
        studies = [k[len("ablation/"):].split("=", 1)[0] for pair in pairs for k in pair
                   if k.startswith("ablation/")]
        return Verdict(HELD if ok else NOT_HELD,
                       "; ".join(parts) + suffix + budget_note(ablations, studies))
    if kind == "decreases":
        curve = curves.get(claim["curve"])
        if not curve or len(curve[1]) < 2:
            return Verdict(NOT_RUN, f"no curve {claim['curve']} with two or more points")
        first, last = curve[1][0], curve[1][-1]
        invalid = _not_finite({f"{claim['curve']} at step {curve[0][0]:g}": first,
                               f"{claim['curve']} at step {curve[0][-1]:g}": last})
        if invalid:
            return invalid
        holds = first > last + margin
        return Verdict(HELD if holds else NOT_HELD,
                       f"{claim['curve']}: {_fmt(first)} at step {curve[0][0]:g} → "
                       f"{_fmt(last)} at step {curve[0][-1]:g}")
    if kind in ("spread", "increasing"):
        groups = ablations.studies.get(claim["param"], {})
        means = {v: s[claim["metric"]].mean for v, s in groups.items() if claim["metric"] in s}
        if len(means) < 2:
            return Verdict(NOT_RUN, f"fewer than two finished groups of {claim['param']}")
        ordered = sorted(means, key=lambda v: order_key(v, claim.get("order")))
        invalid = _not_finite({f"{claim['param']}={v}": means[v] for v in ordered})
        if invalid:
            return invalid
        listing = ", ".join(f"{v}: {_fmt(means[v])}" for v in ordered)
        note = budget_note(ablations, [claim["param"]])
        if kind == "spread":
            spread = max(means.values()) - min(means.values())
            holds = spread <= float(claim["max_range"])
            return Verdict(HELD if holds else NOT_HELD,
                           f"range {_fmt(spread)} (limit {claim['max_range']:g}) over {listing}"
                           + note)
        tol = float(claim.get("tolerance", 0.0))
        falls = [(a, b) for a, b in zip(ordered, ordered[1:]) if means[b] < means[a] - tol]
        detail = listing + (f"; falls {', '.join(f'{a}→{b}' for a, b in falls)}" if falls else "")
        return Verdict(NOT_HELD if falls else HELD, detail + f" (tolerance {tol:g})" + note)
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
            # A range over a NaN mean is undefined (min and max skip it or not, depending
            # on where it stands): list every group instead, as for a trend.
            if (pattern.startswith("ablation_spread/")
                    and all(math.isfinite(m) for m in means.values())):
                texts.append(f"{_fmt(min(means.values()))}–{_fmt(max(means.values()))}")
            else:
                texts.append(", ".join(f"{v}: {_fmt(means[v])}" for v in
                                       sorted(means, key=lambda v: order_key(v, "first_int"))))
            texts[-1] += budget_note(ablations, [param])
            continue
        if pattern.startswith("ablation/"):
            param_value, metric = pattern[len("ablation/"):].split("/", 1)
            param, value = param_value.split("=", 1)
            stat = ablations.studies.get(param, {}).get(value, {}).get(metric)
            texts.append(stat.text() + budget_note(ablations, [param]) if stat else NOT_RUN)
            continue
        found = [(k, b) for k, b in _expand(pattern, metrics) if k in metrics]
        if not found:
            texts.append(NOT_RUN)
        for key, bound in found:
            texts.append(f"{bound}: {_fmt(metrics[key])}" if bound else _fmt(metrics[key]))
    return "; ".join(texts)


@dataclass
class PaperAblation:
    """The paper's figures for one ablation study, as the ablation figure draws them:
    points (value → top-1) and ranges (what → (low, high)) over the whole study."""

    points: dict[str, float]
    ranges: dict[str, tuple[float, float]]


def paper_ablations(results: Sequence[Mapping[str, Any]], metric: str
                    ) -> dict[str, PaperAblation]:
    """Study → PaperAblation from data/paper_results.yaml's results: an entry whose
    ``ours`` (or one of its ``ablation_point`` keys) is
    ablation/<study>=<value>/<metric> with a numeric ``paper`` is a point; one whose
    ``ours`` is ablation_spread/<study> with a "low–high" ``paper`` is a range."""
    out: dict[str, PaperAblation] = {}
    for entry in results:
        paper = entry.get("paper")
        points = entry.get("ablation_point") or []
        for key in [entry.get("ours"), *([points] if isinstance(points, str) else points)]:
            if not isinstance(key, str):
                continue
            if key.startswith("ablation/") and isinstance(paper, (int, float)):
                param_value, which = key[len("ablation/"):].split("/", 1)
                study, value = param_value.split("=", 1)
                if which == metric:
                    out.setdefault(study, PaperAblation({}, {})).points[value] = float(paper)
            elif key.startswith("ablation_spread/") and isinstance(paper, str):
                bounds = re.fullmatch(r"\s*([\d.]+)\s*[–-]\s*([\d.]+)\s*", paper)
                if bounds:
                    study = key.split("/", 1)[1]
                    out.setdefault(study, PaperAblation({}, {})).ranges[entry["what"]] = (
                        float(bounds.group(1)), float(bounds.group(2)))
    return out
