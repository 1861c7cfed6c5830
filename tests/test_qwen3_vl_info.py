"""``jdelta model-info``: eval_shape parameter counts of the real Qwen3-VL sizes."""

import json

import pytest

from jdelta.cli import main
from jdelta.models.qwen3_vl import Qwen3VLConfig
from jdelta.models.qwen3_vl.info import parameter_counts, resolve_config

# Sizes shown on the Hugging Face hub for Qwen/Qwen3-VL-*-Instruct (safetensors metadata).
PUBLISHED = {"2b": 2.13e9, "4b": 4.44e9, "8b": 8.77e9, "32b": 33.4e9}


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_counts_match_published_sizes(size):
    config = Qwen3VLConfig.from_pretrained(resolve_config(size))
    counts = parameter_counts(config)
    assert counts["total"] == counts["vision"] + counts["text"] + counts["embeddings"]
    assert abs(counts["total"] - PUBLISHED[size]) / PUBLISHED[size] < 0.005, counts
    t = config.text
    embed = t.vocab_size * t.hidden_size
    assert counts["embeddings"] == embed * (1 if config.tie_word_embeddings else 2)
    assert config.text.mrope_section == (24, 20, 20) and config.text.rope_theta == 5e6


def test_cli_prints_counts(capsys):
    assert main(["model-info", "--model", "2b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == 2_127_532_032 and out["vision"] == 406_957_056
    assert main(["model-info", "--model", "8b"]) == 0
    text = capsys.readouterr().out
    assert "total:" in text and "8.767B" in text and "deepstack [8, 16, 24]" in text
    with pytest.raises(FileNotFoundError, match="not one of"):
        main(["model-info", "--model", "7b"])
