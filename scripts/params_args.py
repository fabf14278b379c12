"""Print a profile file (same sections as params.yaml) as `-S key=value` arguments, so
one switch applies a whole profile to a DVC experiment:

    dvc exp run -n long $(python scripts/params_args.py configs/long.yaml)

Every key must exist in params.yaml: a typo in a profile fails here, not mid-run.
DVC's `-S` sets one key at a time and has no switch that applies a file of overrides
(its Hydra composition would move params.yaml itself into conf/), hence this script;
sweeps, queues and comparisons are DVC's own (docs/experiments.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The library from this checkout, as the stages' PYTHONPATH=src gives it them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from barlow.params import ConfigError, read_params  # noqa: E402


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def main(profile: str, params: str = "params.yaml") -> None:
    # Read as the stages read params.yaml (barlow.params.ParamsLoader), so each value
    # is spelled with the type the stages give it.
    try:
        wanted = flatten(read_params(profile))
        known = flatten(read_params(params))
    except ConfigError as err:
        sys.exit(str(err))
    unknown = sorted(k for k in wanted if k not in known)
    if unknown:
        sys.exit(f"{profile}: keys not in {params}: {', '.join(unknown)}")
    # The output is used unquoted, as $(...), so each argument must survive the shell's
    # word splitting: compact JSON (valid YAML, which is how `dvc exp run -S` parses
    # values) has no spaces, and a string value with whitespace is refused.
    args = []
    for key, value in wanted.items():
        text = json.dumps(value, separators=(",", ":"))
        if any(c.isspace() for c in text):
            sys.exit(f"{profile}: {key}: {value!r} contains whitespace; "
                     "pass it with its own -S 'key=value'")
        args.append(f"--set-param={key}={text}")
    print(" ".join(args))


if __name__ == "__main__":
    main(*sys.argv[1:])
