"""The evaluation stages' two runs: --weights (the backbone: the DVC stages linear,
semisup, transfer) or --baselines (their baselines: linear_baselines, semisup_scratch,
transfer_baselines, which read no backbone). Exactly one of the two; an empty baseline
list; and dvc.yaml's stages, whose baselines a pretraining change never reruns (the
real DVC). Each run's metrics on tiny data: test_linear_stage, test_semisup_stage,
test_transfer_stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO, machine, repo_params
from stages import linear, semisup, transfer

STAGES = {"linear": linear, "semisup": semisup, "transfer": transfer}
#: Each backbone stage of dvc.yaml and the stage of its baselines.
BASELINE_STAGES = {"linear": "linear_baselines", "semisup": "semisup_scratch",
                   "transfer": "transfer_baselines"}
BACKBONE = "models/pretrain/backbone.pt"


def stage_args(stage: str, tmp: Path, choice: list[str]) -> list[str]:
    return ["--params", str(tmp / "params.yaml"), "--data", str(tmp / "data"),
            *(["--pretrain-data", str(tmp / "data")] if stage == "transfer" else []),
            *choice, "--live", str(tmp / "live")]


@pytest.mark.parametrize("choice", [[], ["--weights", "backbone.pt", "--baselines"]],
                         ids=["neither", "both"])
@pytest.mark.parametrize("stage", STAGES)
def test_exactly_one_of_weights_and_baselines(stage, choice, tmp_path):
    """Neither or both: click's usage error, exit 2, before anything is read (the
    params file does not exist) or written."""
    result = CliRunner().invoke(STAGES[stage].main, stage_args(stage, tmp_path, choice))
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1] == (
        "Error: give exactly one of --weights PATH (the backbone) or --baselines")
    assert not (tmp_path / "live").exists()


@pytest.mark.parametrize("stage", ["linear", "transfer"])
def test_an_empty_baseline_list_writes_metrics_without_a_probe(stage, tmp_path):
    """linear.baselines: [] (transfer.baselines: []): --baselines exits 0 at once, with
    the outputs its DVC stage declares: a metrics.json of {} and an empty plots folder.
    No data is read (there is none here)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        repo_params(**{stage: {"baselines": []}}, machine=machine(1))))
    result = CliRunner().invoke(STAGES[stage].main,
                                stage_args(stage, tmp_path, ["--baselines"]))
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((tmp_path / "live" / "metrics.json").read_text()) == {}
    assert list((tmp_path / "live" / "plots" / "metrics").iterdir()) == []


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", BASELINE_STAGES)
def test_each_baseline_stage_is_its_sibling_without_the_backbone(stage):
    """The same command with --baselines instead of --weights and its own live folder,
    the same deps but the backbone, the same params, metrics and curves uncached."""
    stages = dvc_stages()
    own, base, name = stages[stage], stages[BASELINE_STAGES[stage]], BASELINE_STAGES[stage]
    assert f"--weights {BACKBONE} --live dvclive/{stage}" in own["cmd"]
    assert base["cmd"] == own["cmd"].replace(f"--weights {BACKBONE} --live dvclive/{stage}",
                                             f"--baselines --live dvclive/{name}")
    assert BACKBONE in own["deps"] and BACKBONE not in base["deps"]
    assert base["deps"] == [d for d in own["deps"] if d != BACKBONE]
    assert base["params"] == own["params"]
    assert base["metrics"] == [{f"dvclive/{name}/metrics.json": {"cache": False}}]
    assert base["plots"] == [{f"dvclive/{name}/plots/metrics": {"cache": False, "x": "step"}}]
    assert f"dvclive/{name}/metrics.json" in stages["report"]["deps"]


def paths_of(entries: list) -> list[str]:
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def dvc(repo: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, text=True,
                            capture_output=True, env={"DVC_NO_ANALYTICS": "1",
                                                      "PATH": str(Path(sys.executable).parent)
                                                      + ":/usr/bin:/bin"})
    assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_a_pretraining_change_reruns_the_backbone_stages_not_the_baselines(tmp_path):
    """The project's dvc.yaml and params.yaml in a scratch git+DVC repository, every
    dep and output a placeholder, the whole pipeline recorded as run (`dvc commit`).
    Then a pretrain param changes and pretraining writes another backbone: `dvc
    status` names pretrain, linear, semisup and transfer, and none of the baselines'
    stages. A linear param, by contrast, reruns linear_baselines too."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    text = (REPO / "dvc.yaml").read_text()
    (tmp_path / "dvc.yaml").write_text(text)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    subsets = params["data"]["subsets_dir"]
    paths = set()
    for stage in dvc_stages().values():
        for key in ("deps", "outs", "metrics", "plots"):
            paths |= {p.replace("${data.subsets_dir}", subsets) for p in paths_of(stage.get(key))}
    # A path without a suffix is a folder (data/ffcv, dvclive/x/plots/metrics, ...).
    for path in sorted(paths, key=lambda p: Path(p).suffix == ""):
        target = tmp_path / path
        if Path(path).suffix:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f"{path}\n")
        else:
            target.mkdir(parents=True, exist_ok=True)
            (target / "placeholder").write_text(f"{path}\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(tmp_path, "init", "-q")
    dvc(tmp_path, "commit", "-f", "-q")
    assert json.loads(dvc(tmp_path, "status", "--json")) == {}

    # A pretrain param the report does not print (pretrain.epochs would rerun it too).
    changed = params | {"pretrain": params["pretrain"] | {"lr_weights": 1.0e-3}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    (tmp_path / BACKBONE).write_text("another pretraining's backbone\n")
    assert set(json.loads(dvc(tmp_path, "status", "--json"))) == {
        "pretrain", "linear", "semisup", "transfer"}

    changed["linear"] = params["linear"] | {"epochs": 1}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    status = set(json.loads(dvc(tmp_path, "status", "--json")))
    assert {"linear", "linear_baselines"} <= status
    assert not status & {"semisup_scratch", "transfer_baselines"}
