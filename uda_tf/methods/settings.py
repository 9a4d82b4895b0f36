"""Settings declared once: a method's flags are the fields of its frozen `Config` dataclass.

Each field is made with `setting(default, help, choices=..., lower=..., upper=...)`, which
stores the flag's help text, allowed values and bounds in the field's metadata. From that one
declaration come the absl flag (`define_flags`, called by train.py for every registered method)
and the checks run when a config is built (`from_values`), so a flag, its validator and the
method's own check cannot drift apart. Rules between fields live in the Config's `check()`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


def setting(default, help: str, *, choices=None, lower=None, upper=None, kind: str = "",
            item: type = float, check: Callable | None = None):
    """A Config field: the flag's default, help text, allowed values (`choices`, a tuple
    defined once next to the code that reads it, or a registry dict that grows as modules
    register, checked as it is then) and inclusive bounds. `kind` names the absl flag type when
    the default does not tell it (`list` for a list flag defaulting to None, `string` for one
    defaulting to None); `item` is the type of a list's items. `check(name, value)` raises a
    ValueError naming the flag for a value the bounds cannot describe; it sees the value as
    given (strings from the command line, or typed values) and is also the absl validator."""
    if choices is not None and not isinstance(choices, dict):
        choices = tuple(choices)
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "lower": lower, "upper": upper,
        "kind": kind or _kind_of(default, choices), "item": item, "check": check})


def _kind_of(default, choices) -> str:
    if choices is not None:
        return "enum"
    for python_type, kind in ((bool, "bool"), (int, "integer"), (float, "float"),
                              (str, "string")):
        if isinstance(default, python_type):  # bool before int: True is an int
            return kind
    raise TypeError(f"setting default {default!r}: give kind= (bool, integer, float, string, "
                    "list or enum)")


def fields(config_cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_cls) if "help" in f.metadata]


def define_flags(config_classes, define: Callable, names=None) -> list[str]:
    """Calls `define(kind, name, default, help, enum_values=..., lower_bound=...,
    upper_bound=...)` once per setting of `config_classes` (only those in `names` when given;
    a field shared through a base Config is defined once; two classes giving one name
    different declarations is a programming error). Returns the names, in order."""
    seen: dict[str, dataclasses.Field] = {}
    for cls in config_classes:
        for f in fields(cls):
            if names is not None and f.name not in names:
                continue
            if f.name in seen:
                if (seen[f.name].default, seen[f.name].metadata) != (f.default, f.metadata):
                    raise TypeError(f"setting {f.name!r} is declared twice, differently "
                                    f"({cls.__qualname__})")
                continue
            seen[f.name] = f
            m = f.metadata
            kwargs = {}
            if m["kind"] == "enum":
                choices = m["choices"]  # a registry is listed sorted, a tuple in its order
                kwargs["enum_values"] = [str(c) for c in (
                    sorted(choices) if isinstance(choices, dict) else choices)]
            if m["lower"] is not None:
                kwargs["lower_bound"] = m["lower"]
            if m["upper"] is not None:
                kwargs["upper_bound"] = m["upper"]
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            define(m["kind"], f.name, default, m["help"], **kwargs)
    return list(seen)


def check_value(name: str, value: Any, metadata) -> None:
    """The declared allowed values and bounds; the ValueError names the flag."""
    choices, lower, upper = metadata["choices"], metadata["lower"], metadata["upper"]
    if choices is not None and value not in choices:
        raise ValueError(f"--{name}={value!r}: expected one of {', '.join(map(str, choices))}")
    if lower is not None and value < lower:
        raise ValueError(f"--{name} must be >= {lower}, got {value}")
    if upper is not None and value > upper:
        raise ValueError(f"--{name} must be <= {upper}, got {value}")


def _convert(name, value, kind, item=float):
    if value is None:
        return None
    try:
        if kind == "list":  # a list flag: its items typed, kept as a tuple (frozen)
            return tuple(item(v) for v in value)
        if kind == "float":
            return float(value)
        if kind == "integer":
            return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{name}={value!r}: expected "
                         f"{'comma-separated numbers' if kind == 'list' else 'a number'}") \
            from None
    return value


def from_values(config_cls, values: dict):
    """`config_cls` from flag values (a dict holding at least its fields; other keys are
    ignored; a missing field takes its default), each checked against its declaration, then
    the Config's own `check()`."""
    kwargs = {}
    for f in dataclasses.fields(config_cls):
        if f.name not in values:
            continue
        value, check = values[f.name], f.metadata.get("check")
        if check is not None and value is not None:
            check(f.name, value)
        value = _convert(f.name, value, f.metadata.get("kind"), f.metadata.get("item", float))
        if value is not None and "help" in f.metadata:
            check_value(f.name, value, f.metadata)
        kwargs[f.name] = value
    config = config_cls(**kwargs)
    config.check()
    return config
