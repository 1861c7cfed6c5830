"""Qwen3-VL HF weights in and out, sharded loading, and clear errors for bad checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from qwen3_vl_tiny import (
    CASES,
    assert_parity,
    hf_logits,
    jd_bucketed,
    make_batch,
    tiny_checkpoint,
    tiny_hf_config,
)
from safetensors.torch import load_file, save_file
from transformers import Qwen3VLForConditionalGeneration as HFModel

from jdelta.errors import UserError
from jdelta.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from jdelta.models.qwen3_vl.weights import (
    CheckpointFileError,
    CheckpointMismatchError,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from jdelta.sharding import make_mesh


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("qwen3vl_tiny"))


def _params(model):
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_export_roundtrip_transformers_loads_same_logits(ckpt, tmp_path):
    hf, model, config, _ = ckpt
    out = save_hf_checkpoint(model, config, tmp_path / "export")
    hf2 = HFModel.from_pretrained(out).eval()
    ref_sd, new_sd = hf.state_dict(), hf2.state_dict()
    assert set(ref_sd) == set(new_sd)
    for key, value in ref_sd.items():
        assert torch.equal(value, new_sd[key]), key
    ids, mask, pv, grid = make_batch(CASES["batch_left_padding"])
    np.testing.assert_array_equal(hf_logits(hf2, ids, mask, pv, grid), hf_logits(hf, ids, mask, pv, grid))
    # and jdelta reads its own export back bit-exactly
    again, config2 = load_hf_checkpoint(out)
    assert config2 == config
    for key, value in _params(model).items():
        np.testing.assert_array_equal(_params(again)[key], value)


def test_untied_random_jdelta_model_exports_and_matches(tmp_path):
    """An untied lm_head, written by jdelta in several shards + index, loads in transformers."""
    config = Qwen3VLConfig.from_hf_dict(tiny_hf_config(tie=False).to_dict())
    model = Qwen3VLForConditionalGeneration(config, rngs=nnx.Rngs(3))
    # scale the random weights up so logits are O(1)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 5.0 if x.ndim == 2 else x, state))
    out = save_hf_checkpoint(model, config, tmp_path / "untied", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" in index["weight_map"]
    hf = HFModel.from_pretrained(out).eval()
    assert not hf.config.tie_word_embeddings
    ids, mask, pv, grid = make_batch(CASES["two_images_different_sizes"])
    logits, _, _ = jd_bucketed(model, ids, mask, pv, grid)
    assert_parity(hf_logits(hf, ids, mask, pv, grid), logits, mask)


def test_sharded_hf_checkpoint_and_bf16(ckpt, tmp_path):
    hf, model, _, _ = ckpt
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded, _ = load_hf_checkpoint(tmp_path / "sharded")
    ref = _params(model)
    for key, value in _params(sharded).items():
        np.testing.assert_array_equal(value, ref[key])
    half, config = load_hf_checkpoint(tmp_path / "sharded", dtype="bfloat16")
    assert config.dtype == config.param_dtype == "bfloat16"
    for key, value in _params(half).items():
        assert value.dtype == jnp.bfloat16, key
        np.testing.assert_array_equal(value, ref[key].astype(jnp.bfloat16))
    # a bf16 model exports bf16 safetensors that transformers reads back bit-exactly
    out = save_hf_checkpoint(half, config, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf_half = HFModel.from_pretrained(out, dtype=torch.bfloat16)
    for key, value in hf.state_dict().items():
        assert hf_half.state_dict()[key].dtype == torch.bfloat16
        assert torch.equal(hf_half.state_dict()[key], value.to(torch.bfloat16)), key


def _corrupt(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")


def test_mismatched_checkpoint_fails_with_clear_message(ckpt, tmp_path):
    _, _, _, path = ckpt

    def edit(t):
        del t["model.language_model.layers.1.mlp.up_proj.weight"]
        t["model.visual.blocks.0.attn.qkv.weight"] = torch.zeros(95, 32)
        t["model.visual.blocks.7.attn.qkv.weight"] = torch.zeros(96, 32)

    _corrupt(path, tmp_path / "bad", edit)
    with pytest.raises(CheckpointMismatchError) as err:
        load_hf_checkpoint(tmp_path / "bad")
    msg = str(err.value)
    assert str(tmp_path / "bad") in msg
    assert "missing keys (1):\n    model.language_model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected keys (1):\n    model.visual.blocks.7.attn.qkv.weight" in msg
    assert "model.visual.blocks.0.attn.qkv.weight: checkpoint (95, 32) vs expected (96, 32)" in msg

    _corrupt(path, tmp_path / "missing_one", lambda t: t.pop("model.visual.pos_embed.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\):\n    model.visual.pos_embed.weight"):
        load_hf_checkpoint(tmp_path / "missing_one")
    with pytest.raises(FileNotFoundError, match="no Qwen3-VL config"):
        load_hf_checkpoint(tmp_path)


def test_truncated_safetensors_names_the_file(ckpt, tmp_path):
    """A half-written safetensors file: one line naming the file (it used to be numpy's
    "mmap length is greater than file size")."""
    _, _, _, path = ckpt
    data = (path / "model.safetensors").read_bytes()
    for name, cut in (("half", len(data) // 2), ("header", 20), ("stub", 5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((path / "config.json").read_text())
        (tmp_path / name / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(CheckpointFileError) as e:
            load_hf_checkpoint(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / name / 'model.safetensors'}: ") and "\n" not in msg, msg
        assert isinstance(e.value, UserError)
    with pytest.raises(CheckpointFileError, match=rf"half/model.safetensors: truncated safetensors file \({len(data) // 2} "
                                                  rf"bytes, its header describes {len(data)}\)"):
        load_hf_checkpoint(tmp_path / "half")
    with pytest.raises(CheckpointFileError, match=r"header/model.safetensors: truncated or not a safetensors file"):
        load_hf_checkpoint(tmp_path / "header")


def test_materialised_parameters_do_not_alias_a_memory_map(tmp_path):
    """A parameter made from a memory map owns its data: the file rewritten in place, then
    truncated, changes nothing. (On CPU, ``device_put`` of an aligned NumPy array aliases it:
    before the copy, the rewrite changed the parameter and the truncation killed the process
    with SIGBUS.) Page-aligned data, as a checkpoint's tensors are whenever their offset is."""
    from jdelta.models.safetensors_io import materialise

    file = tmp_path / "w.bin"
    want = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    want.tofile(file)
    source = np.memmap(file, dtype=np.float32, mode="r", shape=want.shape)
    abstract = jax.ShapeDtypeStruct(want.shape, jnp.float32)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    sharded = jax.sharding.NamedSharding(mesh, P(None, None))
    params = [materialise(abstract, source), materialise(abstract, source, sharded)]
    np.zeros_like(want).tofile(file)  # same inode: the memory map now reads zeros
    assert float(np.asarray(source).sum()) == 0.0
    for x in params:
        np.testing.assert_array_equal(np.asarray(x), want)
    with open(file, "r+b") as f:
        f.truncate(0)
    assert [float(jnp.sum(x)) for x in params] == [float(want.sum())] * 2


def test_save_is_atomic(ckpt, tmp_path, monkeypatch):
    """A save that fails part-way leaves no file under the real name (nor a stray .tmp)."""
    import jdelta.models.qwen3_vl.weights as w

    _, model, config, _ = ckpt
    calls, to_hf_layout = [], w.to_hf_layout

    def boom(p, v, c):
        calls.append(p)
        if len(calls) == 5:
            raise RuntimeError("killed mid-save")
        return to_hf_layout(p, v, c)

    monkeypatch.setattr(w, "to_hf_layout", boom)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        save_hf_checkpoint(model, config, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json"]


def test_legacy_key_layout_loads(ckpt, tmp_path):
    _, model, _, path = ckpt

    def to_legacy(t):
        for key in list(t):
            new = key.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
            t[new] = t.pop(key)

    _corrupt(path, tmp_path / "legacy", to_legacy)
    legacy, _ = load_hf_checkpoint(tmp_path / "legacy")
    for key, value in _params(model).items():
        np.testing.assert_array_equal(_params(legacy)[key], value)


def test_mesh_fsdp4_tensor2_matches_single_device(ckpt):
    hf, model, _, path = ckpt
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sharded, _ = load_hf_checkpoint(path, mesh=mesh)
    q = sharded.language_model.layers[0].self_attn.q_proj.kernel.get_value()
    assert q.sharding.spec == P("fsdp", "tensor") and len(q.sharding.device_set) == 8
    assert q.addressable_shards[0].data.shape == (16, 32)
    emb = sharded.language_model.embed_tokens.get_value()
    assert emb.sharding.spec == P("tensor", "fsdp")
    for key, value in _params(sharded).items():
        np.testing.assert_array_equal(value, _params(model)[key])
    ids, mask, pv, grid = make_batch(CASES["batch_left_padding"])
    single, _, _ = jd_bucketed(model, ids, mask, pv, grid)
    with jax.set_mesh(mesh):  # activates the activation sharding constraints (batch over fsdp)
        multi, _, out = jd_bucketed(sharded, ids, mask, pv, grid)
    assert out.logits.sharding.spec == P("fsdp", None, "tensor")
    valid = mask.astype(bool)
    diff = np.abs(multi[valid] - single[valid]).max()
    print(f"8-device vs 1-device max|diff|={diff:.2e}")
    assert diff <= 1e-5
    assert_parity(hf_logits(hf, ids, mask, pv, grid), multi, mask)
