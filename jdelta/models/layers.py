"""Shared transformer blocks (Flax NNX): dense, norms, rotary embeddings, attention, MLP.

Every parameter carries logical axis names (see ``jdelta.sharding``). Parameters live in
``param_dtype``; matmuls run in the compute ``dtype``; norms and softmax in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdelta.sharding import logical_to_spec

Names = tuple[str | None, ...]


class KeyGen:
    """Parameter-init keys from one base key (``fold_in`` with a Python counter).

    Drop-in for ``nnx.Rngs`` inside model constructors: ``keys.params()`` returns a fresh
    key. Unlike ``nnx.Rngs`` it does not update an NNX counter variable per draw, which makes
    ``nnx.eval_shape`` of a 64-layer model seconds faster.
    """

    def __init__(self, rngs: nnx.Rngs | jax.Array):
        self.base = rngs.params() if isinstance(rngs, nnx.Rngs) else rngs
        self.count = 0

    def params(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.base, self.count)


def constrain(x: jax.Array, names: Names) -> jax.Array:
    """Sharding constraint by logical axis names, active only under ``jax.set_mesh(mesh)``
    (a no-op otherwise, e.g. single-device runs)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def _param(value: jax.Array, names: Names) -> nnx.Param:
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class Dense(nnx.Module):
    """``y = x @ kernel (+ bias)``; ``kernel [in, out]`` (the transpose of torch's ``Linear.weight``)."""

    def __init__(self, in_features: int, out_features: int, *, names: tuple[str | None, str | None],
                 use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = _param(jax.random.normal(rngs.params(), (in_features, out_features), param_dtype) * 0.02, names)
        self.bias = _param(jnp.zeros((out_features,), param_dtype), (names[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel.get_value().astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias.get_value().astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """Qwen RMSNorm: ``weight * (x / sqrt(mean(x^2) + eps))``, normalised in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps, self.dtype = eps, dtype
        self.weight = _param(jnp.ones((dim,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight.get_value().astype(self.dtype) * xf.astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias (torch ``nn.LayerNorm``), computed in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps, self.dtype = eps, dtype
        self.weight = _param(jnp.ones((dim,), param_dtype), ("norm",))
        self.bias = _param(jnp.zeros((dim,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)
        return y.astype(self.dtype)


class GatedMLP(nnx.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense(hidden, intermediate, names=("embed", "mlp"), **kw)
        self.up_proj = Dense(hidden, intermediate, names=("embed", "mlp"), **kw)
        self.down_proj = Dense(intermediate, hidden, names=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- rotary

def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [..., S, N, D]`` by ``cos/sin [..., S, D]`` (broadcast over heads), in float32."""
    xf = x.astype(jnp.float32)
    cos, sin = cos[..., None, :].astype(jnp.float32), sin[..., None, :].astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def inv_frequencies(dim: int, theta: float) -> np.ndarray:
    """``1 / theta^(2i/dim)`` for ``i < dim/2``, float32 as torch computes it."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (1.0 / np.power(np.float32(theta), exponent, dtype=np.float32)).astype(np.float32)


def mrope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float,
                  mrope_section: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Interleaved multimodal RoPE (Qwen3-VL).

    Args:
      position_ids: ``[3, B, S]`` temporal / height / width positions.
    Returns:
      ``cos, sin [B, S, head_dim]`` float32. Frequency ``i`` of the ``head_dim/2`` takes its
      position from axis H when ``i % 3 == 1`` and ``i < 3*section[1]``, from W when
      ``i % 3 == 2`` and ``i < 3*section[2]``, and from T otherwise.
    """
    inv = jnp.asarray(inv_frequencies(head_dim, theta))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv  # [3, B, S, D/2]
    axis = np.zeros(head_dim // 2, np.int32)
    axis[1: mrope_section[1] * 3: 3] = 1
    axis[2: mrope_section[2] * 3: 3] = 2
    f = jnp.where(axis == 0, freqs[0], jnp.where(axis == 1, freqs[1], freqs[2]))
    emb = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(rows: jax.Array, cols: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2D axial rotary of the vision tower: ``rows, cols [P]`` -> ``cos, sin [P, head_dim]``.

    Frequencies ``1/theta^(2i/(head_dim/2))`` are applied to the row, then the column, and
    the ``[row | col]`` half is repeated, as HF's ``Qwen3VLVisionRotaryEmbedding``.
    """
    inv = jnp.asarray(inv_frequencies(head_dim // 2, theta))
    fh = rows.astype(jnp.float32)[:, None] * inv
    fw = cols.astype(jnp.float32)[:, None] * inv
    emb = jnp.concatenate([fh, fw, fh, fw], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


# ----------------------------------------------------------------------------- attention

def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
                          implementation: str = "xla", scale: float | None = None) -> jax.Array:
    """Softmax attention with GQA.

    Args:
      q: ``[B, T, N, D]``; k, v: ``[B, S, K, D]`` with ``N % K == 0``.
      mask: bool, broadcastable to ``[B, N, T, S]`` (True = may attend), or None.
      implementation: "xla", "cudnn", or "auto" (let JAX choose).
    Returns:
      ``[B, T, N, D]``.
    """
    impl = None if implementation == "auto" else implementation
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
