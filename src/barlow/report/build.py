"""The report's content: everything read (ReportInputs) → the Document and a summary of
the claims' verdicts, section by section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from barlow.report.ablations import (Ablations, ablation_metrics, format_value,
                                     group_ablations, mean_curve, sorted_values)
from barlow.report.claims import evaluate_claim, paper_ablations, resolve_ours
from barlow.report.document import Document
from barlow.report.figures import (ablation_curves_figure, ablation_figure, bars_figure,
                                   cc_figure, pretrain_figure)
from barlow.report.inputs import NOT_RUN, STAGES, Curve
from barlow.report.profiles import profile_rows
from barlow.report.seeds import is_seed_replica, seed_rows


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
    """The report's content, one function per section in the report's order; also
    returns the claims' verdicts and the cc stats."""
    abl = (group_ablations(inp.runs, report_cfg.ablation_params, report_cfg.seed_param,
                           report_cfg.ablation_metrics, report_cfg.ablation_budget)
           if inp.runs else Ablations())
    metrics = dict(inp.metrics)
    metrics.update(ablation_metrics(abl))
    if inp.cc:
        for name in ("before", "after"):
            for key, value in inp.cc[name]["stats"].items():
                metrics[f"report/cc/{name}/{key}"] = value
    # Snapshots of this very run with other seeds, and the other (longer) profiles.
    replicas = [p for p in inp.profiles if is_seed_replica(inp.params, p)]
    others = [p for p in inp.profiles if p not in replicas]

    doc = Document("Barlow Twins reproduction report")
    doc.para(f"Paper: {inp.paper.get('paper', '')}. Built by the `report` stage from the "
             "dvclive metrics of the pipeline, data/paper_results.yaml and params.yaml.")
    _scale_section(doc, inp)
    _stages_section(doc, inp)
    verdicts = _claims_section(doc, inp, metrics, abl)
    _paper_section(doc, inp, metrics, abl, report_cfg)
    if replicas:
        _seeds_section(doc, replicas, metrics, report_cfg)
    if others:
        _profiles_section(doc, inp, others, metrics, report_cfg)
    _pretraining_section(doc, inp)
    _cc_section(doc, inp)
    _evaluations_section(doc, metrics)
    _ablations_section(doc, inp, abl, report_cfg)
    _determinism_section(doc)
    summary = {"claims": {k: {"status": v.status, "detail": v.detail} for k, v in verdicts.items()},
               "cc": {n: inp.cc[n]["stats"] for n in ("before", "after")} if inp.cc else None,
               "stages": inp.status}
    return doc, summary


def _scale_section(doc: Document, inp: ReportInputs) -> None:
    doc.heading("Scale: this run is not the paper's experiment")
    doc.table(["", "paper", "this run"], _scale_rows(inp))
    doc.para("Every number below comes from a run far smaller than the paper's: a 28 px "
             "10-class data set instead of 224 px ImageNet-1k, a small ResNet instead of "
             "ResNet-50, and a few epochs instead of 1000. Absolute accuracies are therefore "
             "not comparable (10-class top-5 is near 100% for any model); what can be "
             "compared is each claim's direction, tested in the claims table against "
             "baselines run with the same recipe.")


def _stages_section(doc: Document, inp: ReportInputs) -> None:
    doc.heading("Stages")
    doc.table(["stage", "metrics"], [[s, inp.status.get(s, NOT_RUN)] for s in STAGES])


def _claims_section(doc: Document, inp: ReportInputs, metrics: dict[str, float],
                    abl: Ablations) -> dict[str, Any]:
    """The claims table; returns each claim's verdict by id."""
    verdicts = {}
    rows = []
    for claim in inp.paper.get("claims", []):
        verdict = evaluate_claim(claim, metrics, inp.curves, abl)
        verdicts[claim["id"]] = verdict
        rows.append([claim["statement"], claim.get("paper_basis", ""), verdict.status,
                     verdict.detail])
    doc.heading("Claims of the paper, tested at this scale")
    doc.table(["claim", "paper", "this run", "evidence"], rows)
    return verdicts


def _paper_section(doc: Document, inp: ReportInputs, metrics: dict[str, float],
                   abl: Ablations, report_cfg: Any) -> None:
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


def _seeds_section(doc: Document, replicas: list[dict[str, Any]], metrics: dict[str, float],
                   report_cfg: Any) -> None:
    doc.heading("Seeds: this run's figures as mean ± std")
    doc.para(f"This run and {len(replicas)} snapshot(s) of it that differ only in their "
             "seeds (reports/profiles/: "
             + ", ".join(f"{p['name']} at {str(p['rev'])[:10]}" for p in replicas)
             + "). Sample standard deviation; each seed's value follows, this run first.")
    doc.table(["metric", "mean ± std", "this run"] + [p["name"] for p in replicas],
              seed_rows(metrics, replicas, report_cfg.profile_metrics))


def _profiles_section(doc: Document, inp: ReportInputs, others: list[dict[str, Any]],
                      metrics: dict[str, float], report_cfg: Any) -> None:
    doc.heading("Profiles: this run beside the committed longer runs")
    doc.para("Each profile column is a snapshot of a finished run (reports/profiles/); "
             "its dvc.lock and metrics are at the git revision named, so "
             "`dvc metrics diff <rev>` compares it with the workspace. Params listed "
             "are those on which a profile differs from this run.")
    doc.table(["quantity", "this run"] + [f"{p['name']} ({str(p['rev'])[:10]})"
                                          for p in others],
              profile_rows(inp.params, metrics, others, report_cfg.profile_metrics))


def _pretraining_section(doc: Document, inp: ReportInputs) -> None:
    doc.heading("Pretraining")
    fig = pretrain_figure(inp.curves)
    if fig:
        doc.figure(fig)
    else:
        doc.para(f"Pretraining curves: {NOT_RUN} (no dvclive/pretrain/plots).")


def _cc_section(doc: Document, inp: ReportInputs) -> None:
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


def _evaluations_section(doc: Document, metrics: dict[str, float]) -> None:
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


def _ablations_section(doc: Document, inp: ReportInputs, abl: Ablations,
                       report_cfg: Any) -> None:
    doc.heading("Ablations")
    if inp.runs is None or not inp.runs:
        doc.para(f"{NOT_RUN}: no experiments in the snapshot (reports/ablations.json). "
                 "Queue and run them, take a snapshot, and rebuild the report:")
        doc.code("make ablations     # dvc exp run --queue per study, then dvc queue start -j 1\n"
                 "PYTHONPATH=src python -m stages.report ablations --keep --out reports/ablations.json\n"
                 "dvc repro report")
    else:
        _ablation_studies(doc, abl, report_cfg, inp.paper.get("results", []))


def _determinism_section(doc: Document) -> None:
    """What tests/test_reliability.py checks, and where it stops holding."""
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


def _ablation_studies(doc: Document, abl: Ablations, report_cfg: Any,
                      paper_results: Any) -> None:
    """Per study: its groups at every budget it ran (group_ablations says which one is
    judged), the per-epoch curves at that budget, and the figure."""
    budget = report_cfg.ablation_budget
    counts = ", ".join(f"{n} {s}" for s, n in sorted(abl.counts.items()))
    doc.para(f"Experiments in the snapshot: {counts}"
             + (f"; {abl.other_blocks} finished runs in contexts where no study ran left out"
                if abl.other_blocks else "")
             + (f"; {abl.unclassified} runs change two swept params no study names"
                if abl.unclassified else "")
             + ". Runs that change no swept param are each study's baseline. Each study is "
             f"judged (claims, paper table, figure) at the largest {budget} among those "
             "where it ran the most values; its other budgets are shown beside it. "
             "Blocks of runs:")
    doc.bullets([f"{b.label}: {b.runs} runs, "
                 + ", ".join(f"{k}={format_value(v)}" for k, v in b.context.items()
                             if k != budget)
                 + f"; studies: {', '.join(b.studies)}" for b in abl.blocks])
    if not abl.studies:
        doc.para(f"No study has finished groups yet ({NOT_RUN}). make ablations, then "
                 "python -m stages.report ablations --keep --out reports/ablations.json")
    metrics = list(report_cfg.ablation_metrics)
    for param, groups in abl.studies.items():
        doc.heading(param, 3)
        blocks = [b for b in abl.blocks if param in b.studies]
        values = sorted_values({v for b in blocks for v in b.studies[param]})
        # A column per budget and metric that some group has (a kNN-less budget has none).
        columns = [(b, m) for b in blocks for m in metrics
                   if any(m in stats for stats in b.studies[param].values())]
        doc.table(["value"] + [f"{m} ({b.label})" for b, m in columns],
                  [[v] + [_stat_text(b.studies[param].get(v, {}).get(m)) for b, m in columns]
                   for v in values])
        source = abl.source[param]
        for name in report_cfg.ablation_curves:
            means = {v: mean_curve(c[name]) for v, c in source.curves.get(param, {}).items()
                     if name in c}
            steps = sorted({x for xs, _ in means.values() for x in xs})
            if len(means) < 2 or not steps:
                continue
            doc.para(f"{name} per epoch at {source.label}, mean over seeds: where "
                     "the groups separate.")
            doc.table(["value"] + [f"{x:g}" for x in steps],
                      [[v] + [f"{dict(zip(*means[v])).get(x, float('nan')):.1f}"
                              for x in steps]
                       for v in sorted_values(means)])
    for metric in metrics:
        fig = ablation_figure(abl, metric, paper_ablations(paper_results, metric))
        if fig:
            doc.figure(fig)
            break
    for name in report_cfg.ablation_curves:
        fig = ablation_curves_figure(abl, name)
        if fig:
            doc.figure(fig)


def _stat_text(stat: Any) -> str:
    return stat.text() if stat is not None else "—"
