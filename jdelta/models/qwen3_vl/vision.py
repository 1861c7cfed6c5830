"""Qwen3-VL vision tower (Flax NNX), jit-able with the image grids as traced values.

``pixel_values [P, C*T*ps*ps]`` holds all patches of all images of a batch, concatenated,
in HF's processor order: per image, per frame, patches ordered by ``spatial_merge_size``
blocks (block row, block col, in-block row, in-block col). Rows past ``sum(t*h*w)`` are
padding (bucketed shapes) and are ignored. Everything per patch (image id, row, column,
interpolated position embedding, 2D rotary, attention segment) is computed from
``grid_thw [N, 3]`` with array ops, so one compilation serves every image size that fits
the padded shapes. Attention is block-diagonal per frame via segment ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jdelta.models.layers import Dense, LayerNorm, apply_rotary, dot_product_attention, vision_cos_sin
from jdelta.models.qwen3_vl.config import Qwen3VLVisionConfig


def patch_layout(grid_thw: jax.Array, num_patches: int, merge: int) -> dict[str, jax.Array]:
    """Per-patch coordinates from the grids (pure, jit-able).

    Args:
      grid_thw: ``[N, 3]`` int (t, h, w) in patches; padded rows are ``(0, 0, 0)``.
      num_patches: static ``P`` (rows of ``pixel_values``).
      merge: spatial merge size.
    Returns:
      dict of ``[P]`` arrays: ``row``, ``col`` (patch coordinates in its frame), ``height``,
      ``width`` (its image's grid), ``segment`` (global frame id; -1 for padding rows) and
      ``valid`` (bool).
    """
    grid = grid_thw.astype(jnp.int32)
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    counts = t * h * w
    ends = jnp.cumsum(counts)
    starts = ends - counts
    p = jnp.arange(num_patches, dtype=jnp.int32)
    image = jnp.clip(jnp.searchsorted(ends, p, side="right"), 0, grid.shape[0] - 1)
    valid = p < ends[-1]
    hi, wi = jnp.maximum(h[image], 1), jnp.maximum(w[image], 1)
    within = p - starts[image]
    frame = within // (hi * wi)
    in_frame = within % (hi * wi)
    blocks_w = jnp.maximum(wi // merge, 1)
    in_col = in_frame % merge
    in_row = (in_frame // merge) % merge
    block_col = (in_frame // (merge * merge)) % blocks_w
    block_row = in_frame // (merge * merge * blocks_w)
    frame_starts = jnp.cumsum(t) - t
    segment = jnp.where(valid, frame_starts[image] + frame, -1)
    return dict(row=block_row * merge + in_row, col=block_col * merge + in_col, height=hi, width=wi,
                segment=segment, valid=valid)


def bilinear_taps(index: jax.Array, size: jax.Array, side: int) -> tuple[jax.Array, jax.Array]:
    """``align_corners=True`` bilinear taps of target positions ``index [P]`` on an axis of
    ``size [P]`` into a ``side``-long table: ``(taps [P, 2] int, weights [P, 2] float32)``."""
    src = index.astype(jnp.float32) * (side - 1) / jnp.maximum(size - 1, 1).astype(jnp.float32)
    floor = jnp.floor(src)
    offsets = jnp.arange(2, dtype=jnp.float32)
    taps = jnp.clip(floor.astype(jnp.int32)[:, None] + jnp.arange(2, dtype=jnp.int32), 0, side - 1)
    weights = jnp.maximum(1.0 - jnp.abs(src[:, None] - floor[:, None] - offsets), 0.0)
    return taps, weights


def block_local_mask_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment: jax.Array, block: int, *,
                               implementation: str) -> jax.Array:
    """Attention within segments whose rows are contiguous and at most ``block`` long.

    Rows are cut into blocks of ``block``; each query block attends to its own block and
    its two neighbours (a segment no longer than ``block`` lies within them), masked by
    segment equality. Cost ``P * 3 * block`` instead of ``P^2``.

    Args:
      q, k, v: ``[P, H, D]``; segment: ``[P]`` int (equal ids attend to each other).
    Returns:
      ``[P, H, D]``.
    """
    p, h, d = q.shape
    nb = -(-p // block)
    extra = nb * block - p

    def blocks(x, fill):
        x = jnp.concatenate([x, jnp.full((extra, *x.shape[1:]), fill, x.dtype)]) if extra else x
        return x.reshape(nb, block, *x.shape[1:])

    def windows(x, fill):  # [nb, block, ...] -> [nb, 3*block, ...] (previous, own, next block)
        edge = jnp.full((1, *x.shape[1:]), fill, x.dtype)
        padded = jnp.concatenate([edge, x, edge])
        return jnp.concatenate([padded[:-2], padded[1:-1], padded[2:]], axis=1)

    seg = blocks(segment.astype(jnp.int32), -2)  # rows added here only see each other
    seg_k = windows(seg, -3)  # window edges match no query
    mask = (seg[:, :, None] == seg_k[:, None, :])[:, None]  # [nb, 1, block, 3*block]
    out = dot_product_attention(blocks(q, 0), windows(blocks(k, 0), 0), windows(blocks(v, 0), 0), mask,
                                implementation=implementation)
    return out.reshape(nb * block, h, d)[:p]


class VisionAttention(nnx.Module):
    def __init__(self, cfg: Qwen3VLVisionConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim, self.attention_impl = cfg.num_heads, cfg.head_dim, attention_impl
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Dense(d, 3 * d, names=("vision_embed", "q_proj"), **kw)
        self.proj = Dense(d, d, names=("q_proj", "vision_embed"), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment: jax.Array,
                 block: int | None = None) -> jax.Array:
        """``x [P, D]``, ``cos/sin [P, head_dim]``, ``segment [P]`` -> ``[P, D]``.

        Attention is block-diagonal by segment (one segment per image frame): a dense
        ``[P, P]`` mask when ``block`` is None, else block-local (see
        ``block_local_mask_attention``).
        """
        p = x.shape[0]
        qkv = self.qkv(x).reshape(p, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if block is None:
            mask = (segment[:, None] == segment[None, :])[None, None]
            out = dot_product_attention(q[None], k[None], v[None], mask, implementation=self.attention_impl)[0]
        else:
            out = block_local_mask_attention(q, k, v, segment, block, implementation=self.attention_impl)
        return self.proj(out.reshape(p, -1))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: Qwen3VLVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.approximate = cfg.hidden_act == "gelu_pytorch_tanh"
        self.linear_fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, names=("vision_embed", "vision_mlp"), **kw)
        self.linear_fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, names=("vision_mlp", "vision_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen3VLVisionConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(cfg.hidden_size, dtype=dtype, param_dtype=param_dtype)
        self.norm2 = LayerNorm(cfg.hidden_size, dtype=dtype, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                    rngs=rngs)
        self.mlp = VisionMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, segment, block=None):
        x = x + self.attn(self.norm1(x), cos, sin, segment, block)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """LayerNorm, then groups of ``merge^2`` consecutive patches -> MLP (exact GELU) -> text width.

    ``postshuffle_norm`` (the DeepStack mergers) normalises the concatenated group instead
    of each patch.
    """

    def __init__(self, cfg: Qwen3VLVisionConfig, *, postshuffle_norm: bool, dtype, param_dtype, rngs: nnx.Rngs):
        self.merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(self.merged if postshuffle_norm else cfg.hidden_size, dtype=dtype,
                              param_dtype=param_dtype)
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_fc1 = Dense(self.merged, self.merged, names=("vision_embed", "vision_mlp"), **kw)
        self.linear_fc2 = Dense(self.merged, cfg.out_hidden_size, names=("vision_mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [P, D]`` -> ``[P / merge^2, out_hidden]``."""
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged))
        else:
            x = self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class PatchEmbed(nnx.Module):
    """The Conv3d (kernel = stride = (T, ps, ps)) as one matmul over flattened patches."""

    def __init__(self, cfg: Qwen3VLVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = Dense(cfg.patch_dim, cfg.hidden_size, names=("patch", "vision_embed"), use_bias=True,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.proj(pixel_values)


class Qwen3VLVisionModel(nnx.Module):
    def __init__(self, cfg: Qwen3VLVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "xla", max_frame_patches: int | None = None, rngs: nnx.Rngs):
        self.cfg, self.dtype, self.max_frame_patches = cfg, dtype, max_frame_patches
        self.side = int(round(cfg.num_position_embeddings ** 0.5))
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.pos_embed = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.num_position_embeddings, cfg.hidden_size), param_dtype) * 0.02,
            out_sharding=(None, "vision_embed"), eager_sharding=False)
        self.blocks = nnx.List([VisionBlock(cfg, attention_impl=attention_impl, **kw) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, postshuffle_norm=False, **kw)
        self.deepstack_merger_list = nnx.List(
            [PatchMerger(cfg, postshuffle_norm=True, **kw) for _ in cfg.deepstack_visual_indexes])

    def position_embedding(self, layout: dict[str, jax.Array]) -> jax.Array:
        """Learned ``side x side`` table bilinearly resampled to each patch's grid -> ``[P, D]``."""
        h_taps, h_w = bilinear_taps(layout["row"], layout["height"], self.side)
        w_taps, w_w = bilinear_taps(layout["col"], layout["width"], self.side)
        idx = (h_taps[:, :, None] * self.side + w_taps[:, None, :]).reshape(-1, 4)
        wts = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
        table = self.pos_embed.get_value().astype(jnp.float32)
        return jnp.sum(table[idx] * wts[:, :, None], axis=1)

    def __call__(self, pixel_values: jax.Array, grid_thw: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """Encode images.

        Args:
          pixel_values: ``[P, C*T*ps*ps]``, ``P`` a multiple of ``spatial_merge_size^2``.
          grid_thw: ``[N, 3]`` int.
        Returns:
          ``merged [P/m^2, out_hidden]`` and one ``[P/m^2, out_hidden]`` per DeepStack index;
          rows past the real patches are garbage (finite) and must be ignored by the caller.
        """
        num_patches = pixel_values.shape[0]
        unit = self.cfg.spatial_merge_size ** 2
        if num_patches % unit:
            raise ValueError(f"pixel_values has {num_patches} rows; must be a multiple of "
                             f"spatial_merge_size^2={unit} (pad to a bucket that is)")
        if pixel_values.shape[1] != self.cfg.patch_dim:
            raise ValueError(f"pixel_values rows have {pixel_values.shape[1]} values; expected "
                             f"C*T*ps*ps={self.cfg.patch_dim}")
        block = self.max_frame_patches
        if block is not None and not isinstance(grid_thw, jax.core.Tracer):
            largest = int(jnp.max(grid_thw[:, 1] * grid_thw[:, 2]))
            if largest > block:
                raise ValueError(f"an image frame has {largest} patches, more than max_frame_patches={block} "
                                 "(config.vision_max_frame_patches); raise it or resize the image")
        layout = patch_layout(grid_thw, num_patches, self.cfg.spatial_merge_size)
        x = self.patch_embed(pixel_values.astype(self.dtype))
        x = x + self.position_embedding(layout).astype(x.dtype)
        cos, sin = vision_cos_sin(layout["row"], layout["col"], self.cfg.head_dim, self.cfg.rope_theta)
        deepstack = []
        for i, vision_block in enumerate(self.blocks):
            x = vision_block(x, cos, sin, layout["segment"], block)
            if i in self.cfg.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x))
        return self.merger(x), deepstack
