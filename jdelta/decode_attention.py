"""Length-bounded decode attention: decode steps read only the filled prefix of the KV cache.

The sampler's cache has ``max_len = S + max_new_tokens`` slots; a dense decode step attends
over all of them although at step ``t`` only slots ``< S + t + 1`` hold tokens (all rows share
the write slot ``index``, so that is also the longest live row). The bounded decode runs the
decode loop in *segments*: segment ``j`` serves the steps whose write slot is below a static
length ``L_j`` and hands the model a cache made of the first ``L_j`` slots (copied once at the
segment's start, written back at its end), so every step's attention, mask and cache update
touch ``L_j`` slots instead of ``max_len``. The model and its attention kernel are unchanged
(any model honouring the ``KVCache`` contract works) and the masked slots beyond ``L_j`` are
exactly the ones a dense step would give zero weight, so the tokens and log-probs are the
dense path's (up to float summation order).

Why segments rather than a per-layer loop over KV blocks: a dynamic-trip-count loop inside
every layer costs, on GPUs, a device-to-host predicate copy per iteration per layer (XLA while
loops), about as much as the KV reads it saves at short contexts; segments have no control flow
inside a step. The price: one copy of the decode body per segment in the compiled program
(compile time) and, during a segment, the prefix copy beside the full cache (memory
``max_len * (1 + max_fraction)`` at most).

:func:`kv_segments` picks the lengths: powers of two times ``min_len`` above the first write
slot up to ``max_fraction * max_len`` (and that length itself, rounded down to a multiple of
``min_len``), then the whole cache. With ``max_fraction = 0.5`` a step reads at most about
``max(min_len, 2 * live)`` slots.

Cache contract: ``k, v [layers, B, T, kv_heads, head_dim]``, ``valid [B, T]``, ``index`` scalar.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def kv_segments(first_slot: int, max_len: int, *, min_len: int = 256, max_fraction: float = 0.5) -> tuple[int, ...]:
    """Static prefix lengths of the bounded decode's segments, ascending; the last is ``max_len``.

    Args:
      first_slot: the first decode step's write slot (the padded prompt length).
      max_len: cache slots.
      min_len: the smallest prefix; the others double from it.
      max_fraction: prefixes longer than ``max_fraction * max_len`` are not used (the whole cache
        serves those steps), which bounds the extra memory of a segment's copy.
    Returns:
      e.g. ``(512, 1024, 2048, 4352)`` for ``first_slot=256, max_len=4352``; ``(max_len,)`` (the
      dense decode) when no prefix qualifies.
    """
    if min_len < 1:
        raise ValueError(f"min_len must be >= 1, got {min_len}")
    if first_slot >= max_len:
        raise ValueError(f"first_slot {first_slot} leaves no free cache slot (max_len {max_len})")
    out = []
    length = min_len
    while length <= first_slot:
        length *= 2
    while length < max_len and length <= max_fraction * max_len:
        out.append(length)
        length *= 2
    top = int(max_fraction * max_len) // min_len * min_len  # the largest allowed prefix, if not yet there
    if first_slot < top < max_len and (not out or top > out[-1]):
        out.append(top)
    return (*out, max_len)


def _replace(obj: Any, **changes: Any) -> Any:
    if hasattr(obj, "replace"):
        return obj.replace(**changes)
    if hasattr(obj, "_replace"):
        return obj._replace(**changes)
    return dataclasses.replace(obj, **changes)


def read_prefix(cache: Any, length: int) -> Any:
    """The cache's first ``length`` slots as a cache of ``length`` slots (same ``index``)."""
    return _replace(cache, k=cache.k[:, :, :length], v=cache.v[:, :, :length], valid=cache.valid[:, :length])


def write_prefix(cache: Any, prefix: Any) -> Any:
    """``cache`` with its first slots replaced by ``prefix``'s (and ``prefix``'s ``index``)."""
    n = prefix.k.shape[2]
    return _replace(cache, k=cache.k.at[:, :, :n].set(prefix.k), v=cache.v.at[:, :, :n].set(prefix.v),
                    valid=cache.valid.at[:, :n].set(prefix.valid), index=prefix.index)
