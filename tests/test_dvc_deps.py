"""dvc.yaml's code deps are the stages' import closures, as scripts/dvc_deps.py writes
them; the closure itself follows every import a stage can run."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO
from scripts.dvc_deps import closure, code_deps, main, rewrite, stage_modules


def test_code_deps_are_the_import_closure():
    result = CliRunner().invoke(main, ["--check"])
    assert result.exit_code == 0, result.output


def test_check_names_the_stale_stages_and_the_fix(tmp_path):
    text = (REPO / "dvc.yaml").read_text()
    stale = text.replace("      - src/barlow/loss.py\n", "", 1).replace(
        "      - stages/convert.py\n", "      - stages/convert.py\n      - src/barlow/loss.py\n", 1)
    (tmp_path / "dvc.yaml").write_text(stale)
    result = CliRunner().invoke(main, ["--check", "--dvc-yaml", str(tmp_path / "dvc.yaml")])
    assert result.exit_code == 1
    assert result.output.startswith("dvc.yaml: the code deps of convert, pretrain are not")
    assert result.output.rstrip().endswith("run: python scripts/dvc_deps.py")
    assert (tmp_path / "dvc.yaml").read_text() == stale   # --check writes nothing


def test_rewrite_restores_the_closure_and_leaves_everything_else():
    """Only the code entries change: comments, data deps, params and outs stay byte for
    byte, so rewriting the committed file from a damaged copy gives it back."""
    text = (REPO / "dvc.yaml").read_text()
    wanted = {name: code_deps(module) for name, module in stage_modules(REPO / "dvc.yaml").items()}
    damaged = text.replace("      - src/barlow/train.py\n", "", 1)
    assert damaged != text
    assert rewrite(damaged, wanted) == (text, ["pretrain"])
    assert rewrite(text, wanted) == (text, [])


def test_the_closure_follows_lazy_and_package_imports():
    """The mechanism itself: a function-level import and `from barlow import x` count."""
    files = closure("stages.pretrain")
    assert Path("src/barlow/distributed.py") in files      # `from barlow import distributed`
    assert Path("src/barlow/train.py") in files
    assert Path("stages/pretrain.py") in files
    # Empty package markers are left out; a package __init__ with code (augment) is not.
    assert Path("src/barlow/__init__.py") not in files
    assert Path("src/barlow/data/__init__.py") not in files
    assert Path("src/barlow/augment/__init__.py") in files


@pytest.mark.parametrize("stage", ["stages.linear", "stages.semisup", "stages.transfer"])
def test_evaluations_do_not_depend_on_the_training_loop(stage):
    """A change to pretraining's loop reruns pretraining, not every evaluation."""
    assert Path("src/barlow/train.py") not in closure(stage)


def test_conversion_depends_on_no_model_code():
    """Converting ImageNet takes hours: a change to the loss, the models or the
    augmentations must not redo it."""
    files = {f.name for f in closure("stages.convert")}
    assert not files & {"loss.py", "models.py", "augment.py", "train.py", "distributed.py"}
