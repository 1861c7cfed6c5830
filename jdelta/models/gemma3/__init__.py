"""Gemma 3 vision-language (``Gemma3ForConditionalGeneration``) in Flax NNX: config, model, HF weights in and out."""

from jdelta.models.gemma3.config import Gemma3Config, Gemma3TextConfig, RopeSpec, SiglipVisionConfig
from jdelta.models.gemma3.model import (
    Gemma3ForConditionalGeneration,
    Gemma3Output,
    KVCache,
    attention_masks,
    get_rope_index,
    image_blocks,
    text_positions,
)
from jdelta.models.gemma3.weights import CheckpointMismatchError, load_hf_checkpoint, save_hf_checkpoint

__all__ = [
    "CheckpointMismatchError",
    "Gemma3Config",
    "Gemma3ForConditionalGeneration",
    "Gemma3Output",
    "Gemma3TextConfig",
    "KVCache",
    "RopeSpec",
    "SiglipVisionConfig",
    "attention_masks",
    "get_rope_index",
    "image_blocks",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
    "text_positions",
]
