"""3D (t, h, w) position ids for M-RoPE, computed on the host with NumPy.

Mirrors ``Qwen3VLModel.get_rope_index`` of transformers 5.23 for images: over each row's
real tokens (``attention_mask == 1``), text tokens advance all three axes by one; an image
occupies ``t * (h/m) * (w/m)`` tokens whose axes are ``start + (frame, row, col)``, and the
next token starts at ``start + max(h, w)/m``. Padding positions are 0.

``rope_deltas`` here is relative to the *padded* length ``S`` (``max_position + 1 - S``),
so during decoding the position of the token written at cache slot ``i`` is simply
``i + rope_deltas`` for every row, left padding included. (HF 5.23 returns the delta
relative to the number of real tokens and adds it to ``cumsum(attention_mask) - 1``;
both give the same decode positions.)
"""

from __future__ import annotations

import numpy as np

from jdelta.models.qwen3_vl.config import Qwen3VLConfig


def get_rope_index(input_ids, image_grid_thw, attention_mask, config: Qwen3VLConfig) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions.

    Args:
      input_ids: ``[B, S]`` int, left (or right) padded.
      image_grid_thw: ``[N, 3]`` int for the batch's images in order (rows of zeros are
        padding and skipped), or None.
      attention_mask: ``[B, S]`` (1 = real token) or None (all real).
      config: the model config (image token id, spatial merge size).
    Returns:
      ``position_ids [3, B, S]`` int32 and ``rope_deltas [B]`` int32.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {input_ids.shape}")
    b, s = input_ids.shape
    mask = np.ones((b, s), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    grids = grids[grids.prod(-1) > 0]
    merge = config.vision.spatial_merge_size
    tokens_per_image = grids.prod(-1) // (merge * merge)
    next_image = 0
    positions = np.zeros((3, b, s), np.int64)
    deltas = np.zeros((b,), np.int64)
    for row in range(b):
        ids = input_ids[row][mask[row]]
        is_image = ids == config.image_token_id
        pieces, cur, i = [], 0, 0
        while i < len(ids):
            if not is_image[i]:
                j = i
                while j < len(ids) and not is_image[j]:
                    j += 1
                pieces.append(np.broadcast_to(np.arange(j - i) + cur, (3, j - i)))
                cur += j - i
                i = j
                continue
            if next_image >= len(grids):
                raise ValueError(f"row {row}: more image-token runs than images in image_grid_thw ({len(grids)})")
            t, h, w = (int(x) for x in grids[next_image])
            n = int(tokens_per_image[next_image])
            run = ids[i: i + n]
            if len(run) < n or not (run == config.image_token_id).all():
                raise ValueError(f"row {row}: image {next_image} with grid {(t, h, w)} needs {n} consecutive "
                                 f"image tokens (id {config.image_token_id}) at real-token position {i}")
            gh, gw = h // merge, w // merge
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur)
            cur += max(h, w) // merge
            next_image += 1
            i += n
        llm = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, row, mask[row]] = llm
        deltas[row] = (llm.max() + 1 if llm.size else 0) - s
    if next_image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but input_ids hold image tokens for {next_image}")
    return positions.astype(np.int32), deltas.astype(np.int32)


def image_token_counts(config: Qwen3VLConfig, image_grid_thw) -> np.ndarray:
    """``<|image_pad|>`` tokens of each image in a prompt: ``t*h*w / merge**2`` per grid row ``[N]``."""
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    return grids.prod(-1) // int(config.vision.spatial_merge_size) ** 2
