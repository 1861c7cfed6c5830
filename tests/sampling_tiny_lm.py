"""The tiny text-only causal LM of the sampling/scoring tests: now in :mod:`jdelta.testing` (re-exported)."""

from jdelta.testing import (  # noqa: F401
    KVCache,
    TinyCausalLM,
    full_logits,
    left_padded_batch,
    make_model,
    tiny_rope_index,
)
from jdelta.testing import TinyLMConfig as TinyConfig  # noqa: F401
from jdelta.testing import TinyLMOutput as Output  # noqa: F401
