"""Gemma 3 bundled configs: eval_shape parameter counts of the 4B, 12B and 27B sizes (no weights).

The configs and the published sizes are recalled, not checked against the hub (no network):
google/gemma-3-{4b,12b,27b}-it are listed as 4.3B, 12.2B and 27.4B parameters.
"""

import pytest

from jdelta.models.gemma3 import Gemma3Config
from jdelta.models.gemma3.info import SIZES, bundled_config, describe, parameter_counts

PUBLISHED = {"4b": 4.30e9, "12b": 12.2e9, "27b": 27.4e9}


def siglip_count(d=1152, mlp=4304, layers=27, patch=14, positions=(896 // 14) ** 2) -> int:
    """SigLIP without head: patch conv + position table + layers (4 biased projections, biased MLP,
    2 LayerNorms) + final LayerNorm."""
    per_layer = 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 2 * 2 * d
    return 3 * patch * patch * d + d + positions * d + layers * per_layer + 2 * d


@pytest.mark.parametrize("size", SIZES)
def test_counts_match_published_sizes(size):
    config = Gemma3Config.from_pretrained(bundled_config(size))
    counts = parameter_counts(config)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert abs(counts["total"] - PUBLISHED[size]) / PUBLISHED[size] < 0.01, counts
    t = config.text
    assert counts["embeddings"] == t.vocab_size * t.hidden_size  # tied head
    assert counts["vision"] == siglip_count() == 416_866_032  # SigLIP So400m/14
    assert counts["projector"] == 1152 + 1152 * t.hidden_size
    per_layer = (t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
                 + 3 * t.hidden_size * t.intermediate_size + 4 * t.hidden_size + 2 * t.head_dim)
    assert counts["text"] == t.num_hidden_layers * per_layer + t.hidden_size
    assert t.layer_types.count("full_attention") == t.num_hidden_layers // 6
    assert t.rope_global.factor == 8.0 and t.rope_local.theta == 10_000.0 and t.sliding_window == 1024
    print(size, {k: f"{v / 1e9:.3f}B" for k, v in counts.items()}, *describe(config), sep="\n")
