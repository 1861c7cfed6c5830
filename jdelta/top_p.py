"""Exact nucleus (top-p) filtering, with or without a full-vocabulary sort.

The nucleus of a row of logits ``x [V]`` for mass ``p``: sort descending, keep position ``i``
while the probability mass strictly before it is ``< p`` (the most likely token is always
kept); the smallest kept logit is the *threshold*, and every logit below it is masked (ties
with the threshold are kept).

:func:`nucleus_threshold_sorted` does exactly that with a sort of all ``V`` logits.
:func:`nucleus_threshold_preselected` sorts only ``k`` candidates (``lax.top_k``, optionally
after a per-group top-``group_k`` pass, see below) normalised by the full-vocabulary softmax, and
reports per row whether the candidates provably contain the nucleus: every logit not among
the candidates is ``<= E`` (an upper bound the preselection knows), so the candidates ``> E``
are exactly the ``|A|`` most likely tokens of the whole row; if their mass reaches ``p``, the
full sort would stop inside them too and both thresholds are the same.
:func:`apply_top_p` uses the preselection and sorts the rows whose nucleus is not contained
(gathered into a small batch when they are few, else the whole batch; ``lax.switch``), so its
output equals the sorted path's (up to float rounding of the cumulative sums).

Grouped preselection (``group > 0``): the vocabulary is cut into groups of ``group`` logits,
each group keeps its ``group_k`` largest (XLA:GPU has a dedicated TopK kernel for k <= 16;
larger k falls back to a sort), then ``lax.top_k`` picks ``k`` of those
``ceil(V / group) * group_k`` candidates. A group's excluded logits are ``<=`` its
``group_k``-th value, so ``E`` = the largest such value over the groups (and the k-th
candidate).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def nucleus_threshold_sorted(x: jax.Array, p) -> jax.Array:
    """Threshold ``[..., 1]`` of the nucleus of ``x [..., V]`` (float32) by a full sort."""
    sorted_x = -jnp.sort(-x, axis=-1)  # descending
    probs = jax.nn.softmax(sorted_x, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < p
    return jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)


def top_k_values(x: jax.Array, k: int) -> jax.Array:
    """``lax.top_k(x, k)``'s values, read back through its indices: with the indices dead, XLA:CPU
    lowers top-k to a full sort instead of its TopK kernel (30x slower at V = 151,936)."""
    idx = jax.lax.top_k(x, k)[1]
    return jnp.take_along_axis(x, idx, axis=-1)


def candidates(x: jax.Array, k: int, *, group: int = 0, group_k: int = 8) -> tuple[jax.Array, jax.Array]:
    """``(values [..., k] descending, bound [...])``: the ``k`` largest logits of the preselection
    and an upper bound on every logit of ``x [..., V]`` that is not among them."""
    v = x.shape[-1]
    if group > 0 and group_k < group and v > group:
        n_groups = -(-v // group)
        pad = n_groups * group - v
        xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=NEG_INF) if pad else x
        per_group = top_k_values(xp.reshape(*x.shape[:-1], n_groups, group), group_k)  # [..., G, gk]
        group_bound = jnp.max(per_group[..., -1], axis=-1)  # a group's excluded logits are <= its gk-th
        pool = per_group.reshape(*x.shape[:-1], n_groups * group_k)
        k = min(k, pool.shape[-1])
    else:
        group_bound = jnp.full(x.shape[:-1], NEG_INF, x.dtype)
        pool = x
    values = top_k_values(pool, k)
    bound = values[..., -1] if k < pool.shape[-1] else jnp.full(x.shape[:-1], NEG_INF, x.dtype)
    return values, jnp.maximum(group_bound, bound)


def nucleus_threshold_preselected(x: jax.Array, p, k: int, *, group: int = 0,
                                  group_k: int = 8) -> tuple[jax.Array, jax.Array]:
    """``(threshold [..., 1], contained [...] bool)`` from ``k`` preselected candidates of
    ``x [..., V]`` (float32); where ``contained`` is False the threshold may be wrong."""
    values, bound = candidates(x, k, group=group, group_k=group_k)
    top = jnp.max(x, axis=-1, keepdims=True)
    log_z = jnp.log(jnp.sum(jnp.exp(x - top), axis=-1, keepdims=True))
    probs = jnp.exp(values - top - log_z)  # the full-vocabulary softmax of each candidate
    cum = jnp.cumsum(probs, axis=-1)
    keep = cum - probs < p
    threshold = jnp.min(jnp.where(keep, values, jnp.inf), axis=-1, keepdims=True)
    # The candidates above the bound are the |A| most likely tokens of the row: their mass is cum at A's end.
    mass_above = jnp.max(jnp.where(values > bound[..., None], cum, 0.0), axis=-1)
    return threshold, mass_above >= p


def apply_top_p(logits: jax.Array, p, *, candidates_k: int = 0, group: int = 0, group_k: int = 8,
                fallback_rows: int | None = None) -> jax.Array:
    """Nucleus filter on ``logits [..., V]`` (see the module docstring); ``p >= 1`` (a Python
    number) = off. ``candidates_k > 0``: preselect that many candidates; rows whose nucleus does
    not fit are sorted: up to ``fallback_rows`` of them alone (gathered into a small batch;
    default ``rows // 8``), more than that by sorting the whole batch. ``0``: always the full sort."""
    if isinstance(p, (int, float)) and p >= 1.0:
        return logits
    x = logits
    if candidates_k <= 0 or candidates_k >= x.shape[-1]:
        return jnp.where(logits < nucleus_threshold_sorted(x, p), NEG_INF, logits)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    threshold, contained = nucleus_threshold_preselected(x2, p, candidates_k, group=group, group_k=group_k)
    few = rows // 8 if fallback_rows is None else min(fallback_rows, rows)
    missing = rows - jnp.sum(contained.astype(jnp.int32))

    def sort_all():
        return nucleus_threshold_sorted(x2, p)

    def sort_missing():  # gather the (at most ``few``) rows that do not fit, sort them, scatter back
        idx = jnp.argsort(contained, stable=True)[:few]  # False first: the missing rows
        fixed = nucleus_threshold_sorted(x2[idx], p)
        return threshold.at[idx].set(jnp.where(contained[idx][:, None], threshold[idx], fixed))

    if 0 < few < rows:
        branch = jnp.where(missing == 0, 0, jnp.where(missing <= few, 1, 2))
        threshold = jax.lax.switch(branch, [lambda: threshold, sort_missing, sort_all])
    else:
        threshold = jax.lax.cond(missing == 0, lambda: threshold, sort_all)
    return jnp.where(logits < threshold.reshape(*lead, 1), NEG_INF, logits)


def nucleus_fits(logits: jax.Array, p, candidates_k: int, *, group: int = 0, group_k: int = 8) -> jax.Array:
    """``[...]`` bool: whether each row's nucleus fits the preselection (False = the fallback runs)."""
    return nucleus_threshold_preselected(logits.astype(jnp.float32), p, candidates_k, group=group,
                                         group_k=group_k)[1]
