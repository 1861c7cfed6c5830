"""Functional train state for any ``nnx.Module``: parameters, optax state, step, RNG.

The model is split once into ``(graphdef, params, rest)``; the train state holds
only arrays (wrapped in NNX ``Variable`` nodes, which keep their logical-axis
metadata so :func:`jdelta.sharding.state_shardings` can shard the parameters and
the optimiser moments alike). A step is a pure function ``state -> state``, which
makes the state easy to jit, shard, checkpoint with Orbax and resume bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jdelta.config import check


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + warmup/cosine + global-norm clipping (defaults: the VA-OPD recipe).

    ``warmup_steps`` wins over ``warmup_fraction`` when set. ``total_steps`` is the
    number of optimiser updates the schedule spans (None: the run's step count, which the
    distill stage fills in from ``train.steps``; a schedule needs it set). Weight decay applies
    to parameters with ``ndim >= 2`` only (matrices; not norms or biases). ``clip_norm`` None
    or 0: no clipping.
    """

    learning_rate: float = 1e-6
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_fraction: float = 0.05
    warmup_steps: int | None = None
    end_lr_fraction: float = 0.0
    clip_norm: float | None = 1.0
    total_steps: int | None = None

    def __post_init__(self):
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        check(0 <= self.b1 < 1, "b1", f"must be in [0, 1), got {self.b1}")
        check(0 <= self.b2 < 1, "b2", f"must be in [0, 1), got {self.b2}")
        check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.schedule in ("cosine", "constant"), "schedule",
              f"must be 'cosine' or 'constant', got {self.schedule!r}")
        check(0 <= self.warmup_fraction <= 1, "warmup_fraction", f"must be in [0, 1], got {self.warmup_fraction}")
        check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps",
              f"must be >= 0, got {self.warmup_steps}")
        check(0 <= self.end_lr_fraction <= 1, "end_lr_fraction", f"must be in [0, 1], got {self.end_lr_fraction}")
        check(self.clip_norm is None or self.clip_norm >= 0, "clip_norm", f"must be >= 0, got {self.clip_norm}")
        check(self.total_steps is None or self.total_steps >= 1, "total_steps",
              f"must be >= 1, got {self.total_steps}")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate per optimiser update: linear warmup from 0, then cosine (or constant)."""
    if cfg.total_steps is None:
        raise ValueError("optimizer.total_steps is not set (the distill stage sets it to train.steps)")
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_fraction * cfg.total_steps)
    warmup = int(min(max(warmup, 0), cfg.total_steps))
    if cfg.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(cfg.learning_rate)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.learning_rate, warmup), optax.constant_schedule(cfg.learning_rate)],
            [warmup],
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(cfg.total_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.end_lr_fraction,
    )


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm(clip) -> adamw(schedule, b1, b2, eps, weight_decay)``."""
    parts = []
    if cfg.clip_norm is not None and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask
        )
    )
    return optax.chain(*parts)


class TrainState(struct.PyTreeNode):
    """Everything a training run carries from step to step.

    Fields (all arrays, so the whole state is one checkpointable pytree):
      step: int32 scalar, number of train steps taken (skipped non-finite steps included).
      params: ``nnx.State`` of the model's ``nnx.Param`` variables (fp32 master weights).
      rest: ``nnx.State`` of every other model variable (buffers, RNG counters, ...).
      opt_state: the optax state for ``params``.
      rng: uint32[2] PRNG key, split once per step.
      nan_steps: int32 scalar, total steps skipped because loss or gradients were not finite.
    Static (not saved): ``graphdef`` (model structure) and ``tx`` (the optax transform).
    """

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: Any
    rng: jax.Array
    nan_steps: jax.Array
    graphdef: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation, *, seed: int = 0) -> TrainState:
        """Split ``model`` and initialise the optimiser. ``model`` is not modified."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        # nnx.split's States hold ``model``'s own Variable objects: rebuild them (same arrays, no
        # copy) so that updating ``model`` or a ``model()`` view never changes this state, and back.
        params, rest = jax.tree.map(lambda x: x, (params, rest))
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            rest=rest,
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(seed),
            nan_steps=jnp.zeros((), jnp.int32),
            graphdef=graphdef,
            tx=tx,
        )

    def model(self, params: nnx.State | None = None) -> nnx.Module:
        """A new module holding the state's arrays (optionally other ``params``, e.g. cast to bf16).

        Its Variables are its own (the arrays are shared, not copied): ``nnx.update`` on it leaves
        this state, and every other view, unchanged."""
        return nnx.merge(self.graphdef, self.params if params is None else params, self.rest, copy=True)

    def num_params(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.params))


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast every floating leaf of ``tree`` to ``dtype`` (e.g. bf16 compute copies of fp32 masters)."""
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
