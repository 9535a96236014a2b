"""Typed configs: plain dataclasses, loaded from YAML and ``key=value`` overrides, validated.

Every command and recipe in visalign takes one config dataclass. A run's config is built as
defaults ← YAML file ← command-line overrides (``optim.lr=1e-4 lora.rank=8``), then validated
with pydantic: wrong types and unknown fields fail before any work starts, naming the field
(with a suggestion when it looks misspelt). The CLI's ``--help`` is generated from the same
dataclasses (:func:`config_help`), so it is always true.

>>> from visalign.config import configclass, load_config
>>> @configclass
... class Optim:
...     lr: float = 1e-4
>>> load_config(Optim, overrides=["lr=3e-4"]).lr
0.0003
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")

# The help of every command's single_file_config field (sample, eval, train, preference-data, demo).
SINGLE_FILE_CONFIG_HELP = ("for a single .safetensors checkpoint: a local diffusers folder of the same architecture "
                           "whose configs diffusers maps it with (needed offline)")


class ConfigError(ValueError):
    """A config file or override is wrong: unknown field, wrong type, unreadable file."""


def configclass(cls=None, **dataclass_kwargs):
    """``dataclasses.dataclass`` that rejects unknown fields when validated by :func:`load_config`."""
    from pydantic import ConfigDict

    def wrap(klass):
        klass = dataclasses.dataclass(klass, **dataclass_kwargs)
        klass.__pydantic_config__ = ConfigDict(extra="forbid")
        return klass

    return wrap if cls is None else wrap(cls)


def field(default=dataclasses.MISSING, *, help: str = "", default_factory=dataclasses.MISSING):
    """A config field with a help text shown by ``--help``."""
    kwargs: dict[str, Any] = {"metadata": {"help": help}}
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


# --------------------------------------------------------------------------------------------
# Loading


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def parse_overrides(cls: type, overrides: Sequence[str]) -> dict:
    """``["a.b=1", "c=[x, y]"]`` → nested dict. Values are parsed as YAML (numbers, lists, null);
    a scalar given for a list field becomes a one-element list."""
    result: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if _is_list_field(cls, key.split(".")) and not isinstance(value, list) and value is not None:
            value = [value]
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} was already given a value")
        node[parts[-1]] = value
    return result


def merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    data: dict | None = None,
) -> T:
    """Build a ``cls`` from defaults, an optional YAML file, an optional dict and overrides."""
    values: dict = {}
    if path is not None:
        values = merge(values, read_yaml(path))
    if data is not None:
        values = merge(values, data)
    values = merge(values, parse_overrides(cls, overrides))
    return validate(cls, values, source=str(path) if path else "the command line")


def validate(cls: type[T], values: dict, source: str = "config") -> T:
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as error:
        messages = [_describe(cls, e) for e in error.errors()]
        raise ConfigError(f"invalid config ({source}):\n  " + "\n  ".join(messages)) from None


def _describe(cls: type, error: dict) -> str:
    location = [str(part) for part in error["loc"] if not isinstance(part, int)]
    name = ".".join(location)
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        owner = _resolve(cls, location[:-1])
        known = [f.name for f in dataclasses.fields(owner)] if owner and dataclasses.is_dataclass(owner) else []
        close = difflib.get_close_matches(location[-1], known, n=1)
        hint = f" (did you mean {'.'.join(location[:-1] + close)!r}?)" if close else ""
        return f"unknown field {name!r}{hint}; known fields here: {', '.join(known)}"
    if error["type"] == "missing" or error["type"] == "missing_argument":
        return f"missing required field {name!r}"
    return f"{name}: {error['msg']} (got {error.get('input')!r})"


def _resolve(cls: type, path: list[str]):
    node = cls
    for part in path:
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = _unwrap_optional(hints[part])
    return node


def _unwrap_optional(annotation):
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_list_field(cls: type, path: list[str]) -> bool:
    annotation = _resolve(cls, path)
    return typing.get_origin(annotation) in (list, tuple, typing.Sequence)


# --------------------------------------------------------------------------------------------
# Saving and help


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path


def _type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def config_help(cls: type, prefix: str = "") -> list[str]:
    """One line per leaf field: ``name: type = default  help``."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = _unwrap_optional(hints[f.name])
        name = prefix + f.name
        if dataclasses.is_dataclass(annotation):
            lines.extend(config_help(annotation, prefix=name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        text = f.metadata.get("help", "")
        lines.append(f"{name}: {_type_name(hints[f.name])} = {default}" + (f"  — {text}" if text else ""))
    return lines
