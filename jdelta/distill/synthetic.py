"""Synthetic prompt batches and tiny random model pairs: smoke tests, the CPU demo, benchmarks.

Not data for real training: random token prompts (special ids avoided) with one random
image each (``pixel_values`` of the model's patch layout) and a pixelated view of it,
in the same left-padded layout the Grain pipeline yields.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from jdelta.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from jdelta.models.qwen3_vl.config import Qwen3VLTextConfig, Qwen3VLVisionConfig


def tiny_config(hidden: int = 32, layers: int = 2, vocab: int = 64, *, heads: int = 4, kv_heads: int = 2,
                vision: bool = True) -> Qwen3VLConfig:
    """A tiny Qwen3-VL config (vocabulary ``vocab``; the last 4 ids are the vision specials)."""
    head_dim = hidden // heads
    text = Qwen3VLTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             head_dim=head_dim, mrope_section=(head_dim // 8, head_dim // 8, head_dim // 4),
                             max_position_embeddings=4096)
    vis = Qwen3VLVisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                              patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                              deepstack_visual_indexes=(0,))
    return Qwen3VLConfig(text=text, vision=vis, image_token_id=vocab - 4, video_token_id=vocab - 3,
                         vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1)


def random_model(config: Qwen3VLConfig, seed: int, *, logit_scale: float = 1.0) -> Qwen3VLForConditionalGeneration:
    """A randomly initialised model; ``logit_scale`` multiplies the LM head (a peaked, 'opinionated' teacher)."""
    model = Qwen3VLForConditionalGeneration(config, rngs=nnx.Rngs(seed))
    if logit_scale != 1.0:
        if model.lm_head is None:
            raise ValueError("logit_scale needs an untied LM head")
        model.lm_head.kernel.set_value(model.lm_head.kernel.get_value() * logit_scale)
    return model


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


def num_params(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
