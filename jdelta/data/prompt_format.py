"""Qwen3-VL's part of the prompt pipeline (:class:`QwenPromptFormat`), and the interface every family's part honours.

The pipeline (:mod:`jdelta.data.pipeline`) is family-free: per record it asks the family's
prompt format for the images' pixel rows and grid rows and for the prompt tokens, and per batch
for the padded pixel rows. A family registers its format in :mod:`jdelta.models.family`
(``prompt_format_ref``); :func:`prompt_format` picks the one a :class:`PipelineConfig` names.

The contract (:class:`PromptFormat`):

* ``special``: the tokenizer's special tokens (``pad``, ``stop_ids``, ``image``, ``sink``);
* ``images(pil_images, record=) -> (pixels, grids [n, 3] int32, layout)``: ``pixels`` are the
  example's stored pixel rows (any dtype; ``prod(grids[i])`` rows per image ``i``), ``layout``
  what :meth:`prompt` needs to place the images;
* ``prompt(question, layout, hint=None) -> PromptTokens``;
* ``pixel_rows(n) -> int``: the padded pixel-row count of a batch needing ``n`` rows;
* ``collate_pixels(parts, rows) -> pixel_values [rows, ...] float32`` (zero rows past the parts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from jdelta.buckets import bucket
from jdelta.data.chat import PromptTokens, build_prompt
from jdelta.data.image_processor import normalise_patches, process_images_uint8
from jdelta.data.tokenizer import SpecialTokens

if TYPE_CHECKING:
    from jdelta.data.pipeline import PipelineConfig


class PromptFormat(Protocol):
    """A family's part of the prompt pipeline (see the module docstring; ``tokenizer`` None: pixels only)."""

    special: Any

    def images(self, pil_images: Sequence[Any], *, record: str | None = None) -> tuple[np.ndarray, np.ndarray, Any]: ...

    def prompt(self, question: str, layout: Any, *, hint: str | None = None) -> PromptTokens: ...

    def pixel_rows(self, n: int) -> int: ...

    def collate_pixels(self, parts: Sequence[np.ndarray], rows: int) -> np.ndarray: ...


class QwenPromptFormat:
    """Qwen3-VL: uint8 patch rows in merge-window order, ``<|vision_start|><|image_pad|>*k<|vision_end|>``
    per image, patch rows padded to ``patch_buckets`` and normalised at collation."""

    def __init__(self, tokenizer, config: PipelineConfig):
        self.tokenizer, self.config = tokenizer, config
        self.special = None if tokenizer is None else SpecialTokens.from_tokenizer(tokenizer)

    def images(self, pil_images, *, record=None):
        pixels, grids = process_images_uint8(pil_images, config=self.config.image, record=record)
        return pixels, grids, [tuple(int(v) for v in g) for g in grids]

    def prompt(self, question, layout, *, hint=None):
        cfg = self.config
        return build_prompt(self.tokenizer, question, layout, system=cfg.system, merge_size=cfg.image.merge_size,
                            enable_thinking=cfg.enable_thinking, hint=hint, special=self.special)

    def pixel_rows(self, n: int) -> int:
        return bucket(max(n, 1), self.config.patch_buckets)

    def collate_pixels(self, parts, rows):
        image = self.config.image
        out = np.empty((rows, image.patch_dim), np.float32)
        row = 0
        for p in parts:
            normalise_patches(p, image.temporal_patch_size, out=out[row: row + len(p)])
            row += len(p)
        out[row:] = 0.0
        return out


def prompt_format(tokenizer, config: PipelineConfig) -> PromptFormat:
    """The prompt format of ``config.family`` for ``tokenizer``."""
    from jdelta.models.family import get_family

    return get_family(config.family).prompt_format(tokenizer, config)
