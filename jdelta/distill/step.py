"""The pure, jit-able train step: loss -> grads (with accumulation) -> optax update.

``make_train_step(loss_fn)`` returns ``train_step(state, batch, shared=None) ->
(state, metrics)``. A step whose loss or gradients are not finite leaves the
parameters and the optimiser state unchanged and increments ``state.nan_steps``;
the caller (the loop) decides when too many such steps end the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jdelta.distill.train_state import TrainState, cast_floating
from jdelta.sharding import Rules, activation_sharding, state_shardings

# loss_fn(model, batch, rng, shared) -> (scalar loss, {name: scalar metric})
LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]]
Metrics = dict[str, jax.Array]


def _split_micro(batch: Mapping[str, Any], n: int) -> Any:
    def one(x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(
                f"grad_accum_steps={n} must divide the batch dimension of every batch entry; got shape {x.shape}"
            )
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree.map(one, batch)


def make_train_step(
    loss_fn: LossFn,
    *,
    grad_accum_steps: int = 1,
    compute_dtype: Any = None,
    schedule: optax.Schedule | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """Build ``train_step(state, batch, shared=None) -> (state, metrics)``.

    Args:
      loss_fn: ``loss_fn(model, batch, rng, shared) -> (loss, aux)``; ``batch`` leaves have
        a leading batch dim ``B`` (``B / grad_accum_steps`` per call when accumulating);
        ``shared`` is passed through unsplit (e.g. a teacher's LM head ``[H, V]``); ``aux`` is
        a dict of scalars, averaged over micro-batches. ``model`` is the student built from
        the (optionally ``compute_dtype``-cast) parameters; only its ``nnx.Param``s get gradients.
      grad_accum_steps: micro-batches per update. The batch is split into
        ``[grad_accum_steps, B / grad_accum_steps, ...]`` and scanned; the loss and gradients
        are the mean over micro-batches (equal to one big batch for a per-example-mean loss).
      compute_dtype: e.g. ``jnp.bfloat16``: forward/backward run on a cast copy of the fp32
        master weights; gradients and the update stay fp32.
      schedule: the learning-rate schedule, only to report ``learning_rate`` in the metrics.

    Metrics: ``loss``, ``grad_norm`` (before clipping), ``skipped`` (1.0 when non-finite),
    ``learning_rate`` (if ``schedule``), and every ``aux`` entry.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")

    def train_step(state: TrainState, batch: Mapping[str, Any], shared: Any = None) -> tuple[TrainState, Metrics]:
        rng, step_rng = jax.random.split(state.rng)

        def loss_of(params, micro, r):
            model = state.model(cast_floating(params, compute_dtype))
            loss, aux = loss_fn(model, micro, r, shared)
            return loss.astype(jnp.float32), {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        if grad_accum_steps == 1:
            (loss, aux), grads = grad_fn(state.params, batch, step_rng)
        else:
            micro = _split_micro(batch, grad_accum_steps)
            rngs = jax.random.split(step_rng, grad_accum_steps)
            first = jax.tree.map(lambda x: x[0], micro)
            aux_shape = jax.eval_shape(lambda: loss_of(state.params, first, rngs[0])[1])
            init = (
                jax.tree.map(jnp.zeros_like, state.params),
                jnp.zeros((), jnp.float32),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape),
            )

            def body(carry, xs):
                g_acc, l_acc, a_acc = carry
                mb, r = xs
                (mb_loss, a), g = grad_fn(state.params, mb, r)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + mb_loss, jax.tree.map(jnp.add, a_acc, a)), None

            (grads, loss, aux), _ = jax.lax.scan(body, init, (micro, rngs))
            inv = 1.0 / grad_accum_steps
            grads = jax.tree.map(lambda g: g * inv, grads)
            loss = loss * inv
            aux = jax.tree.map(lambda a: a * inv, aux)

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Zero non-finite grads before the update so no NaN enters the optimiser arithmetic.
        safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
        updates, new_opt = state.tx.update(safe_grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jnp.where(finite, new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=jax.tree.map(keep, new_params, state.params),
            opt_state=jax.tree.map(keep, new_opt, state.opt_state),
            rng=rng,
            nan_steps=state.nan_steps + (~finite).astype(jnp.int32),
        )
        metrics = dict(aux)
        metrics.update(loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32))
        if schedule is not None:
            # optax's count == updates applied so far == steps taken minus skipped ones.
            metrics["learning_rate"] = jnp.asarray(schedule(state.step - state.nan_steps), jnp.float32)
        return new_state, metrics

    return train_step


def shard_state(state: TrainState, mesh: Mesh, rules: Rules | None = None) -> TrainState:
    """Place every array of ``state`` on its ``NamedSharding`` (params and moments by logical axes)."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, rules: Rules | None = None) -> dict[str, jax.Array]:
    """Shard each batch entry's leading dim over the ``batch`` logical axis (replicated if indivisible)."""

    def one(x):
        x = jnp.asarray(x)
        names = ("batch",) + (None,) * (x.ndim - 1) if x.ndim else ()
        return jax.device_put(x, activation_sharding(mesh, names, x.shape, rules))

    return jax.tree.map(one, dict(batch))


def jit_train_step(
    train_step: Callable[..., tuple[TrainState, Metrics]],
    state: TrainState,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    *,
    donate: bool = True,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """``jax.jit`` the step; with a mesh the output state keeps the input state's shardings.

    Inputs should already be placed (:func:`shard_state`, :func:`shard_batch`); XLA
    propagates those shardings through the step (FSDP + tensor parallel by the rules).
    ``donate`` reuses the old state's buffers for the new one.
    """
    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if mesh is not None:
        kwargs["out_shardings"] = (state_shardings(state, mesh, rules), None)
    return jax.jit(train_step, **kwargs)
