"""A TrainState never shares mutable Variables with the module it was made from, or with its views."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jdelta.distill.train_state import TrainState


class Tiny(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros(3))


def test_updating_a_view_or_the_source_module_leaves_the_state_unchanged():
    m = Tiny()
    s0 = TrainState.create(m, optax.sgd(1.0))
    view = s0.model()
    nnx.update(view, jax.tree.map(lambda x: x + 1, s0.params), s0.rest)  # e.g. the on-policy sampler's bind()
    np.testing.assert_array_equal(np.asarray(view.w.get_value()), np.ones(3))
    np.testing.assert_array_equal(np.asarray(m.w.get_value()), np.zeros(3))  # the source module: untouched
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(s0.params)[0]), np.zeros(3))  # the state: untouched
    assert s0.model().w is not view.w
    m.w.set_value(jnp.full(3, 5.0))
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(s0.params)[0]), np.zeros(3))
