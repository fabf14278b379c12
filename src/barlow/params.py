"""Reading params.yaml into typed values: the YAML loader DVC agrees with, the type
coercion and checks that turn a mapping into a frozen dataclass (``from_mapping``), and
the helpers over plain-dict configs (merge, fingerprint, diff). Generic: nothing here
knows a section; barlow.config holds the sections and re-exports these names.

Why hand-written rather than pydantic v2 or OmegaConf structured configs:
the coercion is ~100 lines and strict where both libraries are lax or silent: no
defaults, bool never an int, no string-to-number casts, non-finite numbers refused,
Literal and typed tuples (OmegaConf has neither), one-line errors naming the dotted key
that `dvc exp run -S` addresses (pydantic's would need translating). Either would add a
dependency to every stage for little less code; the sections' cross-field checks stay.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from barlow.errors import BadInput

T = TypeVar("T")


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading floats as YAML 1.2 does (and DVC, which writes
    params.yaml on `dvc exp run -S`): ``1e-06`` is a float, not the string YAML 1.1
    makes of it. DVC itself writes ``-S wd=1.0e-6`` back as ``1e-06``."""


# YAML 1.1 floats need a dot; YAML 1.2 also reads 1e-06. Checked before PyYAML's own
# resolvers, which match everything else as before (ints stay ints).
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")
ParamsLoader.yaml_implicit_resolvers = {
    first: ([("tag:yaml.org,2002:float", _EXPONENT_FLOAT)] if first in "-+0123456789" else [])
    + list(resolvers)
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


class ConfigError(BadInput):
    """A params.yaml value is missing, unknown, of the wrong type or out of range."""


def require(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"params: {key}: {message}")


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Return ``value`` converted to ``hint`` where lossless, else raise naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"params: {key}: {value!r} is none of {hint}")
    if hint is type(None):
        require(value is None, key, f"expected null, got {value!r}")
        return None
    if origin is tuple:
        args = typing.get_args(hint)
        require(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        require(len(value) == len(args), key, f"expected {len(args)} values, got {value!r}")
        return tuple(_check_type(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        # A mapping of user-chosen names (data.transfer_folders): each entry's key is
        # named as section.key.name, which `dvc exp run -S` also addresses.
        key_hint, value_hint = typing.get_args(hint)
        require(isinstance(value, Mapping), key, f"expected a mapping, got {value!r}")
        return {_check_type(k, key_hint, key): _check_type(v, value_hint, f"{key}.{k}")
                for k, v in value.items()}
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        require(value in choices, key, f"{value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, key)
    if hint is float:
        # A quoted number is a string; say so rather than a bare type error.
        if isinstance(value, str):
            raise ConfigError(
                f"params: {key}: expected a number, got the string {value!r}"
                " (write numbers unquoted, e.g. 1.0e-3)")
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                f"expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            number = math.inf
        # A non-finite value passes every range check written as a comparison (nan
        # compares false, inf is "positive") and fails only mid-run: refused here, once.
        require(math.isfinite(number), key, f"{value!r} is not finite")
        return number
    if hint is int:
        require(isinstance(value, int) and not isinstance(value, bool), key,
                f"expected an integer, got {value!r}")
        return value
    if hint is bool:
        require(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if hint is str:
        require(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this repo


def from_mapping(cls: type[T], mapping: Any, section: str) -> T:
    """Build dataclass ``cls`` from ``mapping``; unknown keys, wrong types and failed
    checks raise ConfigError naming ``section.key``, and so does a missing key: there
    are no defaults (params.yaml holds every key)."""
    require(isinstance(mapping, Mapping), section,
            f"expected a mapping of keys, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    require(not unknown, f"{section}.{unknown[0]}" if unknown else section,
            f"unknown key (known keys: {', '.join(sorted(fields))})")
    values = {}
    for name in fields:
        key = f"{section}.{name}"
        require(name in mapping, key, "missing (params.yaml must hold every key)")
        values[name] = _check_type(mapping[name], hints[name], key)
    config = cls(**values)
    check = getattr(config, "check", None)
    if check is not None:
        check(section)
    return config


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read params.yaml, with an error naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        params = yaml.load(path.read_text(), Loader=ParamsLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    require(isinstance(params, dict), str(path), "top level must be a mapping of sections")
    return params


def merge_params(base: Mapping[str, Any], *overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with every leaf of each override set, as ``dvc exp run -S key=value`` for
    each leaf would: mappings merged key by key, anything else (lists too) replaced.
    Neither argument is modified."""
    out = copy.deepcopy(dict(base))
    for override in overrides:
        for key, value in override.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge_params(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def as_dict(config: Any) -> dict[str, Any]:
    """Plain-dict form of a (nested) config dataclass, tuples as lists (JSON/YAML-safe)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def fingerprint(config: Mapping[str, Any]) -> str:
    """A stable short hash of a plain-dict config: equal configs give equal fingerprints."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested plain-dict configs."""
    keys = []
    for k in sorted(set(a) | set(b)):
        name = f"{prefix}{k}"
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            keys += diff_keys(va, vb, name + ".")
        elif va != vb:
            keys.append(f"{name}: {va!r} != {vb!r}")
    return keys
