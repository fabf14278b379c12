"""The report's claim logic at its edges: ties, margins at the boundary, NaN metrics,
missing baselines and single-seed groups.

The rules are those data/paper_results.yaml documents, and the claims are that file's
own (loaded by id), so a test fails when the code or the file's margins drift from what
the file says. "greater" and "decreases" are strict ("exceeds ... by more than margin"):
a tie, or a gap of exactly the margin, is not held. "spread" is inclusive ("lie within
max_range") and "increasing" tolerates a fall of exactly the tolerance ("never fall by
more than"). A claim whose inputs are missing or not finite is "not run", and says which.
"""

from __future__ import annotations

import math

import pytest
import yaml

from barlow.report.ablations import Ablations, ablation_metrics, group_ablations
from barlow.report.claims import HELD, NOT_HELD, evaluate_claim, resolve_ours
from barlow.report.inputs import NOT_RUN
from barlow.report.seeds import Stat, seed_rows
from conftest import REPO

PAPER = yaml.safe_load((REPO / "data" / "paper_results.yaml").read_text())
NAN = math.nan
TOP1 = "linear/barlow/top1_best"


def claim(claim_id: str) -> dict:
    return next(c for c in PAPER["claims"] if c["id"] == claim_id)


def result(result_id: str) -> dict:
    return next(r for r in PAPER["results"] if r["id"] == result_id)


def verdict(claim_id: str, metrics: dict | None = None, curves: dict | None = None,
            ablations: Ablations | None = None):
    return evaluate_claim(claim(claim_id), metrics or {}, curves or {},
                          ablations or Ablations())


def study(param: str, means: dict[str, float], metric: str = TOP1) -> Ablations:
    """One study whose groups have these means (three seeds each, std 1)."""
    return Ablations(studies={param: {v: {metric: Stat(m, 1.0, 3)} for v, m in means.items()}})


LINEAR = {"linear/barlow/top1_best": 85.0, "linear/random_init/top1_best": 72.0,
          "linear/raw_pixels/top1_best": 83.0}


# ---------------------------------------------------------------------- greater / less

def test_greater_holds_only_when_every_baseline_is_exceeded() -> None:
    assert verdict("linear_beats_baselines", LINEAR).status == HELD
    tie = {**LINEAR, "linear/raw_pixels/top1_best": 85.0}
    v = verdict("linear_beats_baselines", tie)
    assert v.status == NOT_HELD, "a tie does not exceed (margin 0: strictly greater)"
    assert "≯ linear/raw_pixels/top1_best 85.0" in v.detail


def test_greater_margin_boundary_is_not_enough() -> None:
    c = claim("redundancy_only_collapses")
    assert c["margin"] == 5.0  # the boundary below is the file's own margin
    full = "ablation/loss.variant=full/linear/barlow/top1_best"
    redundancy = "ablation/loss.variant=redundancy/linear/barlow/top1_best"
    at = {full: 45.0, redundancy: 40.0}
    assert verdict("redundancy_only_collapses", at).status == NOT_HELD
    past = {full: 45.25, redundancy: 40.0}
    v = verdict("redundancy_only_collapses", past)
    assert v.status == HELD and v.detail.endswith("(margin 5)")


def test_less_tie_is_not_held() -> None:
    after, before = "report/cc/after/offdiag_abs_mean", "report/cc/before/offdiag_abs_mean"
    assert verdict("cc_offdiagonal_falls", {after: 0.05, before: 0.2}).status == HELD
    assert verdict("cc_offdiagonal_falls", {after: 0.2, before: 0.2}).status == NOT_HELD


def test_missing_metric_or_baseline_is_not_run_and_named() -> None:
    v = verdict("linear_beats_baselines", {})
    assert (v.status, v.detail) == (NOT_RUN, "no metric linear/barlow/top1_best")
    no_raw = {k: v for k, v in LINEAR.items() if "raw_pixels" not in k}
    v = verdict("linear_beats_baselines", no_raw)
    assert (v.status, v.detail) == (NOT_RUN, "missing: linear/raw_pixels/top1_best")


def test_wildcard_claim_with_one_set_lacking_its_baselines_is_not_run() -> None:
    """"On every transfer set": one set without baselines cannot be counted as held."""
    metrics = {"transfer/digits/linear/barlow/top1_best": 90.0,
               "transfer/digits/linear/random_init/top1_best": 50.0,
               "transfer/digits/linear/raw_pixels/top1_best": 60.0,
               "transfer/elpv/linear/barlow/top1_best": 70.0}
    v = verdict("transfer_linear_beats_baselines", metrics)
    assert v.status == NOT_RUN
    assert v.detail == ("missing: transfer/elpv/linear/random_init/top1_best, "
                        "transfer/elpv/linear/raw_pixels/top1_best")


@pytest.mark.parametrize("key", sorted(LINEAR))
def test_nan_metric_is_not_run_not_a_verdict(key: str) -> None:
    """NaN compares false with everything: unchecked, "greater" would say "not held"
    for a NaN baseline and "less" would say it for a NaN metric, as if measured."""
    v = verdict("linear_beats_baselines", {**LINEAR, key: NAN})
    assert v.status == NOT_RUN and v.detail == f"not finite: {key}"


def test_nan_in_less_is_not_run() -> None:
    after, before = "report/cc/after/offdiag_abs_mean", "report/cc/before/offdiag_abs_mean"
    v = verdict("cc_offdiagonal_falls", {after: 0.05, before: NAN})
    assert (v.status, v.detail) == (NOT_RUN, f"not finite: {before}")


# ---------------------------------------------------------------------- decreases

def test_decreases_is_strict_and_needs_two_points() -> None:
    down = {"pretrain/loss": ([0.0, 10.0], [400.0, 120.0])}
    flat = {"pretrain/loss": ([0.0, 10.0], [120.0, 120.0])}
    one = {"pretrain/loss": ([0.0], [400.0])}
    assert verdict("loss_decreases", curves=down).status == HELD
    assert verdict("loss_decreases", curves=flat).status == NOT_HELD
    assert verdict("loss_decreases", curves=one).status == NOT_RUN
    assert verdict("loss_decreases").status == NOT_RUN


@pytest.mark.parametrize("values", [[NAN, 120.0], [400.0, NAN], [math.inf, 120.0]])
def test_decreases_with_a_non_finite_end_is_not_run(values: list[float]) -> None:
    v = verdict("loss_decreases", curves={"pretrain/loss": ([0.0, 10.0], values)})
    assert v.status == NOT_RUN and v.detail.startswith("not finite: pretrain/loss")


# ---------------------------------------------------------------------- spread

def test_spread_at_its_limit_is_held() -> None:
    assert claim("lambda_robust")["max_range"] == 2.0
    at = study("loss.lambd", {"0.002": 80.0, "0.0051": 82.0, "0.02": 81.0})
    v = verdict("lambda_robust", ablations=at)
    assert v.status == HELD and v.detail.startswith("range 2.0 (limit 2)")
    past = study("loss.lambd", {"0.002": 80.0, "0.0051": 82.25})
    assert verdict("lambda_robust", ablations=past).status == NOT_HELD


def test_spread_needs_two_groups_with_the_metric() -> None:
    one = study("loss.lambd", {"0.0051": 80.0})
    other_metric = study("loss.lambd", {"0.002": 80.0, "0.02": 95.0}, metric="pretrain/knn_top1")
    for abl in (Ablations(), one, other_metric):
        v = verdict("lambda_robust", ablations=abl)
        assert (v.status, v.detail) == (NOT_RUN, "fewer than two finished groups of loss.lambd")


@pytest.mark.parametrize("where", [0, 1, 2])
def test_spread_with_a_nan_group_is_not_run(where: int) -> None:
    """max/min skip a NaN or not depending on where it stands: range 1.0 "held" here."""
    means = [80.0, 81.0, 80.5]
    means[where] = NAN
    abl = study("loss.lambd", dict(zip(("0.002", "0.0051", "0.02"), means)))
    v = verdict("lambda_robust", ablations=abl)
    assert v.status == NOT_RUN
    assert v.detail.startswith("not finite: loss.lambd=" + ("0.002", "0.0051", "0.02")[where])


# ---------------------------------------------------------------------- increasing

PROJECTOR = "model.projector"


def test_increasing_tolerates_a_fall_of_exactly_the_tolerance() -> None:
    assert claim("wider_projector_helps")["tolerance"] == 0.5
    # Ordered by the first number, not as strings ("1024-…" < "128-…" as text).
    at = study(PROJECTOR, {"1024-1024": 80.5, "128-128": 79.0, "512-512": 81.0})
    v = verdict("wider_projector_helps", ablations=at)
    assert v.status == HELD
    assert v.detail == "128-128: 79.0, 512-512: 81.0, 1024-1024: 80.5 (tolerance 0.5)"
    past = study(PROJECTOR, {"128-128": 79.0, "512-512": 81.0, "1024-1024": 80.25})
    v = verdict("wider_projector_helps", ablations=past)
    assert v.status == NOT_HELD and "falls 512-512→1024-1024" in v.detail


def test_increasing_tie_is_held() -> None:
    tie = study(PROJECTOR, {"128-128": 80.0, "512-512": 80.0})
    assert verdict("wider_projector_helps", ablations=tie).status == HELD


def test_increasing_with_a_nan_group_is_not_run() -> None:
    """A NaN never "falls" (every comparison is false): unchecked, it would be held."""
    abl = study(PROJECTOR, {"128-128": 80.0, "512-512": NAN, "1024-1024": 70.0})
    v = verdict("wider_projector_helps", ablations=abl)
    assert (v.status, v.detail) == (NOT_RUN, "not finite: model.projector=512-512")


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown kind 'bigger'"):
        evaluate_claim({"id": "x", "kind": "bigger"}, {}, {}, Ablations())


# ---------------------------------------------------------------------- resolve_ours

def test_resolve_ours_missing_metric_and_group_say_not_run() -> None:
    names = [TOP1]
    assert resolve_ours(result("linear_top1"), {}, Ablations(), names) == NOT_RUN
    assert resolve_ours(result("linear_top1"), {TOP1: 85.0}, Ablations(), names) == "85.0"
    full = result("ablation_baseline")
    assert full["ours"] == "ablation/loss.variant=full/linear/barlow/top1_best"
    assert resolve_ours(full, {}, study("loss.variant", {"redundancy": 40.0}), names) == NOT_RUN
    assert resolve_ours(result("lambda_range"), {}, Ablations(), names) == NOT_RUN


def test_resolve_ours_single_seed_group_has_no_std() -> None:
    abl = Ablations(studies={"loss.variant": {"full": {TOP1: Stat.of([81.0])}}})
    text = resolve_ours(result("ablation_baseline"), {}, abl, [TOP1])
    assert text == "81.0 (1 seed)"


@pytest.mark.parametrize("where", [0, 1])
def test_resolve_ours_spread_with_a_nan_group_shows_it(where: int) -> None:
    """min/max of means with a NaN depend on the order: each group is listed instead."""
    means = [80.0, 82.0]
    means[where] = NAN
    abl = study("loss.lambd", dict(zip(("0.002", "0.02"), means)))
    text = resolve_ours(result("lambda_range"), {}, abl, [TOP1])
    assert text == "0.002: {}, 0.02: {}".format(*("nan" if math.isnan(m) else f"{m:.1f}"
                                                 for m in means))
    finite = study("loss.lambd", {"0.002": 80.0, "0.02": 82.0})
    assert resolve_ours(result("lambda_range"), {}, finite, [TOP1]) == "80.0–82.0"


# ---------------------------------------------------------------------- seeds and groups

def test_single_seed_stat_prints_no_spread() -> None:
    one = Stat.of([81.0])
    assert (one.mean, one.n, one.text()) == (81.0, 1, "81.0 (1 seed)")
    two = Stat.of([80.0, 82.0])
    assert two.text() == f"81.0 ± {math.sqrt(2):.1f} (n=2)"


def test_nan_seed_gives_nan_not_a_crash() -> None:
    """statistics.stdev raises on a NaN; one diverged seed must not stop the report."""
    s = Stat.of([80.0, NAN, 82.0])
    assert math.isnan(s.mean) and math.isnan(s.std) and s.n == 3
    assert s.text() == "nan ± nan (n=3)"


def test_seed_rows_single_seed_and_nan() -> None:
    this = {TOP1: 88.0, "linear/random_init/top1_best": 66.0, "pretrain/knn_top1": 80.0}
    replicas = [{"metrics": {TOP1: NAN}}]
    rows = seed_rows(this, replicas, [TOP1, "pretrain/knn_top1"])
    assert rows == [[TOP1, "nan ± nan (n=2)", "88.00", "nan"],
                    ["linear/random_init/top1_best", "66.0 (1 seed)", "66.00"],
                    ["pretrain/knn_top1", "80.0 (1 seed)", "80.00"]]


def run(state: str, seed: int, metrics: dict, **changes) -> dict:
    base = {"loss.variant": "full", "loss.lambd": 0.0051, "pretrain.seed": 0}
    return {"state": state, "params": {**base, "pretrain.seed": seed, **changes},
            "baseline_params": base, "metrics": metrics}


def test_group_ablations_single_seed_and_nan_runs() -> None:
    runs = [run("done", 0, {TOP1: 80.0}), run("done", 1, {TOP1: 82.0}),
            run("done", 0, {TOP1: 40.0}, **{"loss.variant": "redundancy"}),
            run("done", 0, {TOP1: NAN}, **{"loss.variant": "invariance"}),
            run("done", 1, {TOP1: 70.0}, **{"loss.variant": "invariance"}),
            run("failed", 2, {}, **{"loss.variant": "invariance"}),
            run("done", 0, {TOP1: 1.0}, **{"loss.variant": "invariance", "loss.lambd": 0.02})]
    abl = group_ablations(runs, ["loss.variant", "loss.lambd"], "pretrain.seed", [TOP1],
                          "pretrain.epochs")
    assert abl.counts == {"done": 6, "failed": 1} and abl.unclassified == 1
    groups = abl.studies["loss.variant"]
    assert groups["redundancy"][TOP1].text() == "40.0 (1 seed)"
    assert groups["full"][TOP1].text() == f"81.0 ± {math.sqrt(2):.1f} (n=2)"
    assert groups["invariance"][TOP1].text() == "nan ± nan (n=2)"
    assert "loss.lambd" not in abl.studies  # only the baseline ran: not a study
    v = evaluate_claim(claim("invariance_only_worse"),
                       {f"ablation/loss.variant={k}/{TOP1}": s[TOP1].mean
                        for k, s in groups.items()}, {}, abl)
    assert v.status == NOT_RUN and "invariance" in v.detail


def test_group_ablations_composite_study_takes_runs_changing_exactly_its_params() -> None:
    """The paper's no-BN + no-normalisation row changes two settings: the study
    "model.projector_bn+loss.normalization" takes it; a run changing only one of them
    goes to that one's own study; a run changing a pair no entry names is unclassified."""
    base = {"model.projector_bn": True, "loss.normalization": "batch", "loss.lambd": 0.005,
            "pretrain.seed": 0}

    def r(seed, top1, **changes):
        return {"state": "done", "params": {**base, "pretrain.seed": seed, **changes},
                "baseline_params": base, "metrics": {TOP1: top1}}

    sweep = ["loss.lambd", "loss.normalization", "model.projector_bn",
             "model.projector_bn+loss.normalization"]
    runs = [r(0, 80.0), r(1, 82.0),
            r(0, 79.0, **{"model.projector_bn": False}),
            r(0, 50.0, **{"model.projector_bn": False, "loss.normalization": "none"}),
            r(1, 52.0, **{"model.projector_bn": False, "loss.normalization": "none"}),
            r(0, 60.0, **{"loss.normalization": "none", "loss.lambd": 0.02})]
    abl = group_ablations(runs, sweep, "pretrain.seed", [TOP1], "pretrain.epochs")
    both = abl.studies["model.projector_bn+loss.normalization"]
    assert set(both) == {"True+batch", "False+none"}
    assert (both["False+none"][TOP1].mean, both["False+none"][TOP1].n) == (51.0, 2)
    assert both["True+batch"][TOP1].n == 2                  # the baselines
    assert set(abl.studies["model.projector_bn"]) == {"True", "False"}
    assert abl.studies["model.projector_bn"]["False"][TOP1].mean == 79.0
    assert "loss.normalization" not in abl.studies          # only the baseline ran alone
    assert abl.unclassified == 1
    metrics = ablation_metrics(abl)
    assert metrics[f"ablation/model.projector_bn+loss.normalization=False+none/{TOP1}"] == 51.0
    # A run must not be split into its params' single studies: blocks stay by the rest.
    assert abl.other_blocks == 0


def test_seed_rows_list_a_baseline_once_when_it_is_also_named() -> None:
    scratch = "semisup/1percent/scratch/top1_best"
    this = {"semisup/1percent/barlow/top1_best": 75.0, scratch: 24.0}
    rows = seed_rows(this, [{"metrics": {"semisup/1percent/barlow/top1_best": 73.0,
                                         scratch: 28.0}}],
                     ["semisup/1percent/barlow/top1_best", scratch])
    assert [r[0] for r in rows] == ["semisup/1percent/barlow/top1_best", scratch]
