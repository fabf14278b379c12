"""The reproduction report: claims marked from fabricated metrics, missing stages shown as
"not run", a self-contained HTML, ablation grouping, and the cross-correlation maths."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
import torch
from click.testing import CliRunner

from barlow.report.ablations import group_ablations, mean_curve, parse_exp_show
from barlow.report.crosscorr import cc_before_after, cc_stats, checkpoint_models, cross_correlation
from barlow.report.profiles import profile_snapshot
from barlow.report.seeds import is_seed_replica, seed_rows
from barlow.config import ModelConfig, ReportConfig, load_section
from barlow.models import Projector
from barlow.train import build_model, seed_everything
from conftest import REPO
from stages.report import main as report_cli

TINY_MODEL = {"arch": "small_resnet", "width": 4, "layers": [1, 1, 1, 1], "projector": "32-32",
              "projector_bn": True}


def write_live(root: Path, stage: str, metrics: dict, curves: dict | None = None) -> None:
    """A dvclive folder as the stages leave it: nested metrics.json and per-metric TSVs."""
    live = root / stage
    live.mkdir(parents=True)
    tree: dict = {}
    for key, value in metrics.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    (live / "metrics.json").write_text(json.dumps({**tree, "step": 3}))
    for key, rows in (curves or {}).items():
        path = live / "plots" / "metrics" / f"{key}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        name = key.split("/")[-1]
        path.write_text(f"step\t{name}\n" + "".join(f"{s}\t{v}\n" for s, v in rows))


@pytest.fixture()
def fabricated(tmp_path: Path) -> Path:
    """pretrain, linear, semisup (1% only) and their baselines ran; transfer did not."""
    live = tmp_path / "dvclive"
    write_live(live, "pretrain", {"pretrain/loss": 120.0, "pretrain/knn_top1": 70.0},
               {"pretrain/loss": [(20, 400.0), (40, 250.0), (60, 120.0)],
                "pretrain/on_diag": [(20, 300.0), (60, 60.0)],
                "pretrain/off_diag": [(20, 9000.0), (60, 5000.0)],
                "pretrain/knn_top1": [(30, 60.0), (60, 70.0)]})
    write_live(live, "linear", {"linear/barlow/top1_best": 85.0, "linear/barlow/top5_best": 99.5})
    # The baselines, each evaluation's in a stage of its own, under the same names.
    write_live(live, "linear_baselines", {"linear/random_init/top1_best": 72.0,
                                          "linear/raw_pixels/top1_best": 83.0})
    # Barlow below scratch at 1%: the claim must be marked "not held".
    write_live(live, "semisup", {"semisup/1percent/barlow/top1_best": 60.0})
    write_live(live, "semisup_scratch", {"semisup/1percent/scratch/top1_best": 65.0})
    return tmp_path


def build(tmp: Path, ablations: dict | None = None, extra: tuple = ()) -> tuple[str, str]:
    abl = tmp / "ablations.json"
    abl.write_text(json.dumps(ablations or {"runs": []}))
    result = CliRunner().invoke(report_cli, [
        "build", "--params", str(REPO / "params.yaml"), "--live-root", str(tmp / "dvclive"),
        "--checkpoint", str(tmp / "missing.pt"), "--data", str(tmp / "no_data"),
        "--paper", str(REPO / "data" / "paper_results.yaml"), "--ablations", str(abl),
        "--out", str(tmp / "reports"), *extra])
    assert result.exit_code == 0, result.output
    return ((tmp / "reports" / "report.md").read_text(),
            (tmp / "reports" / "report.html").read_text())


def claim_row(md: str, statement_start: str) -> str:
    rows = [line for line in md.splitlines() if line.startswith(f"| {statement_start}")]
    assert len(rows) == 1, statement_start
    return rows[0]


def test_claims_marked_from_metrics(fabricated: Path) -> None:
    md, _ = build(fabricated)
    assert "| held |" in claim_row(md, "Barlow Twins features beat random-init")
    assert "| not held |" in claim_row(md, "With 1% of the labels")
    assert "| not run |" in claim_row(md, "With 10% of the labels")
    assert "| not run |" in claim_row(md, "On every transfer set, a linear head")
    assert "| held |" in claim_row(md, "The Barlow Twins loss decreases")
    # No checkpoint: the cross-correlation claims cannot be tested.
    assert "| not run |" in claim_row(md, "Training pulls the diagonal")


def test_paper_vs_ours_table(fabricated: Path) -> None:
    md, _ = build(fabricated)
    row = next(l for l in md.splitlines() if l.startswith("| Table 1 | linear evaluation, top-1"))
    assert "| 73.2 % | 85.0 |" in row
    assert re.search(r"\| Table 3 \| transfer, Places-205 linear top-1 \| 54.1 % \| not run \|", md)
    assert "| 56.8 AP | out of scope |" in md
    assert "fashion_mnist" in md and "ImageNet-1k" in md  # the scale is stated


def test_missing_stages_not_run(fabricated: Path) -> None:
    md, _ = build(fabricated)
    assert "| transfer | not run |" in md and "| transfer_baselines | not run |" in md
    assert "| linear | ok |" in md and "| linear_baselines | ok |" in md
    assert "transfer: not run." in md
    assert "Cross-correlation" in md and "does not exist" in md
    assert "make ablations" in md  # ablations not run: the command is printed


def test_a_baseline_stage_with_no_baseline_listed_is_ok(fabricated: Path) -> None:
    """transfer.baselines: [] leaves transfer_baselines a metrics.json of {}: the stage
    ran, with nothing to report, unlike a stage that never ran."""
    (fabricated / "dvclive" / "transfer_baselines").mkdir()
    (fabricated / "dvclive" / "transfer_baselines" / "metrics.json").write_text("{}")
    md, _ = build(fabricated)
    assert "| transfer_baselines | ok (no baselines listed) |" in md
    assert "| transfer | not run |" in md


def test_html_is_self_contained(fabricated: Path) -> None:
    _, page = build(fabricated)
    assert "<img" in page and 'src="data:image/png;base64,' in page
    assert not re.search(r"https?://", page)
    for tag in re.findall(r"<(?:script|link|img|iframe)[^>]*>", page):
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", tag), tag


def test_figures_written_for_markdown(fabricated: Path) -> None:
    md, _ = build(fabricated)
    for name in re.findall(r"\]\((figures/[^)]+\.png)\)", md):
        assert (fabricated / "reports" / name).stat().st_size > 1000


def exp_show(runs: list[tuple[dict, dict]], base: dict) -> list[dict]:
    """`dvc exp show --json` as DVC 3.67 prints it: workspace, then the commit with its
    experiments (params and metrics nested per file)."""
    def data(params, metrics):
        return {"params": {"params.yaml": {"data": params}},
                "metrics": {"dvclive/linear/metrics.json": {"data": metrics}} if metrics else {}}

    exps = [{"revs": [{"rev": f"{i:040x}", "name": f"exp-{i}", "data": data(p, m),
                       "error": None, "experiments": None}],
             "executor": None if m else {"state": "queued"}, "name": f"exp-{i}"}
            for i, (p, m) in enumerate(runs)]
    return [{"rev": "workspace", "data": data(base, {}), "experiments": None},
            {"rev": "a" * 40, "name": "main", "data": data(base, {}), "experiments": exps}]


def params(variant="full", lambd=0.0051, seed=0, epochs=5):
    return {"loss": {"lambd": lambd, "variant": variant},
            "pretrain": {"seed": seed, "epochs": epochs, "batch_size": 256},
            "model": {"projector": "512-512-512"}}


def top1(x: float) -> dict:
    return {"linear": {"barlow": {"top1_best": x}}}


def test_ablations_grouped_with_seeds(fabricated: Path) -> None:
    runs = [(params(seed=s, epochs=2), top1(80.0 + s)) for s in (0, 1, 2)]
    runs += [(params("redundancy", seed=s, epochs=2), top1(40.0)) for s in (0, 1)]
    runs += [(params("invariance", seed=0, epochs=2), top1(79.0))]
    runs += [(params(lambd=0.02, seed=0, epochs=2), top1(81.5))]
    runs += [(params(lambd=0.02, seed=1, epochs=2), {})]            # still queued
    runs += [(params(seed=0, epochs=7), top1(99.0))]                # other budget
    # Another worker count is the same experiment: same block. So is a run queued from
    # a commit that added a report param (the report section computes nothing).
    runs += [({**params("invariance", seed=1, epochs=2), "data": {"workers": 8}}, top1(77.0))]
    runs += [({**params(lambd=0.002, seed=0, epochs=2),
               "report": {"ablation_curves": ["pretrain/knn_top1"]}}, top1(80.5))]
    parsed = parse_exp_show(exp_show(runs, params()))
    assert [r["state"] for r in parsed].count("queued") == 1
    cfg = load_section(ReportConfig, "report", REPO / "params.yaml")
    abl = group_ablations(parsed, cfg.ablation_params, cfg.seed_param, cfg.ablation_metrics,
                          cfg.ablation_budget)
    # The 7-epoch run is a lone baseline: no study ran there, so it is left out.
    assert [b.context for b in abl.blocks] == [{"pretrain.epochs": 2}] and abl.other_blocks == 1
    assert abl.source["loss.variant"].budget == 2
    full = abl.studies["loss.variant"]["full"]["linear/barlow/top1_best"]
    assert (full.mean, full.n) == (81.0, 3) and full.std == pytest.approx(1.0)
    assert abl.studies["loss.lambd"]["0.02"]["linear/barlow/top1_best"].n == 1
    assert abl.studies["loss.lambd"]["0.002"]["linear/barlow/top1_best"].n == 1
    assert abl.studies["loss.lambd"]["0.0051"]["linear/barlow/top1_best"].n == 3  # baseline
    assert abl.studies["loss.variant"]["invariance"]["linear/barlow/top1_best"].n == 2
    assert "pretrain.batch_size" not in abl.studies  # only the baseline ran

    snapshot = {"runs": parsed}
    md, _ = build(fabricated, snapshot)
    assert "| held |" in claim_row(md, "The redundancy-reduction term alone")
    assert "| held |" in claim_row(md, "The invariance term alone")
    assert "| held |" in claim_row(md, "Accuracy is insensitive to λ")
    assert "| not run |" in claim_row(md, "Small batches work")
    assert "| full | 81.0 ± 1.0 (n=3) |" in md
    assert "pretrain.epochs=2" in md


def test_ablation_figure_grid_log_axes_paper_and_seeds() -> None:
    """The figure a reader reads: studies on a grid, λ and batch size on log axes with
    the values as ticks, each seed a dot, the paper's points (every batch size it
    reports, 128..4096) and λ range on the right-hand axis of the same scale, and no
    panel zoomed to a few tenths of a point."""
    import yaml

    from barlow.report.claims import paper_ablations
    from barlow.report.figures import MIN_SPAN, ablation_plot

    runs = [(params(seed=s), top1(80.0 + 0.1 * s)) for s in (0, 1, 2)]
    runs += [(params("invariance", seed=s), top1(78.0 + 0.2 * s)) for s in (0, 1)]
    runs += [(params(lambd=lambd, seed=s), top1(79.5 + 0.1 * s))
             for lambd in (0.002, 0.02) for s in (0, 1)]
    runs += [({**params(seed=s), "pretrain": {"seed": s, "epochs": 5, "batch_size": b}},
              top1(79.0 + b / 512)) for b in (128, 512) for s in (0, 1)]
    cfg = load_section(ReportConfig, "report", REPO / "params.yaml")
    abl = group_ablations(parse_exp_show(exp_show(runs, params())), cfg.ablation_params,
                          cfg.seed_param, cfg.ablation_metrics, cfg.ablation_budget)
    metric = "linear/barlow/top1_best"
    paper = paper_ablations(yaml.safe_load((REPO / "data/paper_results.yaml").read_text())
                            ["results"], metric)
    assert paper["pretrain.batch_size"].points == {
        "128": 69.7, "256": 70.7, "512": 71.4, "1024": 71.7, "2048": 71.4, "4096": 70.7}
    assert paper["loss.variant"].points["full"] == 71.4
    assert list(paper["loss.lambd"].ranges.values()) == [(70.8, 71.6)]
    fig = ablation_plot(abl, metric, paper)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert list(panels) == ["loss.lambd", "loss.variant", "pretrain.batch_size"]
    # 3 studies and the key: one row of 4.
    assert len({round(ax.get_position().y0, 3) for ax in panels.values()}) == 1
    lam, variant, batch = panels.values()
    assert lam.get_xscale() == batch.get_xscale() == "log"
    assert variant.get_xscale() == "linear"
    assert [t.get_text() for t in batch.get_xticklabels()] == [
        "128", "256", "512", "1024", "2048", "4096"]
    assert [t.get_text() for t in lam.get_xticklabels()] == ["0.002", "0.0051", "0.02"]
    # Each seed a dot: 3 baseline seeds + 2 + 2 in the λ panel.
    from matplotlib.collections import PathCollection
    assert sum(len(c.get_offsets()) for c in lam.collections
               if isinstance(c, PathCollection)) == 7
    for ax in panels.values():
        low, high = ax.get_ylim()
        assert high - low >= MIN_SPAN
        twin = next(t for t in fig.axes if t is not ax and t.get_position().bounds
                    == ax.get_position().bounds)
        assert twin.get_ylim()[1] - twin.get_ylim()[0] == pytest.approx(high - low)
    twin = next(t for t in fig.axes if t is not batch
                and t.get_position().bounds == batch.get_position().bounds)
    assert list(twin.lines[0].get_ydata()) == [69.7, 70.7, 71.4, 71.7, 71.4, 70.7]
    # All seven studies of params.yaml: two rows of four (three studies stay one row).
    seven = {s: abl.studies["loss.lambd"] for s in cfg.ablation_params}
    from barlow.report.ablations import Ablations
    big = ablation_plot(Ablations(studies=seven), metric, paper)
    rows = {round(ax.get_position().y0, 3) for ax in big.axes if ax.get_title()}
    assert len(rows) == 2


def test_each_study_judged_at_its_largest_budget(fabricated: Path) -> None:
    """loss.variant ran at 2 and 9 epochs: the claims use 9, the table shows both; λ ran
    two values besides the baseline at 2 epochs and one at 9, so it is judged at 2 (a
    longer run of part of a sweep does not replace the whole sweep)."""
    runs = [(params(seed=s, epochs=2), top1(80.0 + s)) for s in (0, 1)]
    runs += [(params("redundancy", seed=s, epochs=2), top1(79.0)) for s in (0, 1)]
    runs += [(params(lambd=0.02, seed=s, epochs=2), top1(70.0)) for s in (0, 1)]
    runs += [(params(lambd=0.002, seed=s, epochs=2), top1(75.0)) for s in (0, 1)]
    runs += [(params(lambd=0.02, seed=s, epochs=9), top1(50.0)) for s in (0, 1)]
    runs += [(params(seed=s, epochs=9), top1(85.0 + s)) for s in (0, 1)]
    runs += [(params("redundancy", seed=s, epochs=9), top1(60.0)) for s in (0, 1)]
    parsed = parse_exp_show(exp_show(runs, params(epochs=9)))
    cfg = load_section(ReportConfig, "report", REPO / "params.yaml")
    abl = group_ablations(parsed, cfg.ablation_params, cfg.seed_param, cfg.ablation_metrics,
                          cfg.ablation_budget)
    assert [b.budget for b in abl.blocks] == [2, 9]
    assert abl.source["loss.variant"].budget == 9 and abl.source["loss.lambd"].budget == 2
    assert abl.studies["loss.variant"]["redundancy"]["linear/barlow/top1_best"].mean == 60.0
    assert abl.studies["loss.lambd"]["0.02"]["linear/barlow/top1_best"].mean == 70.0

    md, _ = build(fabricated, {"runs": parsed})
    # 79 vs 80.5 at 2 epochs would not hold with the claim's margin; 60 vs 85.5 at 9 does.
    row = claim_row(md, "The redundancy-reduction term alone")
    assert "| held |" in row and "(at pretrain.epochs=9)" in row
    assert "(at pretrain.epochs=2)" in claim_row(md, "Accuracy is insensitive to λ")
    assert "| redundancy | 79.0 ± 0.0 (n=2) | 60.0 ± 0.0 (n=2) |" in md  # no kNN column
    assert "| 0.02 | 70.0 ± 0.0 (n=2) | 50.0 ± 0.0 (n=2) |" in md        # both budgets
    assert "linear/barlow/top1_best (pretrain.epochs=9)" in md


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_ablations_snapshot_reads_curves_from_each_run_commit(tmp_path: Path, monkeypatch) -> None:
    """The snapshot reads each finished run's kNN curve from its own git commit (a real
    repository, as the experiments' refs are), against the epoch: runs of batch sizes
    64 and 256 log at other steps but the same epochs. --keep keeps an earlier
    snapshot's runs whose experiments are gone; without it they are dropped."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    plots = repo / "dvclive" / "pretrain" / "plots" / "metrics" / "pretrain"
    plots.mkdir(parents=True)
    revs = []
    for steps_per_epoch, knn in ((10, (60.0, 70.0)), (40, (65.0, 75.0))):
        (plots / "knn_top1.tsv").write_text(
            "step\tknn_top1\n" + "".join(f"{steps_per_epoch * (e + 1)}\t{v}\n"
                                         for e, v in enumerate(knn)))
        (plots / "epoch.tsv").write_text(
            "step\tepoch\n" + "".join(f"{s}\t{s / steps_per_epoch}\n"
                                      for s in range(5, 2 * steps_per_epoch + 1, 5)))
        _git(repo, "add", "-A")
        _git(repo, "commit", "-qm", f"run {steps_per_epoch}")
        revs.append(_git(repo, "rev-parse", "HEAD"))
    raw = exp_show([(params(seed=s), top1(80.0)) for s in (0, 1)], params())
    for exp, rev in zip(raw[1]["experiments"], revs):
        exp["revs"][0]["rev"] = rev
    (tmp_path / "exp.json").write_text(json.dumps(raw))
    out = tmp_path / "abl.json"
    old = {"name": "gone", "rev": "b" * 40, "baseline_rev": "a" * 40, "state": "done",
           "params": params(epochs=1), "metrics": {}, "baseline_params": params()}
    queued = {**old, "name": "never-ran", "rev": "c" * 40, "state": "queued"}
    out.write_text(json.dumps({"runs": [old, queued]}))
    monkeypatch.chdir(repo)
    snapshot = ["ablations", "--params", str(REPO / "params.yaml"), "--out", str(out),
                "--from-json", str(tmp_path / "exp.json")]
    result = CliRunner().invoke(report_cli, snapshot + ["--keep"])
    assert result.exit_code == 0, result.output
    runs = {r["rev"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs[revs[0]]["curves"] == {"pretrain/knn_top1": [[1.0, 2.0], [60.0, 70.0]]}
    assert runs[revs[1]]["curves"] == {"pretrain/knn_top1": [[1.0, 2.0], [65.0, 75.0]]}
    assert runs["b" * 40]["name"] == "gone" and "c" * 40 not in runs
    result = CliRunner().invoke(report_cli, snapshot)
    assert result.exit_code == 0, result.output
    assert {r["rev"] for r in json.loads(out.read_text())["runs"]} == set(revs)


def test_mean_curve_over_the_steps_every_seed_logged() -> None:
    assert mean_curve([([1, 2, 3], [10.0, 20.0, 30.0]), ([1, 2], [12.0, 22.0])]) == (
        [1, 2], [11.0, 21.0])


def test_ablations_snapshot_command(tmp_path: Path) -> None:
    raw = tmp_path / "exp.json"
    raw.write_text(json.dumps(exp_show([(params(seed=1), top1(80.0))], params())))
    out = tmp_path / "abl.json"
    result = CliRunner().invoke(report_cli, ["ablations", "--params", str(REPO / "params.yaml"),
                                              "--out", str(out), "--from-json", str(raw)])
    assert result.exit_code == 0, result.output
    runs = json.loads(out.read_text())["runs"]
    assert runs[0]["params"]["pretrain.seed"] == 1
    assert runs[0]["metrics"] == {"linear/barlow/top1_best": 80.0}


def test_cross_correlation_identity_for_identical_white_views() -> None:
    torch.manual_seed(0)
    head = Projector(16, "16")  # one bias-free Linear: the tiny model of barlow.models
    torch.nn.init.orthogonal_(head[0].weight)
    x = torch.randn(8192, 16)
    with torch.no_grad():
        z = head(x)
    c = cross_correlation(z, z)
    assert torch.allclose(torch.diagonal(c), torch.ones(16, dtype=c.dtype), atol=1e-4)
    stats = cc_stats(c)
    # Orthogonal map of white noise: off-diagonal only sampling noise, ~1/sqrt(N).
    assert stats["offdiag_abs_mean"] < 0.03
    # Standardisation: per-feature affine changes of either view leave c unchanged.
    scale, shift = torch.rand(16) + 0.5, torch.randn(16)
    assert torch.allclose(cross_correlation(z * scale + shift, z), c, atol=1e-4)


def test_checkpoint_models_rebuild_init_and_weights(tmp_path: Path) -> None:
    seed_everything(3)
    init = build_model(ModelConfig(**TINY_MODEL))
    trained = build_model(ModelConfig(**TINY_MODEL))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": trained.state_dict(), "step": 8, "finished": True,
                "config": {"model": TINY_MODEL, "pretrain": {"seed": 3}, "augment": {}}}, path)
    info = checkpoint_models(path)
    for a, b in zip(info.before.state_dict().values(), init.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(info.after.state_dict().values(), trained.state_dict().values()):
        assert torch.equal(a, b)
    # Identical views through the whole model: c_ii = 1 exactly, after standardisation.
    images = torch.randn(64, 3, 16, 16)
    out = cc_before_after(info, [(images, images)], block=8)
    assert out["after"]["block"].shape == (8, 8)
    assert out["after"]["stats"]["diag_mean"] == pytest.approx(1.0, abs=1e-4)


def test_profile_snapshot_set_beside_this_run(fabricated: Path, tmp_path: Path) -> None:
    """`report profile` snapshots a finished run of another profile; `build --profiles`
    prints the params it differs on and the profile metrics beside this run's."""
    other = tmp_path / "long"
    for stage, value in (("pretrain", 80.0), ("linear", 91.25), ("semisup", 75.0),
                         ("transfer", 96.0)):
        write_live(other, stage, {f"{stage}/barlow/top1_best": value,
                                  "pretrain/knn_top1": 80.0} if stage == "linear"
                   else {f"{stage}/x": value})
    # The baselines' stages, each of which a finished run has run too.
    for stage, name in (("linear_baselines", "linear/random_init/top1_best"),
                        ("semisup_scratch", "semisup/1percent/scratch/top1_best"),
                        ("transfer_baselines", "transfer/digits/linear/raw_pixels/top1_best")):
        write_live(other, stage, {name: 50.0})
    long_params = yaml.safe_load((REPO / "params.yaml").read_text())
    quick_epochs = long_params["pretrain"]["epochs"]
    long_params["pretrain"]["epochs"] = 50
    long_params["machine"]["cores"] = 7              # not a difference worth a row
    (other / "params.yaml").write_text(yaml.safe_dump(long_params))
    profiles = tmp_path / "profiles"
    cmd = ["profile", "--name", "long", "--rev", "abc1234", "--params",
           str(other / "params.yaml"), "--live-root", str(other), "--out",
           str(profiles / "long.json")]
    result = CliRunner().invoke(report_cli, cmd)
    assert result.exit_code == 0, result.output
    snapshot = json.loads((profiles / "long.json").read_text())
    assert snapshot["params"]["pretrain.epochs"] == 50
    assert snapshot["metrics"]["linear/barlow/top1_best"] == 91.25

    md, _ = build(fabricated, extra=("--profiles", str(profiles)))
    assert "| quantity | this run | long (abc1234) |" in md
    assert f"| pretrain.epochs | {quick_epochs} | 50 |" in md
    assert "| linear/barlow/top1_best | 85.0 | 91.2 |" in md
    assert "machine.cores" not in md

    # An unfinished run (a stage without metrics) is refused, and nothing is written.
    (other / "semisup" / "metrics.json").unlink()
    result = CliRunner().invoke(report_cli, cmd[:-1] + [str(profiles / "bad.json")])
    assert result.exit_code == 2 and "no metrics for semisup" in result.output
    assert not (profiles / "bad.json").exists()


def test_seed_replicas_are_told_apart_from_profiles() -> None:
    params = {"pretrain": {"seed": 0, "epochs": 16, "workers": 2}, "linear": {"seed": 0}}
    snap = lambda p: profile_snapshot("x", "r", p, {})  # noqa: E731
    other_seed = {"pretrain": {"seed": 1, "epochs": 16, "workers": 2}, "linear": {"seed": 1}}
    longer = {"pretrain": {"seed": 1, "epochs": 32, "workers": 2}, "linear": {"seed": 1}}
    assert is_seed_replica(params, snap(other_seed))
    assert not is_seed_replica(params, snap(longer))      # another experiment
    assert not is_seed_replica(params, snap(params))      # the same run again
    # Run with other workers or process counts, it is still the same experiment; a
    # snapshot that changes only those is the same run again.
    elsewhere = {"pretrain": {"seed": 2, "epochs": 16, "workers": 8, "nproc_per_node": 4},
                 "linear": {"seed": 2}}
    assert is_seed_replica(params, snap(elsewhere))
    on_a_node = {**other_seed, "machine": {"devices": 4, "cores": 32}}
    assert is_seed_replica(params, snap(on_a_node))
    assert not is_seed_replica(params, snap({**params, "pretrain": {**params["pretrain"],
                                                                     "workers": 8}}))


def test_a_snapshot_from_before_colour_ops_on_is_a_seed_replica() -> None:
    """augment.colour_ops_on says where the colour ops run, not what they draw: a seed
    snapshot made before the key existed is a replica of a run with it at host, and so
    is one with it at device."""
    params = {"augment": {"resolution": 28, "colour_ops_on": "host"},
              "pretrain": {"seed": 0, "epochs": 16}}
    snap = lambda p: profile_snapshot("x", "r", p, {})  # noqa: E731
    before = {"augment": {"resolution": 28}, "pretrain": {"seed": 1, "epochs": 16}}
    assert is_seed_replica(params, snap(before))
    assert is_seed_replica(params, snap({**before, "augment": {"resolution": 28,
                                                               "colour_ops_on": "device"}}))
    assert not is_seed_replica(params, snap({**before, "augment": {"resolution": 32}}))


def test_a_snapshot_from_before_grad_allreduce_ran_with_fp32() -> None:
    """pretrain.grad_allreduce changes what a several-process run computes; a snapshot
    made before the key existed ran with fp32 (seeds.IMPLIED): a seed replica of a run
    with fp32, not of one with bf16. An experiment queued before it is blocked with its
    fp32 successors in the ablations likewise (ablations._params_of)."""
    params = {"pretrain": {"seed": 0, "epochs": 16, "grad_allreduce": "fp32"}}
    snap = lambda p: profile_snapshot("x", "r", p, {})  # noqa: E731
    before = {"pretrain": {"seed": 1, "epochs": 16}}
    assert is_seed_replica(params, snap(before))
    assert not is_seed_replica({"pretrain": {**params["pretrain"], "grad_allreduce": "bf16"}},
                               snap(before))
    exp = lambda p: {"rev": "c", "data": {"params": {"params.yaml": {"data": p}}},  # noqa: E731
                     "experiments": [{"revs": [{"name": "e", "rev": "r", "data": {
                         "params": {"params.yaml": {"data": p}}}}]}]}
    old, new = (parse_exp_show([exp(p)])[0]["params"] for p in (before, params))
    assert old == {**new, "pretrain.seed": 1}


def test_seed_rows_give_mean_and_sample_std_with_baselines() -> None:
    this = {"linear/barlow/top1_best": 88.0, "linear/random_init/top1_best": 66.0,
            "pretrain/knn_top1": 80.0}
    replicas = [{"metrics": {"linear/barlow/top1_best": 89.0,
                             "linear/random_init/top1_best": 67.0, "pretrain/knn_top1": 81.0}},
                {"metrics": {"linear/barlow/top1_best": 90.5,
                             "linear/random_init/top1_best": 65.0}}]
    rows = seed_rows(this, replicas, ["linear/barlow/top1_best", "pretrain/knn_top1"])
    assert [r[0] for r in rows] == ["linear/barlow/top1_best", "linear/random_init/top1_best",
                                    "pretrain/knn_top1"]
    # mean 89.17, sample std sqrt(((−1.17)² + (−0.17)² + 1.33²) / 2) = 1.26
    assert rows[0][1] == "89.2 ± 1.3 (n=3)" and rows[0][2:] == ["88.00", "89.00", "90.50"]
    assert rows[1][1] == "66.0 ± 1.0 (n=3)"
    assert rows[2][1] == "80.5 ± 0.7 (n=2)"  # a replica that did not log it is left out
