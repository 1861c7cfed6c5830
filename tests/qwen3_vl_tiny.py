"""Parity harness of the Qwen3-VL tests: bucketed jitted forwards, the HF reference, the tolerance check.

The tiny configs, random checkpoints and input builders live in :mod:`jdelta.testing`
(re-exported here). Inputs are padded to one static BUCKET so a test file compiles the model
only a few times.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import Qwen3VLConfig as HFConfig  # noqa: F401 (re-exported)

from jdelta.models.qwen3_vl import get_rope_index
from jdelta.testing import (  # noqa: F401 (re-exported for the Qwen3-VL tests)
    IMG,
    PAD,
    PATCH_DIM,
    VEND,
    VSTART,
    image_tokens,
    make_batch,
    tiny_checkpoint,
    tiny_hf_config,
)
from jdelta.testing import randomize_hf as randomize  # noqa: F401

TOL = 1e-4


# One static shape for every test input, so a test file compiles the model a handful of
# times (XLA:CPU compiles are seconds each) -- and padding is exercised everywhere.
BUCKET = dict(batch=4, seq=48, patches=128, images=4)


def to_bucket(ids, mask, pv, grid, rng_seed=1):
    """Pad a batch to BUCKET: extra all-padding rows, more left padding, random extra patch
    rows and (0,0,0) grid rows."""
    b, s = ids.shape
    nb, ns = BUCKET["batch"], BUCKET["seq"]
    assert b <= nb and s <= ns
    ids_p = np.full((nb, ns), PAD, np.int64)
    mask_p = np.zeros((nb, ns), np.int64)
    ids_p[:b, ns - s:], mask_p[:b, ns - s:] = ids, mask
    if pv is None:
        return ids_p, mask_p, None, None
    rng = np.random.default_rng(rng_seed)
    pv_p = np.concatenate([pv, rng.normal(size=(BUCKET["patches"] - len(pv), PATCH_DIM))]).astype(np.float32)
    grid_p = np.concatenate([grid, np.zeros((BUCKET["images"] - len(grid), 3), np.int64)])
    return ids_p, mask_p, pv_p, grid_p


def unbucket(x, ids):
    """The rows/columns of a bucketed ``[B, S, ...]`` output that correspond to ``ids``."""
    b, s = ids.shape
    return np.asarray(x)[:b, BUCKET["seq"] - s:]


def hf_logits(hf, ids, mask, pv=None, grid=None):
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if pv is not None:
        kw.update(pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                  mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)))
    with torch.no_grad():
        return hf(**kw).logits.numpy()


@functools.cache
def jitted_forward(graphdef):
    @jax.jit
    def fwd(state, ids, mask, pos, pv, grid):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask, position_ids=pos, pixel_values=pv,
                                          image_grid_thw=grid)
    return fwd


def jd_forward(model, ids, mask, pv=None, grid=None):
    """Jitted forward on host-computed positions (eager dispatch is slow on CPU)."""
    graphdef, state = nnx.split(model)
    pos, _ = get_rope_index(ids, grid, mask, model.config)
    return jitted_forward(graphdef)(
        state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(pos),
        None if pv is None else jnp.asarray(pv), None if grid is None else jnp.asarray(grid, jnp.int32))


def jd_bucketed(model, ids, mask, pv=None, grid=None):
    """Forward on the BUCKET-padded batch; logits and hidden states cut back to ``ids``' shape."""
    out = jd_forward(model, *to_bucket(ids, mask, pv, grid))
    return unbucket(out.logits, ids), unbucket(out.hidden_states, ids), out


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
    "one_image": [[5, (1, 4, 6), 7]],
    "two_images_different_sizes": [[3, (1, 4, 6), 4, (1, 6, 2), 5]],
    "batch_left_padding": [[3, (1, 4, 6), 2, (1, 2, 2), 4], [6, (1, 6, 4), 3], [9]],
}


def save_tiny_hf_checkpoint(tok, out_dir, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> None:
    """A random tiny transformers Qwen3-VL for ``tok`` saved with the tokenizer to ``out_dir`` (a
    complete HF directory): text ``hidden`` wide (MLP 2x), ``layers`` deep, 4 heads (2 KV) of 8, tied
    embeddings, M-RoPE [1, 1, 2] interleaved; vision 32 wide, 1 block, DeepStack at block 0."""
    from transformers import Qwen3VLForConditionalGeneration as HFModel

    from jdelta.data.tokenizer import SpecialTokens

    sp = SpecialTokens.from_tokenizer(tok)
    cfg = HFConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_section": [1, 1, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        image_token_id=sp.image_pad, video_token_id=sp.video_pad, vision_start_token_id=sp.vision_start,
        vision_end_token_id=sp.vision_end, tie_word_embeddings=True)
    torch.manual_seed(seed)
    HFModel(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
