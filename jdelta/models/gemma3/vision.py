"""SigLIP vision tower and Gemma 3's multimodal projector (Flax NNX).

``pixel_values [N, C, H, W]`` (``H = W = image_size``, as the Gemma 3 processor makes them) ->
patches (the stride-``ps`` Conv2d as one matmul) + learned position embeddings -> pre-norm
transformer blocks with bidirectional attention within each image -> final LayerNorm. The
projector average-pools the ``side x side`` patch grid to ``mm_tokens_per_image`` tokens,
applies Gemma RMSNorm and projects to the text width: ``[N, mm_tokens_per_image, H_text]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jdelta.models.gemma3.config import Gemma3Config, SiglipVisionConfig
from jdelta.models.gemma3.text import GemmaRMSNorm
from jdelta.models.layers import Dense, LayerNorm, constrain, dot_product_attention


def image_patches(pixel_values: jax.Array, patch_size: int) -> jax.Array:
    """``[N, C, H, W]`` -> ``[N, (H/ps)*(W/ps), C*ps*ps]``, patches row-major, each flattened
    channel-major (the order of the Conv2d weight ``[E, C, ps, ps]``)."""
    n, c, h, w = pixel_values.shape
    x = pixel_values.reshape(n, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(n, (h // patch_size) * (w // patch_size), -1)


class SiglipAttention(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, dtype, param_dtype, attention_impl: str, rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim, self.attention_impl = cfg.num_attention_heads, cfg.head_dim, attention_impl
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(d, d, names=("vision_embed", "q_proj"), **kw)
        self.k_proj = Dense(d, d, names=("vision_embed", "q_proj"), **kw)
        self.v_proj = Dense(d, d, names=("vision_embed", "q_proj"), **kw)
        self.out_proj = Dense(d, d, names=("q_proj", "vision_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, P, D]`` -> ``[N, P, D]``, every patch attending to every patch of its image."""
        n, p, _ = x.shape
        heads = (n, p, self.num_heads, self.head_dim)
        q, k, v = (proj(x).reshape(heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = dot_product_attention(q, k, v, None, implementation=self.attention_impl)
        return self.out_proj(out.reshape(n, p, -1))


class SiglipMLP(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, dtype, param_dtype, rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.approximate = cfg.hidden_act == "gelu_pytorch_tanh"
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, names=("vision_embed", "vision_mlp"), **kw)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, names=("vision_mlp", "vision_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=self.approximate))


class SiglipEncoderLayer(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, dtype, param_dtype, attention_impl: str, rngs):
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, **norm)
        self.self_attn = SiglipAttention(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                         rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, **norm)
        self.mlp = SiglipMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nnx.Module):
    """Patch embedding (``patch_embedding``: the Conv2d as ``[C*ps*ps, D]`` + bias) and the
    learned ``[num_patches, D]`` position table (``position_embedding``)."""

    def __init__(self, cfg: SiglipVisionConfig, *, dtype, param_dtype, rngs):
        self.patch_size = cfg.patch_size
        self.patch_embedding = Dense(cfg.patch_dim, cfg.hidden_size, names=("patch", "vision_embed"), use_bias=True,
                                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.position_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.num_patches, cfg.hidden_size), param_dtype) * 0.02,
            out_sharding=(None, "vision_embed"), eager_sharding=False)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        x = self.patch_embedding(image_patches(pixel_values, self.patch_size))
        return x + self.position_embedding.get_value().astype(x.dtype)


class SiglipVisionModel(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "xla", rngs):
        self.cfg, self.dtype = cfg, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embeddings = SiglipEmbeddings(cfg, rngs=rngs, **kw)
        self.layers = nnx.List([SiglipEncoderLayer(cfg, attention_impl=attention_impl, rngs=rngs, **kw)
                                for _ in range(cfg.num_hidden_layers)])
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """``[N, C, S, S]`` -> last hidden state ``[N, (S/ps)^2, D]`` (after ``post_layernorm``)."""
        cfg = self.cfg
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be [N, {want[0]}, {want[1]}, {want[2]}] (resized by the Gemma 3 "
                             f"image processor), got shape {tuple(pixel_values.shape)}")
        x = self.embeddings(pixel_values.astype(self.dtype))
        for layer in self.layers:
            x = constrain(layer(x), ("batch", None, "vision_embed"))
        return self.post_layernorm(x)


class Gemma3MultiModalProjector(nnx.Module):
    """Average pooling to ``mm_tokens_per_image`` tokens, Gemma RMSNorm, projection
    ``mm_input_projection_weight [D_vision, H_text]`` (no transpose: HF multiplies by it as is)."""

    def __init__(self, config: Gemma3Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
        v = config.vision
        self.dtype = dtype
        self.side, self.tokens_side = v.patches_per_side, config.tokens_per_side
        self.kernel = self.side // self.tokens_side
        self.mm_soft_emb_norm = GemmaRMSNorm(v.hidden_size, eps=v.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.mm_input_projection_weight = nnx.Param(
            jax.random.normal(rngs.params(), (v.hidden_size, config.text.hidden_size), param_dtype) * 0.02,
            out_sharding=("vision_embed", "embed"), eager_sharding=False)

    def __call__(self, vision_outputs: jax.Array) -> jax.Array:
        """``[N, side^2, D]`` -> ``[N, tokens_side^2, H_text]``."""
        n, _, d = vision_outputs.shape
        t, k = self.tokens_side, self.kernel
        x = vision_outputs.reshape(n, t, k, t, k, d).astype(jnp.float32).mean(axis=(2, 4))
        x = self.mm_soft_emb_norm(x.reshape(n, t * t, d).astype(vision_outputs.dtype))
        out = jnp.dot(x, self.mm_input_projection_weight.get_value().astype(x.dtype))
        return out.astype(vision_outputs.dtype)
