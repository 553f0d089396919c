"""Reading a run config: yaml files with ``base:`` inheritance, ``key=value`` overrides, and the yaml dump.

``load_config(path, overrides)`` reads a yaml file (merged over its ``base:`` file, if any), applies the
overrides, builds the typed :class:`~tread_scale.config.schema.RunConfig` strictly (an unknown key is an
error naming it and the nearest valid one) and validates it. :func:`dump_config` writes the resolved
config back as yaml.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from tread_scale.config.schema import RunConfig
from tread_scale.config.typed import apply_override, from_dict, parse_override, to_dict
from tread_scale.config.validate import validate
from tread_scale.errors import ConfigError


def config_from_dict(data: dict) -> RunConfig:
    """Strictly build and validate a :class:`RunConfig` from a plain mapping.

    Args:
        data: The config as plain data (parsed yaml).

    Returns:
        The validated :class:`RunConfig`, its backend section resolved.

    Raises:
        ConfigError: Naming the key at fault.
    """
    return validate(from_dict(RunConfig, data))


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(p: Path, chain: tuple[Path, ...] = ()) -> dict:
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if p.resolve() in chain:
        raise ConfigError(f"config file {str(p)!r}: 'base' files form a cycle")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid yaml: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {str(p)!r}: 'base' must be a path to another yaml file")
    return _deep_merge(_read_yaml(p.parent / base, (*chain, p.resolve())), data)


def load_config_dict(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Read a yaml file (merged over its ``base:`` file, if any) and apply ``key=value`` overrides.

    A ``base: other.yaml`` key (relative to the file) makes the file a set of changes to another one:
    mappings merge key by key, everything else (lists included) is replaced.

    Args:
        path: yaml file.
        overrides: ``key=value`` strings, applied in order.

    Returns:
        The merged, overridden config as plain data (not typed or validated).

    Raises:
        ConfigError: If a file is missing or not a yaml mapping, or an override is malformed.
    """
    data = _read_yaml(Path(path))
    for text in overrides:
        path_, value = parse_override(text)
        apply_override(data, path_, value, text)
    return data


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load, override and validate a run config.

    Args:
        path: yaml file.
        overrides: ``key=value`` strings, e.g. ``routing.routes[0].rate=0.5``.

    Returns:
        The validated :class:`RunConfig`.

    Raises:
        ConfigError: Naming the file or key at fault.
    """
    return config_from_dict(load_config_dict(path, overrides))


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as yaml.

    Args:
        cfg: A run config (validated, so its backend section is written out in full).

    Returns:
        yaml text that :func:`load_config` reads back to an equal config.
    """
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
