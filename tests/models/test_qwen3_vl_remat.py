"""Training path: decoder-layer remat changes memory, not values (loss and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from qwen3_vl_tiny import make_batch, tiny_hf_config

from jdelta.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration, get_rope_index
from jdelta.models.qwen3_vl.config import REMAT_POLICIES


def _loss_fn(graphdef):
    def loss_fn(params, ids, mask, pos, pv, grid):
        out = nnx.merge(graphdef, params)(ids, attention_mask=mask, position_ids=pos, pixel_values=pv,
                                          image_grid_thw=grid)
        logp = jax.nn.log_softmax(out.logits[:, :-1], -1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])
    return jax.value_and_grad(loss_fn)


def _setup(rows):
    config = Qwen3VLConfig.from_hf_dict(tiny_hf_config().to_dict())
    params = nnx.state(Qwen3VLForConditionalGeneration(config, rngs=nnx.Rngs(1)), nnx.Param)
    ids, mask, pv, grid = make_batch(rows)
    pos, _ = get_rope_index(ids, grid, mask, config)
    inputs = [jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(pos),
              None if pv is None else jnp.asarray(pv), None if grid is None else jnp.asarray(grid, jnp.int32)]
    return config, params, inputs


def _graphdef(config):
    return nnx.graphdef(nnx.eval_shape(lambda: Qwen3VLForConditionalGeneration(config, rngs=nnx.Rngs(0))))


@pytest.fixture(scope="module")
def reference():
    """No remat: loss and gradients on a text row and a row with an image (DeepStack feeds the decoder)."""
    config, params, inputs = _setup([[12], [3, (1, 2, 2), 5]])
    loss, grads = jax.jit(_loss_fn(_graphdef(config)))(params, *inputs)
    assert np.isfinite(float(loss))
    assert "remat" not in str(jax.make_jaxpr(_loss_fn(_graphdef(config)))(params, *inputs))
    return config, params, inputs, float(loss), grads


# jdelta passes each policy to nnx.remat the same way (text.REMAT_POLICIES): the default suite checks
# `dots` (the MFU figure's), the other jax.checkpoint policies run with -m slow
@pytest.mark.parametrize("policy", [p if p == "dots" else pytest.param(p, marks=pytest.mark.slow)
                                    for p in REMAT_POLICIES if p != "none"])
def test_remat_gives_same_loss_and_gradients(policy, reference):
    """Every remat policy (``dots``: the one in the MFU figure) changes memory, not the loss or its gradient."""
    config, params, inputs, loss, grads = reference
    remat = _loss_fn(_graphdef(config.replace(remat_policy=policy)))
    remat_jaxpr = str(jax.make_jaxpr(remat)(params, *inputs))
    assert remat_jaxpr.count("remat") + remat_jaxpr.count("checkpoint") >= config.text.num_hidden_layers
    loss_r, grads_r = jax.jit(remat)(params, *inputs)
    assert abs(float(loss_r) - loss) <= 1e-6 * max(1.0, abs(loss))
    flat, flat_r = jax.tree.leaves(grads), jax.tree.leaves(grads_r)
    assert len(flat) == len(flat_r) and sum(float(jnp.abs(g).sum()) for g in flat) > 0
    for g, gr in zip(flat, flat_r, strict=True):
        np.testing.assert_allclose(np.asarray(gr), np.asarray(g), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_gradients_reach_vision_tower_with_remat():
    config, params, inputs = _setup([[3, (1, 2, 2), 5], [2, (1, 2, 2), 6]])
    loss, grads = jax.jit(_loss_fn(_graphdef(config.replace(remat_policy="full"))))(params, *inputs)
    assert np.isfinite(float(loss))
    assert float(jnp.abs(grads["visual"]["patch_embed"]["proj"]["kernel"].get_value()).sum()) > 0
    assert float(jnp.abs(grads["visual"]["deepstack_merger_list"][1]["linear_fc2"]["kernel"].get_value()).sum()) > 0


def test_bad_remat_policy_is_rejected():
    with pytest.raises(ValueError, match="remat_policy"):
        Qwen3VLConfig(remat_policy="sometimes")
