"""Qwen3-VL (dense) in Flax NNX: config, model, HF weights in and out."""

from jdelta.models.qwen3_vl.config import Qwen3VLConfig, Qwen3VLTextConfig, Qwen3VLVisionConfig
from jdelta.models.qwen3_vl.model import (
    KVCache,
    Qwen3VLForConditionalGeneration,
    Qwen3VLOutput,
    place_visual_features,
)
from jdelta.models.qwen3_vl.positions import get_rope_index
from jdelta.models.qwen3_vl.weights import CheckpointMismatchError, load_hf_checkpoint, save_hf_checkpoint

__all__ = [
    "CheckpointMismatchError",
    "KVCache",
    "Qwen3VLConfig",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLOutput",
    "Qwen3VLTextConfig",
    "Qwen3VLVisionConfig",
    "get_rope_index",
    "load_hf_checkpoint",
    "place_visual_features",
    "save_hf_checkpoint",
]
