"""Padded shapes: a size rounds up to a bucket so jitted programs compile a bounded number of times.

The one rounding rule used by the prompt pipeline (:mod:`jdelta.data.pipeline`) and the sampler
(:mod:`jdelta.sampling`); kept free of heavy imports so Grain worker processes can load it.
"""

from __future__ import annotations

from collections.abc import Sequence


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``n``; past the largest, the next multiple of the largest."""
    for b in buckets:
        if n <= b:
            return int(b)
    top = int(buckets[-1])
    return -(-int(n) // top) * top


__all__ = ["bucket"]
