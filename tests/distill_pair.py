"""Shared setup of the on-policy tests: a tiny fixed random teacher, a smaller random student."""

from __future__ import annotations

import jax

from jdelta.distill.loop import run_loop
from jdelta.distill.on_policy import DistillConfig, OnPolicyDistiller, heldout_reverse_kl, make_distill_loss
from jdelta.distill.step import make_train_step
from jdelta.distill.synthetic import random_prompts
from jdelta.testing import random_model, tiny_config
from jdelta.distill.train_state import OptimizerConfig, TrainState, make_optimizer, make_schedule

TEACHER_CFG = tiny_config(hidden=48, layers=2)
STUDENT_CFG = tiny_config(hidden=32, layers=1)


def distill_pair(mode: str, steps: int, **overrides):
    """Train ``steps`` on-policy steps; returns (held-out KL before, after, LoopResult)."""
    teacher = random_model(TEACHER_CFG, 1, logit_scale=10.0)
    student = random_model(STUDENT_CFG, 2)
    cfg = DistillConfig(mode=mode, rollouts_per_prompt=4, temperature=1.0, top_p=1.0, max_new_tokens=8,
                        stop_token_ids=(3,), chunk_size=8, completion_bucket=8, prompt_bucket=16, **overrides)
    ocfg = OptimizerConfig(learning_rate=1e-2, total_steps=steps, warmup_steps=5, weight_decay=0.0)
    state = TrainState.create(student, make_optimizer(ocfg))
    distiller = OnPolicyDistiller(state.model(), teacher, cfg, random_prompts(STUDENT_CFG, batch=4, seed=0))
    step = jax.jit(make_train_step(make_distill_loss(cfg), schedule=make_schedule(ocfg)), donate_argnums=0)
    held = next(random_prompts(STUDENT_CFG, batch=8, seed=99))  # fresh prompts, never trained on
    before = heldout_reverse_kl(distiller, state, held)
    result = run_loop(state, step, distiller.produce, num_steps=steps, progress=False)
    after = heldout_reverse_kl(distiller, result.state, held)
    return before, after, result
