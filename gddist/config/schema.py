"""How a plain config dict becomes typed dataclasses: unknown keys refused, scalars coerced, each
mistake a `UserError` whose one line names the key, the value and the fix (gddist/config/ holds
the schema itself)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class UserError(Exception):
    """A mistake in the user's config or data: reported as one line, exit code 2, no traceback."""


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{key}={value!r} is not one of: {', '.join(choices)}")


def check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"{key}={value} must be > 0")


def build_dataclass(cls: type, d: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass `cls` from `d`, rejecting unknown keys and coercing scalar types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise UserError(f"unknown config key {key!r}; known keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in d.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"{key} must be a config group, got {value!r}")
            builder = getattr(hint, "from_dict", None)  # sections with their own parsing
            kwargs[name] = builder(value) if builder else build_dataclass(hint, value, key)
        else:
            kwargs[name] = coerce(key, value, hint)
    return cls(**kwargs)


def coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return coerce(key, value, args[0])
    if origin is list:
        if not isinstance(value, list | tuple):
            raise UserError(f"{key}={value!r} must be a list, e.g. {key}=[1,2]")
        (item,) = typing.get_args(hint)
        return [coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"{key}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{key}={value!r} must be a number")
        return float(value)
    if hint is str:
        if value is None or isinstance(value, dict | list):
            raise UserError(f"{key}={value!r} must be a string")
        return str(value)
    raise TypeError(f"unsupported config type {hint} for {key}")  # a schema bug, not user input
