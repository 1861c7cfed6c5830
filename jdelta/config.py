"""YAML configs with ``key.sub=value`` command-line overrides."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a YAML mapping (``path`` may be ``None`` for an empty config) and apply overrides.

    Each override is ``dotted.key=value``; the value is parsed as YAML (``3`` -> int,
    ``[1,2]`` -> list, ``true`` -> bool). A file may name ``base: other.yaml`` (relative
    to itself) to inherit from.
    """
    cfg: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
        base = loaded.pop("base", None)
        if base is not None:
            cfg = load_config(path.parent / base)
        cfg = merge(cfg, loaded)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        set_dotted(cfg, key.strip(), yaml.safe_load(raw))
    return cfg


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = copy.deepcopy(dict(base))
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"cannot set {key!r}: {p!r} is a {type(nxt).__name__}, not a mapping")
        node = nxt
    node[parts[-1]] = value


def get_dotted(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    node: Any = cfg
    for p in key.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return default
        node = node[p]
    return node


def check_known_keys(cfg: Mapping[str, Any], cls: type, what: str) -> dict[str, Any]:
    """A copy of ``cfg`` after checking every key names a field of dataclass ``cls``; an unknown
    key raises ``ValueError`` naming it (``what``: e.g. "distill options", for the message)."""
    cfg = dict(cfg or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")
    return cfg
