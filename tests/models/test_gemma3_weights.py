"""Gemma 3 HF weights in and out: every stored key layout, export that transformers loads with the
same logits, sharded loading on an (fsdp=4, tensor=2) mesh equal to one device, clear errors."""

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from gemma3_tiny import (
    CASES,
    assert_parity,
    hf_logits,
    jd_bucketed,
    make_batch,
    tiny_checkpoint,
    tiny_hf_config,
)
from jax.sharding import PartitionSpec as P
from safetensors.torch import load_file, save_file
from transformers import Gemma3ForConditionalGeneration as HFModel

from jdelta.models.gemma3 import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from jdelta.models.gemma3.weights import CheckpointMismatchError, canonical_key, release_key
from jdelta.sharding import make_mesh


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("gemma3_tiny"))


def _params(model):
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_export_roundtrip_transformers_loads_same_logits(ckpt, tmp_path):
    hf, model, config, _ = ckpt
    out = save_hf_checkpoint(model, config, tmp_path / "export")
    keys = set(load_file(out / "model.safetensors"))
    assert "vision_tower.vision_model.encoder.layers.1.self_attn.out_proj.weight" in keys  # the released layout
    assert "language_model.model.layers.3.post_feedforward_layernorm.weight" in keys
    assert "multi_modal_projector.mm_input_projection_weight" in keys
    hf2 = HFModel.from_pretrained(out, attn_implementation="eager").eval()
    ref_sd, new_sd = hf.state_dict(), hf2.state_dict()
    assert set(ref_sd) == set(new_sd)
    for key, value in ref_sd.items():
        assert torch.equal(value, new_sd[key]), key
    ids, mask, pv = make_batch(CASES["batch_left_padding"])
    np.testing.assert_array_equal(hf_logits(hf2, ids, mask, pv), hf_logits(hf, ids, mask, pv))
    again, config2 = load_hf_checkpoint(out)
    assert config2 == config
    for key, value in _params(model).items():
        np.testing.assert_array_equal(_params(again)[key], value)


def test_every_stored_key_layout_loads(ckpt, tmp_path):
    """transformers 5's module names (``model.*``) and the released ``vision_model`` layout read the same."""
    _, model, _, path = ckpt
    tensors = load_file(path / "model.safetensors")
    for name, rename in (("modules", canonical_key), ("released", lambda k: release_key(canonical_key(k)))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((path / "config.json").read_text())
        save_file({rename(k): v for k, v in tensors.items()}, tmp_path / name / "model.safetensors")
        loaded, _ = load_hf_checkpoint(tmp_path / name)
        for key, value in _params(model).items():
            np.testing.assert_array_equal(_params(loaded)[key], value)
    assert canonical_key("vision_tower.vision_model.post_layernorm.bias") == "model.vision_tower.post_layernorm.bias"
    assert canonical_key("language_model.lm_head.weight") == "lm_head.weight"


def test_untied_random_model_exports_in_shards_and_matches(tmp_path):
    config = Gemma3Config.from_hf_dict(tiny_hf_config(tie=False).to_dict())
    model = Gemma3ForConditionalGeneration(config, rngs=nnx.Rngs(3))
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 5.0 if x.ndim >= 2 else x + 0.3, state))  # O(1) logits
    out = save_hf_checkpoint(model, config, tmp_path / "untied", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "language_model.lm_head.weight" in index["weight_map"]
    hf = HFModel.from_pretrained(out).eval()
    hf.config._attn_implementation = "eager"
    assert not hf.config.tie_word_embeddings
    ids, mask, pv = make_batch(CASES["two_images"])
    logits, _, _ = jd_bucketed(model, ids, mask, pv)
    assert_parity(hf_logits(hf, ids, mask, pv), logits, mask)


def test_bf16_load_and_export(ckpt, tmp_path):
    hf, model, _, path = ckpt
    half, config = load_hf_checkpoint(path, dtype="bfloat16")
    assert config.dtype == config.param_dtype == "bfloat16"
    ref = _params(model)
    for key, value in _params(half).items():
        np.testing.assert_array_equal(value, ref[key].astype(value.dtype))
    out = save_hf_checkpoint(half, config, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf_half = HFModel.from_pretrained(out, dtype=torch.bfloat16)
    for key, value in hf.state_dict().items():
        assert torch.equal(hf_half.state_dict()[key], value.to(torch.bfloat16)), key


def test_mismatched_checkpoint_fails_with_clear_message(ckpt, tmp_path):
    _, _, _, path = ckpt
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((path / "config.json").read_text())
    t = load_file(path / "model.safetensors")
    del t["language_model.model.layers.1.mlp.up_proj.weight"]
    t["vision_tower.encoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(31, 32)
    t["vision_tower.encoder.layers.5.self_attn.q_proj.weight"] = torch.zeros(32, 32)
    save_file(t, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        load_hf_checkpoint(tmp_path / "bad")
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'bad'}: checkpoint does not match its config.json (Gemma 3)")
    assert "missing keys (1):\n    language_model.model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected keys (1):\n    vision_tower.vision_model.encoder.layers.5.self_attn.q_proj.weight" in msg
    assert ("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight: checkpoint (31, 32) vs "
            "expected (32, 32)") in msg
    with pytest.raises(FileNotFoundError, match="no Gemma 3 config"):
        load_hf_checkpoint(tmp_path)


def test_mesh_fsdp4_tensor2_matches_single_device(ckpt):
    hf, model, _, path = ckpt
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sharded, _ = load_hf_checkpoint(path, mesh=mesh)
    q = sharded.language_model.layers[0].self_attn.q_proj.kernel.get_value()
    assert q.sharding.spec == P("fsdp", "tensor") and q.addressable_shards[0].data.shape == (16, 32)
    assert sharded.language_model.embed_tokens.get_value().sharding.spec == P("tensor", "fsdp")
    fc1 = sharded.vision_tower.layers[0].mlp.fc1.kernel.get_value()
    assert fc1.sharding.spec == P("fsdp", "tensor") and len(fc1.sharding.device_set) == 8
    proj = sharded.multi_modal_projector.mm_input_projection_weight.get_value()
    assert proj.sharding.spec == P("fsdp", None)
    for key, value in _params(sharded).items():
        np.testing.assert_array_equal(value, _params(model)[key])
    ids, mask, pv = make_batch(CASES["batch_left_padding"])
    single, _, _ = jd_bucketed(model, ids, mask, pv)
    with jax.set_mesh(mesh):  # activates the activation sharding constraints
        multi, _, out = jd_bucketed(sharded, ids, mask, pv)
    assert out.logits.sharding.spec == P("fsdp", None, "tensor")
    valid = mask.astype(bool)
    diff = np.abs(multi[valid] - single[valid]).max()
    print(f"8-device vs 1-device max|diff|={diff:.2e}")
    assert diff <= 1e-5
    assert_parity(hf_logits(hf, ids, mask, pv), multi, mask)
