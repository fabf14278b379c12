"""The report's figures as PNG bytes (matplotlib, Agg, no metadata so that the same
inputs give the same bytes): pretraining curves, evaluation bars, the cross-correlation
blocks and the ablations."""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

from barlow.report.ablations import Ablations, mean_curve, sorted_values
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


def ablation_figure(ablations: Ablations, metric: str) -> Figure | None:
    studies = {p: g for p, g in ablations.studies.items()
               if sum(metric in s for s in g.values()) >= 2}
    if not studies:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(studies), figsize=(3.6 * len(studies), 3.0), squeeze=False)
    for ax, (param, groups) in zip(axes[0], studies.items()):
        values = sorted_values(v for v in groups if metric in groups[v])
        xs = range(len(values))
        ax.errorbar(xs, [groups[v][metric].mean for v in values],
                    yerr=[groups[v][metric].std for v in values], marker="o", capsize=3)
        ax.set_xticks(list(xs), values, rotation=30, fontsize=7)
        ax.set_title(param, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric, fontsize=8)
    fig.tight_layout()
    return Figure("ablations", _png(fig), f"Ablations: {metric}, mean ± std over seeds")


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
