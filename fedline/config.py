"""One TOML file per process, validated into dataclasses with errors that name
the file and the key.

Why one helper: every part (edge, aggregator, line inference, adapters) reads a
TOML file, and an OT engineer who mistypes ``poll_interval_s`` in any of them
must get the same kind of message: which file, which key, what was expected.
Each part describes its section as a frozen dataclass; :func:`parse` walks the
table, refuses unknown keys, checks types (including ``Literal``, ``Optional``,
``list[...]``, ``dict[str, ...]`` and nested dataclasses) and fills defaults.

Example::

    @dataclass(frozen=True)
    class Broker:
        url: str
        qos: Literal[0, 1] = 1

    cfg = parse(Broker, {"url": "mqtt://127.0.0.1:1883"}, file="site.toml", where="broker")
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, cast, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, naming the file, the key and what was expected."""

    def __init__(self, file: str | Path | None, key: str, message: str) -> None:
        self.file = str(file) if file is not None else "<config>"
        self.key = key
        self.message = message
        super().__init__(f"{self.file}: {key or '<top level>'}: {message}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing file or a syntax error is a :class:`ConfigError`."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(p, "", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(p, "", f"not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(p, "", f"not UTF-8 text (TOML must be UTF-8): {exc}") from None
    except RecursionError:
        raise ConfigError(p, "", "not valid TOML: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(p, "", f"cannot read: {exc.strerror or exc}") from None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return f"a table of {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    if tp is type(None):
        return "nothing"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(tp: Any, value: Any, file: str | Path | None, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        raise ConfigError(file, key, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # Optional[X]: report X's own, precise error
            return _coerce(real[0], value, file, key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, file, key)
            except ConfigError:
                pass
        raise ConfigError(file, key, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(file, key, f"expected {_type_name(tp)}, got {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        items = [_coerce(item, v, file, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(file, key, f"expected {_type_name(tp)}, got {value!r}")
        _, vt = get_args(tp)
        return {k: _coerce(vt, v, file, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(file, key, f"expected a table, got {value!r}")
        return parse(cast("type[Any]", tp), value, file=file, where=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(file, key, f"expected {_type_name(tp)}, got {value!r}")


def parse(cls: type[T], table: dict[str, Any], *, file: str | Path | None = None, where: str = "") -> T:
    """Build dataclass ``cls`` from a TOML table.

    Unknown keys, missing required keys and wrong types raise :class:`ConfigError`
    naming ``file`` and the dotted key (``where`` is the prefix of this table).
    A dataclass may define ``validate(self)`` raising ``ValueError`` for checks
    across fields; its message is reported against the table.
    """
    if not isinstance(table, dict):
        raise ConfigError(file, where, f"expected a table, got {table!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls)) if f.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(file, prefix + unknown[0], f"unknown key; expected one of: {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = prefix + name
        if name in table:
            kwargs[name] = _coerce(hints[name], table[name], file, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(file, key, f"missing; expected {_type_name(hints[name])}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(file, where, str(exc)) from None
    return obj


def load(cls: type[T], path: str | Path) -> T:
    """Load and validate one process's TOML file into ``cls``."""
    return parse(cls, load_toml(path), file=path)


def resolve_path(base_file: str | Path | None, value: str | Path) -> Path:
    """Resolve a path written in a config file relative to that file's folder."""
    p = Path(value).expanduser()
    if p.is_absolute() or base_file is None:
        return p
    return (Path(base_file).resolve().parent / p).resolve()


__all__ = ["ConfigError", "load", "load_toml", "parse", "resolve_path"]
