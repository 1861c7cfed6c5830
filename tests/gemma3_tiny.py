"""Parity harness of the Gemma 3 tests: a tiny random ``transformers`` checkpoint, left-padded
batches with images, bucketed jitted forwards and the tolerance check.

Tiny config: vocabulary 256 (image token 250, begin/end of image 251/252, pad 0), 4 decoder
layers ``[local, global, local, local]`` with a sliding window of 6 (so prompts of ~20 tokens
cross it), rotary bases 10^4 (local) and 10^3 with linear scaling 4 (global),
``query_pre_attn_scalar`` 24 (not head_dim), GQA 4/2 heads; SigLIP 16 px images of 4 px
patches (a 4x4 grid) pooled to 4 tokens per image.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

IMG, BOI, EOI, PAD = 250, 251, 252, 0
TOKENS_PER_IMAGE = 4
IMAGE_SIZE = 16
WINDOW = 6
TOL = 1e-4
BUCKET = dict(batch=4, seq=40, images=4)


def tiny_hf_config(*, tie: bool = True, attn_softcap: float | None = None, final_softcap: float | None = None):
    from transformers import Gemma3Config as HFConfig

    return HFConfig(
        text_config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
            max_position_embeddings=512, attn_logit_softcapping=attn_softcap, final_logit_softcapping=final_softcap,
            rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 4.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=4, vision_use_head=False),
        mm_tokens_per_image=TOKENS_PER_IMAGE, boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMG,
        tie_word_embeddings=tie)


def randomize(hf, seed: int = 0):
    """Weights at std 0.1 and norm weights U(-0.5, 0.5) (Gemma norms scale by 1 + w): logits O(1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight") and "layer_norm" not in name and "layernorm" not in name:
                p.uniform_(-0.5, 0.5)
            elif "layer_norm" in name or "post_layernorm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return hf


def tiny_checkpoint(path, **config_kw):
    """A random tiny HF model saved to ``path`` and loaded by jdelta: ``(hf, model, config, path)``."""
    from transformers import Gemma3ForConditionalGeneration as HFModel

    from jdelta.models.gemma3 import load_hf_checkpoint

    torch.manual_seed(0)
    hf = randomize(HFModel(tiny_hf_config(**config_kw)).eval())
    hf.config._attn_implementation = "eager"  # the reference (sdpa ignores attention soft-capping)
    hf.save_pretrained(path)
    model, config = load_hf_checkpoint(path)
    return hf, model, config, path


def image_tokens() -> list[int]:
    return [BOI] + [IMG] * TOKENS_PER_IMAGE + [EOI]


def make_batch(rows, pad_to: int | None = None, seed: int = 0):
    """Rows of segments (int: that many random text tokens; ``"img"``: one image) -> left-padded
    ``(input_ids [B,S], attention_mask [B,S], pixel_values [N,3,16,16] | None)``."""
    rng = np.random.default_rng(seed)
    seqs, n_images = [], 0
    for row in rows:
        seq = []
        for seg in row:
            if seg == "img":
                seq += image_tokens()
                n_images += 1
            else:
                seq += list(rng.integers(1, 240, seg))
        seqs.append(seq)
    s = pad_to or max(len(q) for q in seqs)
    ids = np.full((len(seqs), s), PAD, np.int64)
    mask = np.zeros((len(seqs), s), np.int64)
    for i, q in enumerate(seqs):
        ids[i, s - len(q):] = q
        mask[i, s - len(q):] = 1
    pv = rng.normal(size=(n_images, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32) if n_images else None
    return ids, mask, pv


def hf_positions(mask):
    return np.where(mask.astype(bool), np.cumsum(mask, 1) - 1, 0)


def hf_logits(hf, ids, mask, pv=None):
    """transformers' logits with generate's positions (``cumsum(mask) - 1``) and image blocks."""
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(hf_positions(mask)),
              token_type_ids=torch.tensor((ids == IMG).astype(np.int64)))
    if pv is not None:
        kw["pixel_values"] = torch.tensor(pv)
    with torch.no_grad():
        return hf(**kw).logits.numpy()


def to_bucket(ids, mask, pv):
    """Pad to BUCKET: extra all-padding rows, more left padding, random extra images."""
    b, s = ids.shape
    nb, ns = BUCKET["batch"], BUCKET["seq"]
    assert b <= nb and s <= ns
    ids_p = np.full((nb, ns), PAD, np.int64)
    mask_p = np.zeros((nb, ns), np.int64)
    ids_p[:b, ns - s:], mask_p[:b, ns - s:] = ids, mask
    extra = np.random.default_rng(1).normal(size=(BUCKET["images"] - (0 if pv is None else len(pv)), 3, IMAGE_SIZE,
                                                  IMAGE_SIZE)).astype(np.float32)
    pv_p = extra if pv is None else np.concatenate([pv, extra])
    return ids_p, mask_p, pv_p


@functools.cache
def jitted_forward(graphdef):
    @jax.jit
    def fwd(state, ids, mask, pv):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask, pixel_values=pv)
    return fwd


def jd_bucketed(model, ids, mask, pv=None):
    """Jitted forward on the BUCKET-padded batch; logits/hidden cut back to ``ids``' shape."""
    graphdef, state = nnx.split(model)
    ids_p, mask_p, pv_p = to_bucket(ids, mask, pv)
    out = jitted_forward(graphdef)(state, jnp.asarray(ids_p, jnp.int32), jnp.asarray(mask_p), jnp.asarray(pv_p))
    b, s = ids.shape
    cut = lambda x: np.asarray(x)[:b, BUCKET["seq"] - s:]  # noqa: E731
    return cut(out.logits), cut(out.hidden_states), out


def assert_parity(ref, got, mask, tol=TOL):
    valid = mask.astype(bool)
    ref, got = ref[valid], np.asarray(got)[valid]
    diff = float(np.abs(ref - got).max())
    scale = float(np.abs(ref).max())
    print(f"max|diff|={diff:.2e}  logits max|x|={scale:.2f} std={ref.std():.2f}")
    assert scale > 0.5, "logits too small for the tolerance to mean anything"
    assert diff <= tol, f"max abs diff {diff} > {tol} (logits scale {scale})"
    return diff


CASES = {
    "text_only": [[17]],
    "one_image": [[5, "img", 7]],
    "two_images": [[3, "img", 4, "img", 5]],
    "batch_left_padding": [[3, "img", 2, "img", 4], [6, "img", 3], [9], [2, "img", 12]],
}


# ----------------------------------------------------------------------------- models for a tokenizer (jdelta only)


def tiny_config_for_tokenizer(tokenizer, *, hidden: int = 32, layers: int = 2, vision_hidden: int = 16,
                              image_size: int = IMAGE_SIZE, tokens_per_image: int = TOKENS_PER_IMAGE,
                              window: int = WINDOW, softcap: float | None = None):
    """A tiny jdelta Gemma 3 config for a Gemma 3-style ``tokenizer`` (its special ids; vocabulary
    rounded up to 64): ``layers`` decoder layers alternating local / global, 2 heads of 16 (1 KV head),
    a 1-layer SigLIP on ``image_size`` px images of 4 px patches pooled to ``tokens_per_image`` tokens."""
    from jdelta.models.gemma3 import Gemma3Config, Gemma3TextConfig, RopeSpec, SiglipVisionConfig
    from jdelta.models.gemma3.chat import Gemma3SpecialTokens

    sp = Gemma3SpecialTokens.from_tokenizer(tokenizer)
    vocab = -(-len(tokenizer) // 64) * 64
    text = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=window,
        max_position_embeddings=4096, final_logit_softcapping=softcap,
        layer_types=tuple("full_attention" if i % 2 else "sliding_attention" for i in range(layers)),
        rope_global=RopeSpec(1000.0), rope_local=RopeSpec(10000.0))
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=1,
                                num_attention_heads=2, image_size=image_size, patch_size=4)
    return Gemma3Config(text=text, vision=vision, mm_tokens_per_image=tokens_per_image, image_token_id=sp.image,
                        boi_token_id=sp.boi, eoi_token_id=sp.eoi, tie_word_embeddings=True)


def make_random_gemma3_dir(config, tokenizer, path, seed: int = 0, *, logit_scale: float = 1.0):
    """A randomly initialised jdelta Gemma 3 (``nnx.Rngs(seed)``; ``logit_scale`` multiplies the tied
    embedding, so the logits) saved in HF layout with ``tokenizer`` beside it."""
    from pathlib import Path

    from jdelta.models.gemma3 import Gemma3ForConditionalGeneration, save_hf_checkpoint

    path = Path(path)
    model = Gemma3ForConditionalGeneration(config, rngs=nnx.Rngs(seed))
    if logit_scale != 1.0:
        emb = model.language_model.embed_tokens
        emb.set_value(emb.get_value() * logit_scale)
    save_hf_checkpoint(model, config, path)
    tokenizer.save_pretrained(str(path))
    return path
