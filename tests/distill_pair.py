"""Shared setup of the distill tests: a tiny fixed random teacher and a smaller random student
(:func:`distill_pair`), stage configs built on the demo config (:func:`stage_config`), and a tiny
checkpoint pair with a tokenizer and prompt records for the records source (:func:`records_setup`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from jdelta.config import build, load_mapping, merge
from jdelta.distill.loop import run_loop
from jdelta.distill.on_policy import DistillConfig, OnPolicyDistiller, heldout_reverse_kl, make_distill_loss
from jdelta.distill.step import make_train_step
from jdelta.distill.synthetic import random_prompts
from jdelta.distill.train_state import OptimizerConfig, TrainState, make_optimizer, make_schedule
from jdelta.testing import make_seeds, make_tiny_pair, make_tokenizer, random_model, tiny_config

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "distill_demo.yaml"

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


def stage_config(run_dir, **sections: Any):
    """The demo config (synthetic prompts, tiny random pair) for a quick test run into ``run_dir``:
    checkpoints every 2 steps, written synchronously, no progress bar; ``sections`` merged over it."""
    from jdelta.stages.distill import Config

    base = merge(load_mapping(DEMO_CONFIG), {"run_dir": str(run_dir), "progress": False,
                                             "checkpoint": {"save_every": 2, "async_save": False}})
    return build(Config, merge(base, sections))


def records_setup(root) -> dict[str, Any]:
    """Prompt records (8 small charts), a BPE tokenizer trained on them and a tiny teacher/student
    checkpoint pair sharing it, under ``root``; returns the stage sections that use them."""
    root = Path(root)
    records = make_seeds(root / "seeds", 8, width=64, height=64)
    tok = make_tokenizer(records, root / "tokenizer", vocab_size=400)
    teacher, student = make_tiny_pair(root / "models", tok, teacher_hidden=32, teacher_layers=1,
                                      student_hidden=16, student_layers=1)
    return {
        "student": {"path": str(student), "random": None},
        "teacher": {"path": str(teacher), "random": None},
        "data": {"source": "records", "path": str(records), "tokenizer": str(teacher),
                 "pipeline": {"image": {"max_pixels": 64 * 64, "min_pixels": 32 * 32},
                              "seq_buckets": [128, 256]}},
        "distill": {"chunk_size": 16, "completion_bucket": 8, "prompt_bucket": 32},
    }
