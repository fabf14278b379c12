"""The report's figures as PNG bytes (matplotlib, Agg, no metadata so that the same
inputs give the same bytes): pretraining curves, evaluation bars, the cross-correlation
blocks and the ablations."""

from __future__ import annotations

import io
import math
import re
from typing import Any, Mapping, Sequence

from barlow.report.ablations import Ablations, mean_curve, sorted_values
from barlow.report.claims import PaperAblation
from barlow.report.document import Figure
from barlow.report.inputs import Curve


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


#: Columns of the ablation figure's grid; one spare cell, where there is one, holds the key.
ABLATION_COLUMNS = 4
#: Smallest y-span of an ablation panel, in points: differences of a few tenths between
#: groups stay a few tenths tall instead of filling the panel.
MIN_SPAN = 2.0


def _numeric_axis(values: Sequence[str]) -> list[float] | None:
    """x positions of a study whose values are numbers (λ) or start with one (batch
    sizes, projector widths "512-512-512"), all positive: those are drawn on a log axis,
    as the paper does; None for categories (loss variants, switches)."""
    xs = []
    for v in values:
        match = re.fullmatch(r"(\d+(?:\.\d*)?(?:e-?\d+)?)(?:-\d+)*", v)
        if not match or float(match.group(1)) <= 0:
            return None
        xs.append(float(match.group(1)))
    return xs


def _span(lows: Sequence[float], highs: Sequence[float]) -> tuple[float, float]:
    """(centre, span) of what a panel's axis must show."""
    lo, hi = min(lows), max(highs)
    return (lo + hi) / 2, hi - lo


def ablation_figure(ablations: Ablations, metric: str,
                    paper: Mapping[str, PaperAblation] | None = None) -> Figure | None:
    """ablation_plot as the report's PNG."""
    fig = ablation_plot(ablations, metric, paper)
    if fig is None:
        return None
    return Figure("ablations", _png(fig),
                  f"Ablations: {metric}, mean ± std over seeds with each seed's value, and "
                  "the paper's figures on a right-hand axis of the same scale")


def ablation_plot(ablations: Ablations, metric: str,
                  paper: Mapping[str, PaperAblation] | None = None):
    """The matplotlib figure: one panel per study on a grid, our group means ± sample
    std over seeds with each seed's value as a dot, and the paper's figures (``paper``:
    claims.paper_ablations) on a right-hand axis of the same scale (points per inch),
    shifted to sit beside ours: the paper's level is ImageNet's, its differences are
    comparable. λ, batch size and projector width are on log axes with the values as
    ticks; a panel spans at least MIN_SPAN points."""
    studies = {p: g for p, g in ablations.studies.items()
               if sum(metric in s for s in g.values()) >= 2}
    if not studies:
        return None
    paper = paper or {}
    plt = _pyplot()
    cols = min(ABLATION_COLUMNS, len(studies) + 1)
    rows = math.ceil((len(studies) + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.7 * cols, 3.1 * rows), squeeze=False)
    cells = [ax for row in axes for ax in row]
    handles = {}
    for ax, (param, groups) in zip(cells, studies.items()):
        values = sorted_values(v for v in groups if metric in groups[v])
        stats = [groups[v][metric] for v in values]
        ref = paper.get(param, PaperAblation({}, {}))
        numeric = _numeric_axis(values + list(ref.points))
        where = dict(zip(values + list(ref.points), numeric or range(len(values))))
        if numeric is None:  # categories: the paper's points only at values we ran
            ref = PaperAblation({v: y for v, y in ref.points.items() if v in where},
                                ref.ranges)
        xs = [where[v] for v in values]
        means = [s.mean for s in stats]
        stds = [s.std if math.isfinite(s.std) else 0.0 for s in stats]
        handles["ours"] = ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3,
                                      color="C0", zorder=3)
        for x, s in zip(xs, stats):
            if len(s.values) > 1:
                handles["seed"] = ax.scatter([x] * len(s.values), s.values, s=9,
                                             color="C0", alpha=0.45, zorder=2)
        lows = [m - d for m, d in zip(means, stds)] + [v for s in stats for v in s.values]
        highs = [m + d for m, d in zip(means, stds)] + [v for s in stats for v in s.values]
        finite = [x for x in lows + highs if math.isfinite(x)]
        centre, span = _span(finite, finite) if finite else (0.0, 0.0)
        paper_ys = list(ref.points.values()) + [b for r in ref.ranges.values() for b in r]
        if paper_ys:
            p_centre, p_span = _span(paper_ys, paper_ys)
            span = max(span, p_span)
        span = max(span, MIN_SPAN) * 1.2
        # A top-1 axis stops at 100 where ours still fits; the paper's axis moves with
        # ours (same scale) as far as its own points stay in view.
        pad = 0.04 * span  # a marker at the edge stays whole
        shift = max(0.0, centre + span / 2 - 100.0)
        centre -= min(shift, centre + span / 2 - max(finite, default=centre) - pad)
        if paper_ys:
            p_centre = min(max(p_centre - shift, max(paper_ys) - span / 2 + pad),
                           min(paper_ys) + span / 2 - pad)
        ax.set_ylim(centre - span / 2, centre + span / 2)
        if paper_ys:
            twin = ax.twinx()
            twin.set_ylim(p_centre - span / 2, p_centre + span / 2)
            if ref.points:
                pv = sorted(ref.points, key=where.__getitem__)
                handles["paper"], = twin.plot([where[v] for v in pv],
                                              [ref.points[v] for v in pv], marker="s",
                                              ls="--", color="C3", ms=4, zorder=1)
            for low, high in ref.ranges.values():
                handles["paper range"] = twin.axhspan(low, high, color="C3", alpha=0.15)
            twin.tick_params(axis="y", colors="C3", labelsize=7)
        if numeric is not None:
            ax.set_xscale("log")
            shown = sorted(set(where.values()))
            ax.set_xticks(shown, [f"{x:g}" for x in shown], fontsize=7)
            ax.minorticks_off()
            ax.set_xlim(min(shown) / 1.5, max(shown) * 1.5)
        else:
            ax.set_xticks(xs, values, rotation=20, fontsize=7)
            ax.set_xlim(-0.5, len(values) - 0.5)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(param, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in cells[len(studies):]:
        ax.axis("off")
    labels = {"ours": "ours: mean ± std over seeds (left axis)", "seed": "ours: each seed",
              "paper": "paper, ImageNet 300 epochs (right axis,\nsame scale)",
              "paper range": "paper: its range over the study"}
    cells[len(studies)].legend([handles[k] for k in labels if k in handles],
                               [labels[k] for k in labels if k in handles],
                               loc="center", fontsize=8, frameon=False)
    for row in axes:
        row[0].set_ylabel(metric, fontsize=8)
    fig.tight_layout()
    return fig


def ablation_curves_figure(ablations: Ablations, name: str) -> Figure | None:
    """Curve NAME (e.g. pretrain/knn_top1) per epoch of each group, mean over seeds, one
    panel per study at the budget it is judged at: where the groups separate."""
    panels = {}
    for param in ablations.studies:
        groups = {v: c[name] for v, c in ablations.source[param].curves.get(param, {}).items()
                  if name in c}
        if len(groups) >= 2:
            panels[param] = groups
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (param, groups) in zip(axes[0], panels.items()):
        for value in sorted_values(groups):
            steps, means = mean_curve(groups[value])
            ax.plot(steps, means, marker=".", label=value)
        ax.set_title(param, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    return Figure("ablation_curves", _png(fig),
                  f"Ablations: {name} per epoch, mean over seeds, at the budget each study "
                  "is judged at")
