"""Typed settings read from environment variables, checked at start.

A dataflow declares its settings as a frozen dataclass and reads them with
:func:`from_env`. Each field ``name`` is read from ``<PREFIX><NAME>`` unless
its metadata names the variable (``field(metadata={"env": "..."})``); fields
with no variable set keep their defaults. Besides text, numbers, booleans,
paths and positions, a field can be a list, ``tuple[str, ...]`` (``a,b,c``),
or a mapping, ``dict[str, float]`` (``acme=0.5,beta=1``); their items parse as
their own type does. A value that does not parse stops the dataflow before it
reads anything, naming the variable and the form expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from operators.kafka.client import DEFAULT_OUTAGE_LIMIT_S, OUTAGE_LIMIT_ENV
from operators.kafka.position import Position
from patternflow import BROKERS_ENV, DEFAULT_BROKERS
from patternflow.errors import PatternflowError

__all__ = [
    "PROCESS_ID_ENV",
    "SettingsError",
    "brokers_field",
    "from_args",
    "from_env",
    "outage_limit_field",
    "process_id",
]

T = TypeVar("T")


class SettingsError(PatternflowError, ValueError):
    """An environment variable or argument holds a value its setting cannot take; the message names both."""


_FORMS: dict[Any, tuple[str, Any]] = {
    str: ("text", str),
    int: ("an integer, e.g. 10", int),
    float: ("a number, e.g. 0.5", float),
    Path: ("a path", Path),
    Position: ("earliest, latest, offset:<n> or timestamp:<epoch ms>", Position.parse),
}
_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
# Set by ``python -m bytewax.run`` in each process of a cluster.
PROCESS_ID_ENV = "BYTEWAX_PROCESS_ID"


def process_id() -> int:
    """This process's index in its Bytewax cluster (0 when it runs alone)."""
    return int(os.environ.get(PROCESS_ID_ENV, "0"))


def brokers_field() -> Any:
    """The broker address, read from ``KAFKA_BOOTSTRAP_SERVERS`` whatever the prefix."""
    return dataclasses.field(default=DEFAULT_BROKERS, metadata={"env": BROKERS_ENV})


def outage_limit_field() -> Any:
    """How long a broker outage is ridden out, from ``KAFKA_OUTAGE_LIMIT_S`` whatever the prefix."""
    return dataclasses.field(default=DEFAULT_OUTAGE_LIMIT_S, metadata={"env": OUTAGE_LIMIT_ENV})


def _env_name(field: dataclasses.Field[Any], prefix: str) -> str:
    return str(field.metadata.get("env", prefix + field.name.upper()))


def _parse(kind: Any, raw: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        return tuple(_parse(args[0], item) for item in _items(raw))
    if origin is dict:
        pairs = [item.split("=", 1) for item in _items(raw)]
        if any(len(pair) != 2 or not pair[0].strip() for pair in pairs):
            raise ValueError
        return {_parse(args[0], key.strip()): _parse(args[1], value.strip()) for key, value in pairs}
    if kind is bool:
        if raw.lower() not in _BOOLS:
            raise ValueError
        return _BOOLS[raw.lower()]
    return _FORMS[kind][1](raw)


def _items(raw: str) -> list[str]:
    """The comma-separated items of a list or mapping; blanks (``a,,b``, a trailing comma) are none."""
    return [item.strip() for item in raw.split(",") if item.strip()]


def _form(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        return f"a comma-separated list, each item {_form(args[0])}"
    if origin is dict:
        return f"comma-separated name=value pairs (e.g. a=1,b=2), each value {_form(args[1])}"
    return "true or false" if kind is bool else _FORMS[kind][0]


def from_env(settings_cls: type[T], prefix: str = "", environ: Mapping[str, str] | None = None) -> T:
    """Build ``settings_cls`` from the environment (or ``environ``)."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(settings_cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(settings_cls):  # type: ignore[arg-type]
        name = _env_name(field, prefix)
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        kind = hints[field.name]
        try:
            values[field.name] = _parse(kind, raw.strip())
        except ValueError as exc:
            raise SettingsError(f"{name}={raw!r} is not valid: expected {_form(kind)}") from exc
    try:
        return settings_cls(**values)
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc


def from_args(settings_cls: type[T], prefix: str, argv: Sequence[str] | None = None, description: str = "") -> T:
    """As :func:`from_env`, with a command-line flag per field (``--field-name``) that wins over its variable."""
    hints = typing.get_type_hints(settings_cls)
    parser = argparse.ArgumentParser(description=description)
    names = {}
    for field in dataclasses.fields(settings_cls):  # type: ignore[arg-type]
        flag = "--" + field.name.replace("_", "-")
        names[field.name] = _env_name(field, prefix)
        default = "" if field.default is dataclasses.MISSING else f", default {field.default}"
        parser.add_argument(
            flag, dest=field.name, help=f"{_form(hints[field.name])} (env {names[field.name]}{default})"
        )
    args = parser.parse_args(argv)
    env = dict(os.environ)
    env.update({names[name]: value for name, value in vars(args).items() if value is not None})
    return from_env(settings_cls, prefix, env)
