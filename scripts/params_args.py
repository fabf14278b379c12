"""Apply a profile file (same sections as params.yaml) in one switch.

    dvc exp run -n long $(python scripts/params_args.py configs/long.yaml)

prints the profile as `-S key=value` arguments for a DVC experiment. A batch job, which
runs the stage commands itself rather than through `dvc exp run` (scripts/slurm/),
needs the same values as one params file instead:

    python scripts/params_args.py --write run.yaml configs/paper.yaml data.imagefolder_root=/x

writes params.yaml with each profile, then each `key=value`, applied, as `dvc exp run -S`
would write params.yaml (values read as YAML, `+key=value` adding a key).

Every key must exist in params.yaml: a typo in a profile fails here, not mid-run.
DVC's `-S` sets one key at a time and has no switch that applies a file of overrides
(its Hydra composition would move params.yaml itself into conf/), hence this script;
sweeps, queues and comparisons are DVC's own (docs/experiments.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

# The library from this checkout, as the stages' PYTHONPATH=src gives it them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from barlow.params import ConfigError, ParamsLoader, merge_params, read_params  # noqa: E402


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_known(wanted: dict, known: dict, where: str, params: str) -> None:
    unknown = sorted(k for k in flatten(wanted) if k not in flatten(known))
    if unknown:
        sys.exit(f"{where}: keys not in {params}: {', '.join(unknown)}")


def main(profile: str, params: str = "params.yaml") -> None:
    # Read as the stages read params.yaml (barlow.params.ParamsLoader), so each value
    # is spelled with the type the stages give it.
    try:
        wanted = read_params(profile)
        check_known(wanted, read_params(params), profile, params)
    except ConfigError as err:
        sys.exit(str(err))
    # The output is used unquoted, as $(...), so each argument must survive the shell's
    # word splitting: compact JSON (valid YAML, which is how `dvc exp run -S` parses
    # values) has no spaces, and a string value with whitespace is refused.
    args = []
    for key, value in flatten(wanted).items():
        text = json.dumps(value, separators=(",", ":"))
        if any(c.isspace() for c in text):
            sys.exit(f"{profile}: {key}: {value!r} contains whitespace; "
                     "pass it with its own -S 'key=value'")
        args.append(f"--set-param={key}={text}")
    print(" ".join(args))


def override(assignment: str) -> tuple[dict, bool]:
    """``key.sub=value`` (``+key.sub=value`` to add a key) as a nested mapping, the
    value read as YAML, as `dvc exp run -S` reads it; and whether the key is new."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.lstrip("+"):
        sys.exit(f"{assignment}: expected key=value")
    value = yaml.load(text, Loader=ParamsLoader)
    for part in reversed(key.lstrip("+").split(".")):
        value = {part: value}
    return value, key.startswith("+")


def write(out: str, *items: str, params: str = "params.yaml") -> None:
    """``params`` with each profile file and ``key=value`` of ``items`` applied, in order,
    written to ``out``."""
    try:
        merged = read_params(params)
        for item in items:
            if "=" in item:
                change, added = override(item)
                if not added:
                    check_known(change, merged, item, params)
            else:
                change = read_params(item)
                check_known(change, merged, item, params)
            merged = merge_params(merged, change)
    except ConfigError as err:
        sys.exit(str(err))
    Path(out).write_text(yaml.safe_dump(merged, sort_keys=False))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
