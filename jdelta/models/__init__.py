"""Model families implemented in Flax NNX (currently Qwen3-VL)."""
