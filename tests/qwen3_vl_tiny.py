"""Tiny random Qwen3-VL checkpoints and input builders shared by the Qwen3-VL tests.

``tiny_hf_config()``: 2 text layers, 2 vision layers with DeepStack at [0, 1], interleaved
M-RoPE, GQA. ``randomize`` draws weights at std 0.1 (HF's default 0.02 gives near-zero
logits, which would make a 1e-4 tolerance meaningless). Inputs are padded to one static
BUCKET so a test file compiles the model only a few times.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import Qwen3VLConfig as HFConfig
from transformers import Qwen3VLForConditionalGeneration as HFModel

from jdelta.models.qwen3_vl import get_rope_index
from jdelta.models.qwen3_vl.weights import load_hf_checkpoint

IMG, VSTART, VEND, PAD = 250, 252, 253, 0
PATCH_DIM = 3 * 2 * 16 * 16
TOL = 1e-4


def tiny_hf_config(tie=True):
    return HFConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1]),
        image_token_id=IMG, video_token_id=251, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=tie)


def randomize(hf):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return hf


def tiny_checkpoint(path, tie=True):
    """Build a random tiny HF model, ``save_pretrained`` it to ``path``, load it with jdelta.
    Returns ``(hf_model, jdelta_model, jdelta_config, path)``."""
    torch.manual_seed(0)
    hf = randomize(HFModel(tiny_hf_config(tie)).eval())
    hf.save_pretrained(path)
    model, config = load_hf_checkpoint(path)
    return hf, model, config, path


def image_tokens(grid):
    t, h, w = grid
    return [VSTART] + [IMG] * (t * h * w // 4) + [VEND]


def make_batch(rows, pad_to=None, seed=0):
    """rows: list of lists of segments (int count of text tokens, or a (t,h,w) image grid).
    Returns left-padded numpy inputs in HF format."""
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
