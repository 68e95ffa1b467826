"""Configuration: YAML defaults per stage, per-environment profiles, and explicit overrides.

``configs/<stage>.yaml`` holds the defaults of one stage (its file name is its section name);
``configs/profiles/<name>.yaml`` (a mapping of sections) is deep-merged on top; overrides given as ``{"stage.key": value}`` win last. Stage code turns its section into a
small dataclass with :func:`from_dict`, which refuses unknown keys (a typo is an error, not a no-op).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from imgsearch.errors import ConfigError

T = TypeVar("T")

#: The repository root when running from a checkout (configs/ lives there).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR_ENV = "IMGSEARCH_CONFIG_DIR"
HOME_ENV = "IMGSEARCH_HOME"


def config_dir() -> Path:
    return Path(os.environ.get(CONFIG_DIR_ENV, PROJECT_ROOT / "configs"))


def home_dir() -> Path:
    """Where caches and fetched data live (never inside git): ``$IMGSEARCH_HOME`` or ``./.imgsearch``."""
    return Path(os.environ.get(HOME_ENV, Path.cwd() / ".imgsearch")).resolve()


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def parse_value(text: str) -> Any:
    """Parse an override given on a command line (``"0.5"``, ``"true"``, ``"[1, 5]"``) as YAML."""
    return yaml.safe_load(text) if isinstance(text, str) else text


def load_config(
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    directory: Path | None = None,
) -> dict[str, Any]:
    """Stage defaults, then ``profile``, then dotted ``overrides`` (``{"extract.batch_size": 32}``)."""
    directory = directory or config_dir()
    cfg: dict[str, Any] = {p.stem: _read_yaml(p) for p in sorted(directory.glob("*.yaml"))}
    if profile:
        cfg = deep_merge(cfg, _read_yaml(directory / "profiles" / f"{profile}.yaml"))
    for dotted, value in (overrides or {}).items():
        if value is None or value == "":
            continue  # an entry-point parameter left at its empty default keeps the config's value
        node = cfg
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node[leaf] = parse_value(value) if isinstance(value, str) else value
    return cfg


def from_dict(cls: type[T], data: Mapping[str, Any] | None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise :class:`ConfigError`."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {unknown}; known: {sorted(names)}")
    hints = _type_hints(cls)
    data = {key: _as_declared(hints.get(key), value) for key, value in data.items()}
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that does not evaluate: no coercion
        return {}


def _as_declared(hint: Any, value: Any) -> Any:
    """A number where the field wants text, as text: ``--path 2024`` is the folder ``2024``.

    Overrides are parsed as YAML (:func:`parse_value`), which cannot know that ``2024`` names
    a folder; the field's declared type can. Only ``str`` fields that accept no number are
    coerced; everything else is left for the dataclass to judge.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        allowed = set(typing.get_args(hint))
    else:
        allowed = {hint}
    if str in allowed and not allowed & {int, float, Any}:
        return str(value)
    return value


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, for logging params."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
