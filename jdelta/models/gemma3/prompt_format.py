"""Gemma 3's part of the prompt pipeline (see :mod:`jdelta.data.prompt_format` for the contract).

Images become whole ``[3, S, S]`` pixel rows (plus their pan-and-scan crops when
``pipeline.gemma3.image.pan_and_scan``), one grid row ``(1, 1, 1)`` each; the prompt is the
Gemma 3 chat format with each image expanded to ``mm_tokens_per_image`` soft tokens
(:mod:`jdelta.models.gemma3.chat`). A batch's images are padded to ``image_buckets`` rows.
``enable_thinking`` has no meaning for Gemma 3 and is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from jdelta.buckets import bucket
from jdelta.config import check
from jdelta.models.gemma3.chat import Gemma3SpecialTokens, build_prompt
from jdelta.models.gemma3.image_processing import Gemma3ImageConfig, process_images

if TYPE_CHECKING:
    from jdelta.data.pipeline import PipelineConfig


@dataclass(frozen=True)
class Gemma3PipelineConfig:
    """The pipeline's Gemma 3 settings: the image processor's and the soft tokens per image (the
    model's ``mm_tokens_per_image``); :func:`jdelta.models.loading.pipeline_config_for` sets both from a model."""

    image: Gemma3ImageConfig = field(default_factory=Gemma3ImageConfig)
    mm_tokens_per_image: int = 256

    def __post_init__(self):
        check(self.mm_tokens_per_image >= 1, "mm_tokens_per_image", f"must be >= 1, got {self.mm_tokens_per_image}")
        check(self.image.size >= 1, "image.size", f"must be >= 1, got {self.image.size}")


class Gemma3PromptFormat:
    """Gemma 3 (see the module docstring)."""

    def __init__(self, tokenizer, config: PipelineConfig):
        self.tokenizer, self.config = tokenizer, config
        self.special = None if tokenizer is None else Gemma3SpecialTokens.from_tokenizer(tokenizer)

    def images(self, pil_images, *, record=None):
        pixels, crops = process_images(pil_images, self.config.gemma3.image, record=record)
        return pixels, np.ones((pixels.shape[0], 3), np.int32), list(crops)

    def prompt(self, question, layout, *, hint=None):
        cfg = self.config
        return build_prompt(self.tokenizer, question, layout, system=cfg.system,
                            mm_tokens_per_image=cfg.gemma3.mm_tokens_per_image, hint=hint, special=self.special)

    def pixel_rows(self, n: int) -> int:
        return bucket(max(n, 1), self.config.image_buckets)

    def collate_pixels(self, parts, rows):
        size = self.config.gemma3.image.size
        out = np.zeros((rows, 3, size, size), np.float32)
        row = 0
        for p in parts:
            out[row: row + len(p)] = p
            row += len(p)
        return out
