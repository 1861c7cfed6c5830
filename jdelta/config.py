"""One typed config system: dataclasses validated by pydantic, loaded from YAML with ``key=value`` overrides.

Every stage has one config dataclass (``jdelta.stages.<verb>.Config``) composed of shared parts
(:class:`SamplingConfig`, :class:`ModelSpec`, ...). A config is built with :func:`load`::

    cfg = load(Config, "configs/x.yaml", ["sampling.n=8", "out=runs/x"])

Why pydantic (v2) over OmegaConf or draccus: the config classes stay plain frozen
``dataclasses`` that library code constructs directly, while pydantic validates a YAML/override
mapping against them with ``Literal`` choices, ``X | None`` unions, tuples and nested dataclasses,
coerces YAML strings such as ``1e-3`` to the declared type, and reports every error with its
location; OmegaConf's structured configs support neither ``Literal`` nor general unions.

Every default is stated once, on the dataclass field. Errors are :class:`ConfigError` (a
:class:`jdelta.errors.UserError`): one line naming the dotted key, with the closest valid key for
a misspelling. Range checks live in the dataclasses' ``__post_init__`` and raise
``ValueError("<field>: ...")`` so the message can be tied to the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from jdelta.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config that does not validate: unknown key, wrong type, out-of-range value, bad file."""


# ----------------------------------------------------------------------------- shared parts


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How completions are drawn. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 disable them.

    n: completions per prompt. max_new_tokens: completion length cap. batch_size: prompts per batch.
    seed: base PRNG seed (each batch folds in its position).
    """

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How a record becomes a prompt: image pixel budget and chat-template switches.

    min_pixels / max_pixels: image resize bounds (None: the model family's defaults; a
    ``max_pixels`` below the default floor lowers the floor with it). system: system message.
    enable_thinking: the chat template's thinking switch (None: the template's default).
    """

    min_pixels: int | None = None
    max_pixels: int | None = None
    system: str | None = None
    enable_thinking: bool | None = None

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels"):
            v = getattr(self, name)
            check(v is None or v >= 1, name, f"must be >= 1, got {v}")
        if self.min_pixels is not None and self.max_pixels is not None:
            check(self.min_pixels <= self.max_pixels, "min_pixels",
                  f"{self.min_pixels} is above max_pixels {self.max_pixels}")


MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape over the named axes ``(data, fsdp, tensor)``; all 1 means one device.

    ``-1`` on one axis takes the devices the others leave.
    """

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = [getattr(self, a) for a in MESH_AXES]
        for a, v in zip(MESH_AXES, sizes, strict=True):
            check(v >= 1 or v == -1, a, f"must be >= 1 (or -1 for the rest), got {v}")
        check(sizes.count(-1) <= 1, "fsdp", "at most one mesh axis may be -1")

    @property
    def is_single_device(self) -> bool:
        return all(getattr(self, a) == 1 for a in MESH_AXES)

    def shape(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}

    def make(self):
        """The ``jax.sharding.Mesh``, or None for one device."""
        if self.is_single_device:
            return None
        from jdelta.sharding import make_mesh

        return make_mesh(self.shape())


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to load: an HF checkpoint directory and jdelta-side settings.

    path: checkpoint directory (``config.json`` + safetensors); a plain string given for the
    section sets it (``teacher: /ckpt`` == ``teacher: {path: /ckpt}``). dtype: parameter and
    compute dtype (None: the checkpoint's). remat_policy / attention_impl: the model config's
    (None: its defaults).
    """

    path: str | None = None
    dtype: str | None = None
    remat_policy: str | None = None
    attention_impl: str | None = None


# ----------------------------------------------------------------------------- checks


def check(ok: bool, field: str, message: str) -> None:
    """``__post_init__`` helper: raise ``ValueError("field: message")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{field}: {message}")


# ----------------------------------------------------------------------------- YAML + overrides


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; ``base: other.yaml`` (relative to the file) is inherited."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path}{where}: invalid YAML ({problem})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    loaded = loaded or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
    base = loaded.pop("base", None)
    if base is not None:
        return merge(read_yaml(path.parent / base), loaded)
    return loaded


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value parsed as YAML)``."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text (the type check decides)
    return key.replace("-", "_"), value


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
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif isinstance(nxt, str):  # the path shorthand (``teacher: /ckpt``) given sub-keys too
            nxt = node[p] = {"path": nxt}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def get_dotted(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    node: Any = cfg
    for p in key.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return default
        node = node[p]
    return node


def load_mapping(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The raw mapping of a YAML file (``None``: empty) with overrides applied; no type checks."""
    cfg = read_yaml(path) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(cfg, key, value)
    return cfg


# ----------------------------------------------------------------------------- typed validation


def load(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
         base: Mapping[str, Any] | None = None) -> T:
    """``cls`` (a config dataclass) from ``base`` <- YAML file <- ``key=value`` overrides, validated."""
    cfg = merge(dict(base or {}), load_mapping(path, overrides))
    return build(cls, cfg, source=str(path) if path else None)


def build(cls: type[T], mapping: Mapping[str, Any], source: str | None = None) -> T:
    """Validate ``mapping`` against dataclass ``cls``; :class:`ConfigError` names the first bad key."""
    from pydantic import TypeAdapter, ValidationError

    _prepare(cls)
    mapping = _section_defaults(cls, _path_shorthand(cls, dict(mapping)))
    _reject_bool_numbers(cls, mapping, "", source)
    try:
        return TypeAdapter(cls).validate_python(mapping)
    except ValidationError as e:
        raise ConfigError(_describe(cls, e.errors()[0], source)) from None


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (calling its factory), or ``dataclasses.MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _section_defaults(cls: type, mapping: dict[str, Any]) -> dict[str, Any]:
    """Fill a section given in part from its field's default *instance* (``sampling: {n: 4}`` keeps a
    stage's ``SamplingConfig(max_new_tokens=16)`` default for the other keys), recursively."""
    hints = typing.get_type_hints(cls)
    out = dict(mapping)
    for f in dataclasses.fields(cls):
        sub = dataclass_of(hints.get(f.name))
        given = out.get(f.name)
        if sub is None or not isinstance(given, Mapping):
            continue
        default = field_default(f)
        base = to_dict(default) if dataclasses.is_dataclass(default) else {}
        out[f.name] = _section_defaults(sub, merge(base, given))
    return out


def _reject_bool_numbers(cls: type, mapping: Mapping[str, Any], prefix: str, source: str | None) -> None:
    """pydantic's lax mode reads ``true`` as the number 1: refuse a boolean for a numeric field."""
    hints = typing.get_type_hints(cls)
    for name, value in mapping.items():
        tp = hints.get(name)
        sub = dataclass_of(tp)
        if sub is not None and isinstance(value, Mapping):
            _reject_bool_numbers(sub, value, f"{prefix}{name}.", source)
        elif isinstance(value, bool) and tp is not None:
            allowed = set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else {tp}
            if allowed & {int, float} and bool not in allowed:
                where = f" (in {source})" if source else ""
                raise ConfigError(f"config key {prefix + name!r}{where}: expected a number, got {value!r}")


def _path_shorthand(cls: type, mapping: dict[str, Any]) -> dict[str, Any]:
    """A plain string given for a section that has a ``path`` field sets that path
    (``teacher: /ckpt/8b`` == ``teacher: {path: /ckpt/8b}``)."""
    hints = typing.get_type_hints(cls)
    out = dict(mapping)
    for f in dataclasses.fields(cls):
        sub = dataclass_of(hints.get(f.name))
        if sub is None or f.name not in out:
            continue
        v = out[f.name]
        if isinstance(v, (str, Path)) and "path" in {g.name for g in dataclasses.fields(sub)}:
            out[f.name] = {"path": str(v)}
        elif isinstance(v, Mapping):
            out[f.name] = _path_shorthand(sub, dict(v))
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able data (tuples become lists)."""
    def plain(x):
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, Mapping):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, Path):
            return str(x)
        return x

    return plain(cfg)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def diff_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two nested mappings, as ``key (old -> new)``."""
    a, b = flatten(old), flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, _MISSING) != b.get(k, _MISSING):
            out.append(f"{k} ({_short(a.get(k, '<unset>'))} -> {_short(b.get(k, '<unset>'))})")
    return out


_MISSING = object()


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def leaf_fields(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Dotted path -> field for every non-dataclass field of a config dataclass tree."""
    out: dict[str, dataclasses.Field] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = dataclass_of(hints.get(f.name))
        if sub is not None:
            out.update(leaf_fields(sub, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def field_type(cls: type, dotted: str) -> Any:
    """The declared type of a dotted field path."""
    node: Any = cls
    for p in dotted.split("."):
        node = typing.get_type_hints(dataclass_of(node) or node)[p]
    return node


def dataclass_of(tp: Any) -> type | None:
    """The dataclass in ``tp`` (``X`` or ``X | None``), else None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        subs = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(subs) == 1:
            return dataclass_of(subs[0])
    return None


def _prepare(cls: type) -> None:
    """Forbid unknown keys in every dataclass of the tree (pydantic reads ``__pydantic_config__``)."""
    from pydantic import ConfigDict

    seen: set[type] = set()

    def walk(tp: Any) -> None:
        dc = dataclass_of(tp)
        if dc is None:
            for a in typing.get_args(tp):
                walk(a)
            return
        if dc in seen:
            return
        seen.add(dc)
        if "__pydantic_config__" not in dc.__dict__:
            dc.__pydantic_config__ = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
        for t in typing.get_type_hints(dc).values():
            walk(t)

    walk(cls)


def _node_class(cls: type, loc: tuple) -> type | None:
    node: Any = cls
    for p in loc:
        dc = dataclass_of(node)
        if dc is None:
            return None
        hints = typing.get_type_hints(dc)
        if p not in hints:
            return None
        node = hints[p]
    return dataclass_of(node)


_TYPE_TAGS = {"int", "float", "str", "bool", "none", "list", "dict", "tuple", "set", "literal", "bytes"}


def _is_union_tag(part: str) -> bool:
    """Whether a pydantic error location part names a union member (``int``, ``dict[str,int]``,
    ``function-before[...]``) rather than a key."""
    return part in _TYPE_TAGS or "[" in part or part.startswith("function-")


def _describe(cls: type, err: Mapping[str, Any], source: str | None) -> str:
    """One line for pydantic error ``err``: the dotted key, what is wrong, and a suggestion."""
    loc = tuple(str(p) for p in err.get("loc", ()) if not isinstance(p, int) and not _is_union_tag(str(p)))
    kind = err.get("type", "")
    where = f" (in {source})" if source else ""
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        parent = _node_class(cls, loc[:-1])
        valid = [f.name for f in dataclasses.fields(parent)] if parent else []
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
        if not close and parent is not None:  # one section deeper? (scorer.temprature -> scorer.sampling.temperature)
            deeper: dict[str, str] = {}
            for path in leaf_fields(parent):
                if "." in path:
                    deeper.setdefault(path.rsplit(".", 1)[-1], path)
            hit = difflib.get_close_matches(loc[-1], list(deeper), n=1, cutoff=0.6)
            close = [deeper[hit[0]]] if hit else []
        hint = f"; did you mean {'.'.join(loc[:-1] + (close[0],))!r}?" if close else ""
        known = f" (known keys{' of ' + '.'.join(loc[:-1]) if loc[:-1] else ''}: {', '.join(valid)})" if valid else ""
        return f"unknown config key {'.'.join(loc)!r}{where}{hint}{known if not close else ''}"
    if kind == "value_error":
        msg = str(err.get("ctx", {}).get("error", err.get("msg", "")))
        m = re.match(r"(\w+): (.*)", msg, re.S)
        parent = _node_class(cls, loc)
        if m and parent is not None and m.group(1) in {f.name for f in dataclasses.fields(parent)}:
            return f"config key {'.'.join(loc + (m.group(1),))!r}{where}: {m.group(2)}"
        return f"config key {'.'.join(loc)!r}{where}: {msg}" if loc else f"config{where}: {msg}"
    if kind == "missing_argument" or kind == "missing":
        return f"config key {'.'.join(loc)!r}{where} is required"
    value = err.get("input")
    msg = err.get("msg", kind)
    return f"config key {'.'.join(loc)!r}{where}: {msg}, got {_short(value)}"


__all__ = [
    "ConfigError",
    "Literal",
    "MeshConfig",
    "ModelSpec",
    "PromptConfig",
    "SamplingConfig",
    "build",
    "check",
    "dataclass_of",
    "diff_keys",
    "field_type",
    "flatten",
    "get_dotted",
    "leaf_fields",
    "load",
    "load_mapping",
    "merge",
    "read_yaml",
    "set_dotted",
    "to_dict",
]
