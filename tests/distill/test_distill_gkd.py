"""GKD mode: off-policy steps (λ) use teacher samples; the generalized JSD at β = 1 is the reverse KL."""

import dataclasses

import jax
import numpy as np
from distill_pair import STUDENT_CFG, TEACHER_CFG

from jdelta.distill.on_policy import DistillConfig, OnPolicyDistiller, make_distill_loss
from jdelta.distill.synthetic import random_prompts
from jdelta.distill.train_state import OptimizerConfig, TrainState, make_optimizer
from jdelta.testing import random_model


def test_gkd_off_policy_teacher_samples_and_beta_limit():
    teacher = random_model(TEACHER_CFG, 1, logit_scale=10.0)
    state = TrainState.create(random_model(STUDENT_CFG, 2), make_optimizer(OptimizerConfig(total_steps=10)))
    cfg = DistillConfig(mode="gkd", gkd_lambda=0.0, off_policy_source="teacher", gkd_beta=1.0,
                        rollouts_per_prompt=2, temperature=1.0, top_p=1.0, max_new_tokens=6, stop_token_ids=(3,),
                        chunk_size=8, completion_bucket=8, prompt_bucket=16)
    distiller = OnPolicyDistiller(state.model(), teacher, cfg, random_prompts(STUDENT_CFG, batch=2, seed=5,
                                                                               with_image=False))
    inp = distiller.produce(state, 0)
    assert inp.stats["rollout/off_policy"] == 1.0  # λ = 0: every step trains on teacher samples

    def loss_of(c):
        fn = make_distill_loss(c)
        return float(jax.jit(lambda p: fn(state.model(p), inp.batch, None, inp.shared)[0])(state.params))

    gkd_b1 = loss_of(cfg)
    rkl = loss_of(dataclasses.replace(cfg, mode="reverse_kl"))
    gkd_mid = loss_of(dataclasses.replace(cfg, gkd_beta=0.5))
    np.testing.assert_allclose(gkd_b1, rkl, rtol=1e-5)
    assert 0.0 < gkd_mid < rkl  # the JSD is bounded and smaller here
