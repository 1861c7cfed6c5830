"""ViCuR's cue-recovery module (arXiv 2606.05718; ``shared/METHODS.md``), in Flax NNX.

The student learns to recover, from the image alone, the visual cues its teacher was given as
text. The module gives the prompt one "sink" token that reads the image at several depths:

* **sink**: the sequence's first ``<|im_start|>`` token (``sink_token_id``), or the first real
  (non-padding) token when the sequence has none;
* after every decoder layer ``i`` with ``i % every == 0`` (``every = 5``: layers 0, 5, 10, ...),
  *after* that layer's DeepStack addition, the sink's hidden state attends over the hidden states
  of all visual tokens of that layer (padding and text masked)::

      q = Wq RMSNorm_q(h_sink)          k_t = Wk RMSNorm_kv(h_t)      v_t = Wv RMSNorm_kv(h_t)
      a = softmax_t(q . k_t * head_dim^-0.5)  (per head, float32, t over visual tokens)
      h_sink <- h_sink + Wo concat_heads(sum_t a_t v_t)

  with per-layer ``Wq, Wk, Wv, Wo`` (hidden x hidden, no bias), the LM's attention head count
  (``head_dim = hidden / heads``), and the two RMSNorms shared by all layers. Later tokens see the
  updated sink through ordinary causal attention in the next layers.

It runs at prefill only (training forward, scoring, the sampler's prefill): the model builds the
hook only for calls without a KV cache or with more than one token, so a decode step runs the
plain decoder (no extra cost; its KV cache already holds the updated sink). A sequence without
visual tokens (text-only prompt, all-padding row) is left unchanged.

Implementation note: ``q . (Wk n_t) = (Wk^T q) . n_t`` and ``sum_t a_t (Wv n_t) = Wv (sum_t a_t
n_t)``, so keys and values are never projected token by token: the cost per module layer is
``O(S * hidden * heads)`` instead of ``O(S * hidden^2)``. The result is the same function (the
PyTorch reference in ``tests/test_cue_recovery.py`` uses the direct form).

Size: ``4 * hidden^2`` per module layer plus ``2 * hidden`` for the norms. Qwen3-VL-2B (hidden
2048, 28 layers: module after 0, 5, ..., 25) 100,667,392 and 8B (hidden 4096, 36 layers: after
0, 5, ..., 35) 536,879,104: the paper's +100.7M and +536.9M exactly (``jdelta model-info
--cue-recovery``). Note that on the 8B the last module layer follows the last decoder layer (35),
where nothing reads the sink any more (only the sink's own, unused, next-token logits change): it
is kept, as the published count includes it. For 4B/32B ``heads * head_dim != hidden``; then the
module's ``head_dim`` is ``hidden / heads`` (80) and the scale follows it (not published).

Initialisation (not published): ``init="zero_out"`` (default) draws ``Wq, Wk, Wv`` from
``N(0, init_std^2)`` and sets ``Wo = 0``, so the module starts as the identity and the student
starts as exactly the base model (a self-distillation run starts with student = unhinted teacher;
only ``Wo`` gets a gradient at the first step, the others from the second). ``init="normal"``
draws ``Wo`` too (an active module from step 0; used by the parity tests).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jdelta.config import check
from jdelta.models.layers import Dense, KeyGen, RMSNorm
from jdelta.models.qwen3_vl.text import LayerHook

QWEN_IM_START = 151644  # <|im_start|> in the Qwen2/2.5/3 tokenizers


@dataclasses.dataclass(frozen=True)
class CueRecoveryConfig:
    """Settings of the cue-recovery module (the sizes come from the LM it is attached to).

    sink_token_id: ``<|im_start|>`` of the tokenizer (the sink is the first one of a sequence);
      None: the sink is always the first real token.
    every: a module layer after every decoder layer ``i`` with ``i % every == 0`` (paper: 5).
    init: ``zero_out`` (``Wo = 0``: the module starts as the identity; default) or ``normal``.
    init_std: standard deviation of the normal draws (the decoder's own ``Dense`` default).
    seed: parameter-init seed.
    """

    sink_token_id: int | None = QWEN_IM_START
    every: int = 5
    init: Literal["zero_out", "normal"] = "zero_out"
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self):
        check(self.every >= 1, "every", f"must be >= 1, got {self.every}")
        check(self.init in ("zero_out", "normal"), "init", f"must be 'zero_out' or 'normal', got {self.init!r}")
        check(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")
        check(self.sink_token_id is None or self.sink_token_id >= 0, "sink_token_id",
              f"must be >= 0, got {self.sink_token_id}")


def module_layers(num_hidden_layers: int, every: int) -> tuple[int, ...]:
    """Decoder layer indices followed by a module layer: ``0, every, 2*every, ... < num_hidden_layers``."""
    return tuple(range(0, num_hidden_layers, every))


def parameter_count(hidden_size: int, num_hidden_layers: int, every: int = 5) -> int:
    """``4 hidden^2`` per module layer + the two shared norms."""
    return 4 * hidden_size * hidden_size * len(module_layers(num_hidden_layers, every)) + 2 * hidden_size


def sink_positions(input_ids: jax.Array, attention_mask: jax.Array, sink_token_id: int | None) -> jax.Array:
    """``[B]`` int32: the first real ``sink_token_id`` of each row, else its first real token
    (0 for an all-padding row)."""
    real = attention_mask.astype(bool)
    first_real = jnp.argmax(real, axis=-1)
    if sink_token_id is None:
        return first_real.astype(jnp.int32)
    is_sink = (input_ids == sink_token_id) & real
    return jnp.where(is_sink.any(-1), jnp.argmax(is_sink, axis=-1), first_real).astype(jnp.int32)


class CueLayer(nnx.Module):
    """One module layer's projections: ``[hidden, hidden]`` kernels (``x @ kernel``), no bias."""

    def __init__(self, hidden: int, cfg: CueRecoveryConfig, *, dtype, param_dtype, rngs: KeyGen):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(hidden, hidden, names=("embed", "q_proj"), **kw)
        self.k_proj = Dense(hidden, hidden, names=("embed", "q_proj"), **kw)
        self.v_proj = Dense(hidden, hidden, names=("embed", "q_proj"), **kw)
        self.o_proj = Dense(hidden, hidden, names=("q_proj", "embed"), **kw)
        scale = cfg.init_std / 0.02  # Dense draws N(0, 0.02^2)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            if scale != 1.0:
                proj.kernel.set_value(proj.kernel.get_value() * scale)
        if cfg.init == "zero_out":
            self.o_proj.kernel.set_value(jnp.zeros_like(self.o_proj.kernel.get_value()))


class CueRecovery(nnx.Module):
    """The module for a decoder of ``num_hidden_layers`` layers of width ``hidden_size``.

    Parameters: ``layers[j].{q,k,v,o}_proj.kernel [H, H]`` for the ``j``-th module layer (after
    decoder layer ``j * every``); ``query_norm.weight [H]``, ``kv_norm.weight [H]``.
    """

    def __init__(self, hidden_size: int, num_hidden_layers: int, num_heads: int, cfg: CueRecoveryConfig, *,
                 rms_norm_eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | jax.Array | None = None):
        if hidden_size % num_heads:
            raise ValueError(f"cue recovery: hidden_size {hidden_size} is not a multiple of the {num_heads} heads")
        self.cfg = cfg
        self.hidden_size, self.num_hidden_layers, self.num_heads = hidden_size, num_hidden_layers, num_heads
        self.rms_norm_eps = rms_norm_eps
        self.dtype = dtype
        self.at_layers = module_layers(num_hidden_layers, cfg.every)
        keys = KeyGen(rngs if rngs is not None else jax.random.key(cfg.seed))
        self.layers = nnx.List([CueLayer(hidden_size, cfg, dtype=dtype, param_dtype=param_dtype, rngs=keys)
                                for _ in self.at_layers])
        self.query_norm = RMSNorm(hidden_size, eps=rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.kv_norm = RMSNorm(hidden_size, eps=rms_norm_eps, dtype=dtype, param_dtype=param_dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def settings(self) -> dict:
        """Everything needed to rebuild the module (the ``cue_recovery.json`` of an export)."""
        return {"config": dataclasses.asdict(self.cfg), "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_hidden_layers, "num_heads": self.num_heads,
                "rms_norm_eps": self.rms_norm_eps, "layers": list(self.at_layers)}

    def step(self, j: int, hidden: jax.Array, sink: jax.Array, visual_mask: jax.Array,
             live: jax.Array) -> jax.Array:
        """Module layer ``j`` on ``hidden [B, S, H]``: the sink (``sink [B]``) reads the visual tokens
        (``visual_mask [B, S]``); rows with ``live [B]`` False are returned unchanged."""
        layer = self.layers[j]
        b, s, h = hidden.shape
        n, d = self.num_heads, self.head_dim
        x = hidden.astype(self.dtype)
        h_sink = jnp.take_along_axis(x, sink[:, None, None], axis=1)[:, 0]  # [B, H]
        q = layer.q_proj(self.query_norm(h_sink)).reshape(b, n, d)
        kv = self.kv_norm(x)  # [B, S, H]
        wk = layer.k_proj.kernel.get_value().astype(self.dtype).reshape(h, n, d)
        wv = layer.v_proj.kernel.get_value().astype(self.dtype).reshape(h, n, d)
        qk = jnp.einsum("bnd,hnd->bnh", q, wk)  # Wk^T q per head
        scores = jnp.einsum("bsh,bnh->bns", kv, qk, preferred_element_type=jnp.float32) * (d ** -0.5)
        scores = jnp.where(visual_mask[:, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
        ctx = jnp.einsum("bns,bsh->bnh", probs.astype(self.dtype), kv)  # sum_t a_t n_t per head
        out = layer.o_proj(jnp.einsum("bnh,hnd->bnd", ctx, wv).reshape(b, h))  # [B, H]
        live = live & visual_mask.any(-1)  # no visual token: nothing to read, row unchanged
        at_sink = (jnp.arange(s)[None, :] == sink[:, None]) & live[:, None]  # [B, S]
        return jnp.where(at_sink[..., None], hidden + out[:, None, :].astype(hidden.dtype), hidden)

    def layer_hook(self, input_ids: jax.Array, attention_mask: jax.Array) -> LayerHook:
        """The decoder hook for one prefill/training forward of ``input_ids, attention_mask [B, S]``."""
        sink = sink_positions(input_ids, attention_mask, self.cfg.sink_token_id)
        live = attention_mask.astype(bool).any(-1)
        index = {layer: j for j, layer in enumerate(self.at_layers)}

        def hook(i: int, hidden: jax.Array, visual_mask: jax.Array, _attention_mask: jax.Array) -> jax.Array:
            if i not in index:
                return hidden
            return self.step(index[i], hidden, sink, visual_mask, live)

        return hook


def make_cue_recovery(text_config, cfg: CueRecoveryConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                      rngs: nnx.Rngs | jax.Array | None = None) -> CueRecovery:
    """The module for a Qwen3-VL text config (``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``rms_norm_eps``)."""
    return CueRecovery(text_config.hidden_size, text_config.num_hidden_layers, text_config.num_attention_heads, cfg,
                       rms_norm_eps=text_config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def attach_cue_recovery(model, cfg: CueRecoveryConfig, *, rngs: nnx.Rngs | jax.Array | None = None):
    """Give a Qwen3-VL ``model`` a fresh module (``model.cue_recovery``), in its dtypes; returns ``model``.

    From then on the model's prefill/training forwards run it through the decoder's ``layer_hook``;
    its parameters are part of ``nnx.state(model)`` (trained, sharded and checkpointed with the
    model). Every family's HF export writes them to separate files (:mod:`jdelta.models.cue_recovery_io`).
    """
    mc = model.config
    module = make_cue_recovery(mc.text, cfg, dtype=jnp.dtype(mc.dtype), param_dtype=jnp.dtype(mc.param_dtype),
                               rngs=rngs)
    model.cue_recovery = nnx.data(module)
    return model


def detach_cue_recovery(model):
    """Remove the module from ``model`` (the plain student); returns the module (or None)."""
    module = getattr(model, "cue_recovery", None)
    model.cue_recovery = nnx.data(None)
    return module


def num_params(module: CueRecovery) -> int:
    return sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))
