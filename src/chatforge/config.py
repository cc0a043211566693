"""Typed stage configs: dataclasses filled from TOML, then from command-line flags. Unknown keys are errors."""
from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from chatforge import ChatforgeError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; `list[str]` stays as is."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if value is None:
        return None
    base = _base_type(tp)
    origin = typing.get_origin(base)
    try:
        if dataclasses.is_dataclass(base):
            if not isinstance(value, dict):
                raise ChatforgeError(f"{where}: expected a table")
            return from_dict(base, value, where)
        if origin in (list, tuple):
            (item,) = typing.get_args(base)[:1] or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            return [_coerce(v, item, where) for v in value]
        if origin is dict:
            return dict(value)
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base is float and isinstance(value, (int, float)):
            return float(value)
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return base(value)
        return value
    except (TypeError, ValueError):
        raise ChatforgeError(f"{where}: expected {getattr(base, '__name__', base)}, got {value!r}") from None


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build `cls` from a mapping, naming the first unknown or ill-typed key."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ChatforgeError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(types_))})")
    kwargs = {k: _coerce(v, types_[k], f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check:
        try:
            check()
        except ChatforgeError as e:  # name where the bad value came from
            raise ChatforgeError(f"{where}: {e}") from None
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ChatforgeError(f"{path}: invalid TOML: {e}") from None


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--flag` per dataclass field (nested dataclasses are set through TOML only), plus `--config FILE`."""
    parser.add_argument("--config", help="TOML file with these settings; flags override it")
    for name, tp in _field_types(cls).items():
        if name in skip or dataclasses.is_dataclass(_base_type(tp)):
            continue
        default = next(f for f in dataclasses.fields(cls) if f.name == name)
        shown = default.default if default.default is not dataclasses.MISSING else "..."
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"cfg_{name}", default=None, metavar=_metavar(tp),
                            help=f"default: {shown}")


def _metavar(tp: Any) -> str:
    base = _base_type(tp)
    return getattr(base, "__name__", "VALUE").upper()


def config_from_args(cls: type[T], args: argparse.Namespace, section: str | None = None) -> T:
    """TOML (`--config`, optionally one `[section]` of it) then flags that were given."""
    data: dict[str, Any] = {}
    where = "flags"
    if getattr(args, "config", None):
        data = read_toml(args.config)
        where = str(args.config)
        if section is not None and section in data and isinstance(data[section], dict):
            data = data[section]
            where = f"{args.config} [{section}]"
    for name in _field_types(cls):
        value = getattr(args, f"cfg_{name}", None)
        if value is not None:
            data[name] = value
    return from_dict(cls, data, where)
