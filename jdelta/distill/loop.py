"""The generic training loop: produce a batch -> jitted step -> metrics -> checkpoint.

What a step trains on comes from a *producer*, ``produce(state, step) -> StepInput``:
for SFT it reads the next dataset batch; on-policy it samples rollouts from the
student's current parameters and has the teacher score them. The loop owns the
rest: resume from the latest checkpoint (train state and Grain iterator), the time
split per phase, tokens/s, JSONL/TensorBoard metrics, a tqdm bar, non-finite-step
accounting and a clean checkpoint-and-exit on SIGTERM.

Multi-host: every process runs the loop on the same global batches. After each step the processes
agree whether any of them was sent SIGTERM (:func:`jdelta.distributed.any_process`, one tiny
all-gather), so all save the same step (Orbax writes each process's shards and every process's
data-iterator state) and stop together; the rerun restores that step on every process.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
from tqdm.auto import tqdm

from jdelta.checkpoint import Checkpointer, PreemptionGuard
from jdelta.distill.metrics import MetricsLogger, to_python
from jdelta.distill.train_state import TrainState
from jdelta.distributed import any_process

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class StepInput:
    """What one train step consumes, plus what it took to make it.

    batch: arrays with a leading batch dim, passed to the train step (and split for accumulation).
    shared: passed to the loss unsplit (e.g. the teacher's LM head weight).
    timings: seconds per producing phase, e.g. ``{"rollout": 1.2, "teacher": 0.4}``.
    stats: extra scalars to log, e.g. ``{"rollout/mean_length": 37.5}``.
    tokens: tokens processed this step (for tokens/s).
    """

    batch: dict[str, Any]
    shared: Any = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    stats: dict[str, float] = dataclasses.field(default_factory=dict)
    tokens: int = 0


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    steps_run: int
    preempted: bool
    last_metrics: dict[str, float]
    time_totals: dict[str, float]

    def time_split(self) -> str:
        total = sum(self.time_totals.values()) or 1.0
        return ", ".join(f"{k} {v:.2f}s ({100 * v / total:.0f}%)" for k, v in self.time_totals.items())


def run_loop(
    state: TrainState,
    train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
    produce: Callable[[TrainState, int], StepInput],
    *,
    num_steps: int,
    checkpointer: Checkpointer | None = None,
    data_iter: Any = None,
    logger: MetricsLogger | None = None,
    max_nan_steps: int | None = 10,
    resume: bool = True,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    log_every: int = 1,
    after_step: Callable[[int], None] | None = None,
) -> LoopResult:
    """Train until ``state.step == num_steps`` (or SIGTERM).

    With a ``checkpointer`` and ``resume``, the latest checkpoint (if any) is restored
    first, including ``data_iter``'s position; a checkpoint is saved every
    ``checkpointer``'s ``save_every`` steps, at the end, and on SIGTERM (then the loop
    returns with ``preempted=True``). ``max_nan_steps``: raise
    :class:`NonFiniteLossError` once this many steps were skipped as non-finite (None: never).
    ``logger``'s rows after the starting step (logged by a run killed after its last
    checkpoint) are dropped first. ``after_step(step)`` runs after each step's metrics are logged
    (e.g. to mark a run directory as holding work).
    """
    if checkpointer is not None and resume and checkpointer.latest_step() is not None:
        state, _ = checkpointer.restore(state, data_iter=data_iter)
        log.info("resumed from step %d", int(state.step))
    start = int(state.step)
    if logger is not None:
        logger.truncate(start)
    totals: dict[str, float] = {}
    last: dict[str, float] = {}
    preempted = False
    bar = tqdm(total=num_steps, initial=start, disable=not progress, desc="train", dynamic_ncols=True)

    def save(force: bool) -> None:
        if checkpointer is not None:
            checkpointer.save(int(state.step), state, data_iter=data_iter, meta=meta, force=force)

    with PreemptionGuard() as guard:
        step = start
        while step < num_steps:
            t0 = time.perf_counter()
            inp = produce(state, step)
            t1 = time.perf_counter()
            state, metrics = train_step(state, inp.batch, inp.shared)
            metrics = jax.device_get(metrics)
            t2 = time.perf_counter()
            step = int(state.step)
            times = dict(inp.timings)
            times["update"] = t2 - t1
            produce_other = (t1 - t0) - sum(inp.timings.values())
            if produce_other > 1e-3 and inp.timings:
                times["data"] = produce_other
            elif not inp.timings:
                times["data"] = t1 - t0
            for k, v in times.items():
                totals[k] = totals.get(k, 0.0) + v
            values = to_python(metrics)
            values.update(to_python(inp.stats))
            values.update({f"time/{k}": v for k, v in times.items()})
            values["time/step"] = t2 - t0
            if inp.tokens:
                values["tokens_per_s"] = inp.tokens / max(t2 - t0, 1e-9)
            values["nan_steps"] = float(state.nan_steps)
            last = values
            if logger is not None and (step % log_every == 0 or step == num_steps):
                logger.log(step, values)
            bar.update(1)
            bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", refresh=False)
            if after_step is not None:
                after_step(step)
            if max_nan_steps is not None and int(state.nan_steps) >= max_nan_steps:
                bar.close()
                raise NonFiniteLossError(
                    f"{int(state.nan_steps)} steps had a non-finite loss or gradient (max_nan_steps="
                    f"{max_nan_steps}); stopping at step {step}. Skipped steps left the parameters unchanged."
                )
            if any_process(guard.triggered):  # a SIGTERM to any process: every process saves this step
                save(force=True)
                preempted = True
                log.warning("preempted: saved step %d and stopping", step)
                break
            save(force=step == num_steps)
        if checkpointer is not None:  # still under the guard: a SIGTERM now lets the last save finish
            checkpointer.wait()
    bar.close()
    return LoopResult(state, int(state.step) - start, preempted, last, totals)
