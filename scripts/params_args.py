"""Print a profile file (same sections as params.yaml) as `-S key=value` arguments, so
one switch applies a whole profile to a DVC experiment:

    dvc exp run -n long $(python scripts/params_args.py configs/long.yaml)

Every key must exist in params.yaml: a typo in a profile fails here, not mid-run.
"""

from __future__ import annotations

import json
import shlex
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


def main(profile: str, params: str = "params.yaml") -> None:
    wanted = flatten(yaml.safe_load(Path(profile).read_text()) or {})
    known = flatten(yaml.safe_load(Path(params).read_text()))
    unknown = sorted(k for k in wanted if k not in known)
    if unknown:
        sys.exit(f"{profile}: keys not in {params}: {', '.join(unknown)}")
    # JSON spelling of values is valid YAML, which is how `dvc exp run -S` parses them.
    print(" ".join(shlex.quote(f"--set-param={k}={json.dumps(v)}") for k, v in wanted.items()))


if __name__ == "__main__":
    main(*sys.argv[1:])
