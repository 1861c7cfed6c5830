"""Qwen3-VL text decoder (Flax NNX): Qwen3 layers with q/k RMSNorm, GQA, interleaved M-RoPE.

The layer loop is a plain Python loop over an ``nnx.List`` so per-layer additions
(DeepStack features, a ``layer_hook`` such as ViCuR's cue-recovery module) sit between
layers without rewriting the model.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jdelta.models.layers import Dense, GatedMLP, RMSNorm, apply_rotary, constrain, dot_product_attention
from jdelta.models.qwen3_vl.config import Qwen3VLTextConfig

# layer_hook(layer_idx, hidden [B,S,H], visual_mask [B,S] bool, attention_mask [B,S] bool) -> hidden
LayerHook = Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]

HIDDEN = ("batch", "seq", "embed")  # logical axes of [B, S, H] activations

REMAT_POLICIES = {
    "full": None,
    "save_nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class TextAttention(nnx.Module):
    def __init__(self, cfg: Qwen3VLTextConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.attention_impl = attention_impl
        kw = dict(use_bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = Dense(h, q, names=("embed", "q_proj"), **kw)
        self.k_proj = Dense(h, kv, names=("embed", "kv_proj"), **kw)
        self.v_proj = Dense(h, kv, names=("embed", "kv_proj"), **kw)
        self.o_proj = Dense(q, h, names=("q_proj", "embed"), **kw)
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 kv_cache: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None):
        """Self-attention.

        Args:
          x: ``[B, S, H]``; cos, sin: ``[B, S, head_dim]``.
          mask: ``[B, 1, S, L]`` bool, ``L`` = S without cache, else the cache length.
          kv_cache: ``(k, v, layer)``: the whole stacked cache ``[num_layers, B, L, K, D]`` and
            this layer's (static) index, or None; index: first slot of this call.
        Returns:
          ``out [B, S, H]`` and the updated stacked ``(k, v)`` (None without a cache). This call's
          keys/values are written into the stacked buffers first and attention reads the layer's
          leading-axis slice of them: a contiguous view, so decoding does not copy a layer's cache.
        """
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        new_cache = None
        if kv_cache is None:
            keys, values = k, v
        else:
            ks, vs, layer = kv_cache
            ks = jax.lax.dynamic_update_slice(ks, k[None].astype(ks.dtype), (layer, 0, index, 0, 0))
            vs = jax.lax.dynamic_update_slice(vs, v[None].astype(vs.dtype), (layer, 0, index, 0, 0))
            keys, values = ks[layer].astype(q.dtype), vs[layer].astype(q.dtype)
            new_cache = (ks, vs)
        out = dot_product_attention(q, keys, values, mask, implementation=self.attention_impl)
        return self.o_proj(out.reshape(b, s, -1)), new_cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3VLTextConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        self.self_attn = TextAttention(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                       rngs=rngs)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype,
                                                param_dtype=param_dtype)

    def __call__(self, x, cos, sin, mask, kv_cache=None, index=None):
        attn, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, index)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_kv


def _layer_no_cache(layer: DecoderLayer, x, cos, sin, mask):
    return layer(x, cos, sin, mask)[0]


class Qwen3VLTextModel(nnx.Module):
    def __init__(self, cfg: Qwen3VLTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "xla", remat_policy: str = "none", rngs: nnx.Rngs):
        self.cfg, self.dtype, self.remat_policy = cfg, dtype, remat_policy
        self.embed_tokens = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype) * 0.02,
            out_sharding=("vocab", "embed"), eager_sharding=False)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype,
                                             attention_impl=attention_impl, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """``[B, S]`` int -> ``[B, S, H]`` in the compute dtype."""
        return jnp.take(self.embed_tokens.get_value(), input_ids, axis=0).astype(self.dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, *,
                 cache_kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None,
                 visual_mask: jax.Array | None = None, deepstack: list[jax.Array] | None = None,
                 attention_mask: jax.Array | None = None, layer_hook: LayerHook | None = None):
        """Run the decoder stack and the final norm.

        Args:
          x: input embeddings ``[B, S, H]``; cos, sin: ``[B, S, head_dim]``; mask: ``[B, 1, S, L]``.
          cache_kv: ``(k, v) [num_layers, B, L, K, D]`` or None; index: int32 first slot.
          visual_mask: ``[B, S]`` bool, image-token positions.
          deepstack: per DeepStack level, ``[B, S, H]`` features already placed at the visual
            positions (zeros elsewhere); added after decoder layer ``i`` for level ``i``.
          layer_hook: ``hook(i, hidden, visual_mask, attention_mask) -> hidden``, called after
            layer ``i`` (after its DeepStack addition).
        Returns:
          ``hidden [B, S, H]`` (final-norm output) and the updated ``(k, v)`` or None.
        """
        use_remat = self.remat_policy != "none" and cache_kv is None
        run = nnx.remat(_layer_no_cache, policy=REMAT_POLICIES.get(self.remat_policy)) if use_remat else None
        ks, vs = cache_kv if cache_kv is not None else (None, None)
        for i, layer in enumerate(self.layers):
            if cache_kv is not None:
                x, (ks, vs) = layer(x, cos, sin, mask, (ks, vs, i), index)
            elif run is not None:
                x = run(layer, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask)[0]
            if deepstack is not None and i < len(deepstack):
                x = x + deepstack[i].astype(x.dtype)
            if layer_hook is not None:
                x = layer_hook(i, x, visual_mask, attention_mask)
            x = constrain(x, HIDDEN)
        return constrain(self.norm(x), HIDDEN), (None if cache_kv is None else (ks, vs))
