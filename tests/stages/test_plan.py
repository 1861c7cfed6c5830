"""``jdelta plan`` and :mod:`jdelta.memory_plan`: the planner against XLA's compiled memory analysis on an
8-device CPU mesh, its table, its refusals.

What is compared, per device, for each config (``MEASURE`` below, run in a subprocess with
``--xla_force_host_platform_device_count=8``):

* **parameters + optimizer state + gradients of a train step**: XLA's ``argument_size + temp_size`` of
  jdelta's own train step (``make_train_step`` + ``jit_train_step``: clipping, AdamW, the non-finite
  guard, donated state) compiled with a loss that keeps no activations (sum of squared parameters), vs
  the planner's float32 master weights + AdamW moments + gradients and update tree (20 bytes per
  parameter of the device's shard);
* **the sampler's KV cache**: XLA's ``output_size`` of ``jax.jit(prefill(...)[0])`` (the cache of
  ``B*n`` rows the decode loop carries) vs :func:`jdelta.memory_plan.kv_cache_bytes` (+ the index scalar);
* **teacher scoring activations**: XLA's ``temp_size`` of ``score_completions_fn`` (forward, chunked
  LM head, float32) vs :func:`jdelta.memory_plan.forward_activation_bytes`.

The scoring activations are compared on meshes with ``fsdp = 1``: with ``fsdp > 1`` XLA's partitioner
(on CPU at these tiny shapes) re-lays out a layer's intermediates with the batch gathered over
``fsdp`` and uses 3-5x the planner's figure; parameters and KV caches are exact on every mesh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jdelta import memory_plan as mp
from jdelta.cli import main

MEASURE = r'''
"""XLA's compiled memory analysis vs the planner, per device, on an 8-device CPU mesh (run in a subprocess)."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
from flax import nnx

from jdelta import memory_plan as mp
from jdelta.distill.step import jit_train_step, make_train_step
from jdelta.distill.train_state import OptimizerConfig, TrainState, make_optimizer
from jdelta.logprobs import score_completions_fn
from jdelta.models.qwen3_vl.weights import abstract_model
from jdelta.sampling import prefill
from jdelta.sharding import activation_sharding, make_mesh, state_shardings
from jdelta.testing import tiny_qwen3_vl_config


def abstract_on(tree, mesh):
    """ShapeDtypeStructs of an (abstract) pytree of NNX variables, each with its NamedSharding."""
    shardings = state_shardings(tree, mesh)

    def one(s, v):
        if isinstance(v, nnx.Variable):
            x = v.get_value()
            return v.replace(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s))
        return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)

    return jax.tree.map(one, shardings, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def measure(c):
    v, h, layers, heads, kvh, hd, inter = c["vocab"], c["hidden"], c["layers"], c["heads"], c["kv_heads"], c["head_dim"], c["inter"]
    q = hd // 2
    cfg = tiny_qwen3_vl_config(vocab=v, hidden=h, layers=layers, heads=heads, kv_heads=kvh, head_dim=hd,
                               mrope_section=(q - 2 * (q // 4), q // 4, q // 4), vision_hidden=32, vision_depth=1,
                               patch_size=4, vision_positions=16, special_ids=(v - 4, v - 3, v - 2, v - 1))
    cfg = cfg.replace(text=type(cfg.text)(**{**cfg.text.__dict__, "intermediate_size": inter}))
    mesh_shape = dict(zip(mp.MESH_AXES, c["mesh"]))
    mesh = make_mesh(mesh_shape)
    b, s, t, n = c["batch"], c["prompt_len"], c["new_tokens"], c["rollouts"]
    shape = mp.shape_of_config("tiny", cfg)

    def arr(shp, dtype, names):
        return jax.ShapeDtypeStruct(shp, dtype, sharding=activation_sharding(mesh, names, shp))

    out = {"config": c}
    # 1. train step (make_train_step: clipping, AdamW, non-finite guard, donation) with a loss that keeps
    #    no activations: XLA's arguments + temporaries = parameters + optimizer state + gradients.
    tx = make_optimizer(OptimizerConfig(total_steps=10))
    state = jax.eval_shape(lambda: TrainState.create(abstract_model(cfg), tx))

    def l2(model, batch, rng, shared):
        return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(nnx.state(model, nnx.Param))), {}

    step = jit_train_step(make_train_step(l2), state, mesh)
    ma = step.lower(abstract_on(state, mesh), {}).compile().memory_analysis()
    numel = mp.param_shard_numel(shape, mesh_shape)
    out["train_state"] = {"xla": ma.argument_size_in_bytes + ma.temp_size_in_bytes,
                          "plan": 4 * numel + 8 * numel + 8 * numel}  # fp32 params + AdamW moments + grads/updates
    # 2. the sampler's KV cache: prefill's output cache (B*n rows of prompt + new slots).
    graphdef, params = nnx.split(abstract_model(cfg))
    p_in = abstract_on(params, mesh)
    inputs = {"input_ids": arr((b, s), jnp.int32, ("batch", None)), "attention_mask": arr((b, s), jnp.int32, ("batch", None)),
              "position_ids": arr((3, b, s), jnp.int32, (None, "batch", None)), "rope_deltas": arr((b,), jnp.int32, ("batch",))}
    fill = jax.jit(lambda st, i: prefill(graphdef, st, i, n=n, max_len=s + t, mesh=mesh)[0])
    ma = fill.lower(p_in, inputs).compile().memory_analysis()
    out["kv_cache"] = {"xla": ma.output_size_in_bytes, "plan": mp.kv_cache_bytes(shape, mesh_shape, b * n, s + t, 4) + 4}
    # 3. teacher scoring: score_completions_fn over B*n rows of prompt + completion (float32, no grads).
    if c.get("scoring", True):
        rows, length = b * n, s + t
        full = {"input_ids": arr((rows, length), jnp.int32, ("batch", None)),
                "attention_mask": arr((rows, length), jnp.int32, ("batch", None)),
                "position_ids": arr((3, rows, length), jnp.int32, (None, "batch", None))}
        comp = arr((rows, t), jnp.int32, ("batch", None))
        score = jax.jit(lambda st, i, ct, cm: score_completions_fn(graphdef, st, i, ct, cm, chunk_size=c["chunk"]))
        ma = score.lower(p_in, full, comp, comp).compile().memory_analysis()
        out["scoring_activations"] = {"xla": ma.temp_size_in_bytes,
                                      "plan": mp.forward_activation_bytes(shape, mesh_shape, rows, length, 4, c["chunk"])}
    return out


if __name__ == "__main__":
    for c in json.loads(sys.argv[1]):
        print(json.dumps(measure(c)), flush=True)
'''

CONFIGS = [
    {"vocab": 4096, "hidden": 256, "layers": 4, "heads": 8, "kv_heads": 4, "head_dim": 32, "inter": 512, "batch": 8,
     "prompt_len": 64, "new_tokens": 32, "rollouts": 1, "chunk": 16, "mesh": [8, 1, 1]},
    {"vocab": 4096, "hidden": 512, "layers": 4, "heads": 8, "kv_heads": 4, "head_dim": 64, "inter": 1536, "batch": 8,
     "prompt_len": 64, "new_tokens": 32, "rollouts": 1, "chunk": 16, "mesh": [2, 1, 4]},
    {"vocab": 4096, "hidden": 256, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 64, "inter": 768, "batch": 4,
     "prompt_len": 200, "new_tokens": 56, "rollouts": 2, "chunk": 16, "mesh": [4, 1, 2]},
]
FSDP_CONFIGS = [  # parameters and KV cache only (see the module docstring)
    {"vocab": 4096, "hidden": 512, "layers": 4, "heads": 8, "kv_heads": 4, "head_dim": 64, "inter": 1536, "batch": 4,
     "prompt_len": 32, "new_tokens": 16, "rollouts": 2, "chunk": 16, "mesh": [1, 4, 2], "scoring": False},
    {"vocab": 8192, "hidden": 512, "layers": 2, "heads": 8, "kv_heads": 2, "head_dim": 64, "inter": 1536, "batch": 2,
     "prompt_len": 96, "new_tokens": 32, "rollouts": 4, "chunk": 16, "mesh": [2, 2, 2], "scoring": False},
]


def measure(configs: list[dict]) -> list[dict]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(configs)], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def check_within(results: list[dict], components: tuple[str, ...], tol: float = 0.10) -> None:
    for res in results:
        for comp in components:
            xla, plan = res[comp]["xla"], res[comp]["plan"]
            assert abs(plan - xla) <= tol * xla, f"{comp} on {res['config']}: plan {plan} vs XLA {xla}"


def test_planner_within_10_percent_of_xla():
    results = measure(CONFIGS)
    assert len(results) == 3
    check_within(results, ("train_state", "kv_cache", "scoring_activations"))
    # The figures are per device: the sharded train state is far below the whole model's.
    assert all(r["train_state"]["xla"] > 0 and r["kv_cache"]["xla"] > 0 for r in results)


@pytest.mark.slow
def test_planner_params_and_kv_on_fsdp_meshes():
    check_within(measure(FSDP_CONFIGS), ("train_state", "kv_cache"))


# ------------------------------------------------------------------------------------------ library


def test_shard_numel_follows_the_rules_table():
    mesh = {"data": 2, "fsdp": 4, "tensor": 2}
    assert mp.shard_numel((4096, 1024), ("embed", "mlp"), mesh) == 4096 * 1024 // 8
    assert mp.shard_numel((4096, 1024), ("embed", "mlp"), {"fsdp": 3, "tensor": 2}) == 4096 * 1024 // 2  # 3 ∤ 4096
    assert mp.shard_numel((7, 1024), ("embed", "mlp"), mesh) == 7 * 512  # fsdp does not divide 7: replicated
    assert mp.shard_numel((128,), ("norm",), mesh) == 128
    assert mp.shard_numel((5, 6), None, mesh) == 30


def test_preset_shards_add_up_to_the_model():
    shape = mp.resolve_model("2b")
    assert abs(shape.num_params - 2_127_532_032) < 1e6  # jdelta model-info --model 2b
    full = mp.param_shard_numel(shape, {"data": 1, "fsdp": 1, "tensor": 1})
    per_device = mp.param_shard_numel(shape, {"data": 1, "fsdp": 8, "tensor": 4})
    assert full == shape.num_params
    assert shape.num_params / 32 <= per_device < shape.num_params / 32 * 1.02  # norms/biases replicated


def test_gemma_presets_resolve():
    assert mp.resolve_model("gemma3-4b").layers == 34


def test_unknown_model_is_refused():
    with pytest.raises(mp.PlanError, match="model 'qwen9'"):
        mp.resolve_model("qwen9")


# ------------------------------------------------------------------------------------------ CLI


def test_cli_table_and_mesh_choice(capsys):
    assert main(["plan", "--teacher", "8b", "--student", "2b", "--mesh", "fsdp=8,tensor=4", "--devices", "32",
                 "--device", "v5p", "--batch", "8", "--rollouts", "4"]) == 0
    out = capsys.readouterr().out
    assert "per-device memory on mesh 1x8x4 (data x fsdp x tensor):" in out
    for name in mp.COMPONENTS:
        assert f"  {name} " in out
    assert "peak (" in out
    assert "device v5p: 95.00 GiB per chip (Cloud TPU docs, TPU v5p: 95 GiB HBM2e per chip)" in out
    assert "fits: yes" in out
    assert "choose mesh 8x1x4 (data x fsdp x tensor)" in out and "--mesh data=8,fsdp=1,tensor=4" in out


def test_cli_tpu_slice_name_gives_the_chip_count(capsys):
    assert mp.parse_device("v5p-64") == ("v5p", 32) and mp.parse_device("v5litepod-16") == ("v5e", 16)
    assert mp.parse_device("v4-32") == ("v4", 16) and mp.parse_device("H200") == ("h200", None)
    assert main(["plan", "--device", "v4-32", "--batch", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    mesh = out["recommended_mesh"]
    assert mesh["data"] * mesh["fsdp"] * mesh["tensor"] == 16 and out["device"] == "v4"
    best = mp.plan(mp.PlanInputs(teacher=mp.resolve_model("8b"), student=mp.resolve_model("2b"), mesh=mesh, batch=16,
                                 prompt_len=1024, new_tokens=512, rollouts=4))
    assert best.peak <= 0.9 * 32 * 1024**3
    # no mesh with less tensor parallelism (then less fsdp) fits
    for m in mp.meshes(16):
        if (m["tensor"], m["fsdp"]) < (mesh["tensor"], mesh["fsdp"]) and 16 % (m["data"] * m["fsdp"]) == 0:
            q = mp.plan(mp.PlanInputs(teacher=mp.resolve_model("8b"), student=mp.resolve_model("2b"), mesh=m,
                                      batch=16, prompt_len=1024, new_tokens=512, rollouts=4))
            assert q.peak > 0.9 * 32 * 1024**3, m


def test_cli_json_agrees_with_the_library(capsys):
    assert main(["plan", "--teacher", "4b", "--student", "2b", "--mesh", "data=2,fsdp=4", "--batch", "16",
                 "--dtype", "bfloat16", "--remat", "none", "--device", "h100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expect = mp.plan(mp.PlanInputs(teacher=mp.resolve_model("4b"), student=mp.resolve_model("2b"),
                                   mesh={"data": 2, "fsdp": 4, "tensor": 1}, batch=16, prompt_len=1024, new_tokens=512,
                                   rollouts=4, dtype="bfloat16", remat="none"))
    assert out["components"] == expect.components and out["peak"] == expect.peak
    assert out["fits"] == (expect.peak <= 0.9 * 80e9)
    assert out["components"]["training activations"] > 0


def test_cli_does_not_fit(capsys):
    assert main(["plan", "--teacher", "32b", "--student", "8b", "--device", "v5e", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["peak"] > 16 * 1024**3


@pytest.mark.parametrize("args, message", [
    (["--mesh", "fsdp=3", "--batch", "8"], "batch 8 prompts does not divide over data x fsdp = 3 devices"),
    (["--mesh", "fsdp=8", "--devices", "16"], "mesh 1x8x1 (data x fsdp x tensor) has 8 devices, not devices=16"),
    (["--device", "tpu9"], "unknown device 'tpu9'; expected one of v4, v5e, v5p, v6e, h100, h200"),
    (["--device", "v5p-63"], "TPU slice 'v5p-63': 63 is not a whole number of v5p chips"),
    (["--device", "v5p-64", "--devices", "8"], "device v5p-64 has 32 chips, not devices=8"),
    (["--teacher", "70b"], "model '70b'"),
    (["--dtype", "int8"], "dtype 'int8': expected one of float32, bfloat16, float16"),
])
def test_cli_refusals_are_one_line(capsys, args, message):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jdelta plan: error: ") and message in err
    assert "\n" not in err
