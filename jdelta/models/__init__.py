"""Model families implemented in Flax NNX (Qwen3-VL, Gemma 3), registered in :mod:`jdelta.models.family`."""
