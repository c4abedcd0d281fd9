"""Typed access to a parsed TOML document, with errors that name the key path.

Each getter reads one key of a table and raises
:class:`~supervisor.errors.ConfigError` whose ``path`` is the key in TOML terms
(``devices[1].services."web.v2"``: TOML's own quoting, array indexes from 0)
when the value has the wrong type; :func:`under` reports a value's own error at
the key it came from.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
from collections.abc import Collection, Iterator, Mapping
from datetime import date, datetime, time
from typing import Final

from supervisor.errors import ConfigError

_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")


def join_key(base: str | None, key: str) -> str:
    # TOML's own quoting, so a service named "web.v2" is not read as two keys.
    part = key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key)
    return f"{base}.{part}" if base else part


def _rebase(exc: ConfigError, base: str) -> ConfigError:
    if exc.path is None:
        path = base
    elif exc.path.startswith("["):
        path = base + exc.path
    else:
        path = f"{base}.{exc.path}"
    return ConfigError(path, exc.message)


@contextlib.contextmanager
def under(base: str) -> Iterator[None]:
    """Report a value's own error at ``base``, the key it came from."""
    try:
        yield
    except ConfigError as exc:
        raise _rebase(exc, base) from None
    except ValueError as exc:
        raise ConfigError(base, str(exc)) from None


def _toml_type(value: object) -> str:
    # bool before int: in Python, True is an int; in TOML it is not.
    for kind, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
        (datetime, "a date-time"),
        (date, "a date"),
        (time, "a time"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def wrong_type(path: str, expected: str, value: object) -> ConfigError:
    return ConfigError(path, f"expected {expected}, got {_toml_type(value)}")


def check_keys(table: Mapping[str, object], base: str | None, allowed: Collection[str]) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(join_key(base, key), f"unknown key{hint}")


def get_string(table: Mapping[str, object], base: str | None, key: str) -> str | None:
    value = table.get(key)
    if value is None or isinstance(value, str):
        return value
    raise wrong_type(join_key(base, key), "a string", value)


def get_required_string(table: Mapping[str, object], base: str | None, key: str) -> str:
    value = get_string(table, base, key)
    if value is None:
        raise ConfigError(join_key(base, key), "required key is missing")
    return value


def get_integer(table: Mapping[str, object], base: str, key: str) -> int:
    value = table[key]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise wrong_type(join_key(base, key), "an integer", value)


def get_number(table: Mapping[str, object], base: str, key: str) -> float:
    value = table[key]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise wrong_type(join_key(base, key), "a number", value)


def get_strings(table: Mapping[str, object], base: str | None, key: str) -> tuple[str, ...]:
    value = table.get(key, [])
    path = join_key(base, key)
    if not isinstance(value, list):
        raise wrong_type(path, "an array of strings", value)
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise wrong_type(f"{path}[{index}]", "a string", item)
    return tuple(value)


def get_table(table: Mapping[str, object], base: str | None, key: str) -> dict[str, object] | None:
    value = table.get(key)
    if value is None or isinstance(value, dict):
        return value
    raise wrong_type(join_key(base, key), "a table", value)


def get_tables(
    table: Mapping[str, object], base: str | None, key: str
) -> list[tuple[str, dict[str, object]]]:
    """The tables of an array of tables (``[[key]]``), each with its key path."""
    value = table.get(key, [])
    path = join_key(base, key)
    if not isinstance(value, list):
        raise wrong_type(path, f"an array of tables ([[{key}]])", value)
    found = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise wrong_type(f"{path}[{index}]", "a table", item)
        found.append((f"{path}[{index}]", item))
    return found
