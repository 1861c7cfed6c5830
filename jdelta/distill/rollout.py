"""Host-side assembly of rollouts into training sequences (NumPy, no JAX tracing).

Prompts arrive left-padded to a common length ``Sp``; completions are ``[B, T]``
token arrays with per-row lengths (the first EOS included). The training sequence
is ``prompt ++ completion`` of length ``Sp + T``, so every completion starts at
column ``Sp`` and the hidden state that predicts completion token ``t`` sits at
column ``Sp - 1 + t`` in every row.

Images: per-sample vision inputs are carried as ``pixel_values [B, P, D]`` and
``image_grid_thw [B, N, 3]`` (every sample the same number ``P`` of patch rows and
``N`` of images, zero grid rows as padding) so they can be repeated per rollout and
split into micro-batches; :func:`flatten_vision` turns them into the model's
``[B*P, D]`` / ``[B*N, 3]`` layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PER_SAMPLE_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_degraded",
                   "prompt_index")


def repeat_prompts(batch: Mapping[str, Any], k: int) -> dict[str, np.ndarray]:
    """Repeat every per-sample entry ``k`` times, rollout-major within a prompt: rows
    ``[p0, p0, .., p1, p1, ..]``. Adds ``prompt_index [B*k]`` (which prompt a row came from)."""
    if k < 1:
        raise ValueError(f"rollouts_per_prompt must be >= 1, got {k}")
    out: dict[str, np.ndarray] = {}
    b = None
    for key, value in batch.items():
        if value is None:
            continue
        a = np.asarray(value)
        if b is None:
            b = a.shape[0]
        elif a.shape[0] != b:
            raise ValueError(f"batch entry {key!r} has leading dim {a.shape[0]}, expected {b} (one row per prompt)")
        out[key] = np.repeat(a, k, axis=0)
    if b is None:
        raise ValueError("empty prompt batch")
    out["prompt_index"] = np.repeat(np.arange(b, dtype=np.int32), k)
    return out


def completion_mask(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[B, T]`` int32: 1 for the first ``lengths[b]`` completion tokens of row ``b``."""
    tokens = np.asarray(tokens)
    lengths = np.asarray(lengths).reshape(-1)
    if lengths.shape[0] != tokens.shape[0]:
        raise ValueError(f"lengths has {lengths.shape[0]} rows, tokens {tokens.shape[0]}")
    if np.any(lengths < 0) or np.any(lengths > tokens.shape[1]):
        raise ValueError(f"lengths must lie in [0, {tokens.shape[1]}], got {lengths.tolist()}")
    return (np.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(np.int32)


def first_stop_lengths(tokens: np.ndarray, stop_ids: Sequence[int], pad_lengths: np.ndarray | None = None) -> np.ndarray:
    """Length of each row up to and including its first stop token (or the full/given length)."""
    tokens = np.asarray(tokens)
    is_stop = np.isin(tokens, np.asarray(list(stop_ids)))
    first = np.where(is_stop.any(1), is_stop.argmax(1) + 1, tokens.shape[1])
    if pad_lengths is not None:
        first = np.minimum(first, np.asarray(pad_lengths))
    return first.astype(np.int32)


def build_sequences(
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    completion: np.ndarray,
    lengths: np.ndarray,
    pad_id: int = 0,
    *,
    where: str = "rollouts",
) -> dict[str, np.ndarray]:
    """Concatenate left-padded prompts ``[B, Sp]`` and completions ``[B, T]`` (lengths ``[B]``).

    Returns ``input_ids``, ``attention_mask`` ``[B, Sp+T]`` (completion padding masked and
    set to ``pad_id``), ``completion`` ``[B, T]`` (the target tokens) and
    ``completion_mask`` ``[B, T]``. Raises if no row has any completion token.
    """
    prompt_ids = np.asarray(prompt_ids)
    prompt_mask = np.asarray(prompt_mask)
    completion = np.asarray(completion)
    if prompt_ids.shape[0] != completion.shape[0]:
        raise ValueError(f"{where}: {prompt_ids.shape[0]} prompts but {completion.shape[0]} completions")
    cmask = completion_mask(completion, lengths)
    if cmask.sum() == 0:
        raise ValueError(f"{where}: the completion mask is empty (every rollout has length 0); nothing to train on")
    if np.any(prompt_mask[:, -1] == 0):
        bad = np.nonzero(prompt_mask[:, -1] == 0)[0].tolist()
        raise ValueError(f"{where}: prompts must be left-padded (rows {bad} end in padding)")
    comp = np.where(cmask > 0, completion, pad_id).astype(prompt_ids.dtype)
    return {
        "input_ids": np.concatenate([prompt_ids, comp], axis=1),
        "attention_mask": np.concatenate([prompt_mask.astype(np.int32), cmask], axis=1),
        "completion": comp.astype(np.int32),
        "completion_mask": cmask,
    }


def flatten_vision(pixel_values: Any, image_grid_thw: Any) -> tuple[Any, Any]:
    """``[B, P, D], [B, N, 3] -> [B*P, D], [B*N, 3]`` (works on NumPy and JAX arrays)."""
    if pixel_values is None:
        return None, None
    return (pixel_values.reshape((-1,) + tuple(pixel_values.shape[2:])),
            image_grid_thw.reshape((-1,) + tuple(image_grid_thw.shape[2:])))


def stack_vision(pixel_values: np.ndarray, image_grid_thw: np.ndarray, merge: int = 2,
                 images_per_sample: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Model layout ``[sum P_i, D], [M, 3]`` -> per-sample ``[B, P, D], [B, N, 3]``.

    ``images_per_sample`` (default: one image per sample) assigns consecutive grid rows to
    samples. Every sample must have the same number of patch rows (so rollouts and
    micro-batches split evenly); a clear error says which differ.
    """
    pixel_values = np.asarray(pixel_values)
    grids = np.asarray(image_grid_thw).reshape(-1, 3)
    counts = list(images_per_sample) if images_per_sample is not None else [1] * grids.shape[0]
    if sum(counts) != grids.shape[0]:
        raise ValueError(f"images_per_sample sums to {sum(counts)} but there are {grids.shape[0]} grids")
    patches, rows, start = [], [], 0
    for c in counts:
        g = grids[start:start + c]
        rows.append(g)
        patches.append(int(g.prod(-1).sum()))
        start += c
    if len(set(patches)) > 1:
        raise ValueError(f"samples have different patch counts {patches}; resize images to one size "
                         "(per-sample vision arrays must be rectangular)")
    n = max(counts)
    grid_out = np.zeros((len(counts), n, 3), grids.dtype)
    for i, g in enumerate(rows):
        grid_out[i, : len(g)] = g
    p = patches[0]
    return pixel_values[: p * len(counts)].reshape(len(counts), p, -1), grid_out
