"""Splitting the sequence axis into fixed-size chunks (for ``lax.map`` over chunks) and back.

Used wherever per-position work over a large vocabulary is done a chunk at a time so that
``[B, T, V]`` never exists at once (chunked log-probs, chunked token divergences).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """``[B, T, ...] -> [n_chunks, B, chunk_size, ...]`` (T zero-padded up to a multiple of ``chunk_size``)."""
    b, t = x.shape[:2]
    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, n, chunk_size) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def from_chunks(y: jax.Array, t: int) -> jax.Array:
    """``[n_chunks, B, chunk_size, ...] -> [B, T, ...]`` (the padding positions dropped)."""
    n, b, c = y.shape[:3]
    return jnp.moveaxis(y, 0, 1).reshape((b, n * c) + y.shape[3:])[:, :t]


__all__ = ["from_chunks", "to_chunks"]
