"""Held-out accuracy of a toy model, per family, with intervals.

:func:`greedy_correct` decodes greedily (:func:`greedy_tokens`, up to ``max_new_tokens``), takes
the final answer out of the completion as every stage does (:func:`jdelta.answers.extract_answer`:
the ``Answer: X`` line of world v2's reasoned completions) and compares it with the reference
answer (:func:`jdelta.answers.exact_match`). :func:`score_rows` also gives each row's mean
log-probability of its reference completion, teacher-forced: the quantity VA-OPD's visual
advantage and the visual reliance are built from.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdelta.divergence import proportion_interval
from jdelta.toy.train import Encoded, answer_logprobs, model_inputs, prompt_rows

MAX_NEW_TOKENS = 16  # longest toy completion: "bar 4 of 4\nAnswer: Lemon" + <|im_end|> is 12 tokens


@nnx.jit
def _scores(model, inputs, target_mask):
    tok, hit = answer_logprobs(model, inputs, target_mask)
    w = target_mask[:, 1:].astype(jnp.float32)
    return hit.all(axis=-1), tok.sum(-1) / jnp.maximum(w.sum(-1), 1.0)


@nnx.jit(static_argnames=("new_tokens",))
def _greedy(model, ids, mask, positions, pixel_values, grid, new_tokens: int):
    """Greedy continuation of left-padded prompts ``ids [B, Lp]`` by ``new_tokens`` tokens, one
    full forward per token over a fixed ``[B, Lp + new_tokens]`` buffer (``positions`` cover the
    whole buffer; the causal mask hides the slots not yet written)."""
    import jax

    b, lp = ids.shape
    buf = jnp.concatenate([ids, jnp.full((b, new_tokens), ids[0, 0], ids.dtype)], axis=1)
    full_mask = jnp.concatenate([mask, jnp.ones((b, new_tokens), mask.dtype)], axis=1)

    def step(t, buf):
        logits = model(buf, attention_mask=full_mask, position_ids=positions, pixel_values=pixel_values,
                       image_grid_thw=grid).logits
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, lp + t - 1, axis=1, keepdims=False), axis=-1)
        return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(buf.dtype), lp + t, axis=1)

    return jax.lax.fori_loop(0, new_tokens, step, buf)[:, lp:]


def greedy_tokens(model, enc: Encoded, *, pixelated: bool = False, batch_size: int = 64,
                  max_new_tokens: int = MAX_NEW_TOKENS) -> np.ndarray:
    """``[N, max_new_tokens]`` greedy continuation of every row's prompt (its reference completion
    removed), on the clean or the pixelated image."""
    from jdelta.models.qwen3_vl.positions import get_rope_index

    config = model.config
    n = len(enc)
    out = []
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        full = np.concatenate([rows, np.zeros(batch_size - len(rows), np.int64)]) if len(rows) < batch_size else rows
        inputs = model_inputs(enc, full, config, pixelated=pixelated)
        ids, mask = prompt_rows(enc, full, int(enc.input_ids[0, 0]))
        buf_ids = np.concatenate([ids, np.full((len(full), max_new_tokens), ids[0, 0], np.int32)], axis=1)
        buf_mask = np.concatenate([mask, np.ones((len(full), max_new_tokens), np.int32)], axis=1)
        pos, _ = get_rope_index(buf_ids, inputs["image_grid_thw"], buf_mask, config)
        toks = _greedy(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos), jnp.asarray(inputs["pixel_values"]),
                       jnp.asarray(inputs["image_grid_thw"]), max_new_tokens)
        out.append(np.asarray(toks)[: len(rows)])
    return np.concatenate(out)


def completion_texts(tokens: np.ndarray, tokenizer) -> list[str]:
    """Decoded completions, each cut at its first stop token (``<|im_end|>`` / ``<|endoftext|>``)."""
    from jdelta.data.tokenizer import SpecialTokens

    stops = set(SpecialTokens.from_tokenizer(tokenizer).stop_ids)
    texts = []
    for row in np.asarray(tokens):
        cut = next((i for i, t in enumerate(row) if int(t) in stops), len(row))
        texts.append(tokenizer.decode([int(t) for t in row[:cut]], skip_special_tokens=False))
    return texts


def greedy_correct(model, enc: Encoded, tokenizer=None, *, pixelated: bool = False, batch_size: int = 64,
                   max_new_tokens: int = MAX_NEW_TOKENS) -> np.ndarray:
    """``[N]`` bool: the final answer of the greedy completion equals the reference answer (see the
    module doc); ``tokenizer`` defaults to the one ``enc`` was encoded with."""
    from jdelta.answers import exact_match, extract_answer

    tokenizer = tokenizer if tokenizer is not None else enc.tokenizer
    if tokenizer is None:
        raise ValueError("greedy_correct needs the tokenizer the rows were encoded with")
    texts = completion_texts(greedy_tokens(model, enc, pixelated=pixelated, batch_size=batch_size,
                                           max_new_tokens=max_new_tokens), tokenizer)
    return np.asarray([exact_match(extract_answer(t), a) > 0 for t, a in zip(texts, enc.answers, strict=True)])


def score_rows(model, enc: Encoded, *, pixelated: bool = False, batch_size: int = 64,
               tokens: str = "completion") -> tuple[np.ndarray, np.ndarray]:
    """``(teacher-forced exact match [N] bool, mean token log-prob [N])`` of every row's reference
    ``tokens``: ``"completion"`` (all of it and the closing ``<|im_end|>``) or ``"answer"`` (the final
    answer's tokens only), on the clean or the VA-OPD pixelated images."""
    if tokens not in ("completion", "answer"):
        raise ValueError(f"tokens must be 'completion' or 'answer', got {tokens!r}")
    mask_of = enc.target_mask if tokens == "completion" else enc.answer_mask
    if mask_of is None:
        raise ValueError("these rows were encoded without an answer mask")
    config = model.config
    correct, logp = [], []
    n = len(enc)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        pad = batch_size - len(rows)  # keep one compiled shape: pad with row 0, drop after
        full = np.concatenate([rows, np.zeros(pad, np.int64)]) if pad else rows
        inputs = {k: jnp.asarray(v) for k, v in model_inputs(enc, full, config, pixelated=pixelated).items()}
        c, lp = _scores(model, inputs, jnp.asarray(mask_of[full]))
        correct.append(np.asarray(c)[: len(rows)])
        logp.append(np.asarray(lp)[: len(rows)])
    return np.concatenate(correct), np.concatenate(logp)


def by_family(values: np.ndarray, families: Sequence[str], order: Sequence[str]) -> dict[str, dict]:
    """Accuracy with a 95% Wilson interval per family (and ``"all"``, the mean over rows):
    ``{family: {"n", "correct", "accuracy", "ci_low", "ci_high"}}``."""
    fam = np.asarray(families, dtype=object)
    out = {}
    for name in [*order, "all"]:
        sel = np.ones(len(fam), bool) if name == "all" else fam == name
        k, n = int(values[sel].sum()), int(sel.sum())
        lo, hi = proportion_interval(k, n)
        out[name] = {"n": n, "correct": k, "accuracy": k / n if n else float("nan"), "ci_low": lo, "ci_high": hi}
    return out


def mean_by_family(values: np.ndarray, families: Sequence[str], order: Sequence[str]) -> dict[str, float]:
    """Mean of ``values`` per family (and ``"all"``)."""
    fam = np.asarray(families, dtype=object)
    out = {name: float(values[fam == name].mean()) for name in order if (fam == name).any()}
    out["all"] = float(values.mean())
    return out


__all__ = ["MAX_NEW_TOKENS", "by_family", "completion_texts", "greedy_correct", "greedy_tokens", "mean_by_family",
           "score_rows"]
