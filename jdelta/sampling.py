"""Batched KV-cache generation: prefill once, n samples per prompt, one jitted decode loop.

The flow of :func:`generate` (and :class:`Sampler`, which keeps the compiled functions):

1. **Bucket** (host): the left-padded prompt batch is padded further to a bucketed
   sequence length, and the image patches / grid rows to bucketed counts, so a stream
   of prompts of different sizes compiles a bounded number of programs.
2. **Positions** (host, NumPy): M-RoPE ``position_ids [3, B, S]`` and ``rope_deltas [B]``
   from the model family's ``get_rope_index``.
3. **Prefill** (one jit): the whole prompt (vision tower once per image) into a cache of
   ``S + max_new_tokens`` slots; the last position's logits come from the final hidden
   state and ``lm_head_weight()`` only (no ``[B, S, V]``). The cache, logits and rope
   deltas are then repeated ``n`` times along the batch (``jnp.repeat``): the n samples
   of a prompt share one prefill.
4. **Decode** (one jit, cache donated): a ``lax.while_loop`` samples a token per
   row, records it with its log-probs, and feeds it back; it stops when every row has
   emitted a stop id or ``max_new_tokens`` tokens were produced. With the default
   :class:`DecodeOptions` the loop runs in segments whose steps attend over a prefix of the
   cache just longer than its filled part (:mod:`jdelta.decode_attention`), and top-p finds
   the nucleus among preselected candidates instead of sorting the vocabulary
   (:mod:`jdelta.top_p`); both give the same samples as the plain forms.

Randomness: row ``r`` (``= prompt * n + sample``) draws step ``t`` from
``fold_in(fold_in(rng, r), t)``, so a call is reproducible from its seed, rows are
independent, and a row's draws do not depend on the batch it sits in.

Sampling filters are pure functions on ``[..., V]`` logits (:func:`apply_temperature`,
:func:`apply_top_k`, :func:`apply_top_p`); ``temperature == 0`` means greedy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jdelta.buckets import bucket
from jdelta.decode_attention import kv_segments, read_prefix, write_prefix
from jdelta.distributed import host_array
from jdelta.models.family import logit_softcap, logits_from_hidden, softcap
from jdelta.sharding import Rules, activation_sharding, state_shardings
from jdelta.top_p import apply_top_p as top_p_filter
from jdelta.top_p import top_k_values

NEG_INF = -jnp.inf

# Default padded shapes for direct calls (short text prompts start at 32): lengths and patch counts
# round up with :func:`jdelta.buckets.bucket`. Callers fed by the prompt pipeline pass the
# pipeline's buckets instead (``Sampler(..., seq_buckets=cfg.seq_buckets, ...)``), so a batch is
# padded once.
DEFAULT_SEQ_BUCKETS: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_PATCH_BUCKETS: tuple[int, ...] = (256, 1024, 4096, 16384)
DEFAULT_IMAGE_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


# --------------------------------------------------------------------------------------------
# Parameters and results
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample.

    Attributes:
      temperature: ``0`` = greedy (argmax); otherwise logits are divided by it.
      top_k: keep the ``k`` largest logits (``0`` = off). Ties at the k-th value are kept.
      top_p: nucleus: keep the smallest set of most-likely tokens whose probability
        reaches ``top_p`` (``1.0`` = off). Applied after temperature and top-k.
      max_new_tokens: tokens generated per sample at most.
      stop_token_ids: a row finishes when it emits any of these (the stop token is kept
        in ``tokens`` and counts in ``lengths``).
      n: samples per prompt.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if a stop id or ``top_k`` does not fit a vocabulary of ``vocab_size``."""
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"unknown stop token id(s) {bad}: the vocabulary has {vocab_size} entries")
        if self.top_k > vocab_size:
            raise ValueError(f"top_k={self.top_k} exceeds the vocabulary size {vocab_size}")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How the decode loop computes; none of it changes what is sampled (same tokens and
    log-probs up to float rounding), only speed, compile time and memory.

    Attributes:
      attention: ``"bounded"``: the decode loop runs in segments whose steps attend over a
        static prefix of the cache just longer than the filled part
        (:mod:`jdelta.decode_attention`); ``"dense"``: every step attends over all cache slots.
      kv_segment_min: the shortest prefix of the bounded decode (the others double from it).
      kv_segment_max_fraction: the longest prefix, as a fraction of the cache (bounds the extra
        memory of a segment's prefix copy: ``cache * (1 + fraction)``).
      top_p_candidates: top-p finds the nucleus among this many preselected logits and falls
        back to the full-vocabulary sort when a row's nucleus does not fit (``0``: always sort).
      top_p_group: > 0: preselect per group of this many logits first (see :mod:`jdelta.top_p`).
      head_copy: form each step's logits with a contiguous ``[H, V]`` copy of the LM head made
        once per decode call, instead of the model's own head (the tied embedding ``[V, H]``
        transposed): XLA:CPU's dot with the transposed table is ~4x slower than with the copy
        (``benchmarks/RESULTS.md``). Costs one head's memory. ``None``: on the CPU backend, for
        tied heads only (an untied head is a contiguous ``[H, V]`` kernel already).
    """

    attention: Literal["dense", "bounded"] = "bounded"
    kv_segment_min: int = 256
    kv_segment_max_fraction: float = 0.5
    top_p_candidates: int = 1024
    top_p_group: int = 0
    head_copy: bool | None = None

    def __post_init__(self):
        if self.attention not in ("dense", "bounded"):
            raise ValueError(f"DecodeOptions.attention must be 'dense' or 'bounded', got {self.attention!r}")
        if self.kv_segment_min < 1:
            raise ValueError(f"DecodeOptions.kv_segment_min must be >= 1, got {self.kv_segment_min}")
        if not 0.0 < self.kv_segment_max_fraction <= 1.0:
            raise ValueError(f"DecodeOptions.kv_segment_max_fraction must be in (0, 1], got "
                             f"{self.kv_segment_max_fraction}")
        if self.top_p_candidates < 0 or self.top_p_group < 0:
            raise ValueError("DecodeOptions.top_p_candidates and top_p_group must be >= 0")

    def segments(self, first_slot: int, max_len: int) -> tuple[int, ...]:
        """The cache-prefix lengths the decode loop runs with (``(max_len,)`` = dense)."""
        if self.attention == "dense":
            return (max_len,)
        return kv_segments(first_slot, max_len, min_len=self.kv_segment_min,
                           max_fraction=self.kv_segment_max_fraction)


class GenerationResult(NamedTuple):
    """Output of :func:`generate`; rows are ordered ``prompt * n + sample``.

    Attributes:
      tokens: ``[B*n, max_new_tokens] int32``; after a row's stop token, ``pad_id``.
      logprobs: ``[B*n, max_new_tokens] float32``: log-prob of the chosen token under the
        *sampling* distribution (temperature, top-k, top-p applied; ``0`` for greedy, a
        point mass); ``0`` after the end.
      raw_logprobs: ``[B*n, max_new_tokens] float32``: log-prob of the chosen token under the
        raw model at temperature 1 (what scoring returns); ``0`` after the end.
      lengths: ``[B*n] int32`` generated tokens per row, the stop token included.
      finish_reason: ``B*n`` strings, ``"stop"`` or ``"length"``.
      prompt_index, sample_index: ``[B*n] int32`` which prompt / which of its n samples.
      stats: timings and shapes of this call (``prefill_s``, ``decode_s``, ``decode_steps``,
        ``compiles`` ...).
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    raw_logprobs: np.ndarray
    lengths: np.ndarray
    finish_reason: list[str]
    prompt_index: np.ndarray
    sample_index: np.ndarray
    stats: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Pure sampling filters
# --------------------------------------------------------------------------------------------


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    """``logits [..., V] / temperature`` (float32). ``temperature`` must be > 0."""
    return logits.astype(jnp.float32) / jnp.float32(temperature)


def apply_top_k(logits: jax.Array, k: int) -> jax.Array:
    """Mask (``-inf``) every entry of ``logits [..., V]`` below the k-th largest; ``k = 0`` = off.

    Entries tied with the k-th value are kept, so slightly more than ``k`` may survive.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = top_k_values(logits, k)[..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def apply_top_p(logits: jax.Array, p: float, *, candidates: int = 0, group: int = 0) -> jax.Array:
    """Nucleus filter on ``logits [..., V]``: keep the smallest most-likely set with mass >= ``p``.

    A token is kept when the probability mass of the tokens strictly more likely than it
    is below ``p``; the most likely token is always kept. ``p >= 1`` = off.
    ``candidates > 0``: find the nucleus among that many preselected logits instead of sorting
    the whole vocabulary (``group``: per-group preselection first), falling back to the full
    sort when a row's nucleus does not fit; the result is the same (:mod:`jdelta.top_p`).
    """
    return top_p_filter(logits, p, candidates_k=candidates, group=group)


def filter_logits(logits: jax.Array, params: SamplingParams, *, temperature: Any = None,
                  top_p: Any = None, options: DecodeOptions | None = None) -> jax.Array:
    """Temperature, then top-k, then top-p: the sampling distribution's logits ``[..., V]``.

    For greedy (``temperature == 0``) returns the float32 logits unchanged. ``temperature``
    and ``top_p`` override ``params``' values and may be traced scalars (so one compiled
    program serves every temperature); whether top-p runs at all is decided by
    ``params.top_p < 1``. ``options``: how top-p is computed (default: the full sort).
    """
    x = logits.astype(jnp.float32)
    if params.greedy:
        return x
    x = apply_temperature(x, params.temperature if temperature is None else temperature)
    x = apply_top_k(x, params.top_k)
    if params.top_p >= 1.0:
        return x
    o = options or DecodeOptions(top_p_candidates=0)
    return apply_top_p(x, params.top_p if top_p is None else top_p, candidates=o.top_p_candidates,
                       group=o.top_p_group)


def first_argmax(logits: jax.Array) -> jax.Array:
    """``jnp.argmax(logits, -1)`` (first index of the maximum; a NaN counts as the maximum) as
    ``[...] int32``, by a max and a min-index reduction: XLA:CPU's fused (value, index) reduction
    takes ~4x as long on ``[16, 151936]``."""
    nan = jnp.isnan(logits)  # XLA:CPU's max may drop NaNs (fast min/max): handle them explicitly
    m = jnp.max(jnp.where(nan, -jnp.inf, logits), axis=-1, keepdims=True)
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, logits == m)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, iota, logits.shape[-1]), axis=-1)


def sample_step(keys: jax.Array, logits: jax.Array, params: SamplingParams, *, temperature: Any = None,
                top_p: Any = None, options: DecodeOptions | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw one token per row.

    Args:
      keys: ``[B]`` PRNG keys (typed or raw ``[B, 2]``), one per row.
      logits: ``[B, V]`` raw model logits.
      params: sampling parameters (``temperature``/``top_p`` may be overridden by traced
        values, see :func:`filter_logits`).
      options: how top-p is computed (see :class:`DecodeOptions`; the result does not depend on it).
    Returns:
      ``(tokens [B] int32, sampling_logprob [B], raw_logprob [B])`` where the first log-prob
      is under the filtered sampling distribution (``0`` for greedy) and the second under
      ``log_softmax(logits)`` (temperature 1, unfiltered).
    """
    logits = logits.astype(jnp.float32)
    raw_logp = jax.nn.log_softmax(logits, axis=-1)
    if params.greedy:
        tokens = first_argmax(logits)
        samp_lp = jnp.zeros(tokens.shape, jnp.float32)
    else:
        filtered = filter_logits(logits, params, temperature=temperature, top_p=top_p, options=options)
        tokens = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        samp_logp = jax.nn.log_softmax(filtered, axis=-1)
        samp_lp = jnp.take_along_axis(samp_logp, tokens[:, None], axis=-1)[:, 0]
    raw_lp = jnp.take_along_axis(raw_logp, tokens[:, None], axis=-1)[:, 0]
    return tokens, samp_lp, raw_lp


def row_keys(rng: jax.Array, num_rows: int) -> jax.Array:
    """``[num_rows]`` per-row keys: ``fold_in(rng, row)``."""
    return jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(num_rows, dtype=jnp.uint32))


# --------------------------------------------------------------------------------------------
# Cache helpers (the model's KVCache: k, v [L, B, T, kvh, hd]; valid [B, T]; index scalar)
# --------------------------------------------------------------------------------------------


def _replace(obj: Any, **changes: Any) -> Any:
    if hasattr(obj, "replace"):
        return obj.replace(**changes)
    if hasattr(obj, "_replace"):
        return obj._replace(**changes)
    return dataclasses.replace(obj, **changes)


def repeat_cache(cache: Any, n: int) -> Any:
    """Repeat every row of a KV cache ``n`` times along the batch (row ``b`` -> rows ``b*n .. b*n+n-1``)."""
    if n == 1:
        return cache
    return _replace(
        cache,
        k=jnp.repeat(cache.k, n, axis=1),
        v=jnp.repeat(cache.v, n, axis=1),
        valid=jnp.repeat(cache.valid, n, axis=0),
    )


def _constrain_cache(cache: Any, mesh: Mesh | None, rules: Rules | None) -> Any:
    if mesh is None:
        return cache
    kv_names = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")

    def c(x, names):
        return jax.lax.with_sharding_constraint(x, activation_sharding(mesh, names, x.shape, rules))

    return _replace(
        cache,
        k=c(cache.k, kv_names),
        v=c(cache.v, kv_names),
        valid=c(cache.valid, ("batch", "cache_seq")),
    )


# --------------------------------------------------------------------------------------------
# Bucketing (host side)
# --------------------------------------------------------------------------------------------


def pad_batch(
    batch: Mapping[str, Any],
    *,
    seq_len: int,
    num_patches: int | None = None,
    num_images: int | None = None,
    num_rows: int | None = None,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Left-pad ``input_ids``/``attention_mask [B, S]`` to ``seq_len``; zero-pad ``pixel_values``
    rows (``[P, ...]``, any family's layout: Qwen3-VL patch rows, Gemma 3 whole images) to
    ``num_patches`` and ``image_grid_thw`` rows (``(0,0,0)``) to ``num_images``; add all-padding
    rows up to ``num_rows`` (their outputs are to be dropped)."""
    ids = np.asarray(batch["input_ids"], np.int32)
    mask = np.asarray(batch["attention_mask"], np.int32)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, S]; got {ids.shape} and {mask.shape}")
    b, s = ids.shape
    if s > seq_len:
        raise ValueError(f"prompt length {s} exceeds the padded length {seq_len}")
    if num_rows is not None and num_rows > b:
        ids = np.concatenate([ids, np.full((num_rows - b, s), pad_id, np.int32)])
        mask = np.concatenate([mask, np.zeros((num_rows - b, s), np.int32)])
        b = num_rows
    out = {
        "input_ids": np.concatenate([np.full((b, seq_len - s), pad_id, np.int32), ids], axis=1),
        "attention_mask": np.concatenate([np.zeros((b, seq_len - s), np.int32), mask], axis=1),
    }
    pv = batch.get("pixel_values")
    if pv is not None:
        pv = np.asarray(pv, np.float32)
        grid = np.asarray(batch["image_grid_thw"], np.int32).reshape(-1, 3)
        p = pv.shape[0] if num_patches is None else num_patches
        m = grid.shape[0] if num_images is None else num_images
        if pv.shape[0] > p or grid.shape[0] > m:
            raise ValueError(f"{pv.shape[0]} patches / {grid.shape[0]} images exceed the bucket {p} / {m}")
        out["pixel_values"] = np.concatenate([pv, np.zeros((p - pv.shape[0], *pv.shape[1:]), np.float32)])
        out["image_grid_thw"] = np.concatenate([grid, np.zeros((m - grid.shape[0], 3), np.int32)])
    return out


def default_rope_index(model: nnx.Module) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """The model's position hook (its ``get_rope_index``, else its family's with its config)."""
    if hasattr(model, "get_rope_index"):
        return model.get_rope_index
    from jdelta.models.family import family_of_model

    positions, config = family_of_model(model).positions, model.config

    def fn(input_ids, image_grid_thw, attention_mask):
        return positions(input_ids, image_grid_thw, attention_mask, config)

    return fn


def pixel_row_buckets(pixel_values: Any, patch_buckets: Sequence[int], image_buckets: Sequence[int]) -> Sequence[int]:
    """The buckets of a batch's pixel rows: ``patch_buckets`` for patch rows ``[P, D]`` (Qwen3-VL),
    ``image_buckets`` for whole images ``[P, C, H, W]`` (Gemma 3)."""
    return patch_buckets if np.ndim(pixel_values) == 2 else image_buckets


def _config_attr(model: nnx.Module, name: str) -> int | None:
    """``model.config.text.<name>`` (or ``.text_config``) or ``model.config.<name>``, if present."""
    cfg = getattr(model, "config", None)
    for c in (getattr(cfg, "text", None), getattr(cfg, "text_config", None), cfg):
        v = getattr(c, name, None)
        if v is not None:
            return int(v)
    return None


def config_vocab_size(model: nnx.Module) -> int | None:
    """The vocabulary size of the model's config (the tokenizer's real ids), or None if it has none."""
    return _config_attr(model, "vocab_size")


# --------------------------------------------------------------------------------------------
# The jitted core: prefill (+ repeat) and the decode loop
# --------------------------------------------------------------------------------------------


def prefill(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    inputs: Mapping[str, jax.Array],
    *,
    n: int,
    max_len: int,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> tuple[Any, jax.Array, jax.Array]:
    """Run the prompt through the model into a fresh cache, then share it across ``n`` samples.

    Args:
      inputs: ``input_ids, attention_mask [B, S]``, ``position_ids [3, B, S]``,
        ``rope_deltas [B]``, optional ``pixel_values [P, D]`` and ``image_grid_thw [N, 3]``.
      n: samples per prompt; max_len: cache slots (``S + max_new_tokens``).
    Returns:
      ``(cache with B*n rows and index S, last-position logits [B*n, V] float32, rope_deltas [B*n])``.
    """
    model = nnx.merge(graphdef, state)
    ids = inputs["input_ids"]
    cache = _constrain_cache(model.init_cache(ids.shape[0], max_len), mesh, rules)
    out = model(
        ids,
        attention_mask=inputs["attention_mask"],
        position_ids=inputs["position_ids"],
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"),
        cache=cache,
        return_logits=False,
    )
    # Left padding: the last column is every row's last real token; the family's logits (soft-capped
    # where configured), as the decode steps' ``return_logits=True`` calls form them.
    logits = logits_from_hidden(model, out.hidden_states[:, -1, :], jnp.float32)
    cache = _constrain_cache(repeat_cache(out.cache, n), mesh, rules)
    return cache, jnp.repeat(logits, n, axis=0), jnp.repeat(inputs["rope_deltas"], n, axis=0)


def decode_head(model: nnx.Module, options: DecodeOptions) -> jax.Array | None:
    """The LM head a decode loop forms its logits with (inside the jitted loop, once per call):
    a contiguous ``[H, V]`` copy when ``options.head_copy`` asks for one (``None``: on the CPU
    backend, for a tied head, the transposed embedding table; an untied head is already a
    contiguous ``[H, V]`` kernel), else None (the model's own head)."""
    copy = options.head_copy
    if copy is None:
        copy = jax.default_backend() == "cpu" and getattr(model, "lm_head", None) is None
    # A real [H, V] copy (the barrier keeps XLA from folding the transpose back into the dot).
    return jax.lax.optimization_barrier(jnp.copy(model.lm_head_weight())) if copy else None


def last_logits(model: nnx.Module, out: Any, head: jax.Array | None) -> jax.Array:
    """``[B, V]`` logits of the last position of a model call made with ``return_logits=head is None``:
    the model's own (``head`` None) or formed as :func:`~jdelta.models.family.logits_from_hidden`
    does, with ``head [H, V]``."""
    if head is None:
        return out.logits[:, -1, :]
    hidden = out.hidden_states[:, -1, :]
    return softcap(jnp.dot(hidden, head.astype(hidden.dtype)), logit_softcap(model))


class DecodeOutput(NamedTuple):
    tokens: jax.Array  # [R, max_new] int32
    logprobs: jax.Array  # [R, max_new] float32 (sampling distribution)
    raw_logprobs: jax.Array  # [R, max_new] float32 (raw model, T = 1)
    lengths: jax.Array  # [R] int32
    stopped: jax.Array  # [R] bool: emitted a stop id
    steps: jax.Array  # scalar int32: loop iterations run
    cache: Any  # the final cache (returned so the donated input buffers are reused in place)


def decode(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache: Any,
    first_logits: jax.Array,
    rope_deltas: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    stop_ids: jax.Array,
    live_rows: jax.Array,
    *,
    params: SamplingParams,
    pad_id: int = 0,
    options: DecodeOptions = DecodeOptions(),
    first_slot: int | None = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> DecodeOutput:
    """The decode loop: ``lax.while_loop`` over steps, all rows at once (one loop per KV segment).

    Args:
      cache: the prefilled cache, ``R`` rows, ``index`` = prompt length; needs
        ``max_new_tokens`` free slots.
      first_logits: ``[R, V]`` logits for the first new token.
      rope_deltas: ``[R]`` M-RoPE offsets; the decode position of a step is
        ``cache.index + rope_deltas`` on all three M-RoPE axes.
      rng: one key for the call; row ``r`` step ``t`` uses ``fold_in(fold_in(rng, r), t)``.
      temperature, top_p: scalars (traced, so changing them does not recompile).
      stop_ids: ``[K] int32`` stop token ids (``-1`` entries never match).
      live_rows: ``[R] bool``; False for batch-padding rows (finished from the start).
      params: static structure: greedy or not, ``top_k``, top-p on/off, ``max_new_tokens``.
      options: static; ``options.attention == "bounded"`` splits the loop into segments over
        cache prefixes (:func:`jdelta.decode_attention.kv_segments` from ``first_slot``); a
        segment's loop runs while the write slot is inside its prefix, so any ``first_slot`` gives
        the same result (it only picks the segments). ``options.top_p_*``: how top-p is computed.
      first_slot: static hint, the cache index at the call (default ``max_len - max_new_tokens``,
        what the :class:`Sampler` passes: the padded prompt length).
    Iteration ``t`` samples token ``t`` from the current logits, records it, and (unless
    every row has finished) feeds it through the model for the next logits.
    """
    model = nnx.merge(graphdef, state)
    rows = first_logits.shape[0]
    max_new = params.max_new_tokens
    keys = row_keys(rng, rows)
    head = decode_head(model, options)
    batch_sharding = (lambda x, names: x) if mesh is None else (
        lambda x, names: jax.lax.with_sharding_constraint(x, activation_sharding(mesh, names, x.shape, rules)))

    def cond(carry):
        t, _, _, _, _, _, _, finished = carry
        return (t < max_new) & ~jnp.all(finished)

    def body(carry):
        t, cache, logits, tokens, lps, raw_lps, lengths, finished = carry
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
        tok, lp, raw_lp = sample_step(step_keys, logits, params, temperature=temperature, top_p=top_p,
                                      options=options)
        live = ~finished
        tok = jnp.where(live, tok, pad_id)
        tokens = tokens.at[:, t].set(tok)
        lps = lps.at[:, t].set(jnp.where(live, lp, 0.0))
        raw_lps = raw_lps.at[:, t].set(jnp.where(live, raw_lp, 0.0))
        lengths = lengths + live.astype(jnp.int32)
        finished = finished | (live & jnp.isin(tok, stop_ids))
        pos = (cache.index + rope_deltas)[:, None].astype(jnp.int32)  # [R, 1]
        out = model(
            tok[:, None],
            attention_mask=jnp.ones((rows, 1), jnp.int32),
            position_ids=jnp.broadcast_to(pos[None], (3, rows, 1)),
            cache=cache,
            return_logits=head is None,
        )
        step_logits = last_logits(model, out, head)
        new_logits = batch_sharding(step_logits.astype(jnp.float32), ("batch", "vocab"))
        new_cache = _constrain_cache(out.cache, mesh, rules)
        return t + 1, new_cache, new_logits, tokens, lps, raw_lps, lengths, finished

    init = (
        jnp.int32(0),
        cache,
        first_logits.astype(jnp.float32),
        jnp.full((rows, max_new), pad_id, jnp.int32),
        jnp.zeros((rows, max_new), jnp.float32),
        jnp.zeros((rows, max_new), jnp.float32),
        jnp.zeros((rows,), jnp.int32),
        ~live_rows,
    )
    max_len = cache.k.shape[2]
    if max_len < max_new:
        raise ValueError(f"the cache has {max_len} slots, fewer than max_new_tokens={max_new}")
    carry = init
    for length in options.segments(max_len - max_new if first_slot is None else first_slot, max_len):
        if length == max_len:
            carry = jax.lax.while_loop(cond, body, carry)
            continue
        full = carry[1]
        prefix = _constrain_cache(read_prefix(full, length), mesh, rules)

        def segment_cond(c, length=length):
            return cond(c) & (c[1].index < length)  # the step's write slot is inside the prefix

        carry = jax.lax.while_loop(segment_cond, body, (carry[0], prefix, *carry[2:]))
        carry = (carry[0], _constrain_cache(write_prefix(full, carry[1]), mesh, rules), *carry[2:])
    t, cache, _, tokens, lps, raw_lps, lengths, finished = carry
    return DecodeOutput(tokens, lps, raw_lps, lengths, finished, t, cache)


# --------------------------------------------------------------------------------------------
# The host-side driver
# --------------------------------------------------------------------------------------------


class Sampler:
    """Keeps the jitted prefill/decode for one model structure and counts compilations.

    Args:
      model: an NNX module with the family call contract (:mod:`jdelta.models.family`:
        ``init_cache``, ``lm_head_weight``, ``__call__(..., cache=, return_logits=)``).
      mesh: optional mesh; parameters are sharded by ``jdelta.sharding``'s rules, inputs
        and the cache along ``batch`` (``data``/``fsdp``), heads over ``tensor``.
      rope_index_fn: ``(input_ids [B,S], image_grid_thw [N,3] | None, attention_mask [B,S])
        -> (position_ids [3,B,S], rope_deltas [B])`` in NumPy; default: the model's
        ``get_rope_index`` (its family's position hook).
      seq_buckets / patch_buckets / image_buckets: padded shapes (see :func:`jdelta.buckets.bucket`);
        pass the prompt pipeline's when its batches are the input (then nothing is padded again).
      batch_buckets: if given, the prompt batch is padded with all-padding rows up to a
        bucket too (e.g. a last partial batch); their outputs are dropped.
      pad_id: token written after a row's end and used for left padding.
      decode_options: how the decode loop computes (length-bounded attention, top-p
        preselection; :class:`DecodeOptions`); the samples do not depend on it.

    The model's current parameters are read at every call (``nnx.split``), so a model being
    trained can be sampled from between steps without recompiling.
    """

    def __init__(
        self,
        model: nnx.Module,
        *,
        mesh: Mesh | None = None,
        rules: Rules | None = None,
        rope_index_fn: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None,
        seq_buckets: Sequence[int] = DEFAULT_SEQ_BUCKETS,
        patch_buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS,
        image_buckets: Sequence[int] = DEFAULT_IMAGE_BUCKETS,
        batch_buckets: Sequence[int] | None = None,
        pad_id: int = 0,
        decode_options: DecodeOptions | None = None,
    ):
        self.model = model
        self.decode_options = decode_options or DecodeOptions()
        self.mesh = mesh
        self.rules = rules
        self.rope_index_fn = rope_index_fn or default_rope_index(model)
        self.seq_buckets = tuple(seq_buckets)
        self.patch_buckets = tuple(patch_buckets)
        self.image_buckets = tuple(image_buckets)
        self.batch_buckets = None if batch_buckets is None else tuple(batch_buckets)
        self.pad_id = int(pad_id)
        self.vocab_size = config_vocab_size(model)
        self._shapes_seen: set[tuple] = set()
        self.compile_seconds = 0.0
        self._prefill = jax.jit(
            functools.partial(prefill, mesh=mesh, rules=rules),
            static_argnames=("graphdef", "n", "max_len"),
        )
        self._decode = jax.jit(
            functools.partial(decode, mesh=mesh, rules=rules),
            static_argnames=("graphdef", "params", "pad_id", "options", "first_slot"),
            donate_argnames=("cache",),
        )

    # -- introspection -------------------------------------------------------------------
    @property
    def compile_count(self) -> int:
        """Programs compiled so far (prefill + decode), from jax's own jit caches."""
        return int(self._prefill._cache_size() + self._decode._cache_size())

    # -- helpers ---------------------------------------------------------------------------
    def _state(self) -> tuple[nnx.GraphDef, nnx.State]:
        graphdef, state = nnx.split(self.model)
        if self.mesh is not None:
            state = jax.device_put(state, state_shardings(state, self.mesh, self.rules))
        return graphdef, state

    def _put(self, x: np.ndarray, names: Sequence[str | None]) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, activation_sharding(self.mesh, names, x.shape, self.rules))

    def prepare(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Bucket-pad a prompt batch and add ``position_ids``/``rope_deltas`` (host, NumPy)."""
        ids = np.asarray(batch["input_ids"])
        s = bucket(ids.shape[1], self.seq_buckets)
        pv = batch.get("pixel_values")
        kwargs: dict[str, Any] = {"seq_len": s, "pad_id": self.pad_id}
        if self.batch_buckets is not None:
            kwargs["num_rows"] = bucket(ids.shape[0], self.batch_buckets)
        if pv is not None:
            kwargs["num_patches"] = bucket(np.asarray(pv).shape[0],
                                           pixel_row_buckets(pv, self.patch_buckets, self.image_buckets))
            kwargs["num_images"] = bucket(np.asarray(batch["image_grid_thw"]).reshape(-1, 3).shape[0],
                                          self.image_buckets)
        out = pad_batch(batch, **kwargs)
        pos, deltas = self.rope_index_fn(out["input_ids"], out.get("image_grid_thw"), out["attention_mask"])
        out["position_ids"] = np.asarray(pos, np.int32)
        out["rope_deltas"] = np.asarray(deltas, np.int32).reshape(-1)
        return out

    def _device_inputs(self, host: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        names = {
            "input_ids": ("batch", "seq"),
            "attention_mask": ("batch", "seq"),
            "position_ids": (None, "batch", "seq"),
            "rope_deltas": ("batch",),
            "pixel_values": ("patch",),
            "image_grid_thw": (None, None),
        }
        return {k: self._put(v, names[k]) for k, v in host.items() if k in names}

    # -- the call --------------------------------------------------------------------------
    def generate(self, batch: Mapping[str, Any], params: SamplingParams, *, rng: jax.Array | int) -> GenerationResult:
        """Sample ``params.n`` completions for every prompt of a left-padded ``batch``.

        ``batch``: ``input_ids, attention_mask [B, S]`` (left-padded; every row needs at
        least one real token), optional ``pixel_values [P, D]``, ``image_grid_thw [N, 3]``.
        """
        if isinstance(rng, int):
            rng = jax.random.key(rng)
        if self.vocab_size is not None:
            params.check_vocab(self.vocab_size)
        mask = np.asarray(batch["attention_mask"])
        empty = np.flatnonzero(mask.sum(axis=1) == 0)
        if empty.size:
            raise ValueError(f"prompt row(s) {empty.tolist()} have no real tokens (attention_mask all zero)")
        host = self.prepare(batch)
        b, s = host["input_ids"].shape
        max_len = s + params.max_new_tokens
        cache_limit = _config_attr(self.model, "max_position_embeddings")
        if cache_limit is not None and max_len > cache_limit:
            raise ValueError(
                f"padded prompt length {s} + max_new_tokens {params.max_new_tokens} = {max_len} exceeds the "
                f"model's max_position_embeddings {cache_limit}")
        graphdef, state = self._state()
        inputs = self._device_inputs(host)
        before = self.compile_count

        t0 = time.perf_counter()
        cache, logits, deltas = self._prefill(graphdef, state, inputs, n=params.n, max_len=max_len)
        jax.block_until_ready(logits)
        t1 = time.perf_counter()
        # Only the program's structure is static; temperature, top-p and stop ids are traced.
        structure = dataclasses.replace(
            params, temperature=0.0 if params.greedy else 1.0, top_p=1.0 if params.top_p >= 1.0 else 0.5,
            stop_token_ids=(), n=1)
        stops = np.full((bucket(max(1, len(params.stop_token_ids)), (4, 16, 64)),), -1, np.int32)
        stops[: len(params.stop_token_ids)] = params.stop_token_ids
        keep = mask.shape[0] * params.n  # the outputs of batch-padding rows are dropped
        live = self._put(np.arange(b * params.n) < keep, ("batch",))
        out = self._decode(graphdef, state, cache, logits, deltas, rng, jnp.float32(params.temperature or 1.0),
                           jnp.float32(params.top_p), jnp.asarray(stops), live, params=structure, pad_id=self.pad_id,
                           options=self.decode_options)
        out = jax.tree.map(host_array, out)  # a global array spanning several processes is gathered
        tokens = np.asarray(out.tokens)[:keep]
        t2 = time.perf_counter()
        compiled = self.compile_count - before
        if compiled:
            self.compile_seconds += (t2 - t0)  # includes one run; the benchmark separates them

        lengths = np.asarray(out.lengths)[:keep]
        stopped = np.asarray(out.stopped)[:keep]
        b_real = mask.shape[0]
        return GenerationResult(
            tokens=tokens,
            logprobs=np.asarray(out.logprobs)[:keep],
            raw_logprobs=np.asarray(out.raw_logprobs)[:keep],
            lengths=lengths,
            finish_reason=["stop" if x else "length" for x in stopped],
            prompt_index=np.repeat(np.arange(b_real, dtype=np.int32), params.n),
            sample_index=np.tile(np.arange(params.n, dtype=np.int32), b_real),
            stats={
                "prefill_s": t1 - t0,
                "decode_s": t2 - t1,
                "decode_steps": int(out.steps),
                "rows": keep,
                "padded_rows": b * params.n,
                "padded_prompt_len": s,
                "prompt_tokens": int(mask.sum()),
                "new_tokens": int(lengths.sum()),
                "compiled": compiled,
                "compile_count": self.compile_count,
            },
        )


def generate(
    model: nnx.Module,
    batch: Mapping[str, Any],
    params: SamplingParams,
    *,
    rng: jax.Array | int,
    mesh: Mesh | None = None,
    **sampler_kwargs: Any,
) -> GenerationResult:
    """Sample ``params.n`` completions per prompt with a one-off :class:`Sampler` (see the module
    docstring). Keep a :class:`Sampler` (or a :class:`jdelta.models.loading.ModelSession`) to reuse
    compiled programs across calls; there is no process-wide cache.
    """
    return Sampler(model, mesh=mesh, **sampler_kwargs).generate(batch, params, rng=rng)
