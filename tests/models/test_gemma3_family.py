"""The model-family interface: both families registered and resolvable, a checkpoint's family
found from its config.json, and Gemma 3 honouring the shared contract -- jdelta's sampler, unchanged,
decodes it greedily (text prompts, past the sliding window) to transformers' generate tokens."""

import json

import numpy as np
import pytest
import torch
from flax import nnx
from gemma3_tiny import PAD, WINDOW, make_batch, tiny_checkpoint

from jdelta.models.family import (
    FAMILIES,
    family_for_model_type,
    family_of_checkpoint,
    family_of_model,
    get_family,
    load_checkpoint,
)
from jdelta.models.gemma3 import Gemma3ForConditionalGeneration, text_positions
from jdelta.sharding import DEFAULT_RULES


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("gemma3_tiny"))


def test_registry_resolves_every_hook():
    assert set(FAMILIES) == {"qwen3_vl", "gemma3"}
    for family in FAMILIES.values():
        for attr in ("config_class", "model_class", "load", "export", "positions", "parameter_counts",
                     "bundled_config", "image_processing", "chat"):
            assert getattr(family, attr) is not None, (family.name, attr)
        assert hasattr(family.chat, "build_prompt") and hasattr(family.image_processing, "process_images")
    assert get_family("gemma3").model_class is Gemma3ForConditionalGeneration
    with pytest.raises(ValueError, match="unknown model family 'llava'; known: gemma3, qwen3_vl"):
        get_family("llava")
    with pytest.raises(ValueError, match=r"cfg.json: model_type 'llama' is not a supported family \(supported: "
                                         r"gemma3, qwen3_vl\)"):
        family_for_model_type("llama", "cfg.json")


def test_family_of_checkpoint_and_model(ckpt, tmp_path):
    _, model, config, path = ckpt
    assert family_of_checkpoint(path).name == "gemma3"
    assert family_of_checkpoint(get_family("qwen3_vl").bundled_config("2b")).name == "qwen3_vl"
    assert family_of_checkpoint(get_family("gemma3").bundled_config("4b")).name == "gemma3"
    assert family_of_model(model).name == "gemma3"
    loaded, cfg2 = load_checkpoint(path)
    assert isinstance(loaded, Gemma3ForConditionalGeneration) and cfg2 == config
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    with pytest.raises(ValueError, match="model_type 'mllama' is not a supported family"):
        family_of_checkpoint(tmp_path)
    ids, mask, _ = make_batch([[4], [7]])
    pos, deltas = get_family("gemma3").positions(ids, None, mask, config)
    np.testing.assert_array_equal(pos, text_positions(mask)[0])
    np.testing.assert_array_equal(deltas, mask.sum(1) - ids.shape[1])


def test_every_parameter_has_known_logical_axes(ckpt):
    _, model, _, _ = ckpt
    rules = dict(DEFAULT_RULES)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
        assert all(n is None or n in rules for n in names), (path, names)


def test_sampler_greedy_equals_hf_generate(ckpt):
    from jdelta.sampling import DecodeOptions, Sampler, SamplingParams

    hf, model, _, _ = ckpt
    ids, mask, _ = make_batch([[11], [5], [8]], seed=3)
    steps = 2 * WINDOW
    sampler = Sampler(model, seq_buckets=(16,), pad_id=PAD, decode_options=DecodeOptions(kv_segment_min=8))
    out = sampler.generate({"input_ids": ids, "attention_mask": mask},
                           SamplingParams(temperature=0.0, max_new_tokens=steps), rng=0)
    with torch.no_grad():
        gen = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=steps,
                          do_sample=False, pad_token_id=PAD, eos_token_id=None)
    np.testing.assert_array_equal(out.tokens, gen[:, ids.shape[1]:].numpy())
