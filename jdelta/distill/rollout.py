"""Host-side assembly of rollouts into training sequences (NumPy, no JAX tracing).

Prompts arrive left-padded to a common length ``Sp``; completions are ``[B, T]``
token arrays with per-row lengths (the first EOS included). The training sequence
is ``prompt ++ completion`` of length ``Sp + T``, so every completion starts at
column ``Sp`` and the hidden state that predicts completion token ``t`` sits at
column ``Sp - 1 + t`` in every row.

Images: per-sample vision inputs are carried as ``pixel_values [B, P, D]`` and
``image_grid_thw [B, N, 3]`` (padded to the largest sample's ``P`` patch rows and ``N``
images; zero grid rows as padding) so they can be repeated per rollout and split into
micro-batches; :func:`flatten_vision` packs them back into the model's ``[B*P, D]`` /
``[B*N, 3]`` layout (inside jit, per micro-batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np


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
    """Per-sample ``[B, P, D], [B, N, 3]`` -> the model's ``[B*P, D], [B*N, 3]``.

    Each sample's valid patch rows (``sum prod(grid)``, first in its block) are packed to the
    front in sample order and the rest zero-filled, so samples with different image sizes
    share one static shape; zero grid rows stay in place (the vision tower skips them).
    Works on NumPy (host) and JAX (inside jit) arrays.
    """
    if pixel_values is None:
        return None, None
    xp = np if isinstance(pixel_values, np.ndarray) else jnp
    b, p = pixel_values.shape[:2]
    grid = image_grid_thw.reshape((-1,) + tuple(image_grid_thw.shape[2:]))
    counts = xp.prod(image_grid_thw.astype(xp.int32), axis=-1).sum(-1)  # [B]
    valid = (xp.arange(p)[None, :] < counts[:, None]).reshape(-1)
    flat = pixel_values.reshape((b * p,) + tuple(pixel_values.shape[2:]))
    dest = xp.where(valid, xp.cumsum(valid.astype(xp.int32)) - 1, b * p)  # b*p: out of range, dropped
    if xp is np:
        out = np.zeros_like(flat)
        out[dest[valid]] = flat[valid]
    else:
        out = jnp.zeros_like(flat).at[dest].set(flat, mode="drop")
    return out, grid


def images_per_row(input_ids: np.ndarray, attention_mask: np.ndarray, image_token_id: int) -> np.ndarray:
    """Number of image-token runs (images) in each row of a prompt batch: ``[B]``."""
    is_img = (np.asarray(input_ids) == image_token_id) & (np.asarray(attention_mask) > 0)
    starts = is_img & ~np.concatenate([np.zeros_like(is_img[:, :1]), is_img[:, :-1]], axis=1)
    return starts.sum(-1)


def stack_vision(pixel_values: np.ndarray, image_grid_thw: np.ndarray,
                 images_per_sample: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Model layout ``[P_total(+pad), D], [M(+pad), 3]`` -> per-sample ``[B, P, D], [B, N, 3]``.

    ``images_per_sample`` (default: one image per sample) assigns consecutive non-zero grid
    rows to samples; zero grid rows and pixel rows past the images (batch padding) are
    dropped. ``P`` / ``N`` are the largest per-sample counts; shorter samples are zero-padded.
    """
    pixel_values = np.asarray(pixel_values)
    grids = np.asarray(image_grid_thw).reshape(-1, 3)
    grids = grids[grids.prod(-1) > 0]
    counts = list(images_per_sample) if images_per_sample is not None else [1] * grids.shape[0]
    if sum(counts) != grids.shape[0]:
        raise ValueError(f"the prompts hold {sum(counts)} images but image_grid_thw has {grids.shape[0]} "
                         "non-empty grid rows")
    sizes = grids.prod(-1)
    total = int(sizes.sum())
    if pixel_values.shape[0] < total:
        raise ValueError(f"image_grid_thw needs {total} patch rows, pixel_values has {pixel_values.shape[0]}")
    b = len(counts)
    per_patches, per_grids, start_img, start_row = [], [], 0, 0
    for c in counts:
        g = grids[start_img:start_img + c]
        n = int(g.prod(-1).sum())
        per_grids.append(g)
        per_patches.append(pixel_values[start_row:start_row + n])
        start_img += c
        start_row += n
    p = max(1, max(len(x) for x in per_patches))
    n_img = max(1, max(counts))
    pv = np.zeros((b, p) + pixel_values.shape[1:], pixel_values.dtype)
    grid_out = np.zeros((b, n_img, 3), grids.dtype)
    for i in range(b):
        pv[i, : len(per_patches[i])] = per_patches[i]
        grid_out[i, : len(per_grids[i])] = per_grids[i]
    return pv, grid_out
