"""dvc.yaml's code deps are the stages' import closures, no more and no less.

DVC reruns a stage when one of its deps changes. A library file a stage imports but
does not list would let a change to it go unnoticed (the committed metrics would no
longer be what the code computes); a listed file it never imports reruns it for
nothing. The closure is computed from the source (every import statement, those inside
functions included), starting at the stage's module and following ``barlow.*``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SRC = REPO / "src"


def module_file(name: str) -> Path | None:
    """The file of module ``name`` (dotted) under src/ or the repository, if it is ours."""
    for root in (SRC, REPO):
        base = root.joinpath(*name.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def imports_of(path: Path) -> set[str]:
    """Dotted names of every project module ``path`` imports (barlow.*, stages.*)."""
    names = set()
    tree = ast.parse(path.read_text())
    # Imports for type checkers only never run.
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                   for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from barlow import distributed`: the names may be modules themselves.
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    ours = set()
    for name in names:
        if name.split(".")[0] in ("barlow", "stages") and module_file(name):
            parts = name.split(".")
            # A package's __init__ runs on import of any of its modules.
            ours |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)
                     if module_file(".".join(parts[:i]))}
    return ours


def closure(module: str) -> set[Path]:
    """Files of ``module`` and of everything it imports, transitively; empty package
    __init__ files left out (they hold no code a change could alter)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += imports_of(module_file(name))
    files = {module_file(name) for name in seen}
    return {f.relative_to(REPO) for f in files if f.read_text().strip()}


def stages() -> dict[str, tuple[str, set[Path]]]:
    """Stage name → (its entry module, the .py files dvc.yaml lists as its deps)."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in spec.items():
        match = re.search(r"python -m (stages\.\w+)", stage["cmd"])
        assert match, f"dvc.yaml: stage {name}: no `python -m stages.<module>` in its cmd"
        listed = {Path(d) for d in stage.get("deps", []) if str(d).endswith(".py")}
        out[name] = (match.group(1), listed)
    return out


@pytest.mark.parametrize("stage", sorted(stages()))
def test_code_deps_are_the_import_closure(stage):
    module, listed = stages()[stage]
    needed = closure(module)
    missing = sorted(map(str, needed - listed))
    extra = sorted(map(str, listed - needed))
    assert not missing and not extra, (
        f"dvc.yaml stage {stage}: deps miss {missing} (imported by {module}), "
        f"list {extra} (not imported)")


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
