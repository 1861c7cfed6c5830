"""``jdelta model-info``: eval_shape parameter counts of the real Qwen3-VL sizes."""

import json
from pathlib import Path

import pytest

from jdelta.cli import main
from jdelta.models.qwen3_vl import Qwen3VLConfig
from jdelta.models.qwen3_vl.info import bundled_config, parameter_counts, resolve_config

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


def test_cli_prints_counts(capsys, tmp_path):
    assert main(["model-info", "--model", "2b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == 2_127_532_032 and out["vision"] == 406_957_056
    assert main(["model-info", "--model", "8b"]) == 0
    text = capsys.readouterr().out
    assert "total:" in text and "8.767B" in text and "deepstack [8, 16, 24]" in text
    assert main(["model-info", "--model", "7b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["jdelta model-info: error: model '7b': not one of 2b, 4b, 8b, 32b, gemma3-4b, gemma3-12b, gemma3-27b "
                   "and no config.json at 7b"]
    # a checkpoint directory or a config.json file
    (tmp_path / "config.json").write_text(resolve_config("2b").read_text())
    for model in (tmp_path, tmp_path / "config.json"):
        assert main(["model-info", "--model", str(model), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["total"] == 2_127_532_032


def test_bundled_configs_are_package_data():
    """The size names resolve inside the installed package (importlib.resources), not a repo checkout."""
    from importlib import resources

    root = Path(str(resources.files("jdelta"))) / "configs" / "models"
    for size in PUBLISHED:
        assert resolve_config(size) == root / f"qwen3-vl-{size}.json"
    assert bundled_config("2B") == root / "qwen3-vl-2b.json"
