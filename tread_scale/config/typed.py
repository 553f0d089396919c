"""The generic typed-dataclass machinery under the config: mappings ↔ dataclasses, ``key=value`` overrides.

:func:`from_dict` builds a dataclass from a plain mapping (parsed yaml), strictly: every error names the
dotted key at fault, and an unknown key also names the nearest valid one. :func:`to_dict` goes back to plain
data for yaml dumps. :func:`parse_override` and :func:`apply_override` read and apply ``a.b[0].c=value``
overrides on the plain mapping before it is typed. Nothing here knows the run schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from tread_scale.errors import ConfigError

_MISSING = dataclasses.MISSING


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp) if a is not Ellipsis)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is list:
        (item_tp,) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def nearest_key(name: str, valid: list[str]) -> list[str]:
    """The valid key closest to ``name``: by spelling, or whose letters are the initials of ``name``'s words.

    Args:
        name: The unknown key.
        valid: The keys allowed at that place.

    Returns:
        A list of at most one key (empty when nothing is close).
    """
    initials = "".join(w[0] for w in name.split("_") if w)
    if len(initials) > 1 and initials in valid:
        return [initials]
    return difflib.get_close_matches(name, valid, n=1, cutoff=0.5)


def from_dict(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursively and strictly.

    Args:
        cls: A dataclass type whose fields carry type annotations.
        data: Mapping of field names to values (``None`` means all defaults).
        key: Dotted path of ``data`` within the whole config, for messages.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: For unknown keys (with the nearest valid key), missing required keys and type errors.
    """
    where = key or "<top level>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            full = f"{key}.{name}" if key else str(name)
            near = nearest_key(str(name), list(fields))
            hint = f"; did you mean '{(key + '.') if key else ''}{near[0]}'?" if near else ""
            raise ConfigError(f"unknown config key '{full}'{hint} (valid keys under {where}: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        full = f"{key}.{name}" if key else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], full)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"missing required config key '{full}' ({_type_name(hints[name])})")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclass → plain dict/list structure (tuples become lists), for yaml dumps.

    Args:
        obj: A dataclass instance, or a list, tuple, dict or scalar holding them.

    Returns:
        The same data as plain dicts, lists and scalars.
    """
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """Parse ``a.b[0].c=value`` into a key path and a yaml-typed value.

    Args:
        text: The override as given on the command line.

    Returns:
        ``(path, value)``: the key path (names and list indices) and the value parsed as yaml.

    Raises:
        ConfigError: If the text has no ``=`` or a malformed key.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    raw_key, raw_value = text.split("=", 1)
    path: list[str | int] = []
    for part in raw_key.strip().split("."):
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)", part)
        if not m:
            raise ConfigError(f"override {text!r}: malformed key segment {part!r}")
        path.append(m.group(1))
        path.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid yaml: {e}") from None
    return path, value


def apply_override(data: dict, path: list[str | int], value: Any, text: str) -> None:
    """Set ``value`` at ``path`` inside nested dicts/lists, creating mappings as needed.

    Args:
        data: The plain (not yet typed) config mapping, changed in place.
        path: Key path from :func:`parse_override`.
        value: The value to set.
        text: The override as given, for messages.

    Raises:
        ConfigError: If the path runs through a non-container or past the end of a list.
    """
    node: Any = data
    for i, step in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(step, int):
            if not isinstance(node, list):
                raise ConfigError(f"override {text!r}: {path[:i]} is not a list")
            if step == len(node):
                node.append({} if isinstance(nxt, str) else [])
            if step > len(node):
                raise ConfigError(f"override {text!r}: index {step} is past the end of a list of {len(node)}")
            node = node[step]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: cannot set a key inside {node!r}")
            if node.get(step) is None:
                node[step] = {} if isinstance(nxt, str) else []
            node = node[step]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last > len(node):
            raise ConfigError(f"override {text!r}: index {last} is out of range")
        if last == len(node):
            node.append(value)
        else:
            node[last] = value
    else:
        if not isinstance(node, dict):
            raise ConfigError(f"override {text!r}: cannot set a key inside {node!r}")
        node[last] = value
