"""One config system for every stage: YAML -> typed pydantic objects, unknown keys rejected.

A config file is plain YAML; ``load_config(path, ConfigClass, overrides=["a.b=1"])`` reads it, applies
``--set``-style overrides and validates it. Every error names the offending key by its dotted path.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and what to do."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value (``1`` -> int, ``[a,b]`` -> list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.path=value`` override set (creating sections as needed)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    """Render a pydantic error as one readable line per wrong key of the config from ``source``."""
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(
                f"  - unknown key '{where}' (check its spelling; see the example configs under configs/)"
            )
        elif e["type"] == "value_error":
            lines.append(f"  - {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  - {where}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def validate(cls: type[M], data: dict[str, Any], source: str = "<dict>") -> M:
    """Validate a plain dict into ``cls``, turning pydantic's error into a ConfigError naming each key."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file holding a mapping (empty file = ``{}``), raising ConfigError when it cannot."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; the shipped configs are under configs/")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys at its top level")
    return data


def load_config(path: str | Path, cls: type[M], overrides: list[str] | None = None) -> M:
    """Read YAML at ``path``, apply ``overrides`` (``["a.b=value", ...]``) and validate into ``cls``."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return validate(cls, data, source=str(path))


def add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """The two config flags every CLI has: ``--config FILE`` and repeatable ``--set key=value``."""
    parser.add_argument("--config", default=default, required=default is None, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )
