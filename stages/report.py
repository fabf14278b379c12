"""DVC stage `report`: the reproduction report, reports/report.md and reports/report.html.

    PYTHONPATH=src python -m stages.report build --live-root dvclive \
        --checkpoint models/pretrain/checkpoint.pt --data data/ffcv \
        --paper data/paper_results.yaml --ablations reports/ablations.json --out reports

Reads every dvclive metrics file that exists (a missing one is "not run"), the pretraining
checkpoint (cross-correlation of held-out pairs before and after training), the paper's
numbers and claims, params.yaml, and a snapshot of the ablation experiments.

    PYTHONPATH=src python -m stages.report ablations --keep --out reports/ablations.json

takes that snapshot from `dvc exp show --json`. It is a separate command, not part of the
stage, because experiments live in git refs that DVC does not track as deps: a stage that
ran `dvc exp show` itself would be stale whenever an experiment finished, and would run
dvc inside `dvc repro`. The snapshot is a committed file, so the report stage reruns
exactly when it changes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from barlow.config import SECTIONS, AugmentConfig, ReportConfig, load_section, read_params
from barlow.data.sources import DataError
from barlow.report.ablations import attach_curves, merge_runs, parse_exp_show
from barlow.report.build import ReportInputs, build_document
from barlow.report.crosscorr import cc_section
from barlow.report.document import write_report
from barlow.report.inputs import NOT_RUN, load_curves, load_metrics
from barlow.report.profiles import load_profiles, profile_snapshot
from barlow.interrupt import written_whole
from barlow.stage import machine_shape, params_option, run_stage


@click.group()
def main() -> None:
    """The reproduction report and its ablation snapshot."""


@main.command()
@params_option
@click.option("--live-root", required=True, type=click.Path(path_type=Path),
              help="folder with one dvclive folder per stage (pretrain, linear, ...)")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="the pretraining checkpoint (model state and the config it ran with)")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="folder with train.beton and test.beton (held-out pairs from test)")
@click.option("--paper", required=True, type=click.Path(path_type=Path, exists=True),
              help="the paper's numbers and claims (data/paper_results.yaml)")
@click.option("--ablations", "ablations_path", required=True, type=click.Path(path_type=Path),
              help="snapshot written by `report ablations`; absent: ablations not run")
@click.option("--profiles", "profiles_dir", type=click.Path(path_type=Path),
              help="folder of `report profile` snapshots (*.json) to set beside this run")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="folder for report.md, report.html and figures/")
@click.option("--skip-cc", is_flag=True, help="leave out the cross-correlation (no FFCV load)")
def build(params: str, live_root: Path, checkpoint: Path, data_dir: Path, paper: Path,
          ablations_path: Path, profiles_dir: Path | None, out_dir: Path, skip_cc: bool) -> None:
    """The reproduction report: paper vs this run, the claims tested, curves.

    Writes OUT/report.md, OUT/figures/*.png and OUT/report.html (self-contained). Reads LIVE_ROOT/<stage>/metrics.json (a missing one is "not run"), CHECKPOINT and
    DATA/test.beton (cross-correlation of held-out pairs), PAPER, ABLATIONS, PROFILES/*.json
    and the params report, data.source, model, augment.resolution, augment.colour_ops_on
    (where the held-out views' colour ops run), machine, pretrain.epochs and
    pretrain.batch_size.
    Exit 2: bad params or inputs."""
    with run_stage("report"):
        cfg = load_section(ReportConfig, "report", params)
        # The sections it prints values of are read raw below: checked first, as the
        # stages that use them check them (a wrong type there is one line, not a report).
        for section in ("data", "model", "augment", "pretrain"):
            load_section(SECTIONS[section], section, params)
        all_params = read_params(params)
        paper_data = yaml.safe_load(paper.read_text())
        metrics, status = load_metrics(live_root)
        curves = load_curves(live_root / "pretrain" / "plots" / "metrics")
        runs = None
        if ablations_path.is_file():
            runs = json.loads(ablations_path.read_text()).get("runs", [])

        train_manifest = data_dir / "train.json"
        inputs = ReportInputs(
            paper=paper_data, params=all_params, metrics=metrics, status=status,
            curves=curves, runs=runs,
            profiles=(load_profiles(profiles_dir)
                      if profiles_dir is not None and profiles_dir.is_dir() else []),
            train_images=(json.loads(train_manifest.read_text()).get("num_images")
                          if train_manifest.is_file() else None),
            **cc_section(checkpoint, data_dir, cfg, skip_cc,
                         load_section(AugmentConfig, "augment", params).colour_ops_on,
                         machine_shape(params).threads))
        doc, summary = build_document(inputs, cfg)
        write_report(doc, out_dir)
        for claim, verdict in summary["claims"].items():
            click.echo(f"report: {claim}: {verdict['status']}")
        click.echo(f"report: wrote {out_dir / 'report.md'} and {out_dir / 'report.html'}")


@main.command()
@params_option
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path))
@click.option("--from-json", "from_json", type=click.Path(path_type=Path, exists=True),
              help="parse this saved `dvc exp show --json` output instead of running dvc")
@click.option("--keep", is_flag=True,
              help="keep OUT's runs whose experiments are gone (e.g. another budget's, "
                   "removed with `dvc exp remove`): one snapshot holds every budget")
def ablations(params: str, out_path: Path, from_json: Path | None, keep: bool) -> None:
    """Snapshot the ablation experiments (`dvc exp show --json --all-commits`) into OUT,
    with each finished run's curves report.ablation_curves read from its git commit."""
    cfg = load_section(ReportConfig, "report", params)
    if from_json is not None:
        raw = json.loads(from_json.read_text())
    else:
        # --all-commits: queued runs branch from the commit they were queued at, which
        # need not be HEAD any more; each run carries its own baseline's params.
        done = subprocess.run(["dvc", "exp", "show", "--json", "--all-commits"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"report: error: dvc exp show failed: {done.stderr.strip()}", file=sys.stderr)
            sys.exit(2)
        raw = json.loads(done.stdout)
    runs = parse_exp_show(raw)
    attach_curves(runs, cfg.ablation_curves, _git_text)
    if keep and out_path.is_file():
        runs = merge_runs(runs, json.loads(out_path.read_text()).get("runs", []))
    # Sorted, so that the same experiments give the same bytes (a committed dep).
    runs.sort(key=lambda r: (str(r["baseline_rev"]), str(r["name"]), str(r["rev"])))
    _write_json(out_path, {"source": "dvc exp show --json", "runs": runs})
    states: dict[str, int] = {}
    for run in runs:
        states[run["state"]] = states.get(run["state"], 0) + 1
    click.echo(f"report: {len(runs)} experiments ({states or 'none'}) → {out_path}")


def _write_json(path: Path, data: Any) -> None:
    """PATH ← DATA as sorted, indented JSON, written whole or not at all (a committed
    snapshot must never be left half-written)."""
    with written_whole(path) as tmp:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _git_text(rev: str, path: str) -> str | None:
    """PATH as committed in REV, or None where that commit has no such file (or the
    rev is not in this repository, e.g. a snapshot parsed from another clone's JSON)."""
    done = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


@main.command()
@click.option("--name", required=True, help="the profile's name (e.g. long)")
@click.option("--rev", required=True,
              help="the git revision whose dvc.lock and metrics are this run's")
@click.option("--params", "params_path", required=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="the params.yaml the run was made with")
@click.option("--live-root", required=True,
              type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="the run's dvclive folder (one sub-folder per stage)")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path))
def profile(name: str, rev: str, params_path: Path, live_root: Path, out_path: Path) -> None:
    """Snapshot a finished run of another profile into OUT for `build --profiles`."""
    with run_stage("report"):
        metrics, status = load_metrics(live_root)
        missing = [stage for stage, state in status.items() if state == NOT_RUN]
        if missing:
            raise DataError(f"{live_root}: no metrics for {', '.join(missing)}; "
                                 "snapshot a finished run")
        snapshot = profile_snapshot(name, rev, read_params(params_path), metrics)
        _write_json(out_path, snapshot)
        click.echo(f"report: profile {name} ({rev}): {len(metrics)} metrics → {out_path}")


if __name__ == "__main__":
    main()
