"""A tiny real causal LM (pure JAX, NNX) honouring the Qwen3-VL call and KV-cache contract.

Used to test the generic sampling/scoring machinery independently of the Qwen3-VL port:
RMSNorm, GQA attention with rotary embeddings (from ``position_ids[0]``), SwiGLU MLP,
final norm, untied LM head. Text only (``pixel_values`` are ignored).

Contract (same as ``jdelta.models.qwen3_vl``):
``model(input_ids [B,S], *, attention_mask [B,S], position_ids [3,B,S] | None,
pixel_values=None, image_grid_thw=None, cache=None, return_logits=True)
-> Output(logits [B,S,V] | None, hidden_states [B,S,H], cache, rope_deltas)``;
``init_cache(batch, max_len) -> KVCache(k, v [L,B,T,kvh,hd], valid [B,T], index)``;
a cached call writes slots ``index .. index+S-1`` and attends causally over valid slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct


@struct.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array


class Output(NamedTuple):
    logits: Any
    hidden_states: jax.Array
    cache: Any
    rope_deltas: Any


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    intermediate_size: int = 64
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0


def _param(rngs, shape, names, scale=None):
    scale = scale if scale is not None else shape[0] ** -0.5
    return nnx.Param(jax.random.normal(rngs.params(), shape) * scale, out_sharding=names, eager_sharding=False)


def _rms(x, w, eps=1e-6):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps) * w).astype(x.dtype)


def _rope(x, pos, theta):
    """x [B,S,h,d], pos [B,S] -> rotated (half-split convention)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = pos.astype(jnp.float32)[..., None] * inv  # [B,S,d/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Layer(nnx.Module):
    def __init__(self, c: TinyConfig, rngs: nnx.Rngs):
        self.c = c
        h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.ln1 = nnx.Param(jnp.ones((h,)), out_sharding=("norm",), eager_sharding=False)
        self.ln2 = nnx.Param(jnp.ones((h,)), out_sharding=("norm",), eager_sharding=False)
        self.wq = _param(rngs, (h, q), ("embed", "q_proj"))
        self.wk = _param(rngs, (h, kv), ("embed", "kv_proj"))
        self.wv = _param(rngs, (h, kv), ("embed", "kv_proj"))
        self.wo = _param(rngs, (q, h), ("q_proj", "embed"))
        self.wg = _param(rngs, (h, c.intermediate_size), ("embed", "mlp"))
        self.wu = _param(rngs, (h, c.intermediate_size), ("embed", "mlp"))
        self.wd = _param(rngs, (c.intermediate_size, h), ("mlp", "embed"))

    def __call__(self, x, pos, k_all, v_all, key_ok, write_at):
        """x [B,S,H]; k_all/v_all [B,T,kvh,hd] (this layer's cache or None); key_ok [B,S,T]."""
        c = self.c
        b, s, _ = x.shape
        y = _rms(x, self.ln1[...])
        q = _rope((y @ self.wq[...]).reshape(b, s, c.num_heads, c.head_dim), pos, c.rope_theta)
        k = _rope((y @ self.wk[...]).reshape(b, s, c.num_kv_heads, c.head_dim), pos, c.rope_theta)
        v = (y @ self.wv[...]).reshape(b, s, c.num_kv_heads, c.head_dim)
        if k_all is None:
            k_all, v_all = k, v
        else:
            k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype), (0, write_at, 0, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype), (0, write_at, 0, 0))
        rep = c.num_heads // c.num_kv_heads
        kk = jnp.repeat(k_all, rep, axis=2)
        vv = jnp.repeat(v_all, rep, axis=2)
        att = jnp.einsum("bshd,bthd->bhst", q, kk) * c.head_dim**-0.5
        att = jnp.where(key_ok[:, None], att, -1e30)  # finite: fully masked (pad) rows stay NaN-free
        att = jax.nn.softmax(att.astype(jnp.float32), -1).astype(x.dtype)
        o = jnp.einsum("bhst,bthd->bshd", att, vv).reshape(b, s, -1)
        x = x + o @ self.wo[...]
        y = _rms(x, self.ln2[...])
        x = x + (jax.nn.silu(y @ self.wg[...]) * (y @ self.wu[...])) @ self.wd[...]
        return x, k_all, v_all


class TinyCausalLM(nnx.Module):
    def __init__(self, config: TinyConfig = TinyConfig(), *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.embed = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), 1.0)
        self.layers = nnx.List([Layer(c, rngs) for _ in range(c.num_layers)])
        self.norm = nnx.Param(jnp.ones((c.hidden_size,)), out_sharding=("norm",), eager_sharding=False)
        self.head = _param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"))

    def lm_head_weight(self) -> jax.Array:
        return self.head[...]

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
        dt = dtype or jnp.float32
        return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch, max_len), bool), jnp.int32(0))

    def __call__(self, input_ids, *, attention_mask, position_ids=None, pixel_values=None, image_grid_thw=None,
                 cache=None, return_logits=True):
        b, s = input_ids.shape
        mask = attention_mask.astype(bool)
        if position_ids is None:
            p = jnp.cumsum(attention_mask, -1) - 1
            position_ids = jnp.broadcast_to(jnp.where(mask, p, 1)[None], (3, b, s))
        pos = position_ids[0]
        x = self.embed[...][input_ids]
        if cache is None:
            q_slot = jnp.arange(s)
            key_ok = (q_slot[None, :, None] >= q_slot[None, None, :]) & mask[:, None, :]
            ks = vs = [None] * len(self.layers)
            start = 0
        else:
            start = cache.index
            t = cache.valid.shape[1]
            valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, start))
            q_slot = start + jnp.arange(s)
            key_ok = (q_slot[None, :, None] >= jnp.arange(t)[None, None, :]) & valid[:, None, :]
            ks, vs = cache.k, cache.v
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, pos, ks[i], vs[i], key_ok, start)
            new_k.append(k)
            new_v.append(v)
        hidden = _rms(x, self.norm[...])
        if cache is not None:
            cache = KVCache(jnp.stack(new_k), jnp.stack(new_v), valid, cache.index + s)
        logits = hidden @ self.head[...] if return_logits else None
        return Output(logits, hidden, cache, None)


def tiny_rope_index(input_ids, image_grid_thw, attention_mask):
    """Text-only M-RoPE positions (NumPy): real tokens 0, 1, ...; padding 1; ``rope_deltas`` =
    (number of real tokens) - S, so decode step positions continue the real sequence."""
    mask = np.asarray(attention_mask)
    pos = np.cumsum(mask, -1) - 1
    pos = np.where(mask > 0, pos, 1)
    deltas = mask.sum(-1) - mask.shape[1]
    return np.broadcast_to(pos[None], (3,) + mask.shape).astype(np.int32), deltas.astype(np.int32)


def make_model(seed: int = 0, **kw) -> TinyCausalLM:
    return TinyCausalLM(TinyConfig(**kw), rngs=nnx.Rngs(seed))


def left_padded_batch(rows: list[list[int]]) -> dict[str, np.ndarray]:
    s = max(len(r) for r in rows)
    ids = np.zeros((len(rows), s), np.int32)
    mask = np.zeros((len(rows), s), np.int32)
    for i, r in enumerate(rows):
        ids[i, s - len(r):] = r
        mask[i, s - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _forward_fn(graphdef, state, ids, mask, pos):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask, position_ids=pos).logits


_jit_forward = jax.jit(_forward_fn, static_argnums=0)


def full_logits(model: TinyCausalLM, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Uncached forward over a whole (left-padded) sequence -> logits [B,S,V] (jitted)."""
    pos, _ = tiny_rope_index(ids, None, mask)
    graphdef, state = nnx.split(model)
    return np.asarray(_jit_forward(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))
