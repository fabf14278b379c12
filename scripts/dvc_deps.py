"""Write (or check) the code deps of every stage in dvc.yaml: its import closure.

DVC reruns a stage when one of its deps changes. A library file a stage imports but
does not list would let a change to it go unnoticed (the committed metrics would no
longer be what the code computes); a listed file it never imports reruns it for
nothing. The closure is computed from the source (every import statement, those inside
functions included), starting at the module the stage's command runs
(`python -m stages.<name>`) and following ``barlow.*`` and ``stages.*``.

    python scripts/dvc_deps.py            # rewrite the code deps in place
    python scripts/dvc_deps.py --check    # exit 1 naming the stages whose deps are stale

Only the `.py` entries at the head of each stage's `deps:` list are rewritten (the
stage's module, then the library files in path order); comments, data deps, params and
outs are left byte for byte, so the file is edited as text, not re-serialised.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import click
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
# A code entry of a deps list: a Python file of the stages or the library.
CODE_DEP = re.compile(r"^(\s+)- ((?:stages|src)/\S+\.py)\s*$")


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
    """Files (relative to the repository) of ``module`` and of everything it imports,
    transitively; empty package __init__ files left out (they hold no code a change
    could alter)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += imports_of(module_file(name))
    files = {module_file(name) for name in seen}
    return {f.relative_to(REPO) for f in files if f.read_text().strip()}


def stage_modules(dvc_yaml: Path) -> dict[str, str]:
    """Stage name → the module its command runs."""
    out = {}
    for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        match = re.search(r"python -m (stages\.\w+)", stage["cmd"])
        if not match:
            raise click.ClickException(
                f"{dvc_yaml.name}: stage {name}: no `python -m stages.<module>` in its cmd")
        out[name] = match.group(1)
    return out


def code_deps(module: str) -> list[str]:
    """The deps list's code entries for a stage running ``module``: its own file first,
    then the rest of the closure in path order."""
    own = module_file(module).relative_to(REPO)
    return [str(own)] + sorted(str(f) for f in closure(module) - {own})


def rewrite(text: str, wanted: dict[str, list[str]]) -> tuple[str, list[str]]:
    """``text`` (dvc.yaml) with each stage's code entries replaced by ``wanted[stage]``,
    and the names of the stages whose entries changed."""
    lines = text.splitlines(keepends=True)
    out, stale, stage, todo = [], [], None, dict(wanted)
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if m := re.match(r"^  (\w[\w-]*):\s*$", line):
            stage = m.group(1)
        elif stage in todo and re.match(r"^    deps:\s*$", line):
            listed, indent = [], "      "
            while i < len(lines) and (m := CODE_DEP.match(lines[i])):
                indent, entry = m.groups()
                listed.append(entry)
                i += 1
            if listed != todo[stage]:
                stale.append(stage)
            out += [f"{indent}- {entry}\n" for entry in todo.pop(stage)]
    if todo:
        raise click.ClickException(f"dvc.yaml: stages {sorted(todo)} have no `deps:` list")
    return "".join(out), stale


@click.command()
@click.option("--check", is_flag=True,
              help="Change nothing; exit 1 naming the stages whose code deps are stale.")
@click.option("--dvc-yaml", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=REPO / "dvc.yaml", show_default="dvc.yaml of this repository")
def main(check: bool, dvc_yaml: Path) -> None:
    """Write each stage's import closure as the code entries of its deps in dvc.yaml."""
    text = dvc_yaml.read_text()
    wanted = {name: code_deps(module) for name, module in stage_modules(dvc_yaml).items()}
    new, stale = rewrite(text, wanted)
    if check:
        if stale:
            click.echo(f"dvc.yaml: the code deps of {', '.join(stale)} are not their import "
                       "closure; run: python scripts/dvc_deps.py", err=True)
            sys.exit(1)
        return
    if new != text:
        dvc_yaml.write_text(new)
    click.echo(f"dvc.yaml: code deps rewritten for {', '.join(stale)}" if stale
               else "dvc.yaml: code deps already current")


if __name__ == "__main__":
    main()
