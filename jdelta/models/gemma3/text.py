"""Gemma 3 text decoder (Flax NNX).

Per layer: Gemma RMSNorm ``(1 + w)`` before and after attention and before and after the MLP,
QK-norm, GQA, rotary embeddings whose base (and linear scaling) depends on the layer type,
and a sliding-window mask on the local layers (``layer_types``). Attention logits are scaled
by ``query_pre_attn_scalar^-1/2`` (Gemma 3 has no attention soft-capping: QK-norm replaced
Gemma 2's, and transformers ignores ``attn_logit_softcapping``; so does jdelta). The KV cache is one stacked
``[num_layers, B, L, K, D]`` buffer (local layers keep every slot; the window is a mask).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdelta.models.gemma3.config import Gemma3TextConfig, RopeSpec
from jdelta.models.layers import Dense, apply_rotary, constrain, dot_product_attention, inv_frequencies

# layer_hook(layer_idx, hidden [B,S,H], visual_mask [B,S] bool, attention_mask [B,S] bool) -> hidden
LayerHook = Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]

HIDDEN = ("batch", "seq", "embed")  # logical axes of [B, S, H] activations

REMAT_POLICIES = {
    "full": None,
    "save_nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class GemmaRMSNorm(nnx.Module):
    """Gemma RMSNorm: ``(x / sqrt(mean(x^2) + eps)) * (1 + weight)`` in float32, then cast
    (transformers multiplies before the cast, unlike Llama/Qwen). ``weight`` starts at 0."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps, self.dtype = eps, dtype
        self.weight = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * (1.0 + self.weight.get_value().astype(jnp.float32))).astype(self.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, rope: RopeSpec) -> tuple[jax.Array, jax.Array]:
    """``positions [B, S]`` -> ``cos, sin [B, S, head_dim]`` float32 (HF's ``cat(freqs, freqs)``)."""
    inv = jnp.asarray(inv_frequencies(head_dim, rope.theta) / np.float32(rope.factor))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class TextAttention(nnx.Module):
    def __init__(self, cfg: Gemma3TextConfig, *, dtype, param_dtype, attention_impl: str, rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.attention_impl = attention_impl
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        kw = dict(use_bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = Dense(h, q, names=("embed", "q_proj"), **kw)
        self.k_proj = Dense(h, kv, names=("embed", "kv_proj"), **kw)
        self.v_proj = Dense(h, kv, names=("embed", "kv_proj"), **kw)
        self.o_proj = Dense(q, h, names=("q_proj", "embed"), **kw)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 kv_cache: tuple | None = None, index: jax.Array | None = None):
        """Self-attention.

        Args:
          x: ``[B, S, H]``; cos, sin: ``[B, S, head_dim]`` (this layer type's rotary).
          mask: ``[B, 1, S, L]`` bool (this layer type's mask: sliding window or global).
          kv_cache: ``(k, v, layer)``: the stacked cache ``[num_layers, B, L, K, D]`` and this
            layer's static index, or None; index: first slot of this call.
        Returns:
          ``out [B, S, H]`` and the updated stacked ``(k, v)`` (None without a cache).
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
        out = dot_product_attention(q, keys, values, mask, implementation=self.attention_impl, scale=self.scale)
        return self.o_proj(out.reshape(b, s, -1)), new_cache


class GemmaMLP(nnx.Module):
    """``down(gelu_tanh(gate(x)) * up(x))``."""

    def __init__(self, cfg: Gemma3TextConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.approximate = cfg.hidden_activation == "gelu_pytorch_tanh"
        self.gate_proj = Dense(cfg.hidden_size, cfg.intermediate_size, names=("embed", "mlp"), **kw)
        self.up_proj = Dense(cfg.hidden_size, cfg.intermediate_size, names=("embed", "mlp"), **kw)
        self.down_proj = Dense(cfg.intermediate_size, cfg.hidden_size, names=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=self.approximate) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Gemma3TextConfig, *, dtype, param_dtype, attention_impl: str, rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = TextAttention(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                       rngs=rngs)
        self.mlp = GemmaMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm)

    def __call__(self, x, cos, sin, mask, kv_cache=None, index=None):
        attn, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, index)
        x = x + self.post_attention_layernorm(attn)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x, new_kv


def _layer_no_cache(layer: DecoderLayer, x, cos, sin, mask):
    return layer(x, cos, sin, mask)[0]


class Gemma3TextModel(nnx.Module):
    def __init__(self, cfg: Gemma3TextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "xla", remat_policy: str = "none", rngs):
        self.cfg, self.dtype, self.param_dtype, self.remat_policy = cfg, dtype, param_dtype, remat_policy
        self.embed_tokens = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype) * 0.02,
            out_sharding=("vocab", "embed"), eager_sharding=False)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype,
                                             attention_impl=attention_impl, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = GemmaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """``[B, S]`` int -> ``[B, S, H]``: the embedding times ``sqrt(hidden)``, the scale rounded to
        the parameter dtype first as transformers does (in bf16 ``sqrt(2560)`` becomes 50.5)."""
        scale = jnp.asarray(self.cfg.hidden_size ** 0.5, self.param_dtype)
        table = self.embed_tokens.get_value()
        return (jnp.take(table, input_ids, axis=0) * scale.astype(table.dtype)).astype(self.dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, masks: tuple[jax.Array, jax.Array], *,
                 cache_kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None,
                 visual_mask: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 layer_hook: LayerHook | None = None):
        """Run the decoder stack and the final norm.

        Args:
          x: input embeddings ``[B, S, H]``; positions: ``[B, S]`` int rotary positions.
          masks: ``(local, global)`` bool ``[B, 1, S, L]`` for sliding and full layers.
          cache_kv: ``(k, v) [num_layers, B, L, K, D]`` or None; index: int32 first slot.
          visual_mask, attention_mask: ``[B, S]`` bool, passed to ``layer_hook``.
          layer_hook: ``hook(i, hidden, visual_mask, attention_mask) -> hidden`` after layer ``i``.
        Returns:
          ``hidden [B, S, H]`` (final-norm output) and the updated ``(k, v)`` or None.
        """
        cfg = self.cfg
        rot = {True: rope_cos_sin(positions, cfg.head_dim, cfg.rope_local),
               False: rope_cos_sin(positions, cfg.head_dim, cfg.rope_global)}
        rot = {key: (c.astype(x.dtype), s.astype(x.dtype)) for key, (c, s) in rot.items()}
        local_mask, global_mask = masks
        use_remat = self.remat_policy != "none" and cache_kv is None
        run = nnx.remat(_layer_no_cache, policy=REMAT_POLICIES.get(self.remat_policy)) if use_remat else None
        ks, vs = cache_kv if cache_kv is not None else (None, None)
        for i, (layer, sliding) in enumerate(zip(self.layers, cfg.is_sliding, strict=True)):
            cos, sin = rot[sliding]
            mask = local_mask if sliding else global_mask
            if cache_kv is not None:
                x, (ks, vs) = layer(x, cos, sin, mask, (ks, vs, i), index)
            elif run is not None:
                x = run(layer, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask)[0]
            if layer_hook is not None:
                x = layer_hook(i, x, visual_mask, attention_mask)
            x = constrain(x, HIDDEN)
        return constrain(self.norm(x), HIDDEN), (None if cache_kv is None else (ks, vs))
