"""Gemma 3 for conditional generation (Flax NNX): SigLIP tower + projector + Gemma 3 decoder + LM head.

Call contract (the one the sampler, scoring and distillation code use for Qwen3-VL)::

    out = model(input_ids, attention_mask=mask, position_ids=None, pixel_values=None,
                image_grid_thw=None, cache=None, return_logits=True, layer_hook=None)
    out.logits [B, S, V] | None, out.hidden_states [B, S, H], out.cache, out.rope_deltas [B]

Positions are 1D: a row's real tokens are numbered ``0, 1, ...`` (``cumsum(mask) - 1``, as
``transformers``' ``generate``), so left padding does not change a row's result.
``position_ids`` may be ``[B, S]`` or ``[3, B, S]`` (three equal rows, the Qwen3-VL shape the
sampler passes; row 0 is used); None derives them from the masks, also under jit and in decode
(``count(cache.valid) + cumsum(mask) - 1``). ``image_grid_thw`` is accepted and ignored
(Gemma 3 images have one fixed size).

Attention masks follow transformers: causal, plus bidirectional among the tokens of one image
(a run of consecutive image tokens; transformers' ``token_type_ids``); local layers add the
sliding window ``slot_q - slot_k < sliding_window`` on top of that. Bidirectional blocks are
formed among the tokens of one call, so an image must sit within one prefill call.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jdelta.models.gemma3.config import Gemma3Config
from jdelta.models.gemma3.text import HIDDEN, Gemma3TextModel, LayerHook
from jdelta.models.gemma3.vision import Gemma3MultiModalProjector, SiglipVisionModel
from jdelta.models.layers import Dense, KeyGen, constrain


@struct.dataclass
class KVCache:
    """Static-shape KV cache, the layout of the jdelta cache contract.

    k, v: ``[num_layers, B, max_len, num_kv_heads, head_dim]`` (local layers too: their window is
    a mask); valid: ``[B, max_len]`` bool; index: int32 scalar, the next slot to write.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


class Gemma3Output(NamedTuple):
    logits: jax.Array | None  # [B, S, V]
    hidden_states: jax.Array  # [B, S, H], final-norm output
    cache: KVCache | None
    rope_deltas: jax.Array  # [B] int32: position of cache slot i is i + rope_deltas


def text_positions(attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """Host-side positions for the sampler's hook: ``attention_mask [B, S]`` ->
    ``(position_ids [3, B, S]`` (three equal rows), ``rope_deltas [B])`` with
    ``rope_deltas = real tokens - S`` (decode position of slot ``i`` = ``i + rope_deltas``)."""
    mask = np.asarray(attention_mask).astype(bool)
    pos = np.where(mask, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    deltas = (mask.sum(1) - mask.shape[1]).astype(np.int32)
    return np.broadcast_to(pos[None], (3, *pos.shape)).copy(), deltas


def get_rope_index(input_ids, image_grid_thw, attention_mask, config: Gemma3Config | None = None):
    """The family position hook (Qwen3-VL's signature): :func:`text_positions` of the mask; the
    ids, image grids and config do not change Gemma 3's 1D positions."""
    del input_ids, image_grid_thw, config
    return text_positions(attention_mask)


def image_blocks(visual_mask: jax.Array) -> jax.Array:
    """``[B, S]`` bool -> ``[B, S]`` int32: the index of the image-token run each image token
    belongs to (``-1`` for other tokens); transformers' ``get_block_sequence_ids_for_mask``."""
    prev = jnp.pad(visual_mask, ((0, 0), (1, 0)))[:, :-1]
    starts = visual_mask & ~prev
    return jnp.where(visual_mask, jnp.cumsum(starts.astype(jnp.int32), axis=1) - 1, -1)


def attention_masks(key_valid: jax.Array, slots_q: jax.Array, slots_k: jax.Array, blocks_q: jax.Array,
                    blocks_k: jax.Array, sliding_window: int) -> tuple[jax.Array, jax.Array]:
    """``(local, global)`` bool masks ``[B, 1, T, L]``.

    Args:
      key_valid: ``[B, L]`` (slot holds a real token); slots_q: ``[T]``, slots_k: ``[L]`` slot
        indices; blocks_q ``[B, T]``, blocks_k ``[B, L]``: image-block ids (-1: none).
    Global: ``(causal | same image block) & key valid``; local adds ``slot_k > slot_q - window``.
    A query always sees its own slot (padded queries: no all-masked rows).
    """
    causal = (slots_k[None, :] <= slots_q[:, None])[None]
    same = (blocks_q[:, :, None] == blocks_k[:, None, :]) & (blocks_q[:, :, None] >= 0)
    diagonal = (slots_k[None, :] == slots_q[:, None])[None]
    full = ((causal | same) & key_valid[:, None, :]) | diagonal
    window = (slots_k[None, :] > slots_q[:, None] - sliding_window)[None]
    return (full & window)[:, None], full[:, None]


class Gemma3ForConditionalGeneration(nnx.Module):
    def __init__(self, config: Gemma3Config, *, rngs: nnx.Rngs):
        self.config = config
        dtype, pdtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        rngs = KeyGen(rngs)
        self.vision_tower = SiglipVisionModel(config.vision, dtype=dtype, param_dtype=pdtype,
                                              attention_impl=config.attention_impl, rngs=rngs)
        self.multi_modal_projector = Gemma3MultiModalProjector(config, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.language_model = Gemma3TextModel(config.text, dtype=dtype, param_dtype=pdtype,
                                              attention_impl=config.attention_impl,
                                              remat_policy=config.remat_policy, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Dense(config.text.hidden_size, config.text.vocab_size, names=("embed", "vocab"),
                                 dtype=dtype, param_dtype=pdtype, rngs=rngs)

    # ------------------------------------------------------------------ helpers
    def lm_head_weight(self) -> jax.Array:
        """``[H, V]``: the LM head kernel, or the tied embedding transposed."""
        if self.lm_head is None:
            return self.language_model.embed_tokens.get_value().T
        return self.lm_head.kernel.get_value()

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """``hidden [..., H]`` -> logits ``[..., V]``, soft-capped when ``final_logit_softcapping`` is set."""
        logits = jnp.dot(hidden, self.lm_head_weight().astype(hidden.dtype))
        cap = self.config.text.final_logit_softcapping
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        t = self.config.text
        dtype = jnp.dtype(dtype or self.config.dtype)
        shape = (t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    def get_rope_index(self, input_ids, image_grid_thw, attention_mask):
        """The sampler's position hook: ``(position_ids [3, B, S], rope_deltas [B])`` (NumPy)."""
        return get_rope_index(input_ids, image_grid_thw, attention_mask)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """``[N, C, S, S]`` -> ``[N, mm_tokens_per_image, H]``."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array, position_ids: jax.Array | None = None,
                 pixel_values: jax.Array | None = None, image_grid_thw: jax.Array | None = None,
                 cache: KVCache | None = None, return_logits: bool = True,
                 layer_hook: LayerHook | None = None) -> Gemma3Output:
        """Forward pass.

        Args:
          input_ids, attention_mask: ``[B, S]``, left-padded (mask 1 = real token).
          position_ids: ``[B, S]`` or ``[3, B, S]``; None: from the masks (see the module doc).
          pixel_values: ``[N, C, S_img, S_img]``, the batch's images in order of their image-token
            runs; extra (padding) images at the end are ignored.
          image_grid_thw: ignored (accepted for the shared call contract).
          cache: a ``KVCache``; this call's keys/values go to slots ``index .. index+S-1``.
          return_logits: False skips the LM head (use ``hidden_states`` with ``lm_head_weight()``).
          layer_hook: ``hook(i, hidden, visual_mask, attention_mask) -> hidden`` after layer ``i``.
        Returns:
          ``Gemma3Output(logits [B,S,V] | None, hidden_states [B,S,H], cache | None, rope_deltas [B])``.
        """
        del image_grid_thw
        cfg = self.config
        b, s = input_ids.shape
        if attention_mask.shape != (b, s):
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {(b, s)}")
        attention_mask = attention_mask.astype(bool)
        if cache is None:
            index = jnp.zeros((), jnp.int32)
            key_valid = attention_mask
            slots_k = jnp.arange(s)
            seen = jnp.zeros((b,), jnp.int32)
        else:
            index = cache.index.astype(jnp.int32)
            seen = jnp.sum(cache.valid, axis=1, dtype=jnp.int32)
            key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, index))
            slots_k = jnp.arange(cache.max_len)
        slots_q = index + jnp.arange(s)
        if position_ids is None:
            positions = jnp.where(attention_mask, seen[:, None] + jnp.cumsum(attention_mask, axis=1) - 1, 0)
        else:
            positions = position_ids[0] if position_ids.ndim == 3 else position_ids
            if positions.shape != (b, s):
                raise ValueError(f"position_ids must be [B, S] or [3, B, S] with B, S = {(b, s)}, "
                                 f"got {position_ids.shape}")

        visual_mask = (input_ids == cfg.image_token_id) & attention_mask
        ids = input_ids
        if cfg.image_token_id >= cfg.text.vocab_size:  # transformers: an out-of-vocabulary image id reads row 0
            ids = jnp.where(input_ids == cfg.image_token_id, 0, input_ids)
        x = self.language_model.embed(ids)
        if pixel_values is not None:
            self._check_image_tokens(visual_mask, pixel_values)
            feats = self.image_features(pixel_values).astype(x.dtype)
            x = jnp.where(visual_mask[..., None], _place(feats.reshape(-1, feats.shape[-1]), visual_mask), x)
        x = constrain(x, HIDDEN)

        blocks_q = image_blocks(visual_mask)
        if cache is None:
            blocks_k = blocks_q
        else:
            blocks_k = jax.lax.dynamic_update_slice(jnp.full(cache.valid.shape, -1, jnp.int32), blocks_q, (0, index))
        masks = attention_masks(key_valid, slots_q, slots_k, blocks_q, blocks_k, cfg.text.sliding_window)
        cache_kv = None if cache is None else (cache.k, cache.v)
        hidden, new_kv = self.language_model(x, positions, masks, cache_kv=cache_kv, index=index,
                                             visual_mask=visual_mask, attention_mask=attention_mask,
                                             layer_hook=layer_hook)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=new_kv[0], v=new_kv[1], valid=key_valid, index=index + s)
        last_pos = jnp.max(jnp.where(attention_mask, positions, -1), axis=1)
        rope_deltas = (last_pos + 1 - (index + s)).astype(jnp.int32)
        logits = None
        if return_logits:
            logits = constrain(self.logits_from_hidden(hidden), ("batch", "seq", "vocab"))
        return Gemma3Output(logits=logits, hidden_states=hidden, cache=new_cache, rope_deltas=rope_deltas)

    def _check_image_tokens(self, visual_mask, pixel_values) -> None:
        """Host-side consistency check (skipped under jit)."""
        if isinstance(visual_mask, jax.core.Tracer):
            return
        n_tokens, per = int(np.asarray(visual_mask).sum()), self.config.mm_tokens_per_image
        if n_tokens % per or n_tokens // per > pixel_values.shape[0]:
            raise ValueError(f"input_ids hold {n_tokens} image tokens (id {self.config.image_token_id}); expected "
                             f"{per} per image for at most {pixel_values.shape[0]} images in pixel_values")


def _place(features: jax.Array, visual_mask: jax.Array) -> jax.Array:
    """Rows of ``features [M, H]`` to the True positions of ``visual_mask [B, S]`` in row-major
    order (cumsum index + gather); ``[B, S, H]``, zeros elsewhere."""
    flat = visual_mask.reshape(-1)
    idx = jnp.clip(jnp.cumsum(flat.astype(jnp.int32)) - 1, 0, features.shape[0] - 1)
    out = jnp.where(flat[:, None], jnp.take(features, idx, axis=0), jnp.zeros((), features.dtype))
    return out.reshape(*visual_mask.shape, features.shape[-1])
