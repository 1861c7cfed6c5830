"""ViCuR in ``jdelta distill``: equal to sampled-token OPD when it has nothing privileged; padded
LM-head columns carry no probability in any mode's softmax; every mode and ablation runs end to end
through the CLI (self or separate teacher), checkpoints, resumes exactly and exports."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from distill_pair import DEMO_CONFIG, STUDENT_CFG, TEACHER_CFG, records_setup
from flax import nnx

from jdelta.cli import main
from jdelta.config import load_mapping, merge
from jdelta.distill.metrics import read_metrics
from jdelta.distill.on_policy import DistillConfig, OnPolicyDistiller, make_distill_loss
from jdelta.distill.synthetic import random_prompts
from jdelta.distill.train_state import OptimizerConfig, TrainState, make_optimizer
from jdelta.distill.vicur import self_teacher
from jdelta.testing import random_model

BASE = dict(rollouts_per_prompt=1, temperature=1.0, top_p=1.0, max_new_tokens=6, stop_token_ids=(3,), chunk_size=8,
            completion_bucket=8, prompt_bucket=16)


def _state(student):
    return TrainState.create(student, make_optimizer(OptimizerConfig(total_steps=10)))


def _loss_and_grads(cfg, state, batch, shared):
    """The loss of ``cfg`` and its gradient at ``state.params`` (the arrays are arguments, not constants
    closed over, so calls with other arrays of the same shapes reuse the compiled program)."""
    fn = make_distill_loss(cfg)

    def loss(params, rest, batch, shared):
        return fn(state.replace(rest=rest).model(params), batch, None, shared)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(state.params, state.rest, batch, shared)


# ----------------------------------------------------------------------------- vicur == sampled-token OPD


def test_vicur_without_module_or_hint_is_sampled_token_opd():
    """No module, no privileged prompt, a separate teacher: the ViCuR loss is the sampled-token k1
    estimate of KL(student || teacher) and its gradient the score-function gradient
    ``mean_n (lp_S - lp_T) ∇ lp_S``, computed here from plain full-logit forwards."""
    teacher = random_model(TEACHER_CFG, 1, logit_scale=3.0)
    state = _state(random_model(STUDENT_CFG, 2))
    cfg = DistillConfig(mode="vicur", privileged="none", cue_recovery=False, rollouts_per_prompt=2,
                        **{k: v for k, v in BASE.items() if k != "rollouts_per_prompt"})
    distiller = OnPolicyDistiller(state.model(), teacher, cfg, random_prompts(STUDENT_CFG, batch=3, seed=4))
    inp = distiller.produce(state, 0)
    (loss, aux), grads = _loss_and_grads(cfg, state, inp.batch, inp.shared)
    assert float(aux["vicur/clamped_fraction"]) == 0.0  # |k1| < 10: the clamp is inert, as in plain OPD

    b = inp.batch
    comp, mask = b["completion"], b["completion_mask"].astype(jnp.float32)
    t = comp.shape[1]
    inputs = dict(attention_mask=b["attention_mask"], position_ids=jnp.swapaxes(b["position_ids"], 0, 1),
                  pixel_values=b["pixel_values"].reshape(-1, b["pixel_values"].shape[-1]),
                  image_grid_thw=b["image_grid_thw"].reshape(-1, 3))

    def token_logprobs(model):
        logits = model(b["input_ids"], **inputs).logits[:, -t - 1:-1]
        return jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), comp[..., None], -1)[..., 0]

    lp_t = token_logprobs(teacher)

    def opd(params):
        lp_s = token_logprobs(state.model(params))
        k1 = jax.lax.stop_gradient(lp_s - lp_t)
        surrogate = jnp.sum(k1 * lp_s * mask) / mask.sum()  # gradient: E[k1 ∇ log p_S]
        return surrogate, jnp.sum(k1 * mask) / mask.sum()

    (_, k1_mean), ref_grads = jax.jit(jax.value_and_grad(opd, has_aux=True))(state.params)
    np.testing.assert_allclose(float(loss), float(k1_mean), rtol=1e-5, atol=1e-7)
    got, want = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    scale = max(float(jnp.abs(g).max()) for g in want)
    assert scale > 1e-4  # a real gradient
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5 * scale, rtol=1e-4)

    # the self teacher (the student's frozen initial weights, no hint, no module): no signal (up to
    # the rounding of two separately compiled forwards)
    same = OnPolicyDistiller(state.model(), self_teacher(state.model()), cfg, random_prompts(STUDENT_CFG, batch=3,
                                                                                            seed=4))
    inp = same.produce(state, 0)
    (loss, _), grads = _loss_and_grads(cfg, state, inp.batch, inp.shared)
    assert abs(float(loss)) < 1e-6
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-4 * scale


@pytest.mark.parametrize("mode, extra", [
    ("vicur", dict(privileged="none", cue_recovery=False)),
    pytest.param("gkd", dict(gkd_reduction="batchmean"), marks=pytest.mark.slow),
])
def test_gradient_accumulation_keeps_the_global_token_mean(mode, extra):
    """vicur and GKD batchmean: two micro-batches give the one-batch loss and gradient."""
    from jdelta.distill.step import make_train_step

    teacher = random_model(TEACHER_CFG, 1, logit_scale=3.0)
    student = random_model(STUDENT_CFG, 2)
    cfg = DistillConfig(mode=mode, **extra, **{**BASE, "rollouts_per_prompt": 2})
    state = _state(student)
    distiller = OnPolicyDistiller(state.model(), teacher, cfg, random_prompts(STUDENT_CFG, batch=2, seed=7,
                                                                              with_image=False))
    inp = distiller.produce(state, 0)
    mask = np.asarray(inp.batch["completion_mask"])
    assert mask[:2].sum() != mask[2:].sum()  # unequal micro-batches: per-micro means would differ
    out = {}
    for n in (1, 2):
        step = jax.jit(make_train_step(make_distill_loss(cfg), grad_accum_steps=n))
        _, metrics = step(state, inp.batch, inp.shared)
        out[n] = (float(metrics["loss"]), float(metrics["grad_norm"]))
    np.testing.assert_allclose(out[2], out[1], rtol=2e-5)


# ----------------------------------------------------------------------------- padded LM-head columns


REAL_VOCAB = 48  # of the tiny models' 64 LM-head columns


def _pad_head(model, value: float, seed: int):
    """Padded columns ``>= REAL_VOCAB`` of the LM head set to large random logits' weights."""
    w = np.asarray(model.lm_head.kernel.get_value()).copy()
    rng = np.random.default_rng(seed)
    w[:, REAL_VOCAB:] = value * (1 + rng.random((w.shape[0], w.shape[1] - REAL_VOCAB)))
    model.lm_head.kernel.set_value(jnp.asarray(w))
    return model


@pytest.mark.parametrize("mode, extra", [
    ("reverse_kl", {}),
    # gkd: the same masked fused divergence as reverse_kl (jdelta.losses.chunked, one column mask for
    # every kind); va_opd: reverse_kl's masked log-probs, reweighted
    pytest.param("gkd", {"gkd_beta": 0.5}, marks=pytest.mark.slow),
    pytest.param("va_opd", {}, marks=pytest.mark.slow),
    ("vicur", {"privileged": "none", "cue_recovery": False}),
])
def test_padded_vocab_columns_carry_no_probability(mode, extra):
    """Same completions (real ids only), LM heads whose padded columns hold huge weights of either
    sign: with ``vocab_size`` the loss and the gradient of every real parameter are the same and
    the padded columns get no gradient; without it the padded columns dominate."""
    prompts = next(random_prompts(STUDENT_CFG, batch=2, seed=3))
    rng = np.random.default_rng(0)
    k = 4 if mode == "va_opd" else 1
    completion = rng.integers(1, REAL_VOCAB - 4, (2 * k, 6)).astype(np.int32)
    lengths = np.array([6, 3, 5, 2, 6, 4, 1, 6][: 2 * k], np.int32)

    def run(value, vocab_size):
        cfg = DistillConfig(mode=mode, vocab_size=vocab_size, **extra, **{**BASE, "rollouts_per_prompt": k})
        teacher = _pad_head(random_model(TEACHER_CFG, 1), value, 1)
        state = _state(_pad_head(random_model(STUDENT_CFG, 2), value, 2))
        distiller = OnPolicyDistiller(state.model(), teacher, cfg, iter([]))
        batch, _, _ = distiller.train_batch(prompts, completion, lengths)
        (loss, _), grads = _loss_and_grads(cfg, state, batch, distiller.teacher_head)
        return float(loss), dict(nnx.to_flat_state(grads))

    hi, g_hi = run(30.0, REAL_VOCAB)
    lo, g_lo = run(-30.0, REAL_VOCAB)
    np.testing.assert_allclose(hi, lo, rtol=1e-5, atol=1e-6)
    head = ("lm_head", "kernel")
    np.testing.assert_array_equal(np.asarray(g_hi[head].get_value())[:, REAL_VOCAB:], 0.0)
    for path in g_hi:
        a, b = np.asarray(g_hi[path].get_value()), np.asarray(g_lo[path].get_value())
        if path == head:
            a, b = a[:, :REAL_VOCAB], b[:, :REAL_VOCAB]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(path))
    unmasked, _ = run(30.0, None)
    assert abs(unmasked - hi) > 0.1 * max(abs(hi), 1e-3)


def test_rollouts_are_cut_before_a_padded_id():
    from jdelta.distill.batch import cut_at_padded_ids

    tokens = np.array([[5, 7, 50, 6], [5, 6, 7, 8], [60, 1, 2, 3]])
    lengths, cut = cut_at_padded_ids(tokens, np.array([4, 4, 0]), 48)
    assert lengths.tolist() == [2, 4, 0] and cut == 1  # a padded id past a row's end does not count
    assert cut_at_padded_ids(tokens, np.array([4, 4, 4]), None)[0].tolist() == [4, 4, 4]


# ----------------------------------------------------------------------------- end to end through the CLI


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """The distill tests' records setup with a 2-layer student: the module after decoder layer 0 then
    has a later layer to read the sink (after a model's last layer it changes nothing)."""
    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.testing import make_random_model_dir, tiny_config_for_tokenizer

    root = tmp_path_factory.mktemp("vicur_records")
    sections = records_setup(root)
    tok = load_tokenizer(sections["data"]["tokenizer"])
    student = make_random_model_dir(tiny_config_for_tokenizer(tok, hidden=16, layers=2, vision_hidden=16), tok,
                                    root / "student2", seed=2)
    return {**sections, "student": {"path": str(student), "random": None}}


SLOW = pytest.mark.slow
MODES = [  # (id, distill settings, separate teacher)
    pytest.param({"privileged": "hint", "cue_recovery": True}, False, id="full-self"),
    pytest.param({"privileged": "hint", "cue_recovery": False}, False, id="hint_only-self", marks=SLOW),
    pytest.param({"privileged": "none", "cue_recovery": True}, True, id="module_only-teacher", marks=SLOW),
    pytest.param({"privileged": "answer", "cue_recovery": False}, False, id="answer_privileged-self", marks=SLOW),
    pytest.param({"privileged": "hint", "cue_recovery": True}, True, id="full-teacher", marks=SLOW),
]


def _config_file(path: Path, records: dict, distill: dict, teacher: bool) -> Path:
    sections = {**records, "distill": {**records["distill"], "mode": "vicur", "rollouts_per_prompt": 1, **distill},
                "checkpoint": {"save_every": 1, "async_save": False}, "progress": False}
    if not teacher:
        sections["teacher"] = None
    cfg = merge(load_mapping(DEMO_CONFIG), sections)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("distill, teacher", MODES)
def test_vicur_modes_run_checkpoint_resume_exactly_and_export(distill, teacher, records, tmp_path):
    from jdelta.models.qwen3_vl.weights import CUE_SETTINGS, load_hf_checkpoint

    cfg = _config_file(tmp_path / "vicur.yaml", records, distill, teacher)
    common = ["distill", "--config", str(cfg), "optimizer.total_steps=2"]
    assert main([*common, f"run_dir={tmp_path / 'straight'}", "train.steps=2", f"export.path={tmp_path / 'a'}"]) == 0
    assert main([*common, f"run_dir={tmp_path / 'resumed'}", "train.steps=1"]) == 0
    assert main([*common, f"run_dir={tmp_path / 'resumed'}", "train.steps=2", f"export.path={tmp_path / 'b'}"]) == 0
    rows, ref = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("resumed", "straight"))
    assert [r["step"] for r in rows] == [1, 2] and [r["loss"] for r in rows] == [r["loss"] for r in ref]
    assert all(r["completion_tokens"] > 0 for r in ref) and "vicur/k1_mean" in ref[-1]
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    # the exports of the resumed and the uninterrupted run are the same bytes: the same parameters
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    has_module = distill["cue_recovery"]
    assert ((tmp_path / "a" / CUE_SETTINGS).exists()) == has_module
    model, _ = load_hf_checkpoint(tmp_path / "a")
    assert (model.cue_recovery is not None) == has_module
    if has_module:  # the sink is the data tokenizer's <|im_start|>; the zero-initialised output projection moved
        from jdelta.data.tokenizer import SpecialTokens, load_tokenizer

        im_start = SpecialTokens.from_tokenizer(load_tokenizer(records["data"]["tokenizer"])).im_start
        assert json.loads((tmp_path / "a" / CUE_SETTINGS).read_text())["config"]["sink_token_id"] == im_start
        assert float(jnp.abs(model.cue_recovery.layers[0].o_proj.kernel.get_value()).max()) > 0


def test_teacher_reads_the_privileged_prompt_and_the_same_completions(records):
    """Assembled batch: the teacher's rows are ``question + [Hint]: ...`` (the student's are not) and
    end in the same completion tokens at positions that continue the teacher's own prompt."""
    from jdelta.config import build
    from jdelta.distill.setup import DataConfig, prompt_source
    from jdelta.models.qwen3_vl.weights import load_hf_checkpoint

    student, student_cfg = load_hf_checkpoint(records["student"]["path"])
    teacher, _ = load_hf_checkpoint(records["teacher"]["path"])
    source = prompt_source(build(DataConfig, records["data"]), student_cfg, mode="vicur", teacher_prompt="hint")
    prompts = next(source.batches)
    cfg = DistillConfig(mode="vicur", **{**BASE, "rollouts_per_prompt": 2}).resolved(source.stop_ids, source.pad_id)
    distiller = OnPolicyDistiller(student, teacher, cfg, iter([]))
    b = prompts["input_ids"].shape[0]
    completion = np.random.default_rng(0).integers(10, 100, (2 * b, 5)).astype(np.int32)
    host = distiller.build_batch(prompts, completion, np.full(2 * b, 5, np.int32))
    tok = source.tokenizer
    for row in range(2 * b):
        t_text = tok.decode(host["teacher_input_ids"][row][host["teacher_attention_mask"][row] == 1])
        s_text = tok.decode(host["input_ids"][row][host["attention_mask"][row] == 1])
        assert "[Hint]:" in t_text and "[Hint]" not in s_text
        np.testing.assert_array_equal(host["teacher_input_ids"][row, -5:], completion[row])
        np.testing.assert_array_equal(host["input_ids"][row, -5:], completion[row])
        pos = host["teacher_position_ids"][row, 0]  # temporal axis: the completion continues the prompt
        assert np.all(np.diff(pos[-6:]) == 1)
    assert np.all(host["teacher_attention_mask"].sum(1) > host["attention_mask"].sum(1))  # the hint's tokens


def test_config_errors_name_the_key(records, tmp_path, capsys):
    cfg = _config_file(tmp_path / "vicur.yaml", records, {}, False)
    # hinted teacher prompts need prompt records
    assert main(["distill", "--config", str(cfg), f"run_dir={tmp_path / 'r'}", "data.source=synthetic"]) == 2
    assert "distill.privileged=hint needs prompt records" in capsys.readouterr().err
    # another mode without a teacher
    assert main(["distill", "--config", str(cfg), f"run_dir={tmp_path / 'r2'}", "distill.mode=reverse_kl"]) == 2
    assert "only distill.mode=vicur runs without one" in capsys.readouterr().err
    assert main(["distill", "--config", str(cfg), f"run_dir={tmp_path / 'r3'}", "distill.privileged=box"]) == 2
    assert "distill.privileged" in capsys.readouterr().err


def test_distill_config_defaults_are_the_papers():
    cfg = DistillConfig(mode="vicur")
    assert (cfg.vicur_clip_low, cfg.vicur_clip_high, cfg.vicur_dual_clip, cfg.vicur_k1_clamp) == (0.2, 0.2, 3.0, 10.0)
    assert cfg.privileged == "hint" and cfg.cue_recovery and cfg.cue.every == 5 and cfg.cue.init == "zero_out"
    assert cfg.teacher_prompt == "hint" and dataclasses.replace(cfg, mode="reverse_kl").teacher_prompt is None
    assert DistillConfig().gkd_reduction == "sequence_mean" and DistillConfig().gkd_lambda == 1.0


def test_recipe_config_matches_methods():
    from jdelta.config import load
    from jdelta.stages.distill import Config

    recipe = Path(__file__).resolve().parents[2] / "configs" / "vicur_qwen3vl_2b.yaml"
    cfg = load(Config, recipe, ["student.path=/ckpt/2b", "data.path=/data/r.jsonl", "data.tokenizer=/ckpt/2b"])
    d = cfg.distill
    assert cfg.teacher is None and (d.mode, d.privileged, d.cue_recovery) == ("vicur", "hint", True)
    assert (d.rollouts_per_prompt, d.temperature, d.top_p, d.max_new_tokens) == (1, 1.0, 1.0, 2048)
    assert (d.vicur_clip_low, d.vicur_clip_high, d.vicur_dual_clip, d.vicur_k1_clamp) == (0.2, 0.2, 3.0, 10.0)
    assert cfg.data.batch_size == 128 and cfg.optimizer.learning_rate == 1e-6
