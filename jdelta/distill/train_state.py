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
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jdelta.config import build


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + warmup/cosine + global-norm clipping (defaults: the VA-OPD recipe).

    ``warmup_steps`` wins over ``warmup_fraction`` when set. ``total_steps`` is the
    number of optimiser updates the schedule spans. Weight decay applies to
    parameters with ``ndim >= 2`` only (matrices; not norms or biases).
    """

    learning_rate: float = 1e-6
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: str = "cosine"  # "cosine" | "constant"
    warmup_fraction: float = 0.05
    warmup_steps: int | None = None
    end_lr_fraction: float = 0.0
    clip_norm: float | None = 1.0
    total_steps: int = 1000

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> OptimizerConfig:
        return build(cls, cfg or {})


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate per optimiser update: linear warmup from 0, then cosine (or constant)."""
    if cfg.total_steps < 1:
        raise ValueError(f"optimizer.total_steps must be >= 1, got {cfg.total_steps}")
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_fraction * cfg.total_steps)
    warmup = int(min(max(warmup, 0), cfg.total_steps))
    if cfg.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(cfg.learning_rate)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.learning_rate, warmup), optax.constant_schedule(cfg.learning_rate)],
            [warmup],
        )
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=cfg.learning_rate,
            warmup_steps=warmup,
            decay_steps=max(cfg.total_steps, warmup + 1),
            end_value=cfg.learning_rate * cfg.end_lr_fraction,
        )
    raise ValueError(f"unknown schedule {cfg.schedule!r}; expected 'cosine' or 'constant'")


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
        """A module view of the state (optionally with other ``params``, e.g. cast to bf16)."""
        return nnx.merge(self.graphdef, self.params if params is None else params, self.rest)

    def num_params(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.params))


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast every floating leaf of ``tree`` to ``dtype`` (e.g. bf16 compute copies of fp32 masters)."""
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
