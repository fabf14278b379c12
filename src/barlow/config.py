"""Typed, validated views of params.yaml.

Every params.yaml section loads into a frozen dataclass at a stage's edge, before any
work starts. `dvc exp run -S key=value` edits params.yaml and nothing else, so this is
the one place where a mistyped key, a wrong type or an impossible value can be caught:
each error names the full key (``pretrain.batch_size``) and what is wrong with it.

The dataclasses themselves live next to the code that uses them (``barlow.loss``,
``barlow.train``, ...); this module only knows how to fill and check them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
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
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        require(value in choices, key, f"{value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, key)
    if hint is float:
        # YAML reads "1e-3" as a string; say so rather than a bare type error.
        if isinstance(value, str):
            raise ConfigError(
                f"params: {key}: expected a number, got the string {value!r}"
                " (write floats with a dot, e.g. 1.0e-3)")
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                f"expected a number, got {value!r}")
        return float(value)
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
    checks raise ConfigError naming ``section.key``. Missing keys take the default."""
    require(isinstance(mapping, Mapping), section,
            f"expected a mapping of keys, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    require(not unknown, f"{section}.{unknown[0]}" if unknown else section,
            f"unknown key (known keys: {', '.join(sorted(fields))})")
    values = {}
    for name, field in fields.items():
        key = f"{section}.{name}"
        if name in mapping:
            values[name] = _check_type(mapping[name], hints[name], key)
        else:
            require(field.default is not dataclasses.MISSING
                    or field.default_factory is not dataclasses.MISSING,
                    key, "missing")
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
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    require(isinstance(params, dict), str(path), "top level must be a mapping of sections")
    return params


def load_section(cls: type[T], section: str, path: str | Path = "params.yaml") -> T:
    """Load one section of params.yaml into ``cls``; a missing section uses defaults."""
    params = read_params(path)
    return from_mapping(cls, params.get(section, {}), section)


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


# ---------------------------------------------------------------- params.yaml sections

def _check_probability(value: float, key: str) -> None:
    require(0.0 <= value <= 1.0, key, f"{value} is not a probability in [0, 1]")


@dataclass(frozen=True)
class FfcvConfig:
    """RGBImageField settings for ImageFolder sources (ffcv-imagenet's defaults)."""

    write_mode: typing.Literal["raw", "jpg", "proportion", "smart"] = "proportion"
    max_resolution: int = 500
    compress_probability: float = 0.5
    jpeg_quality: int = 90

    def check(self, section: str) -> None:
        require(self.max_resolution >= 8, f"{section}.max_resolution", "must be >= 8")
        _check_probability(self.compress_probability, f"{section}.compress_probability")
        require(1 <= self.jpeg_quality <= 100, f"{section}.jpeg_quality", "must be in 1..100")


@dataclass(frozen=True)
class DataConfig:
    """`data:` — what the convert stages read and how they write it."""

    source: typing.Literal["fashion_mnist", "imagefolder"] = "fashion_mnist"
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"
    imagefolder_root: str = ""
    subsets_dir: str = "data/subsets/fashion_mnist"
    skip_bad: bool = False
    workers: int = 2
    seed: int = 0
    ffcv: FfcvConfig = FfcvConfig()
    transfer_test_fraction: float = 0.25
    elpv_resolution: int = 64

    def check(self, section: str) -> None:
        if self.source == "imagefolder":
            require(bool(self.imagefolder_root), f"{section}.imagefolder_root",
                    "must be set when data.source is imagefolder")
        require(self.workers >= 1, f"{section}.workers", "must be >= 1")
        require(0.0 < self.transfer_test_fraction < 1.0, f"{section}.transfer_test_fraction",
                "must be in (0, 1)")
        require(self.elpv_resolution >= 8, f"{section}.elpv_resolution", "must be >= 8")
