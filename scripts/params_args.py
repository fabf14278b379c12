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

import yaml


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def spell(value: object) -> str:
    """Compact JSON, except that floats in exponent form get a dot in the mantissa
    (1e-06 -> 1.0e-06): YAML 1.1, which params.yaml is read with, takes 1e-06 for a
    string."""
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, list):
        return "[" + ",".join(spell(v) for v in value) + "]"
    return json.dumps(value, separators=(",", ":"))


def main(profile: str, params: str = "params.yaml") -> None:
    wanted = flatten(yaml.safe_load(Path(profile).read_text()) or {})
    known = flatten(yaml.safe_load(Path(params).read_text()))
    unknown = sorted(k for k in wanted if k not in known)
    if unknown:
        sys.exit(f"{profile}: keys not in {params}: {', '.join(unknown)}")
    # The output is used unquoted, as $(...), so each argument must survive the shell's
    # word splitting: compact JSON (valid YAML, which is how `dvc exp run -S` parses
    # values) has no spaces, and a string value with whitespace is refused.
    args = []
    for key, value in wanted.items():
        text = spell(value)
        if any(c.isspace() for c in text):
            sys.exit(f"{profile}: {key}: {value!r} contains whitespace; "
                     "pass it with its own -S 'key=value'")
        args.append(f"--set-param={key}={text}")
    print(" ".join(args))


if __name__ == "__main__":
    main(*sys.argv[1:])
