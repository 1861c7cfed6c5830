"""Synthetic prompt batches: smoke tests, the distill demo config, benchmarks.

Not data for real training: random token prompts (special ids avoided) with one random
image each (``pixel_values`` of the model's patch layout) and a pixelated view of it,
in the same left-padded layout the Grain pipeline yields. The tiny random models they are
fed to come from :mod:`jdelta.testing` (``tiny_config``, ``random_model``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from flax import nnx

from jdelta.models.qwen3_vl import Qwen3VLConfig


def pixelate_patches(pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
    """A detail-free view of patch rows: every patch row replaced by its image's mean row.

    (A stand-in for ``jdelta.data.pixelate`` on synthetic patch features: same shape and grid.)
    """
    out = np.empty_like(pixel_values)
    start = 0
    for g in np.asarray(grid_thw).reshape(-1, 3):
        n = int(np.prod(g))
        out[start:start + n] = pixel_values[start:start + n].mean(0, keepdims=True)
        start += n
    out[start:] = pixel_values[start:]
    return out


def random_prompts(config: Qwen3VLConfig, *, batch: int, min_len: int = 4, max_len: int = 8, image_side: int = 4,
                   seed: int = 0, with_image: bool = True) -> Iterator[dict[str, Any]]:
    """Endless left-padded prompt batches: ``[text][<vs> image <ve>][text]`` per row.

    ``image_side``: patches per side (``image_side ** 2`` patch rows, ``/ merge ** 2`` visual tokens).
    """
    rng = np.random.default_rng(seed)
    text_vocab = config.text.vocab_size - 4
    vis = config.vision
    merge = vis.spatial_merge_size
    grid = np.array([1, image_side, image_side], np.int32)
    n_vis = image_side * image_side // (merge * merge)
    while True:
        rows = []
        for _ in range(batch):
            n = int(rng.integers(min_len, max_len + 1))
            toks = rng.integers(1, text_vocab, n).tolist()
            if with_image:
                cut = n // 2
                toks = (toks[:cut] + [config.vision_start_token_id] + [config.image_token_id] * n_vis
                        + [config.vision_end_token_id] + toks[cut:])
            rows.append(toks)
        s = max(len(r) for r in rows)
        ids = np.zeros((batch, s), np.int32)
        mask = np.zeros((batch, s), np.int32)
        for i, r in enumerate(rows):
            ids[i, s - len(r):] = r
            mask[i, s - len(r):] = 1
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if with_image:
            grids = np.tile(grid, (batch, 1))
            pv = rng.normal(size=(batch * image_side * image_side, vis.patch_dim)).astype(np.float32)
            out.update(pixel_values=pv, image_grid_thw=grids, pixel_values_pixelated=pixelate_patches(pv, grids))
        yield out


class SyntheticPromptIterator(grain.DatasetIterator):
    """:func:`random_prompts` as a checkpointable iterator: its state is the number of batches drawn.

    ``set_state`` rebuilds the stream from its seed and draws that many batches again, so a run
    resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen
    (fast-forwarding costs a few microseconds per skipped batch: these are tiny NumPy arrays).
    """

    def __init__(self, config: Qwen3VLConfig, **kwargs: Any):
        super().__init__()
        self._config, self._kwargs = config, kwargs
        self._stream = random_prompts(config, **kwargs)
        self._drawn = 0

    def __next__(self) -> dict[str, Any]:
        batch = next(self._stream)
        self._drawn += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"batches_drawn": self._drawn}

    def set_state(self, state: dict[str, Any]) -> None:
        self._stream = random_prompts(self._config, **self._kwargs)
        self._drawn = 0
        for _ in range(int(state["batches_drawn"])):
            next(self)

    def __str__(self) -> str:
        return f"SyntheticPromptIterator({self._kwargs})"


def num_params(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
