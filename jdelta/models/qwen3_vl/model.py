"""Qwen3-VL for conditional generation (Flax NNX): vision tower + text decoder + LM head.

Call contract (shared with the sampler, scoring and distillation code)::

    out = model(input_ids, attention_mask=mask, position_ids=None, pixel_values=None,
                image_grid_thw=None, cache=None, return_logits=True, layer_hook=None)
    out.logits [B, S, V] | None, out.hidden_states [B, S, H], out.cache, out.rope_deltas [B]

Prefill: ``cache = model.init_cache(B, max_len)``; call with the whole left-padded prompt.
Decode: ``input_ids [B, 1]``, ``attention_mask`` ones, ``position_ids`` = ``cache.index +
rope_deltas`` on all three axes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jdelta.models.layers import Dense, KeyGen, constrain, mrope_cos_sin
from jdelta.models.qwen3_vl.config import Qwen3VLConfig
from jdelta.models.qwen3_vl.positions import get_rope_index
from jdelta.models.qwen3_vl.text import HIDDEN, LayerHook, Qwen3VLTextModel
from jdelta.models.qwen3_vl.vision import Qwen3VLVisionModel


@struct.dataclass
class KVCache:
    """Static-shape KV cache.

    k, v: ``[num_layers, B, max_len, num_kv_heads, head_dim]``; valid: ``[B, max_len]`` bool
    (slot holds a real token); index: int32 scalar, the next slot to write (same for all rows).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


class Qwen3VLOutput(NamedTuple):
    logits: jax.Array | None  # [B, S, V]
    hidden_states: jax.Array  # [B, S, H], final-norm output
    cache: KVCache | None
    rope_deltas: jax.Array  # [B] int32: position of cache slot i is i + rope_deltas


def _dtype(name):
    return jnp.dtype(name)


def place_visual_features(features: jax.Array, visual_mask: jax.Array) -> jax.Array:
    """Scatter rows of ``features [M, H]`` to the True positions of ``visual_mask [B, S]`` in
    row-major order (jit-friendly: cumsum index + where). Returns ``[B, S, H]``, zeros elsewhere."""
    flat = visual_mask.reshape(-1)
    idx = jnp.clip(jnp.cumsum(flat.astype(jnp.int32)) - 1, 0, features.shape[0] - 1)
    gathered = jnp.take(features, idx, axis=0)
    out = jnp.where(flat[:, None], gathered, jnp.zeros((), features.dtype))
    return out.reshape(*visual_mask.shape, features.shape[-1])


class Qwen3VLForConditionalGeneration(nnx.Module):
    def __init__(self, config: Qwen3VLConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, pdtype = _dtype(config.dtype), _dtype(config.param_dtype)
        rngs = KeyGen(rngs)
        self.visual = Qwen3VLVisionModel(config.vision, dtype=dtype, param_dtype=pdtype,
                                         attention_impl=config.attention_impl,
                                         max_frame_patches=config.vision_max_frame_patches, rngs=rngs)
        self.language_model = Qwen3VLTextModel(config.text, dtype=dtype, param_dtype=pdtype,
                                               attention_impl=config.attention_impl,
                                               remat_policy=config.remat_policy, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Dense(config.text.hidden_size, config.text.vocab_size, names=("embed", "vocab"),
                                 dtype=dtype, param_dtype=pdtype, rngs=rngs)
        # ViCuR's cue-recovery module (jdelta.models.cue_recovery.attach_cue_recovery), or None.
        self.cue_recovery = None

    # ------------------------------------------------------------------ helpers
    def lm_head_weight(self) -> jax.Array:
        """``[H, V]``: the LM head kernel, or the tied embedding transposed."""
        if self.lm_head is None:
            return self.language_model.embed_tokens.get_value().T
        return self.lm_head.kernel.get_value()

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        t = self.config.text
        dtype = jnp.dtype(dtype or self.config.dtype)
        shape = (t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    def get_rope_index(self, input_ids, image_grid_thw, attention_mask):
        return get_rope_index(input_ids, image_grid_thw, attention_mask, self.config)

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array, position_ids: jax.Array | None = None,
                 pixel_values: jax.Array | None = None, image_grid_thw: jax.Array | None = None,
                 cache: KVCache | None = None, return_logits: bool = True,
                 layer_hook: LayerHook | None = None) -> Qwen3VLOutput:
        """Forward pass.

        Args:
          input_ids, attention_mask: ``[B, S]``, left-padded (mask 1 = real token).
          position_ids: ``[3, B, S]`` M-RoPE positions; None computes them on the host with
            ``get_rope_index`` (prefill only, not under jit).
          pixel_values: ``[P, C*T*ps*ps]``, all images of the batch in order, optionally padded
            with extra rows; image_grid_thw: ``[N, 3]``, optionally padded with ``(0, 0, 0)``.
          cache: a ``KVCache``; this call's keys/values go to slots ``index .. index+S-1``.
          return_logits: False skips the LM head (``logits=None``; use ``hidden_states`` with
            ``lm_head_weight()`` for chunked losses).
          layer_hook: ``hook(i, hidden [B,S,H], visual_mask [B,S], attention_mask [B,S]) -> hidden``
            called after decoder layer ``i``. None: the attached cue-recovery module's hook, if
            any, on prefill/training calls (no cache, or more than one token); decode steps
            (one token with a cache) never run it.
        Returns:
          ``Qwen3VLOutput(logits [B,S,V] | None, hidden_states [B,S,H], cache | None, rope_deltas [B])``.
        """
        cfg = self.config
        b, s = input_ids.shape
        if attention_mask.shape != (b, s):
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {(b, s)}")
        attention_mask = attention_mask.astype(bool)
        if position_ids is None:
            if isinstance(input_ids, jax.core.Tracer) or isinstance(attention_mask, jax.core.Tracer):
                raise ValueError("position_ids=None needs concrete input_ids; under jit compute them with "
                                 "get_rope_index(...) and pass them")
            if cache is not None and not isinstance(cache.index, jax.core.Tracer) and int(cache.index) != 0:
                raise ValueError("position_ids=None is only valid for a prefill (cache.index == 0); for decode "
                                 "steps pass position_ids = cache.index + rope_deltas on all three axes")
            grids = None if image_grid_thw is None else np.asarray(image_grid_thw)
            pos, _ = get_rope_index(np.asarray(input_ids), grids, np.asarray(attention_mask), cfg)
            position_ids = jnp.asarray(pos)
        if position_ids.shape != (3, b, s):
            raise ValueError(f"position_ids must be [3, B, S] = {(3, b, s)}, got {position_ids.shape}")

        x = self.language_model.embed(input_ids)
        visual_mask = (input_ids == cfg.image_token_id) & attention_mask
        deepstack = None
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values given without image_grid_thw")
            self._check_image_tokens(visual_mask, pixel_values, image_grid_thw)
            merged, deep = self.visual(pixel_values, jnp.asarray(image_grid_thw))
            x = jnp.where(visual_mask[..., None], place_visual_features(merged.astype(x.dtype), visual_mask), x)
            deepstack = [place_visual_features(d.astype(x.dtype), visual_mask) for d in deep]

        x = constrain(x, HIDDEN)
        t = cfg.text
        cos, sin = mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
        cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)

        if cache is None:
            index = jnp.zeros((), jnp.int32)
            slots_q = jnp.arange(s)
            slots_k = slots_q
            key_valid = attention_mask
            cache_kv = None
        else:
            index = cache.index.astype(jnp.int32)
            key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, index))
            slots_q = index + jnp.arange(s)
            slots_k = jnp.arange(cache.max_len)
            cache_kv = (cache.k, cache.v)
        causal = slots_k[None, :] <= slots_q[:, None]
        diagonal = slots_k[None, :] == slots_q[:, None]  # padded queries attend to themselves: no NaN rows
        mask = (causal[None] & (key_valid[:, None, :] | diagonal[None]))[:, None]  # [B, 1, S, L]

        if layer_hook is None and self.cue_recovery is not None and (cache is None or s > 1):
            layer_hook = self.cue_recovery.layer_hook(input_ids, attention_mask)
        hidden, new_kv = self.language_model(x, cos, sin, mask, cache_kv=cache_kv, index=index,
                                             visual_mask=visual_mask, deepstack=deepstack,
                                             attention_mask=attention_mask, layer_hook=layer_hook)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=new_kv[0], v=new_kv[1], valid=key_valid, index=index + s)
        last_pos = jnp.max(jnp.where(attention_mask, jnp.max(position_ids, axis=0), -1), axis=1)
        rope_deltas = (last_pos + 1 - (index + s)).astype(jnp.int32)
        logits = None
        if return_logits:
            logits = constrain(jnp.dot(hidden, self.lm_head_weight().astype(hidden.dtype)), ("batch", "seq", "vocab"))
        return Qwen3VLOutput(logits=logits, hidden_states=hidden, cache=new_cache, rope_deltas=rope_deltas)

    def _check_image_tokens(self, visual_mask, pixel_values, image_grid_thw) -> None:
        """Host-side consistency check (skipped under jit)."""
        if isinstance(visual_mask, jax.core.Tracer) or isinstance(image_grid_thw, jax.core.Tracer):
            return
        grids = np.asarray(image_grid_thw).reshape(-1, 3)
        patches = int(grids.prod(-1).sum())
        unit = self.config.vision.spatial_merge_size ** 2
        if patches > pixel_values.shape[0]:
            raise ValueError(f"image_grid_thw needs {patches} patch rows but pixel_values has {pixel_values.shape[0]}")
        n_tokens = int(np.asarray(visual_mask).sum())
        if n_tokens != patches // unit:
            raise ValueError(f"input_ids hold {n_tokens} image tokens (id {self.config.image_token_id}) but "
                             f"image_grid_thw gives {patches // unit} merged visual tokens")
