"""One TOML -> typed dataclass validator, for every file a person writes: the node config and
the stick's garage.toml, the head config, and the model catalog (build-image.sh checks
garage.toml with it too).

Each file maps onto frozen dataclasses; the field types say what a key holds, and a field's
own check (`setting(check=...)`) is the only rule on its range. Every error names the file and
the key and says what was expected, and never echoes the value (a key may hold a secret). Unknown keys are errors, not ignored: a typo must not be silently dropped.

Written here rather than with pydantic: the agent has an RSS budget of 60 MB, pydantic alone
costs a good part of it, and the checks we need are a page of code. msgspec (which the wire
messages use) ignores unknown dataclass fields and cannot say "file and key".
"""

from __future__ import annotations

import math
import tomllib
import types
import typing
from dataclasses import MISSING, Field, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable

# Field metadata keys, set through setting() below.
_CHECK = "garage.check"  # (predicate, expected): a constraint after the type check
_PARSE = "garage.parse"  # (function, expected): replaces the type-based conversion
_SKIP = "garage.skip"  # filled in by code, not read from the file
_KEY = "garage.key"  # the key in the file, where it differs from the field's name


class SettingsError(ValueError):
    """A settings file is unreadable or wrong; the message says where and what to do."""


class ConfigError(SettingsError):
    """The node's or the head's config is wrong (the model catalog has CatalogError)."""


def setting(default: Any = MISSING, *, check: tuple[Callable[[Any], bool], str] | None = None,
            parse: tuple[Callable[[Any], Any], str] | None = None, secret: bool = False,
            skip: bool = False, key: str | None = None, default_factory: Any = MISSING) -> Any:
    """A dataclass field with a constraint (`check`), a custom conversion (`parse`: raises
    ValueError on a bad value), hidden from repr (`secret`), or not read from files (`skip`)."""
    meta: dict[str, Any] = {}
    if check:
        meta[_CHECK] = check
    if parse:
        meta[_PARSE] = parse
    if skip:
        meta[_SKIP] = True
    if key:
        meta[_KEY] = key
    return field(default=default, default_factory=default_factory, repr=not secret, metadata=meta)


def one_of(*choices: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), f"one of {', '.join(choices)}"


def positive() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > 0 and (not isinstance(v, float) or math.isfinite(v))), "greater than 0"


def nonnegative() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= 0), "0 or more"


def tcp_port() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: 0 < v < 65536), "a TCP port (1-65535)"


def read_toml(path: Path, error: type[Exception] = SettingsError) -> dict[str, Any]:
    try:
        # Notepad may save garage.toml with a byte-order mark; TOML itself does not allow one.
        return tomllib.loads(path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text. Save it as UTF-8 and start again.") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML ({e}). Fix the syntax and start again.") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e}).") from None


def parse(target: Any, data: Any, source: Path | str, where: str = "",
          error: type[Exception] = SettingsError) -> Any:
    """A dataclass built from `data`. `target` is a dataclass type (keys without a default are
    required) or an instance, whose values stay where `data` has no key (an override file
    laid over a base file)."""
    return _Parser(source, error).table(target, data, where)


def toml_key(name: str) -> str:
    """A key as TOML writes it in a dotted path: bare when it can be, else quoted."""
    bare = name and all(c.isalnum() or c in "-_" for c in name) and name.isascii()
    return name if bare else f'"{name}"'


class _Parser:
    def __init__(self, source: Path | str, error: type[Exception]) -> None:
        self.source, self.error = source, error

    def fail(self, where: str, what: str) -> Exception:
        return self.error(f"{self.source}: '{where}' {what}")

    def table(self, target: Any, data: Any, where: str) -> Any:
        cls = target if isinstance(target, type) else type(target)
        base = None if isinstance(target, type) else target
        if not isinstance(data, dict):
            raise self.fail(where, f"must be a table ([{where}]), got {_kind(data)}.")
        known = {f.metadata.get(_KEY, f.name): f for f in fields(cls) if f.init and not f.metadata.get(_SKIP)}
        for key in data:
            if key not in known:
                raise self.error(f"{self.source}: unknown key '{_join(where, key)}'. "
                                 f"Known keys here: {', '.join(sorted(known))}.")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for name, f in known.items():
            key = _join(where, name)
            if name in data:
                current = getattr(base, f.name) if base is not None else None
                values[f.name] = self.value(data[name], hints[f.name], f, current, key)
            elif base is None and f.default is MISSING and f.default_factory is MISSING:
                raise self.fail(key, f"is missing ({_expected(hints[f.name], f)}).")
        obj = replace(base, **values) if base is not None else cls(**values)
        for key, what in getattr(obj, "problems", lambda: [])():
            raise self.fail(_join(where, key), what)
        return obj

    def value(self, value: Any, expected: Any, f: Field | None, current: Any, where: str) -> Any:
        meta = f.metadata if f is not None else {}
        if _PARSE in meta:
            convert, what = meta[_PARSE]
            try:
                out = convert(value)
            except (ValueError, TypeError):
                raise self.fail(where, f"must be {what}, got {_kind(value)}.") from None
        elif is_dataclass(expected):
            return self.table(current if current is not None else expected, value, where)
        else:
            out = self.convert(value, expected, where)
        if _CHECK in meta:
            ok, what = meta[_CHECK]
            if not ok(out):
                raise self.fail(where, f"must be {what}.")
        return out

    def convert(self, value: Any, expected: Any, where: str) -> Any:
        def fail(what: str) -> Exception:
            return self.fail(where, f"must be {what}, got {_kind(value)}.")

        origin, args = typing.get_origin(expected), typing.get_args(expected)
        if origin in (typing.Union, types.UnionType) and type(None) in args:
            inner = next(a for a in args if a is not type(None))
            return self.convert(value, inner, where)
        if expected is Path:
            if not isinstance(value, str) or not value:
                raise fail("a non-empty path string")
            return Path(value)
        if expected is bool:
            if not isinstance(value, bool):
                raise fail("true or false")
            return value
        # The type only: which range a number may take is its field's own check (a share may
        # be 0, a period may not), never a rule for every number.
        if expected is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise fail("a whole number")
            return value
        if expected is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise fail("a number")
            return float(value)
        if expected is str:
            if not isinstance(value, str):
                raise fail("a string in quotes")
            return value
        if origin is dict and args and is_dataclass(args[1]):
            if not isinstance(value, dict):
                raise fail(f"a table of [{where}.<name>] tables")
            return {k: self.table(args[1], v, _join(where, toml_key(k))) for k, v in value.items()}
        if origin is dict:
            if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                raise fail("a table of strings (KEY = \"value\")")
            return dict(value)
        if origin is tuple and args and args[0] is int:
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 65536
                                                      for v in value):
                raise fail("a list of port numbers")
            return tuple(value)
        if origin is tuple:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise fail("a list of strings")
            return tuple(value)
        raise TypeError(f"settings field {where} has an unsupported type {expected}")  # our bug


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _kind(value: Any) -> str:
    names = {bool: "boolean", int: "whole number", float: "number", str: "string", dict: "table", list: "list"}
    return f"a {names.get(type(value), type(value).__name__)}"


def _expected(expected: Any, f: Field) -> str:
    if _PARSE in f.metadata:
        return f.metadata[_PARSE][1]
    if is_dataclass(expected):
        return "a table"
    kind = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
            Path: "a path"}.get(expected, "a value")
    return f"{kind}, {f.metadata[_CHECK][1]}" if _CHECK in f.metadata else kind
