"""On-policy distillation with continuous-batching rollouts (``distill.engine=continuous``): the
same rollouts, losses and parameters as the static sampler's, step after step, on a tiny random
pair with image prompts; the stage accepts the switch on resume and refuses what it cannot run."""

import json
import warnings

import jax
import numpy as np
import pytest
from distill_pair import STUDENT_CFG, TEACHER_CFG, stage_config

from jdelta.config import ConfigError, build
from jdelta.distill.on_policy import DistillConfig, OnPolicyDistiller, make_distill_loss
from jdelta.distill.step import make_train_step
from jdelta.distill.synthetic import random_prompts
from jdelta.distill.train_state import OptimizerConfig, TrainState, make_optimizer, make_schedule
from jdelta.stages.distill import train
from jdelta.testing import random_model

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
STEPS = 3


def run_steps(engine: str, **overrides):
    """``STEPS`` on-policy steps; returns (rollouts per step, losses, final params, distiller)."""
    teacher = random_model(TEACHER_CFG, 1, logit_scale=10.0)
    student = random_model(STUDENT_CFG, 2)
    cfg = DistillConfig(rollouts_per_prompt=3, temperature=1.0, top_p=0.9, max_new_tokens=8, stop_token_ids=(3,),
                        chunk_size=8, completion_bucket=8, prompt_bucket=16, seed=1, engine=engine, **overrides)
    ocfg = OptimizerConfig(learning_rate=1e-2, total_steps=STEPS, warmup_steps=0, weight_decay=0.0)
    state = TrainState.create(student, make_optimizer(ocfg))
    distiller = OnPolicyDistiller(state.model(), teacher, cfg, random_prompts(STUDENT_CFG, batch=4, seed=0))
    rollouts = []
    original = distiller._rollout

    def recorded(prompts, state, step, off_policy):
        tokens, lengths = original(prompts, state, step, off_policy)
        rollouts.append((off_policy, np.asarray(tokens).copy(), np.asarray(lengths).copy()))
        return tokens, lengths

    distiller._rollout = recorded
    step_fn = jax.jit(make_train_step(make_distill_loss(cfg), schedule=make_schedule(ocfg)))
    losses, stats = [], []
    for step in range(STEPS):
        inp = distiller.produce(state, step)
        state, metrics = step_fn(state, inp.batch, inp.shared)
        losses.append(float(metrics["loss"]))
        stats.append(inp.stats)
    return rollouts, losses, jax.tree.map(np.asarray, state.params), distiller, stats


@pytest.mark.parametrize("overrides", [
    {},  # reverse KL: the student's rollouts
    pytest.param({"mode": "gkd", "gkd_lambda": 0.5, "off_policy_source": "teacher"},  # steps 1, 2: teacher samples
                 marks=pytest.mark.slow),
], ids=["reverse_kl", "gkd_teacher_samples"])
def test_continuous_rollouts_train_as_static(overrides):
    static = run_steps("static", **overrides)
    # 6 slots: two of the 4 prompts (x 3 rollouts) decode at a time, the others admitted as rows finish
    cont = run_steps("continuous", engine_slots=6, **overrides)
    for (off_s, tok_s, len_s), (off_c, tok_c, len_c) in zip(static[0], cont[0], strict=True):
        assert off_s == off_c
        np.testing.assert_array_equal(len_c, len_s)
        mask = np.arange(tok_s.shape[1])[None] < len_s[:, None]
        np.testing.assert_array_equal(np.where(mask, tok_c, -1), np.where(mask, tok_s, -1))
    assert len(static[0]) == STEPS and len({tuple(r[1][0]) for r in static[0]}) > 1
    if "mode" in overrides:
        assert {r[0] for r in static[0]} == {False, True}, "the coin gave no off-policy step: pick another seed"
    np.testing.assert_allclose(cont[1], static[1], rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), cont[2], static[2])
    assert cont[3]._engines and not static[3]._engines  # the engine did run
    # the engine's slot use is logged per step: generated tokens / (decode steps x 6 slots)
    for (_, _, len_c), st in zip(cont[0], cont[4], strict=True):
        assert st["rollout/decode_steps"] >= len_c.max()
        assert st["rollout/slot_utilization"] == pytest.approx(len_c.sum() / (st["rollout/decode_steps"] * 6))
        assert 0 < st["rollout/slot_utilization"] <= 1
    assert not any("rollout/slot_utilization" in st for st in static[4])


def test_engine_config_checks():
    with pytest.raises(ConfigError, match=r"config key 'engine_slots': must be >= rollouts_per_prompt \(4\), got 2"):
        build(DistillConfig, {"engine": "continuous", "engine_slots": 2})
    with pytest.raises(ConfigError, match="engine"):
        build(DistillConfig, {"engine": "paged"})


def test_stage_switches_the_engine_on_resume(tmp_path):
    """The stage runs continuous rollouts (synthetic image prompts); ``distill.engine`` does not
    change what a step computes, so a rerun may switch it and the run resumes."""
    # (one schedule for both runs: the resumed run's train step is then the same program, compiled once)
    sections = {"distill": {"mode": "reverse_kl", "rollouts_per_prompt": 2}, "data": {"batch_size": 2},
                "optimizer": {"total_steps": 3}}
    run = tmp_path / "run"
    cont = train(stage_config(run, train={"steps": 2}, **{**sections, "distill": {
        **sections["distill"], "engine": "continuous", "engine_slots": 2}}))
    assert cont.summary["steps"] == 2 and np.isfinite(cont.summary["last"]["loss"])
    assert json.loads((run / "manifest.json").read_text())["config"]["distill"]["engine"] == "continuous"
    more = train(stage_config(run, train={"steps": 3}, **sections))  # back to static: resumed, not refused
    assert more.summary["steps"] == 3 and more.summary["steps_run"] == 1
    assert json.loads((run / "manifest.json").read_text())["config"]["distill"]["engine"] == "static"


def test_a_mesh_with_the_continuous_engine_is_refused_in_one_line(tmp_path, capsys):
    from jdelta.cli import main

    assert main(["distill", "--config", "configs/distill_demo.yaml", "--no-progress", f"run_dir={tmp_path / 'run'}",
                 "mesh.data=2", "distill.engine=continuous", "train.steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["jdelta distill: error: distill.engine=continuous runs on one device in one process; use "
                   "distill.engine=static with a mesh or several processes"]
