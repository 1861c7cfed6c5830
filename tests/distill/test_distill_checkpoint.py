import os
import signal

import grain
import jax
import numpy as np
import pytest
from distill_tiny import TinyLM, ce_loss, make_batch
from flax import nnx

from jdelta.checkpoint import Checkpointer, CheckpointMismatchError
from jdelta.distill.loop import NonFiniteLossError, StepInput, run_loop
from jdelta.distill.metrics import MetricsLogger, read_metrics
from jdelta.distill.step import make_train_step
from jdelta.distill.train_state import OptimizerConfig, TrainState, make_optimizer, make_schedule

CFG = OptimizerConfig(learning_rate=1e-2, total_steps=20, warmup_steps=2)


def _fresh():
    """A new model, optimiser, step fn and data iterator, as a restarted process would build them."""
    state = TrainState.create(TinyLM(rngs=nnx.Rngs(0)), make_optimizer(CFG), seed=1)
    step = jax.jit(make_train_step(ce_loss, grad_accum_steps=2, schedule=make_schedule(CFG)), donate_argnums=0)
    it = iter(grain.MapDataset.range(10_000).map(make_batch).to_iter_dataset())

    def produce(state, i):
        b = next(it)
        return StepInput(batch=b, timings={"fake_rollout": 0.0}, stats={"rollout/len": 3.0}, tokens=b["mask"].size)

    return state, step, it, produce


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state, state.rng))]


def _assert_bitwise(a, b):
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference():
    state, step, it, produce = _fresh()
    return run_loop(state, step, produce, num_steps=20, progress=False).state


def test_resume_is_bitwise_exact(tmp_path, reference):
    state, step, it, produce = _fresh()
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=10, keep=2)
    with MetricsLogger(tmp_path / "run") as logger:
        r = run_loop(state, step, produce, num_steps=10, checkpointer=ckpt, data_iter=it, logger=logger,
                     progress=False)
    assert r.steps_run == 10 and ckpt.latest_step() == 10
    ckpt.close()
    del state, step, it, produce, r  # "kill"
    state, step, it, produce = _fresh()
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=10, keep=2)
    with MetricsLogger(tmp_path / "run") as logger:
        r = run_loop(state, step, produce, num_steps=20, checkpointer=ckpt, data_iter=it, logger=logger,
                     progress=False, meta={"run": "test"})
    assert r.steps_run == 10 and int(r.state.step) == 20
    assert it.get_state() == {"next_index": 20}
    _assert_bitwise(r.state, reference)
    assert ckpt.all_steps() == [10, 20]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 21))
    for key in ("loss", "grad_norm", "learning_rate", "time/update", "time/fake_rollout", "tokens_per_s",
                "rollout/len", "tokens"):
        assert key in rows[-1], key
    assert any(p.name.startswith("events") for p in (tmp_path / "run" / "tensorboard").iterdir())
    # restoring into a template gives the saved step and data position
    template, _, it2, _ = _fresh()
    restored, meta = ckpt.restore(template, data_iter=it2, step=10)
    assert int(restored.step) == 10 and it2.get_state() == {"next_index": 10} and meta is None
    assert ckpt.restore(template, step=20)[1] == {"run": "test"}
    ckpt.close()


def test_sigterm_saves_and_resume_matches(tmp_path, reference):
    state, step, it, produce = _fresh()

    def produce_then_kill(state, i):
        if i == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # the preemption notice arrives mid-step
        return produce(state, i)

    ckpt = Checkpointer(tmp_path / "ckpt", save_every=100, keep=3)
    r = run_loop(state, step, produce_then_kill, num_steps=20, checkpointer=ckpt, data_iter=it, progress=False)
    assert r.preempted and int(r.state.step) == 7 and ckpt.latest_step() == 7
    assert signal.getsignal(signal.SIGTERM) is not None  # handler restored
    ckpt.close()
    state, step, it, produce = _fresh()
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=100, keep=3)
    r = run_loop(state, step, produce, num_steps=20, checkpointer=ckpt, data_iter=it, progress=False)
    assert not r.preempted and r.steps_run == 13
    _assert_bitwise(r.state, reference)
    ckpt.close()


def test_resume_after_a_kill_logs_every_step_once(tmp_path, reference):
    """A kill after step 5 (checkpoints at 2 and 4, the one at 4 cut short mid-write, a metrics row
    cut short mid-line): the rerun resumes from 2, drops the rows after it, and matches the reference."""
    state, step, it, produce = _fresh()

    def produce_then_die(state, i):
        if i == 5:
            raise KeyboardInterrupt  # the process dies here (steps 1..5 logged)
        return produce(state, i)

    ckpt = Checkpointer(tmp_path / "ckpt", save_every=2, keep=3, async_save=False)
    with MetricsLogger(tmp_path / "run") as logger, pytest.raises(KeyboardInterrupt):
        run_loop(state, step, produce_then_die, num_steps=20, checkpointer=ckpt, data_iter=it, logger=logger,
                 progress=False)
    ckpt.close()
    # what a kill during the step-4 save leaves: Orbax's temporary directory, never renamed into place
    (tmp_path / "ckpt" / "4").rename(tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-1700000000")
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss": 0.')
    assert [r["step"] for r in _complete_rows(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    state, step, it, produce = _fresh()
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=2, keep=3, async_save=False)
    with MetricsLogger(tmp_path / "run") as logger:
        r = run_loop(state, step, produce, num_steps=20, checkpointer=ckpt, data_iter=it, logger=logger,
                     progress=False)
    ckpt.close()
    assert r.steps_run == 18
    assert [row["step"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 21))
    _assert_bitwise(r.state, reference)


def _complete_rows(path):
    """The complete JSON rows of a metrics file (a partial last line skipped)."""
    import json

    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def test_restoring_another_models_checkpoint_is_one_clear_error(tmp_path):
    state = TrainState.create(TinyLM(rngs=nnx.Rngs(0)), make_optimizer(CFG))
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, async_save=False)
    ckpt.save(1, state, force=True)
    ckpt.close()
    other = TrainState.create(TinyLM(embed=24, rngs=nnx.Rngs(0)), make_optimizer(CFG))
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, async_save=False)
    with pytest.raises(CheckpointMismatchError) as e:
        ckpt.restore(other)
    msg = str(e.value)
    assert "\n" not in msg and f"checkpoint {tmp_path / 'ckpt' / '1'} holds another model's arrays" in msg
    assert "params.embed.value: (32, 16) in the checkpoint, (32, 24) now" in msg
    assert int(ckpt.restore(state)[0].step) == 0  # the right template still restores
    ckpt.close()


def test_nan_steps_stop_training():
    def sometimes_nan(model, batch, rng, shared):
        loss, aux = ce_loss(model, batch, rng)
        return loss * batch["scale"][0], aux

    state = TrainState.create(TinyLM(rngs=nnx.Rngs(0)), make_optimizer(CFG))
    step = jax.jit(make_train_step(sometimes_nan))
    scales = [1.0, np.nan, 1.0, np.nan, np.nan, 1.0]

    def produce(state, i):
        return StepInput(batch={**make_batch(i), "scale": np.full(8, scales[i], np.float32)})

    with pytest.raises(NonFiniteLossError, match="3 steps had a non-finite loss"):
        run_loop(state, step, produce, num_steps=6, max_nan_steps=3, progress=False)
    state = TrainState.create(TinyLM(rngs=nnx.Rngs(0)), make_optimizer(CFG))
    r = run_loop(state, step, produce, num_steps=6, max_nan_steps=4, progress=False)
    assert int(r.state.nan_steps) == 3 and r.last_metrics["nan_steps"] == 3.0


def test_restore_without_checkpoint_is_clear(tmp_path):
    ckpt = Checkpointer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.restore({"x": np.zeros(2)})
    ckpt.close()
