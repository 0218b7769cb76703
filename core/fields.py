"""Dataclasses from untyped tables (TOML, JSON, CLI options) with every key and type checked.

One rule everywhere a user writes fields — a campaign config, a mode's target, a problem's
options: an unknown key is an error naming the key and the known ones; a value of the wrong type
is an error naming the key, the expected type and the value. Nested dataclasses nest; a field
typed `dict` takes a table as it is (its owner checks it).
"""

from __future__ import annotations

import dataclasses
import typing


class FieldError(ValueError):
    """A table that does not fit its dataclass; the message names the key."""


def build(cls, table, where: str = "", error: type[Exception] = FieldError):
    """An instance of dataclass `cls` from `table`, checking keys and value types; errors are
    raised as `error` with the key path (`where.key`) first."""
    if not isinstance(table, dict):
        raise error(f"{where or cls.__name__}: expected a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in table.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise error(f"{path}: unknown key; known: {', '.join(sorted(known))}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = build(kind, value, path, error)
        else:
            values[key] = check_type(value, kind, path, error)
    try:
        return cls(**values)
    except error:
        raise
    except ValueError as e:  # a validator of the dataclass itself
        raise error(f"{where or cls.__name__}: {e}") from None


def check_type(value, kind, path: str, error: type[Exception] = FieldError):
    origin = typing.get_origin(kind) or kind
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if origin is dict and isinstance(value, dict):
        return dict(value)
    if kind in (int, str, bool) and type(value) is kind:
        return value
    args = typing.get_args(kind)
    if args and type(None) in args and value is None:
        return None
    name = getattr(kind, "__name__", str(kind))
    raise error(f"{path}: expected {name}, got {value!r:.80}")


def parse_assignments(cls, pairs: list[str], where: str = "--set", error: type[Exception] = FieldError) -> dict:
    """`["sparsity=0.6", "pattern=2:4"]` → {"sparsity": 0.6, "pattern": "2:4"}, each value parsed
    by its field's type in dataclass `cls` (for options typed on a command line)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise error(f"{where} {pair!r}: write KEY=VALUE")
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(cls))
            raise error(f"{where} {key}: unknown key; known: {known}")
        out[key] = _parse(text.strip(), hints[key], f"{where} {key}", error)
        _check_given(cls, key, out[key], f"{where} {key}", error)
    return out


def _check_given(cls, key: str, value, path: str, error) -> None:
    """A field whose default is a sentinel (`0`: "the model's") says, in its metadata, the least
    value a user may write (`field(default=0, metadata={"given_min": 1, "default_means": ...})`):
    writing the sentinel by hand is refused rather than silently meaning the default."""
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == key)
    least = meta.get("given_min")
    if least is not None and value < least:
        raise error(f"{path}: {value} is not allowed (at least {least}); leave it out for "
                    f"{meta.get('default_means', 'the default')}")


def _parse(text: str, kind, path: str, error):
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if kind in (int, float):
            return kind(text)
    except ValueError:
        raise error(f"{path}: expected {kind.__name__}, got {text!r}") from None
    return text
