"""Every stage refuses a bad params value in one line, before any heavy work: a
property-based test (hypothesis) that changes one params.yaml key at a time and runs
each stage dvc.yaml names, in-process through click's CliRunner.

The cases come from the files themselves: each stage's command and the params keys it
reads are dvc.yaml's, and the keys and their current values are params.yaml's, so a
new section or key is fuzzed without a change here. A key's value is replaced by a
wrong type (a string, a list, a mapping, null, a bool for a number), a non-finite
number (.inf, -.inf, .nan, 1e400), a boundary value (0, an empty string or list) or an
out-of-range one (negative numbers, 1.5 for a probability, 1e300). The property: a
wrong type or a non-finite number ends the stage with status 2 and exactly one line
``<stage>: error: <the key>: ...`` on stderr; a boundary or out-of-range value either
does the same (naming the key, or the first missing input where the value is valid) or
is accepted (status 0); never a traceback, never another status.

Valid values pass the params checks, so every run starts where no input exists: an
empty working folder, the data-set roots in params.yaml pointed into it. Then a stage
that accepts a value stops at its first missing input, with one line as well (the
report, which reads what exists and marks the rest "not run", writes its report). Two
independent roots guard convert_transfer (data.voc07_root and a data.transfer_folders
tree, both listed before anything is written), so one changed key cannot reach its
embedded data sets. Integers are never raised (a large process count would start that
many processes); numbers go down, to zero and below.
"""

from __future__ import annotations

import importlib
import math
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, repo_params

# Inputs that exist on a machine that ran `make repro` (the Fashion-MNIST package),
# pointed where nothing is: the stages must stop at them, not convert.
ABSENT_INPUTS = {"data": {"fashion_mnist_dir": "absent/fashion-mnist",
                          "voc07_root": "absent/VOC2007",
                          "transfer_folders": {"absent": "absent/tree"}}}
# Command-line inputs that click itself checks exist: copied into the working folder.
CLICK_CHECKED = ("data/paper_results.yaml",)


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_argv(cmd: str) -> tuple[str, list[str]]:
    """("stages.x", [args]) of a dvc.yaml command ``PYTHONPATH=src python -m stages.x ...``."""
    words = shlex.split(cmd)
    at = words.index("-m")
    return words[at + 1], words[at + 2:]


def leaves(value: Any, key: str):
    """(dotted key, value) of every value under ``key`` in params.yaml; a list also by
    element, as ``key[i]``."""
    if isinstance(value, dict) and value and key.count(".") < 2 or key.count(".") == 0:
        for name, inner in value.items():
            yield from leaves(inner, f"{key}.{name}")
        return
    yield key, value
    if isinstance(value, list):
        for i, element in enumerate(value):
            yield f"{key}[{i}]", element


def cases() -> list[tuple[str, str, Any]]:
    """(stage, key, current value) for every params key each dvc.yaml stage reads."""
    params = repo_params(**ABSENT_INPUTS)
    out = []
    for name, stage in stages().items():
        for prefix in stage.get("params", []):
            section, _, rest = prefix.partition(".")
            value = params[section]
            for part in filter(None, rest.split(".")):
                value = value[part]
            out += [(name, key, v) for key, v in leaves(value, prefix)]
    return out


CASES = cases()


def mutations(value: Any) -> list[tuple[str, Any]]:
    """(kind, value) replacements of a current value: kinds "type", "non-finite",
    "boundary", "range"."""
    wrong = [("type", "a string"), ("type", [1, 2]), ("type", {"a": 1}), ("type", None)]
    if isinstance(value, bool):
        return [("type", 1), ("type", "yes"), ("type", None)]
    if isinstance(value, int):
        return [*wrong, ("type", True), ("type", 1.5), ("non-finite", math.inf),
                ("boundary", 0), ("range", -1), ("range", -2**31)]
    if isinstance(value, float):
        return [*wrong, ("type", True),
                *(("non-finite", v) for v in (math.inf, -math.inf, math.nan, 10**400)),
                ("boundary", 0.0), ("range", -1.0), ("range", -1e-300), ("range", 1.5),
                ("range", 1e300)]
    if isinstance(value, str):
        return [("type", 3), ("type", ["x"]), ("type", None), ("boundary", ""),
                ("range", "no-such-choice")]
    if isinstance(value, list):
        return [("type", "a string"), ("type", 3), ("type", {"a": 1}), ("type", None),
                ("boundary", [])]
    return [("type", "a string"), ("type", [1]), ("type", None)]


def set_key(params: dict, key: str, value: Any) -> dict:
    """``params`` with dotted ``key`` (or ``key[i]``) set to ``value``."""
    path, _, index = key.partition("[")
    *parents, last = path.split(".")
    node = params
    for part in parents:
        node = node[part]
    if index:
        node[last] = [*node[last]]
        node[last][int(index.rstrip("]"))] = value
    else:
        node[last] = value
    return params


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    for name in CLICK_CHECKED:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, folder / name)
    return folder


def test_every_stage_reads_keys():
    """The case list covers every stage of dvc.yaml and each of params.yaml's sections."""
    assert {stage for stage, _, _ in CASES} == set(stages())
    assert {key.split(".")[0] for _, key, _ in CASES} == set(repo_params())


@pytest.mark.parametrize("stage", list(stages()))
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_one_bad_key_is_one_line_and_exit_2(stage, data, workdir, monkeypatch):
    """40 of each stage's (key, change) pairs, the same ones on every run (derandomize):
    10 stages x 40."""
    key, value = data.draw(st.sampled_from([(k, v) for s, k, v in CASES if s == stage]),
                           label="key, value")
    kind, bad = data.draw(st.sampled_from(mutations(value)), label="kind, value")
    monkeypatch.chdir(workdir)
    params = set_key(repo_params(**ABSENT_INPUTS), key, bad)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    module, args = stage_argv(stages()[stage]["cmd"])
    command = importlib.import_module(module)
    entry = getattr(command, "main", None) or command.cli
    result = CliRunner().invoke(entry, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        result.exc_info
    if result.exit_code == 0 and kind in ("boundary", "range"):
        return
    assert result.exit_code == 2, result.output
    # A baselines' stage runs its evaluation's command, which names itself ("linear: ").
    name = stage.removesuffix("_baselines").removesuffix("_scratch")
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{name}: error: "), \
        result.stderr
    if kind in ("type", "non-finite"):
        assert key in result.stderr, result.stderr
