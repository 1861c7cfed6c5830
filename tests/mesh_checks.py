"""Checks that a computation on a mesh really ran sharded (a test that ignored the mesh would fail them).

Equality with a single-device run proves the numbers; these helpers prove the layout: parameters,
caches and outputs laid over every device of the mesh with the expected ``PartitionSpec``, each
device holding only its slice.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


class Recorder:
    """Wraps a jitted function and keeps the shardings of every output it returned (read at the
    call, before donation can delete the buffers). Other attributes (``_cache_size``) pass through."""

    def __init__(self, fn):
        self.fn = fn
        self.shardings: list[Any] = []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.shardings.append(jax.tree.map(lambda x: x.sharding, out))
        return out

    def __getattr__(self, name):
        return getattr(self.fn, name)


def watch_sampler(sampler) -> tuple[Recorder, Recorder]:
    """Record the output shardings of a :class:`jdelta.sampling.Sampler`'s prefill and decode."""
    sampler._prefill = Recorder(sampler._prefill)
    sampler._decode = Recorder(sampler._decode)
    return sampler._prefill, sampler._decode


def assert_layout(what: str, sharding, shape: tuple[int, ...], mesh: Mesh, spec: P) -> None:
    """``sharding`` (of an array of ``shape``) is ``spec`` over all of ``mesh``'s devices, and a
    sharded spec really splits the array (each device holds less than the whole)."""
    want = NamedSharding(mesh, spec)
    assert sharding.is_equivalent_to(want, len(shape)), f"{what}: {sharding} is not {spec}"
    assert len(sharding.device_set) == mesh.size, f"{what}: on {len(sharding.device_set)} of {mesh.size} devices"
    if any(s is not None for s in spec):
        assert sharding.shard_shape(shape) != tuple(shape), f"{what}: {spec} but every device holds all of it"


def assert_array_layout(what: str, x: jax.Array, mesh: Mesh, spec: P) -> None:
    assert_layout(what, x.sharding, x.shape, mesh, spec)
