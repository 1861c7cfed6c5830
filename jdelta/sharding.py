"""Meshes and logical-axis sharding.

Every parameter and activation in jdelta is annotated with *logical* axis names
(``embed``, ``mlp``, ``heads``, ``kv_heads``, ``vocab``, ``batch``, ...). This module
owns the single rules table that maps those names onto the physical mesh axes
``data``, ``fsdp`` and ``tensor``. Nothing else in the code names a mesh axis.

A logical dimension whose size is not divisible by the mesh axes it maps to is
replicated instead (e.g. 2 KV heads on ``tensor=4``), so tiny test configs and
odd real shapes shard without special cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("vision_mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("q_proj", "tensor"),  # flattened heads * head_dim
    ("kv_proj", "tensor"),  # flattened kv_heads * head_dim
    ("vocab", "tensor"),
    ("head_dim", None),
    ("seq", None),
    ("cache_seq", None),
    ("patch", None),
    ("norm", None),
    ("layers", None),
)

Rules = Sequence[tuple[str, Any]]


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a ``(data, fsdp, tensor)`` mesh.

    Args:
      shape: sizes per axis, e.g. ``{"fsdp": 4, "tensor": 2}``; missing axes are 1,
        and one axis may be ``-1`` to take the remaining devices. ``None`` puts all
        devices on ``fsdp``.
      devices: devices to use (default: all of ``jax.devices()``).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"fsdp": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        if math.prod(sizes) > len(devices):
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, have {len(devices)}")
        devices = devices[: math.prod(sizes)]
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def _rules_dict(rules: Rules | None) -> dict[str, Any]:
    return dict(DEFAULT_RULES if rules is None else rules)


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> PartitionSpec:
    """Map logical axis names to a ``PartitionSpec``.

    With ``shape`` and ``mesh`` given, a dimension not divisible by its mesh axes'
    total size is replicated, and a mesh axis is never used twice in one spec.
    """
    if not names:
        return PartitionSpec()
    table = _rules_dict(rules)
    used: set[str] = set()
    out: list[Any] = []
    for i, name in enumerate(names):
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules table")
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*out)


def _names_of(var: nnx.Variable) -> tuple[str | None, ...] | None:
    meta = var.get_metadata()
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
    """``NamedSharding`` for every variable of an (abstract or concrete) NNX state."""

    def one(var):
        names = _names_of(var) if isinstance(var, nnx.Variable) else None
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        spec = logical_to_spec(names, getattr(value, "shape", None), mesh, rules)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def activation_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int] | None = None,
                        rules: Rules | None = None) -> NamedSharding:
    """``NamedSharding`` for an activation/input with the given logical axes."""
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> nnx.Module:
    """Place every variable of ``model`` on its sharding (in place); returns the model."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model
