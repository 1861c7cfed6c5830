"""A tiny causal LM (pure JAX, NNX) with logical-axis names, for the distill infrastructure tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _param(rngs: nnx.Rngs, shape, names, scale=None):
    scale = scale if scale is not None else shape[0] ** -0.5
    return nnx.Param(jax.random.normal(rngs.params(), shape) * scale, out_sharding=names, eager_sharding=False)


class TinyLM(nnx.Module):
    """Embed -> causal running mean -> MLP (residual) -> norm -> LM head. ``[B,S] -> [B,S,V]``."""

    def __init__(self, vocab: int = 32, embed: int = 16, mlp: int = 32, *, rngs: nnx.Rngs):
        self.embed = _param(rngs, (vocab, embed), ("vocab", "embed"), 1.0)
        self.w_in = _param(rngs, (embed, mlp), ("embed", "mlp"))
        self.w_out = _param(rngs, (mlp, embed), ("mlp", "embed"))
        self.scale = nnx.Param(jnp.ones((embed,)), out_sharding=("norm",), eager_sharding=False)
        self.head = _param(rngs, (embed, vocab), ("embed", "vocab"))

    def hidden(self, input_ids: jax.Array) -> jax.Array:
        x = self.embed[...][input_ids]
        pos = jnp.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        x = x + jnp.cumsum(x, axis=1) / pos
        x = x + jax.nn.gelu(x @ self.w_in[...]) @ self.w_out[...]
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * self.scale[...]

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.hidden(input_ids) @ self.head[...]


def ce_loss(model: TinyLM, batch, rng, shared=None):
    """Masked next-token cross-entropy; mean over examples of the per-example token mean."""
    ids = batch["input_ids"]
    logits = model(ids[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, -1)
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    mask = batch["mask"][:, 1:].astype(jnp.float32)
    per_ex = -(tok * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    return per_ex.mean(), {"tokens": mask.sum()}


def make_batch(seed: int, batch: int = 8, seq: int = 12, vocab: int = 32) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    ids = r.integers(0, vocab, (batch, seq)).astype(np.int32)
    ids[:, 1::2] = (ids[:, 0::2] + 1) % vocab  # a learnable pattern
    mask = np.ones((batch, seq), np.int32)
    return {"input_ids": ids, "mask": mask}
