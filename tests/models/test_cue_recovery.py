"""ViCuR's cue-recovery module: against an independent PyTorch implementation of METHODS.md, its
placement in the decoder (after DeepStack) against transformers + that implementation, the
fallback sink, prefill-only execution (decode equals a full recompute), Orbax and HF-export
persistence, and the parameter count of ``jdelta model-info``."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from qwen3_vl_tiny import IMG, TOL, hf_logits, jd_bucketed, jd_forward, make_batch, randomize, tiny_hf_config
from transformers import Qwen3VLForConditionalGeneration as HFModel

from jdelta.cli import main
from jdelta.models.cue_recovery import (
    CueRecovery,
    CueRecoveryConfig,
    attach_cue_recovery,
    detach_cue_recovery,
    module_layers,
    num_params,
    sink_positions,
)
from jdelta.models.qwen3_vl.weights import CUE_SETTINGS, CUE_WEIGHTS, load_hf_checkpoint, save_hf_checkpoint

SINK = 245  # stands for <|im_start|>: outside make_batch's random text ids [1, 240)
LAYERS = 6  # module layers after decoder layers 0 and 5; DeepStack after layers 0 and 1
ACTIVE = CueRecoveryConfig(sink_token_id=SINK, init="normal", init_std=0.15, seed=3)


# ----------------------------------------------------------------------------- the reference


def torch_cue_recovery(h, input_ids, attention_mask, visual_mask, weights, layer, *, heads, sink_id, eps=1e-6):
    """METHODS.md's module step after decoder layer ``layer``, row by row, in float64 torch.

    ``weights``: torch-layout ``[out, in]`` ``layers.<j>.{q,k,v,o}_proj.weight``, ``query_norm.weight``,
    ``kv_norm.weight``. Keys and values are projected token by token (the direct form).
    """
    h = h.clone()
    j = layer // 5
    w = {k: weights[f"layers.{j}.{k}_proj.weight"] for k in "qkvo"}

    def rms(x, g):
        return g * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    hidden = h.shape[-1]
    d = hidden // heads
    for b in range(h.shape[0]):
        real = attention_mask[b].bool()
        if not real.any():
            continue
        sinks = torch.nonzero((input_ids[b] == sink_id) & real).flatten()
        sink = int(sinks[0]) if len(sinks) else int(torch.nonzero(real).flatten()[0])
        vis = torch.nonzero(visual_mask[b]).flatten()
        if len(vis) == 0:
            continue
        q = (rms(h[b, sink], weights["query_norm.weight"]) @ w["q"].T).view(heads, d)
        kv = rms(h[b, vis], weights["kv_norm.weight"])
        k = (kv @ w["k"].T).view(-1, heads, d)
        v = (kv @ w["v"].T).view(-1, heads, d)
        att = torch.softmax((q[None] * k).sum(-1).float() * d ** -0.5, dim=0).to(h.dtype)  # [T, heads]
        o = (att[..., None] * v).sum(0).reshape(hidden) @ w["o"].T
        h[b, sink] = h[b, sink] + o
    return h


def torch_weights(module: CueRecovery, dtype=torch.float64) -> dict[str, torch.Tensor]:
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        value = np.asarray(var.get_value(), np.float64)
        name = ".".join(str(p) for p in path)
        if path[-1] == "kernel":
            name, value = name[: -len("kernel")] + "weight", value.T
        out[name] = torch.tensor(value, dtype=dtype)
    return out


def cue_batch(pad_to=40):
    """Left-padded rows with 1, 2, 0 and 1 images; sinks placed by hand (see the comments)."""
    ids, mask, pv, grid = make_batch(
        [[3, (1, 4, 6), 4], [3, (1, 4, 6), 2, (1, 2, 2), 4], [9], [2, (1, 2, 4), 3]], pad_to=pad_to)
    first = mask.argmax(1)
    ids[0, first[0] + 1] = SINK  # sink: the 2nd real token (not the fallback)
    ids[1, first[1] + 2] = SINK  # two sinks: the first one counts
    ids[1, -2] = SINK
    ids[2, first[2] + 4] = SINK  # text only: nothing to read, unchanged
    # row 3: no sink -> the first real token
    return ids, mask, pv, grid


# ----------------------------------------------------------------------------- the module alone


def test_sink_positions_and_fallback():
    ids = jnp.asarray([[0, 0, 7, SINK, 9, SINK], [0, 5, 6, 7, 8, 9], [0, 0, 0, 0, 0, 0], [SINK, 1, 2, SINK, 3, 4]])
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]])
    # row 3: a padding position holding the sink id does not count
    np.testing.assert_array_equal(sink_positions(ids, mask, SINK), [3, 1, 0, 3])
    np.testing.assert_array_equal(sink_positions(ids, mask, None), [2, 1, 0, 1])


def test_module_matches_torch_reference():
    """Module layers after decoder layers 0 and 5 on random hidden states of a padded batch with
    0/1/2 images: <= 1e-5 against the float64 torch reference; only the sinks of rows with images
    change, bit for bit nothing else."""
    ids, mask, _, _ = cue_batch()
    visual = (ids == IMG) & mask.astype(bool)
    module = CueRecovery(64, LAYERS, 4, ACTIVE)
    assert module.at_layers == module_layers(LAYERS, 5) == (0, 5)
    rng = np.random.default_rng(0)
    h0 = rng.normal(size=(*ids.shape, 64)).astype(np.float32)
    hook = module.layer_hook(jnp.asarray(ids), jnp.asarray(mask))
    got = jnp.asarray(h0)
    ref = torch.tensor(h0, dtype=torch.float64)
    w = torch_weights(module)
    t_ids, t_mask, t_vis = torch.tensor(ids), torch.tensor(mask), torch.tensor(visual)
    for i in range(LAYERS):
        got = jax.jit(hook, static_argnums=0)(i, got, jnp.asarray(visual), jnp.asarray(mask))
        if i in (0, 5):
            ref = torch_cue_recovery(ref, t_ids, t_mask, t_vis, w, i, heads=4, sink_id=SINK)
    got, ref = np.asarray(got), ref.numpy()
    diff = np.abs(got - ref).max()
    assert diff <= 1e-5, diff
    changed = np.argwhere(np.any(got != h0, axis=-1))
    first = mask.argmax(1)
    assert changed.tolist() == [[0, first[0] + 1], [1, first[1] + 2], [3, first[3]]]
    assert np.abs(got - h0).max() > 0.1  # the module is active: the comparison means something


def test_zero_out_init_is_identity_and_gradients_reach_the_module():
    """Default init: Wo = 0, so the module starts as the identity, yet the loss has a gradient in Wo."""
    ids, mask, _, _ = cue_batch()
    visual = jnp.asarray((ids == IMG) & mask.astype(bool))
    module = CueRecovery(64, LAYERS, 4, CueRecoveryConfig(sink_token_id=SINK))
    h = jnp.asarray(np.random.default_rng(1).normal(size=(*ids.shape, 64)), jnp.float32)
    out = module.layer_hook(jnp.asarray(ids), jnp.asarray(mask))(0, h, visual, jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(h))
    graphdef, params = nnx.split(module)

    def loss(p):
        m = nnx.merge(graphdef, p)
        return jnp.sum(m.layer_hook(jnp.asarray(ids), jnp.asarray(mask))(0, h, visual, jnp.asarray(mask)) ** 2)

    grads = dict(nnx.to_flat_state(jax.grad(loss)(params)))
    assert float(jnp.abs(grads[("layers", 0, "o_proj", "kernel")].get_value()).max()) > 0
    assert float(jnp.abs(grads[("layers", 0, "q_proj", "kernel")].get_value()).max()) == 0  # Wo = 0 blocks it


# ----------------------------------------------------------------------------- in the model


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    """A 6-layer tiny transformers model saved to disk and loaded by jdelta (plain, no module)."""
    path = tmp_path_factory.mktemp("cue_tiny")
    cfg = tiny_hf_config(tie=False)
    cfg.text_config.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    hf = randomize(HFModel(cfg).eval())
    hf.save_pretrained(path)
    model, config = load_hf_checkpoint(path)
    return hf, model, config, path


def with_module(model, cfg=ACTIVE):
    graphdef, state = nnx.split(model)
    return attach_cue_recovery(nnx.merge(graphdef, state), cfg)  # a copy: the fixture stays plain


def hf_logits_with_module(hf, module, ids, mask, pv, grid, *, before_deepstack=False):
    """transformers' forward with :func:`torch_cue_recovery` after decoder layers 0, 5: as the input
    of the next layer (or the final norm), i.e. after DeepStack; or, to show the placement matters,
    on the layer's own output (before DeepStack)."""
    w = torch_weights(module, torch.float32)
    t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
    t_vis = (t_ids == IMG) & t_mask.bool()
    lm = hf.model.language_model
    handles = []
    for i in module.at_layers:
        def apply(h, i=i):
            return torch_cue_recovery(h, t_ids, t_mask, t_vis, w, i, heads=4, sink_id=SINK)

        if before_deepstack:
            handles.append(lm.layers[i].register_forward_hook(lambda mod, args, out, f=apply: f(out)))
        else:
            nxt = lm.layers[i + 1] if i + 1 < LAYERS else lm.norm
            handles.append(nxt.register_forward_pre_hook(
                lambda mod, args, kwargs, f=apply: ((f(args[0]), *args[1:]), kwargs), with_kwargs=True))
    try:
        return hf_logits(hf, ids, mask, pv, grid)
    finally:
        for hd in handles:
            hd.remove()


def test_model_with_module_matches_transformers_plus_reference(six_layers):
    """The whole student with the module (padded batch, 0/1/2 images) equals transformers with the
    reference module after DeepStack (the model parity tolerance); the module moves the logits by
    far more than that, and the same module placed before DeepStack would not match."""
    hf, model, _, _ = six_layers
    student = with_module(model)
    ids, mask, pv, grid = cue_batch()
    got = jd_bucketed(student, ids, mask, pv, grid)[0]
    ref = hf_logits_with_module(hf, student.cue_recovery, ids, mask, pv, grid)
    valid = mask.astype(bool)
    diff = np.abs(got[valid] - ref[valid]).max()
    assert diff <= TOL, diff
    plain = hf_logits(hf, ids, mask, pv, grid)
    assert np.abs(plain[valid] - ref[valid]).max() > 100 * TOL
    np.testing.assert_array_equal(plain[2], ref[2])  # the text-only row is untouched
    early = hf_logits_with_module(hf, student.cue_recovery, ids, mask, pv, grid, before_deepstack=True)
    assert np.abs(early[valid] - ref[valid]).max() > 10 * TOL


def test_decode_with_module_equals_full_recompute(six_layers, monkeypatch):
    """Sampler: prefill runs the module, decode steps do not (the hook is built once, for the
    prefill trace), and the sampled tokens' log-probs equal a full uncached forward with the module."""
    from jdelta.sampling import Sampler, SamplingParams

    _, model, config, _ = six_layers
    student = with_module(model)
    built = []
    original = CueRecovery.layer_hook
    monkeypatch.setattr(CueRecovery, "layer_hook", lambda self, *a: built.append(1) or original(self, *a))
    ids, mask, pv, grid = cue_batch(pad_to=32)
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
    sampler = Sampler(student, seq_buckets=(32,), patch_buckets=(128,), image_buckets=(4,))
    out = sampler.generate(batch, SamplingParams(temperature=1.0, max_new_tokens=5), rng=0)
    assert len(built) == 1 and out.stats["decode_steps"] == 5
    full_ids = np.concatenate([ids, out.tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(out.tokens)], axis=1)
    logits = np.asarray(jd_forward(student, full_ids, full_mask, pv, grid).logits)
    s = ids.shape[1]
    logp = jax.nn.log_softmax(jnp.asarray(logits[:, s - 1: -1]), axis=-1)
    want = np.take_along_axis(np.asarray(logp), out.tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(out.raw_logprobs, want, atol=2e-5)
    # the module matters for these tokens (else the comparison would not test it)
    plain_logits = np.asarray(jd_forward(model, full_ids, full_mask, pv, grid).logits)
    plain = np.take_along_axis(np.asarray(jax.nn.log_softmax(plain_logits[:, s - 1: -1])), out.tokens[..., None], -1)
    assert np.abs(plain[..., 0] - want)[[0, 1, 3]].max() > 1e-3


# ----------------------------------------------------------------------------- persistence


def _params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_orbax_checkpoint_saves_and_restores_the_module(six_layers, tmp_path):
    from jdelta.checkpoint import Checkpointer, CheckpointMismatchError

    _, model, _, _ = six_layers
    student = with_module(model)
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, async_save=False)
    ckpt.save(1, nnx.state(student, nnx.Param))
    ckpt.wait()
    fresh = with_module(model, CueRecoveryConfig(sink_token_id=SINK, init="normal", seed=9))
    restored, _ = ckpt.restore(nnx.state(fresh, nnx.Param))
    nnx.update(fresh, restored)
    want, got = _params(student), _params(fresh)
    assert any(p[0] == "cue_recovery" for p in want) and want.keys() == got.keys()
    for p in want:
        np.testing.assert_array_equal(got[p], want[p])
    # a student without the module cannot take this checkpoint silently
    with pytest.raises(CheckpointMismatchError, match="cue_recovery.*in the checkpoint only"):
        ckpt.restore(nnx.state(model, nnx.Param))
    ckpt.close()


def test_hf_export_plain_student_plus_module_file(six_layers, tmp_path):
    """The export is a plain student (transformers loads it with no unexpected or missing key) plus
    cue_recovery.{json,safetensors}, which jdelta loads back into the same function."""
    _, model, config, _ = six_layers
    student = with_module(model)
    out = save_hf_checkpoint(student, config, tmp_path / "export")
    settings = json.loads((out / CUE_SETTINGS).read_text())
    assert settings["layers"] == [0, 5] and settings["num_heads"] == 4 and settings["config"]["sink_token_id"] == SINK
    hf, info = HFModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask, pv, grid = cue_batch()
    valid = mask.astype(bool)
    plain_ref = hf_logits(hf.eval(), ids, mask, pv, grid)
    assert np.abs(plain_ref[valid] - jd_bucketed(model, ids, mask, pv, grid)[0][valid]).max() <= TOL

    loaded, _ = load_hf_checkpoint(out)
    assert loaded.cue_recovery is not None and loaded.cue_recovery.cfg == ACTIVE
    want, got = _params(student), _params(loaded)
    assert want.keys() == got.keys()
    for p in want:
        np.testing.assert_array_equal(got[p], want[p])
    np.testing.assert_array_equal(jd_bucketed(loaded, ids, mask, pv, grid)[0], jd_bucketed(student, ids, mask, pv, grid)[0])
    assert load_hf_checkpoint(out, cue_recovery=False)[0].cue_recovery is None

    # exporting the plain student into the same directory removes the stale module files
    plain = with_module(model)
    detach_cue_recovery(plain)
    save_hf_checkpoint(plain, config, out)
    assert not (out / CUE_SETTINGS).exists() and not (out / CUE_WEIGHTS).exists()


def test_module_loads_sharded_on_a_mesh_and_computes_the_same(six_layers, tmp_path):
    """Loaded on an fsdp=4 x tensor=2 mesh, the module's kernels are split by their logical axes
    (embed -> fsdp, q_proj -> tensor) and the sharded student computes the single-device logits."""
    from jax.sharding import PartitionSpec as P

    from jdelta.sharding import make_mesh

    _, model, config, _ = six_layers
    student = with_module(model)
    save_hf_checkpoint(student, config, tmp_path)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sharded, _ = load_hf_checkpoint(tmp_path, mesh=mesh)
    layer = sharded.cue_recovery.layers[1]
    q, o = layer.q_proj.kernel.get_value(), layer.o_proj.kernel.get_value()
    assert q.sharding.spec == P("fsdp", "tensor") and o.sharding.spec == P("tensor", "fsdp")
    assert q.addressable_shards[0].data.shape == (16, 32) and len(q.sharding.device_set) == 8
    ids, mask, pv, grid = cue_batch()
    single = jd_bucketed(student, ids, mask, pv, grid)[0]
    with jax.set_mesh(mesh):
        multi = jd_bucketed(sharded, ids, mask, pv, grid)[0]
    valid = mask.astype(bool)
    assert np.abs(multi[valid] - single[valid]).max() <= 1e-5


def test_module_file_for_another_model_is_one_clear_error(six_layers, tmp_path):
    from jdelta.models.qwen3_vl.weights import CheckpointMismatchError, load_cue_recovery

    _, model, config, _ = six_layers
    save_hf_checkpoint(with_module(model), config, tmp_path)
    settings = json.loads((tmp_path / CUE_SETTINGS).read_text())
    settings["num_hidden_layers"] = 36
    (tmp_path / CUE_SETTINGS).write_text(json.dumps(settings))
    with pytest.raises(CheckpointMismatchError, match=r"does not fit this model: num_hidden_layers 36 \(model: 6\)"):
        load_cue_recovery(with_module(model), tmp_path)


# ----------------------------------------------------------------------------- size


@pytest.mark.parametrize("size, expected, paper", [("2b", 100_667_392, "100.7"), ("8b", 536_879_104, "536.9")])
def test_model_info_counts_the_module_as_the_paper(size, expected, paper, capsys):
    assert main(["model-info", "--model", size, "--cue-recovery", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["cue_recovery"] == expected and f"{expected / 1e6:.1f}" == paper
    assert counts["total"] == counts["vision"] + counts["text"] + counts["embeddings"] + expected


def test_num_params_formula():
    module = CueRecovery(64, 11, 4, CueRecoveryConfig())
    assert module.at_layers == (0, 5, 10)
    assert num_params(module) == 3 * 4 * 64 * 64 + 2 * 64

