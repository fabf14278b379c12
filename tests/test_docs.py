"""README.md and docs/*.md cannot drift from the code: their links and anchors resolve,
their shell commands run (or a named test runs them), and the README's results table is
the committed metrics.

The convention for fenced blocks in README.md and docs/*.md:

- ```bash: commands a user runs as written, here or on the embedded default. Every
  command in one is either run by this module (cheap ones: `make -n <target>`,
  `python scripts/params_args.py <profile>`, `python -m stages.<stage> --help`, the flags
  of `dvc exp show`, `python scripts/dvc_deps.py --check`), or named in RUN_BY_TESTS with the test that runs it; that test must
  exist and its source must hold the command as the test spells it.
- ```console: illustrative, not run: commands that need what the machine may lack
  (ImageNet, GPUs, a cluster, a finished queue) and printed output. Their `-S key=value`
  keys must still be keys of params.yaml, and the repository files they name must exist.
- Any other info string (yaml, ini, text, bibtex, python) is not shell. A fence with no
  info string must hold no shell command: say which of the two it is.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import yaml

from barlow.config import read_params
from barlow.report.inputs import flatten, load_metrics
from barlow.report.profiles import load_profiles
from barlow.report.seeds import Stat, is_seed_replica

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PY = sys.executable

#: Commands of ```bash blocks that a test runs, as the page spells them →
#: (the test, the text by which that test's source runs it).
JOURNEY = "tests/test_docs.py::test_the_readme_journey_runs_on_tiny_data"
PAPER = "tests/test_imagenet_paper.py::test_paper_switch_runs_every_stage_through_dvc"
OWN_DATA = "tests/test_doc_pages.py::test_own_data_page_runs_on_a_folder_with_unequal_classes"
OWN_BLOCK = 'fenced("own-data.md", "bash")'
PAPER_SWITCH = '"scripts/params_args.py", "configs/paper.yaml"'
RUN_BY_TESTS = {
    "dvc repro": (JOURNEY, '"dvc repro"'),
    "dvc exp run -S loss.lambd=0.0051": (JOURNEY, '"dvc exp run -S loss.lambd=0.0051"'),
    "dvc metrics diff": (JOURNEY, '"dvc metrics diff"'),
    "dvc push": ("tests/test_workflow.py::test_push_fresh_clone_pull_and_nothing_to_reproduce",
                 'dvc("push"'),
    # The paper switch: the ImageNet-shaped tree stands in for /datasets/imagenet.
    "dvc exp run -n paper $(python scripts/params_args.py configs/paper.yaml)"
    " -S data.imagefolder_root=/datasets/imagenet": (PAPER, PAPER_SWITCH),
    "python -m pytest -m paper_e2e tests/test_imagenet_paper.py": (PAPER, "paper_e2e"),
    # The pages' own examples, each block run whole by its page's test.
    "PYTHONPATH=src python benchmarks/imagenet_cost.py": (
        "tests/test_doc_pages.py::test_imagenet_cost_table_is_what_the_script_prints",
        "run_lines(command[0], REPO)"),
    "PYTHONPATH=src python -m stages.convert dataset --out data/ffcv": (OWN_DATA, OWN_BLOCK),
    "PYTHONPATH=src python -m barlow.data.subsets --dataset imagefolder --data data/ffcv"
    " --out data/subsets/mydata --make-subsets": (OWN_DATA, OWN_BLOCK),
}

SHELL_WORDS = ("dvc ", "python ", "make ", "bash ", "git ", "PYTHONPATH=", "pytest ",
               "torchrun ", "srun ", "sbatch ")


# ------------------------------------------------------------------------------- parsing
def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def fences(page: Path) -> list[tuple[str, str, int]]:
    """(info string, body, line number) of every fenced block, indented ones included."""
    blocks, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)(.*)$", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.groups()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        blocks.append((info.strip().split(" ")[0], "\n".join(body), i + 1))
        i = j + 1
    return blocks


def prose(page: Path) -> str:
    """The page without its fenced blocks (headings and links live outside them)."""
    out, inside = [], None
    for line in page.read_text().splitlines():
        m = re.match(r"^\s*(```+|~~~+)", line)
        if m and inside is None:
            inside = m.group(1)
        elif m and inside and line.strip().startswith(inside):
            inside = None
        elif inside is None:
            out.append(line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text without markup, lower case, every
    character but letters, digits, `_`, `-` and spaces dropped, spaces as `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # links → their text
    text = re.sub(r"<[^>]+>", "", text).lower()
    return "".join("-" if c == " " else c for c in text
                   if c in " -_" or unicodedata.category(c)[0] in "LN")


@lru_cache(maxsize=None)
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    text = prose(page)
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    found |= set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    return frozenset(found)


def links(page: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", prose(page))             # code spans are not links
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


def commands(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped; in a
    block that shows a prompt (`$ `), only the prompted lines (the rest is output)."""
    lines = re.sub(r"\\\n\s*", " ", body).splitlines()
    if any(line.startswith("$ ") for line in lines):
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    stripped = (" ".join(re.sub(r"(^|\s+)#.*$", "", line).split()) for line in lines)
    return [line for line in stripped if line]


def shell_blocks(kind: str) -> list[tuple[str, str]]:
    """(where, command) for every command of every ``kind`` block."""
    return [(f"{rel(page)}:{line}", cmd) for page in PAGES
            for info, body, line in fences(page) if info == kind
            for cmd in commands(body)]


# --------------------------------------------------------------------------------- links
@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):     # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {rel(dest)}")
    assert not broken, f"{rel(page)}: " + "; ".join(broken)


def test_slugs_follow_githubs_rules():
    assert slug("The reference code's λ") == "the-reference-codes-λ"
    assert slug("Loss terms at 10 epochs, 2 seeds (2026-11-30)") == \
        "loss-terms-at-10-epochs-2-seeds-2026-11-30"
    assert slug("Conversion (the `convert` stage)") == "conversion-the-convert-stage"
    assert slug("Results that travel: the DVC remote") == "results-that-travel-the-dvc-remote"


# ------------------------------------------------------------------------------ commands
def test_untagged_fences_hold_no_shell_command():
    untagged = [f"{rel(page)}:{line}" for page in PAGES
                for info, body, line in fences(page) if not info
                for cmd in commands(body) if cmd.startswith(SHELL_WORDS)]
    assert not untagged, f"tag these blocks ```bash (run) or ```console (illustrative): {untagged}"


@lru_cache(maxsize=None)
def params_keys() -> frozenset[str]:
    return frozenset(flatten(read_params(REPO / "params.yaml"), "."))


def set_params(cmd: str) -> list[str]:
    """The keys of a command's `-S key=value` / `--set-param key=value` arguments; `+key`
    (DVC's way to add a key to a mapping) as `+key`."""
    return re.findall(r"(?:-S|--set-param)[ =]+['\"]?(\+?[A-Za-z_][\w.]*)=", cmd)


def known_key(key: str) -> bool:
    """A key (or section) of params.yaml, or `+section.mapping.new` where section.mapping
    is a mapping (DVC's way to add a key)."""
    node = read_params(REPO / "params.yaml")
    parts = key.lstrip("+").split(".")
    for part in parts[:-1] if key.startswith("+") else parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return isinstance(node, dict) or not key.startswith("+")


@pytest.mark.parametrize("kind", ["bash", "console"])
def test_set_params_name_keys_of_params_yaml(kind):
    wrong = [f"{where}: {key}" for where, cmd in shell_blocks(kind)
             for key in set_params(cmd) if not known_key(key)]
    assert not wrong, f"-S keys params.yaml does not have: {wrong}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_params_keys_named_in_prose_exist(page):
    """`section.key` in a code span, where section is one of params.yaml's: the key a
    reader would set must be there (a renamed or removed key leaves no stale name)."""
    sections = set(read_params(REPO / "params.yaml"))
    named = {m.group(1) for m in re.finditer(r"`\+?([a-z_]+(?:\.[a-z_0-9]+)+)(?=[`:= ])",
                                             prose(page))
             if m.group(1).split(".")[0] in sections
             and m.group(1).rsplit(".", 1)[-1] not in ("py", "md", "yaml", "json", "pt")}
    wrong = sorted(k for k in named if not known_key(k))
    assert not wrong, f"{rel(page)}: keys params.yaml does not have: {wrong}"


@pytest.mark.parametrize("kind", ["bash", "console"])
def test_files_that_commands_name_exist(kind):
    """configs/…, scripts/…, benchmarks/…, tests/… named in a command (in an illustrative
    one, the repository's own: a profile named there may be the reader's to write)."""
    missing = [f"{where}: {path}" for where, cmd in shell_blocks(kind)
               for path in re.findall(r"(?<![\w/.])((?:configs|scripts|benchmarks|tests)"
                                      r"/[\w./-]+\.(?:yaml|py|sh))", cmd)
               if not (REPO / path).is_file()
               and (kind == "bash" or not path.startswith("configs/"))]
    assert not missing, missing


def cheap_check(cmd: str) -> str | None:
    """How this module runs ``cmd``, or None when it does not."""
    if re.fullmatch(r"make [\w-]+", cmd):
        return "make -n"
    if re.fullmatch(r"python scripts/params_args\.py \S+", cmd):
        return "params_args"
    if re.fullmatch(r"(PYTHONPATH=src )?python -m stages\.\w+( \w+)? --help", cmd):
        return "help"
    if cmd.startswith("dvc exp show"):
        return "exp show"
    if cmd == "python scripts/dvc_deps.py":
        return "dvc_deps"
    return None


def test_every_bash_command_is_run_by_a_test():
    """A ```bash command is run here or by the test RUN_BY_TESTS names, which exists
    and runs it (its source holds the command's text as the test spells it)."""
    unrun = []
    for where, cmd in shell_blocks("bash"):
        if cheap_check(cmd):
            continue
        if cmd not in RUN_BY_TESTS:
            unrun.append(f"{where}: {cmd}")
    assert not unrun, ("commands no test runs (run them in a test and add them to "
                       f"RUN_BY_TESTS, or make their block ```console): {unrun}")


@pytest.mark.parametrize("cmd", sorted(RUN_BY_TESTS))
def test_the_tests_that_run_documented_commands_exist_and_run_them(cmd):
    test_id, spelling = RUN_BY_TESTS[cmd]
    path, _, name = test_id.partition("::")
    tree = ast.parse((REPO / path).read_text())
    found = [node for node in ast.walk(tree)
             if isinstance(node, ast.FunctionDef) and node.name == name]
    assert found, f"{test_id}: no such test"
    lines = (REPO / path).read_text().splitlines()
    first = min([found[0].lineno] + [d.lineno for d in found[0].decorator_list])
    source = "\n".join(lines[first - 1:found[0].end_lineno])    # decorators included
    assert spelling in source, \
        f"{test_id} does not run {cmd!r} (no {spelling!r} in it)"


def cheap_commands(check: str) -> list[str]:
    return sorted({cmd for _, cmd in shell_blocks("bash") if cheap_check(cmd) == check})


@pytest.mark.slow
@pytest.mark.parametrize("cmd", cheap_commands("make -n"))
def test_make_targets_exist(cmd):
    target = cmd.split()[1]
    result = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"`{cmd}`: {result.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize("cmd", cheap_commands("params_args"))
def test_profile_commands_run(cmd):
    result = subprocess.run([PY, *cmd.split()[1:]], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--set-param=" in result.stdout, \
        f"`{cmd}`: {result.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize("cmd", cheap_commands("help"))
def test_stage_help_commands_run(cmd):
    words = cmd.split()
    if words[0].startswith("PYTHONPATH="):
        words = words[1:]
    result = subprocess.run([PY, *words[1:]], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": "src"})
    assert result.returncode == 0 and "Usage" in result.stdout, f"`{cmd}`: {result.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize("cmd", cheap_commands("dvc_deps"))
def test_dvc_deps_command_runs(cmd):
    """Run with --check, which writes nothing: exit 0 says the command has nothing to
    rewrite in the committed dvc.yaml."""
    result = subprocess.run([PY, *cmd.split()[1:], "--check"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": "src"})
    assert result.returncode == 0, f"`{cmd} --check`: {result.stdout}{result.stderr}"


def dvc(*args: str) -> str:
    result = subprocess.run([PY, "-m", "dvc", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stderr}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("cmd", cheap_commands("exp show"))
def test_dvc_exp_show_commands_use_real_flags_and_columns(cmd):
    """DVC accepts any --sort-by while there is no experiment to sort, so the value is
    checked against the columns `dvc exp show` prints, and every flag against --help."""
    words = shlex.split(cmd)[3:]
    flags = set(re.findall(r"--[\w-]+", dvc("exp", "show", "--help")))
    assert {w for w in words if w.startswith("--")} <= flags, cmd
    if "--sort-by" in words:
        column = words[words.index("--sort-by") + 1]
        header = dvc("exp", "show", "--csv", "--no-pager").splitlines()[0].split(",")
        names = {h.rsplit(":", 1)[-1] for h in header}
        assert column in names, f"`{cmd}`: no column {column!r} (DVC's names: a.b.c)"


# ---------------------------------------------------------------------- results table
def table(page: Path, heading: str) -> list[list[str]]:
    """The first table under ``heading``: rows of stripped cells, header first."""
    text = page.read_text().split(heading, 1)[1]
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            rows.append([c.strip().replace("**", "") for c in line.strip("|").split("|")])
        elif rows:
            break
    return [rows[0]] + rows[2:]


#: README's results rows → the Barlow Twins metric and the paper's result id.
RESULT_ROWS = {
    "linear, top-1": ("linear/barlow/top1_best", "linear_top1"),
    "linear, top-5": ("linear/barlow/top5_best", "linear_top5"),
    "semi-supervised 1 %, top-1": ("semisup/1percent/barlow/top1_best", "semisup_1_top1"),
    "semi-supervised 10 %, top-1": ("semisup/10percent/barlow/top1_best", "semisup_10_top1"),
    "transfer digits, linear top-1": ("transfer/digits/linear/barlow/top1_best",
                                      "transfer_places"),
    "transfer digits, SVM mAP": ("transfer/digits/svm/barlow/map", "transfer_voc07"),
    "transfer ELPV, linear top-1": ("transfer/elpv/linear/barlow/top1_best", None),
    "transfer ELPV, SVM mAP": ("transfer/elpv/svm/barlow/map", None),
    "kNN monitor (k = 200), top-1": ("pretrain/knn_top1", None),
}
PAPER_PREFIX = {"transfer_places": "Places-205 ", "transfer_voc07": "VOC07 "}


def seed_runs() -> list[dict[str, float]]:
    """This run's metrics and its seed replicas', read as the report reads them."""
    metrics, _ = load_metrics(REPO / "dvclive")
    params = read_params(REPO / "params.yaml")
    replicas = [p for p in load_profiles(REPO / "reports/profiles")
                if is_seed_replica(params, p)]
    return [metrics] + [r["metrics"] for r in replicas]


def mean_std(runs: list[dict[str, float]], key: str) -> str:
    s = Stat.of([r[key] for r in runs if r.get(key) is not None])
    return f"{s.mean:.1f} ± {s.std:.1f}"


def paper_figures() -> tuple[dict[str, float], dict[str, str]]:
    paper = yaml.safe_load((REPO / "data/paper_results.yaml").read_text())
    return ({r["id"]: r["paper"] for r in paper["results"]},
            {c["id"]: c.get("paper_basis", "") for c in paper["claims"]})


def test_readme_results_table_is_the_committed_metrics():
    runs = seed_runs()
    assert len(runs) >= 3, "the seed snapshots (reports/profiles) are no longer this run's"
    readme = (REPO / "README.md").read_text()
    assert f"mean ± sample std over {len(runs)} seeds" in readme
    results, claims = paper_figures()
    rows = table(REPO / "README.md", "## Results on the embedded default")
    assert rows[0] == ["evaluation", "Barlow Twins", "raw pixels", "random init",
                       "paper (ImageNet)"]
    assert [r[0] for r in rows[1:]] == list(RESULT_ROWS)
    for label, ours, raw, random, paper in rows[1:]:
        key, paper_id = RESULT_ROWS[label]
        expect = [mean_std(runs, key)]
        for name in ("raw_pixels", "random_init"):
            base = key.replace("/barlow/", f"/{name}/")
            if key.startswith("semisup/") and name == "random_init":
                base = key.replace("/barlow/", "/scratch/")
            expect.append(mean_std(runs, base) if "/barlow/" in key and
                          any(base in r for r in runs) else "")
        if paper_id is None:
            expect.append("")
        else:
            expect.append(f"{PAPER_PREFIX.get(paper_id, '')}{results[paper_id]}")
            if paper_id.startswith("semisup"):
                basis = claims[f"semisup_{paper_id.split('_')[1]}_beats_scratch"]
                supervised = re.search(r"supervised ([\d.]+)", basis)[1]
                expect[-1] += f" (supervised {supervised})"
        assert [ours, raw, random, paper] == expect, label


def test_readme_metrics_diff_excerpt_is_what_dvc_prints():
    """The excerpt of `dvc metrics diff <rev>`: <rev> is a seed snapshot's commit, each
    row its value, the committed value and their difference (as DVC rounds them)."""
    readme = (REPO / "README.md").read_text()
    block = next(body for info, body, _ in fences(REPO / "README.md")
                 if info == "console" and "dvc metrics diff" in body)
    lines = block.splitlines()
    rev = shlex.split(lines[0])[4]
    snapshot = next(p for p in load_profiles(REPO / "reports/profiles")
                    if str(p["rev"]).startswith(rev))
    metrics, _ = load_metrics(REPO / "dvclive")
    assert lines[1].split() == ["Path", "Metric", rev, "workspace", "Change"]
    for line in lines[2:]:
        path, name, old, new, change = line.split()
        key = name.replace(".", "/")
        assert path == f"dvclive/{key.split('/')[0]}/metrics.json", line
        assert float(old) == pytest.approx(snapshot["metrics"][key], abs=1e-9), line
        assert float(new) == pytest.approx(metrics[key], abs=1e-9), line
        assert float(change) == pytest.approx(metrics[key] - snapshot["metrics"][key],
                                              abs=1e-6), line
    assert "dvc metrics diff" in readme


# ---------------------------------------------------------------------- the repository
def test_readme_is_a_runbook():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 122 and max(map(len, lines)) <= 100
    first = "\n".join(lines[:40])
    for cmd in ("make repro", "make test", "dvc repro", "dvc exp run -S loss.lambd=0.0051",
                "dvc metrics diff"):
        assert cmd in first, cmd


def test_licence_and_citation():
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert "Apache" in (REPO / "NOTICE").read_text()
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT"
    paper = cff["preferred-citation"]
    assert paper["title"] == "Barlow Twins: Self-Supervised Learning via Redundancy Reduction"
    assert [a["family-names"] for a in paper["authors"]] == \
        ["Zbontar", "Jing", "Misra", "LeCun", "Deny"]
    assert (paper["volume"], paper["start"], paper["end"], paper["year"]) == \
        (139, 12310, 12320, 2021)
    assert "2103.03230" in paper["identifiers"][0]["value"]
    assert "@inproceedings{zbontar2021barlow" in (REPO / "README.md").read_text()


HISTORY = [r"\bwave\b", r"\bthe old\b", r"not done yet", r"\bwas:", r"\bnot met\b",
           r"\bmissed\b", r"\bis met\b", r"a busier host", r"(?<![\w/-])20\d\d-\d\d-\d\d(?![\w.-])",
           r"\b(?:commit|main after) [0-9a-f]{7,40}\b"]


@pytest.mark.parametrize("page", [p for p in PAGES], ids=rel)
def test_pages_describe_the_present(page):
    found = [f"{pattern}: …{m.string[max(0, m.start() - 30):m.end() + 30]}…"
             for pattern in HISTORY
             for m in re.finditer(pattern, page.read_text(), re.I)]
    assert not found, f"{rel(page)}: history belongs in git log: {found}"


# ------------------------------------------------------------- the card's three commands
def journey_commands() -> list[str]:
    """The README's `dvc repro` / `dvc exp run` / `dvc metrics diff` block, as written."""
    body = next(body for info, body, _ in fences(REPO / "README.md")
                if info == "bash" and "dvc metrics diff" in body)
    return commands(body)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_readme_journey_runs_on_tiny_data(tmp_path):
    """The README's three commands, as written, in a git copy of the repository whose
    pipeline is cut to convert → pretrain, on a 32-image ImageFolder tree with tiny
    params: `dvc repro` runs both stages, the experiment reruns pretraining only, and
    `dvc metrics diff` prints its figures against the committed run."""
    from PIL import Image

    from conftest import NO_JIT, TINY_PARAMS
    from test_imagenet_paper import fresh_copy, run

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "NUMBA_THREADING_LAYER": "workqueue", **NO_JIT}
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 8)):
        for c in range(2):
            (tmp_path / "images" / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
                pixels[8 * c:8 * c + 8] += 150
                Image.fromarray(pixels).save(tmp_path / "images" / split / f"c{c}" / f"{i}.png")
    repo = tmp_path / "repo"
    fresh_copy(repo, env)
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(
        {"stages": {name: stages[name] for name in ("convert", "pretrain")}}))
    # The repository's λ (TINY_PARAMS uses the experiment's 0.0051).
    params = {**TINY_PARAMS, "loss": read_params(REPO / "params.yaml")["loss"],
              "data": {**TINY_PARAMS["data"], "source": "imagefolder",
                       "imagefolder_root": str(tmp_path / "images")},
              "pretrain": {**TINY_PARAMS["pretrain"], "epochs": 1, "batch_size": 8,
                           "knn_bank_size": 16, "checkpoint_every_steps": 100}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    repro, experiment, diff = journey_commands()
    assert (repro, experiment, diff) == \
        ("dvc repro", "dvc exp run -S loss.lambd=0.0051", "dvc metrics diff")
    bash = ["bash", "-euc"]
    journey = run([*bash, repro], repo, env)
    assert "Running stage 'pretrain'" in journey, journey[-2000:]
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "run"],
        repo, env)
    rerun = run([*bash, experiment], repo, env)
    assert "Stage 'convert' didn't change, skipping" in rerun, rerun[-2000:]
    assert "Running stage 'pretrain'" in rerun, rerun[-2000:]
    printed = run([*bash, diff], repo, env).splitlines()
    assert printed[0].split() == ["Path", "Metric", "HEAD", "workspace", "Change"], printed
    assert any(line.split()[:2] == ["dvclive/pretrain/metrics.json", "pretrain.loss"]
               for line in printed[1:]), printed
