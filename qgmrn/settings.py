"""Settings typed from the dataclasses' annotations: one conversion for command-line flags,
`--set FIELD=VALUE` and `--config file.json` (top level: TrainConfig, "model": ModelConfig).

A value arrives as text (flags, --set) or as JSON (config file); either way it becomes the type
the field is annotated with, or a SettingsError names the field, the value and the type wanted.
"""
from __future__ import annotations

import dataclasses
import types
import typing


class SettingsError(ValueError):
    """A setting that does not exist or does not fit its field's type or range."""


def field_types(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _describe(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(args[0])}"
    return {type(None): "none", bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint))


def convert(value, hint, name: str):
    """`value` (text or JSON) as the annotated type `hint`; SettingsError otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):                   # Optional[X]: "none"/null or X
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(value, a, name)
            except SettingsError as e:
                errors.append(e)
        raise SettingsError(f"{name}: expected {_describe(hint)}, got {value!r}")
    if origin is tuple:
        item = args[0]
        if isinstance(value, str):
            parts = [p.strip() for p in value.strip("()[] ").split(",") if p.strip()]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            raise SettingsError(f"{name}: expected {_describe(hint)}, got {value!r}")
        return tuple(convert(p, item, name) for p in parts)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}: expected a boolean (true/false), got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise SettingsError(f"{name}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise SettingsError(f"{name}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise SettingsError(f"{name}: expected a string, got {value!r}")
    raise SettingsError(f"{name}: fields of type {hint} cannot be set")


def typed(cls, mapping: dict, where: str) -> dict:
    """Every key of `mapping` must be a field of `cls`; values converted to their types."""
    if not isinstance(mapping, dict):
        raise SettingsError(f"{where}: expected a JSON object of {cls.__name__} fields, got "
                            f"{type(mapping).__name__}")
    types_ = field_types(cls)
    unknown = sorted(set(mapping) - set(types_))
    if unknown:
        raise SettingsError(f"{where}: unknown {cls.__name__} field(s) {unknown}; known: {', '.join(types_)}")
    return {k: convert(v, types_[k], f"{where} {k}") for k, v in mapping.items()}


def split_assignment(text: str) -> tuple[str, str]:
    key, eq, raw = text.partition("=")
    if not eq or not key:
        raise SettingsError(f"--set {text!r}: expected FIELD=VALUE")
    return key.strip(), raw
