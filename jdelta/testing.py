"""Tiny configs, random models and random checkpoints shared by the tests, the demo and benchmarks.

Nothing here is trained: every model is randomly initialised and exists to exercise plumbing.

* Qwen3-VL configs: :func:`tiny_config` (a standalone vocabulary whose last 4 ids are the vision
  specials; 4 px patches), :func:`tiny_config_for_tokenizer` (a tokenizer's vocabulary and special
  ids; the released models' 16 px patch layout), both through :func:`tiny_qwen3_vl_config`;
  :func:`tiny_hf_config` (the ``transformers`` config of the parity tests).
* Random models: :func:`random_model` (the model's own initialisers), :func:`random_model_fast`
  (NumPy draws into the abstract model: much faster on a busy CPU).
* Checkpoints on disk: :func:`make_random_model_dir` / :func:`make_tiny_pair` (HF layout, jdelta
  writer), :func:`tiny_checkpoint` (saved by ``transformers`` itself, for parity tests).
* Data: :func:`make_seeds` (generated records), :func:`make_tokenizer` (a small BPE trained on them),
  :func:`make_batch` (token/image-grid rows -> left-padded HF inputs).
* :class:`TinyCausalLM`: a text-only causal LM honouring the Qwen3-VL call and KV-cache contract,
  to test sampling independently of the Qwen3-VL port.

torch is imported only inside the functions that build ``transformers`` models.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

# ----------------------------------------------------------------------------- Qwen3-VL configs


def tiny_qwen3_vl_config(*, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                         mrope_section: tuple[int, int, int], vision_hidden: int, vision_depth: int,
                         patch_size: int, vision_positions: int, special_ids: tuple[int, int, int, int],
                         tie_word_embeddings: bool = False):
    """A small Qwen3-VL config: MLPs 2x wide, 2 vision heads, 2x2 merge, 2 frames, DeepStack at block 0.

    special_ids: ``(image, video, vision_start, vision_end)`` token ids.
    """
    from jdelta.models.qwen3_vl.config import Qwen3VLConfig, Qwen3VLTextConfig, Qwen3VLVisionConfig

    text = Qwen3VLTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, mrope_section=mrope_section,
        max_position_embeddings=4096)
    vision = Qwen3VLVisionConfig(
        depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
        out_hidden_size=hidden, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
        num_position_embeddings=vision_positions, deepstack_visual_indexes=(0,))
    image, video, start, end = special_ids
    return Qwen3VLConfig(text=text, vision=vision, image_token_id=image, video_token_id=video,
                         vision_start_token_id=start, vision_end_token_id=end,
                         tie_word_embeddings=tie_word_embeddings)


def tiny_config(hidden: int = 32, layers: int = 2, vocab: int = 64, *, heads: int = 4, kv_heads: int = 2):
    """A tiny Qwen3-VL config on a ``vocab``-sized vocabulary whose last 4 ids are the vision
    specials (image, video, start, end); 4 px patches, vision width 16."""
    head_dim = hidden // heads
    return tiny_qwen3_vl_config(
        vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        mrope_section=(head_dim // 8, head_dim // 8, head_dim // 4), vision_hidden=16, vision_depth=1,
        patch_size=4, vision_positions=16, special_ids=(vocab - 4, vocab - 3, vocab - 2, vocab - 1))


def tiny_config_for_tokenizer(tokenizer, *, hidden: int = 64, layers: int = 2, vision_hidden: int = 32,
                              vision_depth: int = 1):
    """A tiny Qwen3-VL config for ``tokenizer`` (its special ids; vocabulary rounded up to 64) with
    the released models' patch layout (16 px patches, 2x2 merge, 2 frames) and an untied LM head.
    Heads are 16 wide (M-RoPE sections (2, 2, 4)): ``hidden`` must be a multiple of 16."""
    from jdelta.data.tokenizer import SpecialTokens

    head_dim = 16
    if hidden % head_dim:
        raise ValueError(f"hidden={hidden} must be a multiple of {head_dim}")
    heads = hidden // head_dim
    sp = SpecialTokens.from_tokenizer(tokenizer)
    return tiny_qwen3_vl_config(
        vocab=-(-len(tokenizer) // 64) * 64, hidden=hidden, layers=layers, heads=heads, kv_heads=max(1, heads // 2),
        head_dim=head_dim, mrope_section=(2, 2, 4), vision_hidden=vision_hidden, vision_depth=vision_depth,
        patch_size=16, vision_positions=64, special_ids=(sp.image_pad, sp.video_pad, sp.vision_start, sp.vision_end))


# ----------------------------------------------------------------------------- random models


def random_model(config, seed: int, *, logit_scale: float = 1.0):
    """A randomly initialised Qwen3-VL model (the model's own initialisers, ``nnx.Rngs(seed)``);
    ``logit_scale`` multiplies the LM head (a peaked, 'opinionated' teacher)."""
    from flax import nnx

    from jdelta.models.qwen3_vl import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration(config, rngs=nnx.Rngs(seed))
    if logit_scale != 1.0:
        if model.lm_head is None:
            raise ValueError("logit_scale needs an untied LM head")
        model.lm_head.kernel.set_value(model.lm_head.kernel.get_value() * logit_scale)
    return model


def random_model_fast(config, seed: int = 0, *, logit_scale: float = 1.0):
    """A randomly initialised Qwen3-VL model, drawn with NumPy into the abstract model's shapes.

    Norm scales are 1, biases 0, other weights ``N(0, 1/fan_in)`` (embeddings ``N(0, 1)``);
    the LM head is multiplied by ``logit_scale``. Much faster than running each layer's
    initialiser eagerly on a busy CPU, and just as random.
    """
    import jax
    from flax import nnx

    from jdelta.models.qwen3_vl.weights import abstract_model

    model = abstract_model(config)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(str(p) for p in path)
        shape = tuple(var.get_value().shape)
        dtype = np.dtype(var.get_value().dtype)
        if name.endswith("bias"):
            value = np.zeros(shape)
        elif "norm" in name:
            value = np.ones(shape)
        elif "embed" in name and len(shape) == 2 and "patch" not in name:
            value = rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
            value = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        if "lm_head" in name:
            value = value * logit_scale
        var.set_value(jax.device_put(value.astype(dtype)))
    return model


# ----------------------------------------------------------------------------- checkpoints on disk


def make_random_model_dir(config, tokenizer, path: str | Path, seed: int = 0, *, logit_scale: float = 1.0) -> Path:
    """A :func:`random_model_fast` model saved in HF layout with ``tokenizer`` beside it."""
    from jdelta.models.qwen3_vl.weights import save_hf_checkpoint

    path = Path(path)
    model = random_model_fast(config, seed, logit_scale=logit_scale)
    save_hf_checkpoint(model, config, path)
    tokenizer.save_pretrained(str(path))
    (path / "RANDOM_WEIGHTS.txt").write_text(
        f"Randomly initialised (seed {seed}) by jdelta.testing.make_random_model_dir; not a trained model.\n")
    return path


def make_tiny_pair(root: str | Path, tokenizer, *, seed: int = 0, teacher_hidden: int = 64, teacher_layers: int = 2,
                   student_hidden: int = 32, student_layers: int = 1) -> tuple[Path, Path]:
    """Teacher (larger) and student (smaller) random models sharing ``tokenizer``: ``root/{teacher,student}``."""
    root = Path(root)
    t_cfg = tiny_config_for_tokenizer(tokenizer, hidden=teacher_hidden, layers=teacher_layers)
    s_cfg = tiny_config_for_tokenizer(tokenizer, hidden=student_hidden, layers=student_layers, vision_hidden=16)
    # A peaked (larger-logit) teacher answers more consistently than the student: some structure
    # for Δ to see, still random.
    teacher = make_random_model_dir(t_cfg, tokenizer, root / "teacher", seed + 1, logit_scale=4.0)
    student = make_random_model_dir(s_cfg, tokenizer, root / "student", seed + 2)
    return teacher, student


# Token ids of tiny_hf_config's vocabulary (256).
IMG, VIDEO, VSTART, VEND, PAD = 250, 251, 252, 253, 0
PATCH_DIM = 3 * 2 * 16 * 16  # channels x frames x 16 x 16


def tiny_hf_config(tie: bool = True):
    """The ``transformers`` Qwen3-VL config of the parity tests: 2 text layers, 2 vision layers
    with DeepStack at [0, 1], interleaved M-RoPE, GQA."""
    from transformers import Qwen3VLConfig as HFConfig

    return HFConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1]),
        image_token_id=IMG, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=tie)


def randomize_hf(hf):
    """Redraw a ``transformers`` model's weights at std 0.1 (norm scales U(0.5, 1.5)): HF's default
    0.02 gives near-zero logits, which would make a 1e-4 parity tolerance meaningless."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return hf


def tiny_checkpoint(path: str | Path, tie: bool = True):
    """A random :func:`tiny_hf_config` model saved by ``transformers`` to ``path`` and loaded by jdelta.
    Returns ``(hf_model, jdelta_model, jdelta_config, path)``."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration as HFModel

    from jdelta.models.qwen3_vl.weights import load_hf_checkpoint

    torch.manual_seed(0)
    hf = randomize_hf(HFModel(tiny_hf_config(tie)).eval())
    hf.save_pretrained(path)
    model, config = load_hf_checkpoint(path)
    return hf, model, config, path


# ----------------------------------------------------------------------------- data


def make_seeds(out_dir: str | Path, n: int, seed: int = 0, *, width: int = 192, height: int = 144) -> Path:
    """``n`` generated prompt records -> ``out_dir/records.jsonl`` (images inline)."""
    from jdelta.data.charts import generate_records
    from jdelta.data.records import write_jsonl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    tmp = out / ".records.jsonl.tmp"  # renamed when complete: a killed run leaves no partial file
    write_jsonl(generate_records(n, seed, width=width, height=height), tmp)
    os.replace(tmp, path)
    return path


def make_tokenizer(records_path: str | Path, out_dir: str | Path, vocab_size: int = 512):
    """A small byte-level BPE tokenizer trained on the records' text, saved in HF layout."""
    from jdelta.data.charts import corpus_text
    from jdelta.data.records import read_records_jsonl
    from jdelta.data.tokenizer import build_demo_tokenizer

    records = list(read_records_jsonl(records_path))
    return build_demo_tokenizer(out_dir, corpus_text(records), vocab_size=vocab_size)


def image_tokens(grid: tuple[int, int, int]) -> list[int]:
    """``<vision_start> <image>*(t*h*w/4) <vision_end>`` for one image grid (2x2 merge)."""
    t, h, w = grid
    return [VSTART] + [IMG] * (t * h * w // 4) + [VEND]


def make_batch(rows: list[list[Any]], pad_to: int | None = None, seed: int = 0):
    """Left-padded inputs in HF format from rows of segments (an int: that many random text
    tokens; a ``(t, h, w)`` tuple: one image of that patch grid).

    Returns ``(input_ids [B,S] int64, attention_mask [B,S], pixel_values [P, PATCH_DIM] | None,
    image_grid_thw [I,3] | None)``.
    """
    rng = np.random.default_rng(seed)
    seqs, grids = [], []
    for row in rows:
        seq = []
        for seg in row:
            if isinstance(seg, tuple):
                seq += image_tokens(seg)
                grids.append(seg)
            else:
                seq += list(rng.integers(1, 240, seg))
        seqs.append(seq)
    s = pad_to or max(len(q) for q in seqs)
    ids = np.full((len(seqs), s), PAD, np.int64)
    mask = np.zeros((len(seqs), s), np.int64)
    for i, q in enumerate(seqs):
        ids[i, s - len(q):] = q
        mask[i, s - len(q):] = 1
    grid = np.array(grids, np.int64).reshape(-1, 3) if grids else None
    pv = rng.normal(size=(int(grid.prod(-1).sum()), PATCH_DIM)).astype(np.float32) if grids else None
    return ids, mask, pv, grid


# ----------------------------------------------------------------------------- a tiny text-only causal LM
# Used to test the generic sampling/scoring machinery independently of the Qwen3-VL port: RMSNorm,
# GQA attention with rotary embeddings (from ``position_ids[0]``), SwiGLU MLP, final norm, untied
# LM head; ``pixel_values`` are ignored. Contract (same as ``jdelta.models.qwen3_vl``):
# ``model(input_ids [B,S], *, attention_mask [B,S], position_ids [3,B,S] | None, pixel_values=None,
# image_grid_thw=None, cache=None, return_logits=True) -> (logits [B,S,V] | None, hidden_states
# [B,S,H], cache, rope_deltas)``; ``init_cache(batch, max_len) -> KVCache(k, v [L,B,T,kvh,hd],
# valid [B,T], index)``; a cached call writes slots ``index .. index+S-1`` and attends causally
# over valid slots.


@struct.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array


class TinyLMOutput(NamedTuple):
    logits: Any
    hidden_states: jax.Array
    cache: Any
    rope_deltas: Any


@dataclasses.dataclass(frozen=True)
class TinyLMConfig:
    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    intermediate_size: int = 64
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0


def _param(rngs, shape, names, scale=None):
    scale = scale if scale is not None else shape[0] ** -0.5
    return nnx.Param(jax.random.normal(rngs.params(), shape) * scale, out_sharding=names, eager_sharding=False)


def _rms(x, w, eps=1e-6):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps) * w).astype(x.dtype)


def _rope(x, pos, theta):
    """x [B,S,h,d], pos [B,S] -> rotated (half-split convention)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = pos.astype(jnp.float32)[..., None] * inv  # [B,S,d/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class TinyLMLayer(nnx.Module):
    def __init__(self, c: TinyLMConfig, rngs: nnx.Rngs):
        self.c = c
        h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.ln1 = nnx.Param(jnp.ones((h,)), out_sharding=("norm",), eager_sharding=False)
        self.ln2 = nnx.Param(jnp.ones((h,)), out_sharding=("norm",), eager_sharding=False)
        self.wq = _param(rngs, (h, q), ("embed", "q_proj"))
        self.wk = _param(rngs, (h, kv), ("embed", "kv_proj"))
        self.wv = _param(rngs, (h, kv), ("embed", "kv_proj"))
        self.wo = _param(rngs, (q, h), ("q_proj", "embed"))
        self.wg = _param(rngs, (h, c.intermediate_size), ("embed", "mlp"))
        self.wu = _param(rngs, (h, c.intermediate_size), ("embed", "mlp"))
        self.wd = _param(rngs, (c.intermediate_size, h), ("mlp", "embed"))

    def __call__(self, x, pos, k_all, v_all, key_ok, write_at):
        """x [B,S,H]; k_all/v_all [B,T,kvh,hd] (this layer's cache or None); key_ok [B,S,T]."""
        c = self.c
        b, s, _ = x.shape
        y = _rms(x, self.ln1[...])
        q = _rope((y @ self.wq[...]).reshape(b, s, c.num_heads, c.head_dim), pos, c.rope_theta)
        k = _rope((y @ self.wk[...]).reshape(b, s, c.num_kv_heads, c.head_dim), pos, c.rope_theta)
        v = (y @ self.wv[...]).reshape(b, s, c.num_kv_heads, c.head_dim)
        if k_all is None:
            k_all, v_all = k, v
        else:
            k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype), (0, write_at, 0, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype), (0, write_at, 0, 0))
        rep = c.num_heads // c.num_kv_heads
        kk = jnp.repeat(k_all, rep, axis=2)
        vv = jnp.repeat(v_all, rep, axis=2)
        att = jnp.einsum("bshd,bthd->bhst", q, kk) * c.head_dim**-0.5
        att = jnp.where(key_ok[:, None], att, -1e30)  # finite: fully masked (pad) rows stay NaN-free
        att = jax.nn.softmax(att.astype(jnp.float32), -1).astype(x.dtype)
        o = jnp.einsum("bhst,bthd->bshd", att, vv).reshape(b, s, -1)
        x = x + o @ self.wo[...]
        y = _rms(x, self.ln2[...])
        x = x + (jax.nn.silu(y @ self.wg[...]) * (y @ self.wu[...])) @ self.wd[...]
        return x, k_all, v_all


class TinyCausalLM(nnx.Module):
    def __init__(self, config: TinyLMConfig = TinyLMConfig(), *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.embed = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), 1.0)
        self.layers = nnx.List([TinyLMLayer(c, rngs) for _ in range(c.num_layers)])
        self.norm = nnx.Param(jnp.ones((c.hidden_size,)), out_sharding=("norm",), eager_sharding=False)
        self.head = _param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"))

    def lm_head_weight(self) -> jax.Array:
        return self.head[...]

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
        dt = dtype or jnp.float32
        return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch, max_len), bool), jnp.int32(0))

    def __call__(self, input_ids, *, attention_mask, position_ids=None, pixel_values=None, image_grid_thw=None,
                 cache=None, return_logits=True):
        b, s = input_ids.shape
        mask = attention_mask.astype(bool)
        if position_ids is None:
            p = jnp.cumsum(attention_mask, -1) - 1
            position_ids = jnp.broadcast_to(jnp.where(mask, p, 1)[None], (3, b, s))
        pos = position_ids[0]
        x = self.embed[...][input_ids]
        if cache is None:
            q_slot = jnp.arange(s)
            key_ok = (q_slot[None, :, None] >= q_slot[None, None, :]) & mask[:, None, :]
            ks = vs = [None] * len(self.layers)
            start = 0
        else:
            start = cache.index
            t = cache.valid.shape[1]
            valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, start))
            q_slot = start + jnp.arange(s)
            key_ok = (q_slot[None, :, None] >= jnp.arange(t)[None, None, :]) & valid[:, None, :]
            ks, vs = cache.k, cache.v
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, pos, ks[i], vs[i], key_ok, start)
            new_k.append(k)
            new_v.append(v)
        hidden = _rms(x, self.norm[...])
        if cache is not None:
            cache = KVCache(jnp.stack(new_k), jnp.stack(new_v), valid, cache.index + s)
        logits = hidden @ self.head[...] if return_logits else None
        return TinyLMOutput(logits, hidden, cache, None)


def tiny_rope_index(input_ids, image_grid_thw, attention_mask):
    """Text-only M-RoPE positions (NumPy): real tokens 0, 1, ...; padding 1; ``rope_deltas`` =
    (number of real tokens) - S, so decode step positions continue the real sequence."""
    mask = np.asarray(attention_mask)
    pos = np.cumsum(mask, -1) - 1
    pos = np.where(mask > 0, pos, 1)
    deltas = mask.sum(-1) - mask.shape[1]
    return np.broadcast_to(pos[None], (3,) + mask.shape).astype(np.int32), deltas.astype(np.int32)


def make_model(seed: int = 0, **kw) -> TinyCausalLM:
    return TinyCausalLM(TinyLMConfig(**kw), rngs=nnx.Rngs(seed))


def left_padded_batch(rows: list[list[int]]) -> dict[str, np.ndarray]:
    s = max(len(r) for r in rows)
    ids = np.zeros((len(rows), s), np.int32)
    mask = np.zeros((len(rows), s), np.int32)
    for i, r in enumerate(rows):
        ids[i, s - len(r):] = r
        mask[i, s - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _forward_fn(graphdef, state, ids, mask, pos):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask, position_ids=pos).logits


_jit_forward = jax.jit(_forward_fn, static_argnums=0)


def full_logits(model: TinyCausalLM, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Uncached forward over a whole (left-padded) sequence -> logits [B,S,V] (jitted)."""
    pos, _ = tiny_rope_index(ids, None, mask)
    graphdef, state = nnx.split(model)
    return np.asarray(_jit_forward(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))


__all__ = [
    "IMG", "PAD", "PATCH_DIM", "VEND", "VIDEO", "VSTART",
    "KVCache", "TinyCausalLM", "TinyLMConfig", "TinyLMLayer", "TinyLMOutput", "full_logits", "left_padded_batch", "make_model", "tiny_rope_index",
    "image_tokens", "make_batch", "make_random_model_dir", "make_seeds", "make_tiny_pair", "make_tokenizer",
    "random_model", "random_model_fast", "randomize_hf", "tiny_checkpoint", "tiny_config",
    "tiny_config_for_tokenizer", "tiny_hf_config", "tiny_qwen3_vl_config",
]
