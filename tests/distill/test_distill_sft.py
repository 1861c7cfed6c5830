"""Off-policy SFT on teacher-written responses; the chunked NLL equals the direct one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from distill_pair import STUDENT_CFG, TEACHER_CFG

from jdelta.distill.batch import cut_at_special, special_ids
from jdelta.distill.loop import run_loop
from jdelta.distill.sft import (
    SFTConfig,
    SFTProducer,
    chunked_nll,
    make_sft_loss,
    read_sft_records,
    sft_batches,
)
from jdelta.distill.step import make_train_step
from jdelta.distill.synthetic import random_prompts
from jdelta.distill.train_state import OptimizerConfig, TrainState, make_optimizer
from jdelta.sampling import SamplingParams, generate
from jdelta.testing import random_model


def test_chunked_nll_matches_direct_value_and_grad():
    r = np.random.default_rng(0)
    h = jnp.asarray(r.normal(size=(2, 7, 5)), jnp.float32)
    w = jnp.asarray(r.normal(size=(5, 11)), jnp.float32)
    y = jnp.asarray(r.integers(0, 11, (2, 7)))

    def direct(h, w):
        lp = jax.nn.log_softmax(h @ w, -1)
        return -jnp.take_along_axis(lp, y[..., None], -1)[..., 0]

    np.testing.assert_allclose(chunked_nll(h, w, y, chunk_size=3), direct(h, w), atol=1e-5)
    g1 = jax.grad(lambda h, w: chunked_nll(h, w, y, chunk_size=3).sum(), argnums=(0, 1))(h, w)
    g2 = jax.grad(lambda h, w: direct(h, w).sum(), argnums=(0, 1))(h, w)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_sft_learns_teacher_responses(tmp_path):
    teacher = random_model(TEACHER_CFG, 1, logit_scale=10.0)
    prompts = next(random_prompts(STUDENT_CFG, batch=16, with_image=False, seed=3))
    res = generate(teacher, prompts, SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=(3,)), rng=0)
    lengths, _ = cut_at_special(res.tokens, res.lengths, special_ids(teacher))
    keep = [i for i in range(16) if lengths[i] > 0]
    path = tmp_path / "teacher_responses.jsonl"
    with path.open("w") as f:
        for i in keep:
            p = prompts["input_ids"][i][prompts["attention_mask"][i] > 0].tolist()
            f.write(__import__("json").dumps({"prompt_ids": p, "response_ids": res.tokens[i, : lengths[i]].tolist()})
                    + "\n")
    records = read_sft_records(path)
    cfg = SFTConfig(chunk_size=4, completion_bucket=8, prompt_bucket=16)
    ocfg = OptimizerConfig(learning_rate=1e-2, schedule="constant", warmup_steps=0, total_steps=40, weight_decay=0.0)
    state = TrainState.create(random_model(STUDENT_CFG, 2), make_optimizer(ocfg))
    producer = SFTProducer(state.model(), sft_batches(records, batch_size=8, seed=0), cfg)
    step = jax.jit(make_train_step(make_sft_loss(cfg)), donate_argnums=0)
    first = run_loop(state, step, producer.produce, num_steps=1, progress=False)
    result = run_loop(first.state, step, producer.produce, num_steps=40, progress=False)
    assert result.last_metrics["nll"] < 0.5 * first.last_metrics["nll"], (first.last_metrics, result.last_metrics)


def test_sft_bad_records(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt_ids": [1, 2], "response_ids": []}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: record needs non-empty"):
        read_sft_records(p)
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_sft_records(p)
