"""Held-out accuracy of a toy model, per family, with intervals.

:func:`greedy_correct` is exact-match accuracy of greedy decoding computed in one forward pass:
greedy decoding returns the reference answer exactly when, teacher-forced on the reference, every
answer token and the closing ``<|im_end|>`` is the argmax. (It counts an answer spelled with
other tokens as wrong; the toy's answers are short words and numbers, so the two agree unless a
model emits a non-canonical tokenisation. :func:`jdelta.evaluation.evaluate_source` is the
sampling path used by ``jdelta eval``.) :func:`answer_logprob` gives the mean log-probability of
the answer tokens, the quantity VA-OPD's visual advantage is built from.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdelta.divergence import proportion_interval
from jdelta.toy.train import Encoded, answer_logprobs, model_inputs


@nnx.jit
def _scores(model, inputs, target_mask):
    tok, hit = answer_logprobs(model, inputs, target_mask)
    w = target_mask[:, 1:].astype(jnp.float32)
    return hit.all(axis=-1), tok.sum(-1) / jnp.maximum(w.sum(-1), 1.0)


def score_rows(model, enc: Encoded, *, pixelated: bool = False, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(greedy exact match [N] bool, mean answer-token log-prob [N])`` for every row of ``enc``
    (``pixelated``: on the VA-OPD pixelated images)."""
    config = model.config
    correct, logp = [], []
    n = len(enc)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        pad = batch_size - len(rows)  # keep one compiled shape: pad with row 0, drop after
        full = np.concatenate([rows, np.zeros(pad, np.int64)]) if pad else rows
        inputs = {k: jnp.asarray(v) for k, v in model_inputs(enc, full, config, pixelated=pixelated).items()}
        c, lp = _scores(model, inputs, jnp.asarray(enc.target_mask[full]))
        correct.append(np.asarray(c)[: len(rows)])
        logp.append(np.asarray(lp)[: len(rows)])
    return np.concatenate(correct), np.concatenate(logp)


def greedy_correct(model, enc: Encoded, *, pixelated: bool = False, batch_size: int = 64) -> np.ndarray:
    """``[N]`` bool: greedy decoding gives the reference answer exactly (see the module doc)."""
    return score_rows(model, enc, pixelated=pixelated, batch_size=batch_size)[0]


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


__all__ = ["by_family", "greedy_correct", "mean_by_family", "score_rows"]
