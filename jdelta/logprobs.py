"""Per-token log-probs of given completions under a model, chunked over the sequence.

One forward pass with ``return_logits=False`` gives the final hidden states; the logits
are then formed from ``hidden_states`` and ``model.lm_head_weight()`` one chunk of
positions at a time inside ``lax.map``, so ``[batch, seq, vocab]`` is never materialised:
the peak is ``[batch, chunk_size, vocab]`` whatever the sequence length.

Layers of the API:

* :func:`chunked_token_logprobs` -- pure: hidden states + LM head + targets -> log-probs.
* :func:`score_completions_fn` -- pure, jit-able over ``(graphdef, state)`` (what the
  distillation loop calls inside its own jit, with gradients if wanted).
* :func:`prepare_score_inputs` -- host side: prompt batch + completions -> model inputs.
* :func:`score_completions` -- the convenience wrapper doing both with a cached jit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jdelta.chunking import from_chunks, to_chunks
from jdelta.models.family import logit_softcap
from jdelta.sharding import Rules, activation_sharding, state_shardings


class ScoreResult(NamedTuple):
    """Log-probs of completion tokens; every array is zero where ``completion_mask`` is 0.

    Attributes:
      token_logprobs: ``[B, T]`` log p(token_t | prompt, tokens_<t) at the given temperature.
      topk_logprobs: ``[B, T, k]`` the k largest log-probs of each position (``None`` if k = 0).
      topk_ids: ``[B, T, k] int32`` their token ids (``None`` if k = 0).
      logsumexp: ``[B, T]`` log-sum-exp of the (temperature-scaled) logits over the full
        vocabulary (``None`` unless asked for): with it, any ``logit - logsumexp`` is a log-prob.
    """

    token_logprobs: jax.Array
    topk_logprobs: jax.Array | None
    topk_ids: jax.Array | None
    logsumexp: jax.Array | None


def chunked_token_logprobs(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    chunk_size: int,
    top_k: int = 0,
    temperature: float = 1.0,
    return_logsumexp: bool = False,
    vocab_size: int | None = None,
    softcap: float | None = None,
) -> ScoreResult:
    """Log-probs of ``targets`` from hidden states, ``chunk_size`` positions at a time.

    Differentiable (w.r.t. ``hidden`` and ``lm_head``): each chunk is rematerialised in the
    backward pass, so training through it (e.g. SFT's NLL) also peaks at one chunk of logits.

    Args:
      hidden: ``[B, T, H]``; position ``t`` predicts ``targets[:, t]``.
      lm_head: ``[H, V]``.
      targets: ``[B, T]`` int token ids.
      mask: ``[B, T]`` (1 = score this position), or ``None`` for all.
      chunk_size: positions per chunk (``T`` is padded up to a multiple); peak logits memory
        is ``B * chunk_size * V`` floats.
      top_k: also return the top-k log-probs and ids per position (0 = no).
      temperature: logits are divided by it (> 0).
      return_logsumexp: also return the full-vocabulary log-sum-exp per position.
      vocab_size: real vocabulary size when ``lm_head`` has padded columns beyond it
        (those are excluded from the softmax).
      softcap: the model's ``final_logit_softcapping``: logits are ``cap * tanh(logits / cap)``
        before the temperature (as the model's own forward and the sampler form them).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for scoring, got {temperature}")
    t = hidden.shape[1]
    v = lm_head.shape[1]
    if top_k > v:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary size {v}")
    chunk_size = min(chunk_size, t)
    # [C, B, c, ...]: chunks first for lax.map.
    h_chunks = to_chunks(hidden, chunk_size)
    t_chunks = to_chunks(targets.astype(jnp.int32), chunk_size)
    inv_t = jnp.float32(1.0 / temperature)

    @jax.checkpoint  # differentiable with the same peak: the backward recomputes one chunk's logits
    def one(args):
        hc, tc = args
        logits = jnp.einsum("bch,hv->bcv", hc, lm_head.astype(hc.dtype), preferred_element_type=jnp.float32)
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        logits = logits * inv_t
        if vocab_size is not None and vocab_size < v:
            logits = jnp.where(jnp.arange(v) < vocab_size, logits, -jnp.inf)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tok = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0] - lse
        out = {"tok": tok}
        if top_k:
            vals, ids = jax.lax.top_k(logits, top_k)
            out["topv"] = vals - lse[..., None]
            out["topi"] = ids.astype(jnp.int32)
        if return_logsumexp:
            out["lse"] = lse
        return out

    res = jax.lax.map(one, (h_chunks, t_chunks))

    def unchunk(x):  # [C, B, c, ...] -> [B, T, ...]
        return from_chunks(x, t)

    m = None if mask is None else mask.astype(bool)

    def masked(x):
        if m is None:
            return x
        return jnp.where(m.reshape(m.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))

    return ScoreResult(
        token_logprobs=masked(unchunk(res["tok"])),
        topk_logprobs=masked(unchunk(res["topv"])) if top_k else None,
        topk_ids=masked(unchunk(res["topi"])) if top_k else None,
        logsumexp=masked(unchunk(res["lse"])) if return_logsumexp else None,
    )


def score_completions_fn(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    inputs: Mapping[str, jax.Array],
    completion_tokens: jax.Array,
    completion_mask: jax.Array,
    *,
    chunk_size: int,
    top_k: int = 0,
    temperature: float = 1.0,
    return_logsumexp: bool = False,
    vocab_size: int | None = None,
) -> ScoreResult:
    """Pure, jit-able scoring over ``(graphdef, state)``.

    Args:
      inputs: from :func:`prepare_score_inputs`: ``input_ids, attention_mask [B, S+T]``
        (prompt left-padded, then the completion), ``position_ids [3, B, S+T]``, optional
        ``pixel_values [P, ...]`` (the family's pixel rows), ``image_grid_thw [N, 3]``.
    The logits are the family's (soft-capped where the model's config says so).
      completion_tokens, completion_mask: ``[B, T]``; the completion occupies the last T
        columns of ``input_ids``.
    """
    model = nnx.merge(graphdef, state)
    out = model(
        inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        position_ids=inputs["position_ids"],
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"),
        return_logits=False,
    )
    t = completion_tokens.shape[1]
    hidden = out.hidden_states[:, -t - 1 : -1, :]  # position S-1+i predicts completion token i
    return chunked_token_logprobs(
        hidden, model.lm_head_weight(), completion_tokens, completion_mask,
        chunk_size=chunk_size, top_k=top_k, temperature=temperature,
        return_logsumexp=return_logsumexp, vocab_size=vocab_size, softcap=logit_softcap(model),
    )


def prepare_score_inputs(
    prompt_batch: Mapping[str, Any],
    completion_tokens: Any,
    completion_mask: Any,
    rope_index_fn: Callable[..., tuple[np.ndarray, np.ndarray]],
    *,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Host side: ``[prompt | completion]`` ids, attention mask and M-RoPE positions (NumPy).

    ``completion_mask [B, T]`` marks real completion tokens; masked ones are replaced by
    ``pad_id``. The attention mask over the completion is all ones: a completion is scored
    causally, so later (padding) tokens never influence earlier log-probs.
    """
    ids = np.asarray(prompt_batch["input_ids"], np.int32)
    pmask = np.asarray(prompt_batch["attention_mask"], np.int32)
    comp = np.asarray(completion_tokens, np.int32)
    cmask = np.asarray(completion_mask, np.int32)
    if comp.ndim != 2 or comp.shape != cmask.shape or comp.shape[0] != ids.shape[0]:
        raise ValueError(
            f"completion_tokens {comp.shape} and completion_mask {cmask.shape} must be [B, T] with "
            f"B = {ids.shape[0]} (the prompt batch)")
    comp = np.where(cmask > 0, comp, pad_id)
    full_ids = np.concatenate([ids, comp], axis=1)
    full_mask = np.concatenate([pmask, np.ones_like(cmask)], axis=1)
    grid = prompt_batch.get("image_grid_thw")
    grid = None if grid is None else np.asarray(grid, np.int32).reshape(-1, 3)
    pos, _ = rope_index_fn(full_ids, grid, full_mask)
    out = {"input_ids": full_ids, "attention_mask": full_mask, "position_ids": np.asarray(pos, np.int32)}
    if prompt_batch.get("pixel_values") is not None:
        out["pixel_values"] = np.asarray(prompt_batch["pixel_values"], np.float32)
        out["image_grid_thw"] = grid
    return out


_STATIC = ("graphdef", "chunk_size", "top_k", "temperature", "return_logsumexp", "vocab_size")
_score_jit = jax.jit(score_completions_fn, static_argnames=_STATIC)


def score_completions(
    model: nnx.Module,
    prompt_batch: Mapping[str, Any],
    completion_tokens: Any,
    completion_mask: Any,
    *,
    chunk_size: int,
    top_k: int = 0,
    return_logsumexp: bool = False,
    temperature: float = 1.0,
    rope_index_fn: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> ScoreResult:
    """Per-token log-probs of ``completion_tokens [B, T]`` after a left-padded prompt batch.

    See :func:`chunked_token_logprobs` for the outputs; ``rope_index_fn`` defaults to the
    model's family position hook (:func:`jdelta.sampling.default_rope_index`). With ``mesh``, parameters and
    inputs are sharded by ``jdelta.sharding``'s rules (batch over ``data``/``fsdp``).
    """
    if rope_index_fn is None:
        from jdelta.sampling import default_rope_index

        rope_index_fn = default_rope_index(model)
    host = prepare_score_inputs(prompt_batch, completion_tokens, completion_mask, rope_index_fn)
    graphdef, state = nnx.split(model)
    comp = np.asarray(host["input_ids"][:, -np.asarray(completion_tokens).shape[1]:])
    cmask = np.asarray(completion_mask, np.int32)
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state, mesh, rules))
        names = {"input_ids": ("batch", "seq"), "attention_mask": ("batch", "seq"),
                 "position_ids": (None, "batch", "seq"), "pixel_values": ("patch",),
                 "image_grid_thw": (None, None)}

        def put(x, nm):
            return jax.device_put(x, activation_sharding(mesh, nm, x.shape, rules))

        host = {k: put(v, names[k]) for k, v in host.items()}
        comp, cmask = put(comp, ("batch", "seq")), put(cmask, ("batch", "seq"))
    from jdelta.sampling import config_vocab_size

    vocab = config_vocab_size(model)
    fn = functools.partial(_score_jit, chunk_size=int(chunk_size), top_k=int(top_k),
                           temperature=float(temperature), return_logsumexp=bool(return_logsumexp),
                           vocab_size=vocab)
    return fn(graphdef, state, host, comp, cmask)
