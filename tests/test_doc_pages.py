"""The examples of the user pages run as written: each page's fenced ```python blocks are
read from the .md and executed, so the page cannot drift from the code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import NO_JIT, TINY_PARAMS, machine

REPO = Path(__file__).resolve().parents[1]


def fenced(page: str, lang: str) -> list[str]:
    """The ```LANG blocks of docs/PAGE in page order."""
    text = (REPO / "docs" / page).read_text()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def test_backbone_page_small_resnet(pretrained_backbone, tiny_ffcv, tmp_path, monkeypatch):
    """docs/backbone.md, first block: a real exported small-ResNet backbone (tiny
    pretraining) loads strictly through build_backbone and gives features, run in a
    folder laid out as the repository (params.yaml, models/pretrain, data/ffcv)."""
    blocks = fenced("backbone.md", "python")
    assert len(blocks) == 2
    (tmp_path / "models/pretrain").mkdir(parents=True)
    (tmp_path / "data/ffcv").mkdir(parents=True)
    shutil.copy(pretrained_backbone, tmp_path / "models/pretrain/backbone.pt")
    shutil.copy(tiny_ffcv / "train.json", tmp_path / "data/ffcv/train.json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "docs/backbone.md[python 1]", "exec"), scope)
    assert scope["dim"] == 8 * TINY_PARAMS["model"]["width"]
    assert torch.isfinite(scope["features"]).all()
    # What the page says of the layout: torchvision names, no fc, 3x3 stem.
    state = torch.load("models/pretrain/backbone.pt", weights_only=True)
    assert not any(k.startswith("fc.") for k in state)
    assert state["conv1.weight"].shape[-2:] == (3, 3)
    assert {k.split(".")[0] for k in state} == {"conv1", "bn1", "layer1", "layer2",
                                                "layer3", "layer4"}
    # ... and that it loads into no torchvision ResNet-18, even at its width and depth.
    from barlow.models import build_backbone
    wide, _ = build_backbone("small_resnet", 64, (2, 2, 2, 2))
    with pytest.raises(RuntimeError, match="conv1.weight"):
        __import__("torchvision").models.resnet18().load_state_dict(
            wide.state_dict(), strict=False)


def test_backbone_page_resnet50(tmp_path, monkeypatch):
    """docs/backbone.md, second block: a fresh project ResNet-50 backbone exported by
    the pretrain stage's export function loads into torchvision.models.resnet50 with
    exactly fc.weight and fc.bias missing."""
    from barlow import distributed as dist
    from barlow.models import BarlowTwins, Projector, build_backbone
    from barlow.train import export

    backbone, dim = build_backbone("resnet50")
    env = dist.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    export(BarlowTwins(backbone, Projector(dim, "16-16")), tmp_path / "models/pretrain", env)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(fenced("backbone.md", "python")[1], "docs/backbone.md[python 2]", "exec"),
         scope)
    assert torch.equal(scope["model"].conv1.weight, backbone.conv1.weight)


def run_lines(block: str, cwd: Path) -> list[str]:
    """Each command of a ```bash block (backslash continuations joined) run by bash in
    ``cwd``, as a user would type it; their stdout."""
    out = []
    for command in block.replace("\\\n", " ").splitlines():
        if command.strip() and not command.lstrip().startswith("#"):
            result = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True,
                                    text=True, timeout=600,
                                    env={**os.environ, **NO_JIT,
                                         "PATH": f"{Path(sys.executable).parent}"
                                         f":{os.environ['PATH']}"})
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
            out.append(result.stdout)
    return out


@pytest.mark.slow
def test_own_data_page_runs_on_a_folder_with_unequal_classes(pretrained_backbone, tmp_path):
    """docs/own-data.md on an ImageNet-shaped folder of 3 classes of 140, 194 and 249
    images (tests/imagenet_tree.py): the page's profile over params.yaml with size-only
    overrides, the page's commands (convert, subsets), then linear and semisup as
    dvc.yaml runs them, in a folder laid out as the repository."""
    from barlow.config import merge_params, read_params
    from barlow.data.subsets import VAL_PER_CLASS, check_splits, read_subset
    from imagenet_tree import make_tree, sample_synsets

    tree = tmp_path / "mydata"
    names = make_tree(tree, sample_synsets(3), spare=12, val_per_class=4)
    sizes = [len(v) for v in names.values()]
    assert len(set(sizes)) == 3
    work = tmp_path / "work"
    work.mkdir()
    for linked in ("src", "stages"):
        (work / linked).symlink_to(REPO / linked)
    (work / "models/pretrain").mkdir(parents=True)
    shutil.copy(pretrained_backbone, work / "models/pretrain/backbone.pt")

    profile = yaml.safe_load(fenced("own-data.md", "yaml")[0])
    assert profile["data"]["imagefolder_root"] == "/datasets/mydata"
    # Only sizes and the folder change (the tiny backbone: width 4, 16 px).
    params = merge_params(read_params(REPO / "params.yaml"), profile, {
        "data": {"imagefolder_root": str(tree), "ffcv": {"max_resolution": 32}},
        "machine": machine(1),
        "model": {k: TINY_PARAMS["model"][k] for k in ("width", "layers", "projector")},
        "augment": {"resolution": 16},
        "linear": {"epochs": 2, "baselines": []},
        "semisup": {"resolution": 16, "epochs": [1, 1], "batch_size": 32,
                    "eval_batch_size": 64},
    })
    (work / "params.yaml").write_text(yaml.safe_dump(params))

    commands = fenced("own-data.md", "bash")
    assert len(commands) == 1
    printed = run_lines(commands[0], work)
    subsets = work / "data/subsets/mydata"
    assert printed[1].splitlines() == [
        f"data/subsets/mydata/{name}.txt: {n} images"
        for name, n in (("1percent", 5), ("10percent", 58), ("val", 30))]
    manifest = json.loads((work / "data/ffcv/train.json").read_text())
    assert manifest["class_counts"] == sizes
    files = (work / "data/ffcv/train.files.txt").read_text().splitlines()
    labels = np.repeat(np.arange(3), sizes)
    ten = read_subset(subsets / "10percent.txt", len(files), files)
    one = read_subset(subsets / "1percent.txt", len(files), files)
    # Proportional to 140, 194, 249: 14, 19, 25 and 1, 2, 2; the 1 % inside the 10 %.
    assert sizes == [140, 194, 249]
    assert np.bincount(labels[ten]).tolist() == [14, 19, 25]
    assert np.bincount(labels[one]).tolist() == [1, 2, 2] and set(one) <= set(ten)
    val, _, origin = check_splits(subsets, files, labels, manifest["class_names"],
                                  ["1percent", "10percent"])
    assert origin.endswith("val.txt")
    assert np.bincount(labels[val]).tolist() == [VAL_PER_CLASS] * 3

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in ("linear", "semisup"):
        run_lines(stages[stage]["cmd"], work)
        metrics = json.loads((work / f"dvclive/{stage}/metrics.json").read_text())
        assert metrics[stage], stage


def _matches(shown: str, printed: str) -> bool:
    """The page's line, where "..." stands for any text, against the printed line."""
    pattern = ".*".join(re.escape(part) for part in shown.strip().split("..."))
    return re.fullmatch(pattern, printed.strip()) is not None


@pytest.mark.slow
def test_troubleshooting_messages_are_what_the_stages_print(tiny_ffcv, pretrained_backbone,
                                                             tmp_path, monkeypatch, capsys):
    """Each message of docs/troubleshooting.md, in page order, produced by the real stage
    (CliRunner) in a folder laid out as the repository, with the exit status its
    section names."""
    from click.testing import CliRunner

    from barlow import distributed as dist
    from barlow.config import merge_params
    from barlow.stage import open_live, run_stage
    from conftest import repo_params
    from stages import convert, linear

    shown = fenced("troubleshooting.md", "text")
    assert len(shown) == 7
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_ffcv, "data/ffcv")
    Path("data/subsets/mydata").mkdir(parents=True)
    Path("data/subsets/mydata/val.txt").write_text("".join(f"{i}\n" for i in range(16)))
    Path("models/pretrain").mkdir(parents=True)
    shutil.copy(pretrained_backbone, "models/pretrain/backbone.pt")
    base = repo_params(data={"subsets_dir": "data/subsets/mydata"},
                       model={k: TINY_PARAMS["model"][k] for k in ("arch", "width", "layers")},
                       augment={"resolution": 16},
                       linear={"epochs": 1, "baselines": []}, machine=machine(1))

    def linear_stage(**changes) -> tuple[int, str]:
        Path("params.yaml").write_text(yaml.safe_dump(merge_params(base, changes)))
        result = CliRunner().invoke(linear.main, [
            "--data", "data/ffcv", "--weights", "models/pretrain/backbone.pt",
            "--live", "dvclive/linear"])
        return result.exit_code, result.stderr

    printed = [
        linear_stage(linear={"lrr": 0.1}),
        linear_stage(linear={"weight_decay": "1.0e-6"}),
    ]
    shutil.move("data/ffcv", "ffcv-kept")   # before the convert stage ran
    printed.append(linear_stage())
    shutil.move("ffcv-kept", "data/ffcv")
    assert not Path("/datasets/mydata").exists()
    Path("params.yaml").write_text(yaml.safe_dump(merge_params(base, {"data": {
        "source": "imagefolder", "imagefolder_root": "/datasets/mydata"}})))
    result = CliRunner().invoke(convert.cli, ["dataset", "--out", "data/converted"])
    printed.append((result.exit_code, result.stderr))
    shutil.move("data/subsets/mydata/val.txt", "val.txt")
    printed.append(linear_stage())
    shutil.move("val.txt", "data/subsets/mydata/val.txt")
    printed.append(linear_stage(model={"width": 2 * TINY_PARAMS["model"]["width"]}))

    # A diverged figure, logged as every stage logs (open_live inside run_stage).
    env = dist.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, run_stage("linear"):
        live = open_live(Path("dvclive/linear"), env)
        live.log_metric("linear/barlow/top1", float("nan"))
    printed.append((exit_info.value.code, capsys.readouterr().err))
    statuses = [2, 2, 2, 2, 2, 2, 3]
    for page_line, (status, line), expected in zip(shown, printed, statuses):
        assert status == expected and line.count("\n") <= 1, (page_line, status, line)
        assert _matches(page_line, line), f"page: {page_line}\nprinted: {line}"
    assert not Path("dvclive/linear/metrics.json").exists()


@pytest.mark.slow
def test_imagenet_cost_table_is_what_the_script_prints():
    """docs/imagenet.md's Cost section: its command, run from the repository root,
    prints exactly the table the section shows."""
    text = (REPO / "docs/imagenet.md").read_text()
    section = text[text.index("\n## Cost\n"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    command = re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
    assert len(command) == 1
    shown = "".join(line + "\n" for line in section.splitlines() if line.startswith("|"))
    assert run_lines(command[0], REPO) == [shown]
