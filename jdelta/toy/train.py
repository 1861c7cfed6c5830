"""Training a toy Qwen3-VL from scratch on teacher-forced answer tokens (optax AdamW).

Every record becomes one fixed-length row: the chat prompt exactly as the sampling pipeline
builds it (:func:`jdelta.data.chat.build_prompt`, the image at its native size; the question with
ViCuR's ``[Hint]: ...`` block for the rows chosen to be hinted), then the reference completion's
tokens (``meta["completion"]``, else the answer) and ``<|im_end|>``, left-padded to the world's
row length. The loss is the mean cross-entropy of the completion tokens and the closing
``<|im_end|>`` only (the prompt is not modelled). All images of a world have one size, so every batch has the same shapes and the step
compiles once.

Deterministic: the initial weights come from ``jax.random`` keys folded from ``seed``, batches
and pixelated rows from a NumPy generator seeded with ``seed``, and XLA on CPU is deterministic,
so the same settings give bit-identical weights (``tests/stages/test_toy_models.py`` checks it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jdelta.config import check
from jdelta.data.chat import build_prompt
from jdelta.data.image_processor import (
    ImageConfig,
    decode_image,
    normalise_patches,
    pixelate,
    process_image_uint8,
)
from jdelta.data.records import PromptRecord
from jdelta.data.tokenizer import SpecialTokens
from jdelta.distill.train_state import OptimizerConfig, TrainState, make_optimizer


@dataclass(frozen=True)
class ModelSize:
    """A toy Qwen3-VL's widths and depths (heads 16 wide; vision: 2 heads, 16 px patches, 2x2 merge)."""

    hidden: int = 64
    layers: int = 2
    intermediate: int = 128
    vision_hidden: int = 32
    vision_depth: int = 1
    # Short sequences: the released models' theta (5e6) would leave 16-wide heads with almost no
    # positional signal over a 50-token prompt.
    rope_theta: float = 1000.0
    patch_size: int = 16

    def __post_init__(self):
        check(self.hidden >= 16 and self.hidden % 16 == 0, "hidden", f"must be a multiple of 16, got {self.hidden}")
        for name in ("layers", "intermediate", "vision_depth"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.vision_hidden >= 4 and self.vision_hidden % 2 == 0, "vision_hidden",
              f"must be even and >= 4, got {self.vision_hidden}")


def model_config(tokenizer, size: ModelSize):
    """The Qwen3-VL config of a toy model for ``tokenizer`` (vocabulary rounded up to 64, untied head)."""
    from jdelta.models.qwen3_vl.config import Qwen3VLConfig, Qwen3VLTextConfig, Qwen3VLVisionConfig

    sp = SpecialTokens.from_tokenizer(tokenizer)
    head_dim = 16
    heads = size.hidden // head_dim
    text = Qwen3VLTextConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=head_dim, mrope_section=(2, 3, 3), rope_theta=size.rope_theta, max_position_embeddings=4096)
    vision = Qwen3VLVisionConfig(
        depth=size.vision_depth, hidden_size=size.vision_hidden, intermediate_size=2 * size.vision_hidden,
        num_heads=2, out_hidden_size=size.hidden, patch_size=size.patch_size, spatial_merge_size=2, temporal_patch_size=2,
        num_position_embeddings=64, deepstack_visual_indexes=(0,))
    return Qwen3VLConfig(text=text, vision=vision, image_token_id=sp.image_pad, video_token_id=sp.video_pad,
                         vision_start_token_id=sp.vision_start, vision_end_token_id=sp.vision_end,
                         tie_word_embeddings=False)


def image_config(width: int, height: int, patch_size: int = 16, scale: int = 1) -> ImageConfig:
    """Processor settings that resize a ``width x height`` image to exactly ``scale`` times its
    size (multiples of ``2 * patch_size``): ``min_pixels = max_pixels`` = the target area."""
    area = width * height * scale * scale
    return ImageConfig(patch_size=patch_size, min_pixels=area, max_pixels=area)


@dataclass
class Encoded:
    """Records as fixed-length training rows (``N`` rows, ``L`` tokens, ``P`` patches per image).

    input_ids, attention_mask, target_mask: ``[N, L]`` int32 (target_mask 1 on the answer tokens
    and the closing ``<|im_end|>``); patches: ``[N, P, 3, 256]`` uint8 (the processor's patch rows
    before normalisation); pixelated: the same for VA-OPD's pixelated view (or None);
    grid: ``(1, H/16, W/16)``; families, answers (the final answers), completions (the
    trained-on text) and hinted (the question carries the ``[Hint]`` block): per row.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    target_mask: np.ndarray
    patches: np.ndarray
    pixelated: np.ndarray | None
    grid: tuple[int, int, int]
    families: list[str]
    answers: list[str]
    completions: list[str] | None = None
    hinted: np.ndarray | None = None
    tokenizer: object | None = None  # the tokenizer the rows were encoded with (to decode completions)
    answer_mask: np.ndarray | None = None  # [N, L] 1 on the final answer's tokens within the completion

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def take(self, rows) -> Encoded:
        """The rows ``rows`` (every per-row field indexed; ``grid`` and ``tokenizer`` shared)."""
        import dataclasses

        idx = np.asarray(rows, np.int64)

        def pick(v):
            if v is None:
                return None
            return v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]

        return dataclasses.replace(self, **{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if f.name not in ("grid", "tokenizer")})


def encode_records(records: Sequence[PromptRecord], tokenizer, *, width: int, height: int, length: int,
                   patch_size: int = 16, scale: int = 1, with_pixelated: bool = False,
                   hinted: Sequence[bool] | bool = False) -> Encoded:
    """Tokenise and patchify ``records`` (one image each, ``width x height``) into rows of ``length``;
    ``hinted``: append the record's ``cues.hint`` to the question (per row, or all rows)."""
    from jdelta.data.chat import with_hint

    sp = SpecialTokens.from_tokenizer(tokenizer)
    hint_rows = np.broadcast_to(np.asarray(hinted, bool), (len(records),)).copy()
    icfg = image_config(width, height, patch_size, scale)
    n = len(records)
    ids = np.full((n, length), sp.pad, np.int32)
    mask = np.zeros((n, length), np.int32)
    target = np.zeros((n, length), np.int32)
    answer_mask = np.zeros((n, length), np.int32)
    patches, pixelated, grid = [], [], None
    backend = tokenizer.backend_tokenizer
    completions = []
    for i, rec in enumerate(records):
        image = decode_image(rec.image_bytes(0), record=rec.id)
        p, g = process_image_uint8(image, patch_size=patch_size, min_pixels=icfg.min_pixels,
                                   max_pixels=icfg.max_pixels, record=rec.id)
        if grid is not None and g != grid:
            raise ValueError(f"record {rec.id!r}: image grid {g} differs from the first record's {grid}")
        grid = g
        patches.append(p)
        if with_pixelated:
            pixelated.append(process_image_uint8(pixelate(image), patch_size=patch_size, min_pixels=icfg.min_pixels,
                                                 max_pixels=icfg.max_pixels, record=rec.id)[0])
        question = rec.question
        if hint_rows[i]:
            if rec.cues is None or not rec.cues.hint:
                raise ValueError(f"record {rec.id!r}: asked for a hinted row but the record has no cues.hint")
            question = with_hint(question, rec.cues.hint)
        prompt = build_prompt(tokenizer, question, [g], special=sp).input_ids
        text = rec.meta.get("completion", rec.answer) if rec.meta else rec.answer
        completions.append(text)
        answer = np.asarray(backend.encode(text, add_special_tokens=False).ids + [sp.im_end], np.int32)
        row = np.concatenate([prompt, answer])
        if len(row) > length:
            raise ValueError(f"record {rec.id!r}: {len(row)} tokens > row length {length}")
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
        target[i, length - len(answer):] = 1
        a0, a1 = answer_span(backend, text, rec.answer)
        start = length - len(answer)
        answer_mask[i, start + a0: start + a1] = 1
    return Encoded(ids, mask, target, np.stack(patches), np.stack(pixelated) if with_pixelated else None, grid,
                   [r.family for r in records], [r.answer for r in records], completions, hint_rows, tokenizer,
                   answer_mask)


def prompt_rows(enc: Encoded, rows, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The chat prompts of ``rows`` of ``enc`` without their reference completions, left-padded with
    ``pad_id`` to the rows' length: ``(input_ids, attention_mask)``, each ``[len(rows), L]`` int32."""
    rows = np.asarray(rows, np.int64)
    length = enc.input_ids.shape[1]
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        toks = enc.input_ids[r][(enc.attention_mask[r] > 0) & (enc.target_mask[r] == 0)]
        ids[i, length - len(toks):] = toks
        mask[i, length - len(toks):] = 1
    return ids, mask


def answer_span(backend, completion: str, answer: str | None) -> tuple[int, int]:
    """``(start, end)`` token indices of the final answer within ``completion``'s tokens: the last
    occurrence of ``answer`` in the text (the whole completion when it is not found). The byte-level
    pre-tokeniser splits at the space before a word, so the prefix tokenises the same on its own."""
    ids = backend.encode(completion, add_special_tokens=False).ids
    at = completion.rfind(answer) if answer else -1
    if at < 0:
        return 0, len(ids)
    head = completion[:at].rstrip(" ")
    start = len(backend.encode(head, add_special_tokens=False).ids) if head else 0
    end = len(backend.encode(completion[: at + len(answer)], add_special_tokens=False).ids)
    return start, max(end, start + 1)


@dataclass(frozen=True)
class TrainSettings:
    """How one toy model is trained (the defaults made the shipped pair, with ``steps`` and
    ``pixelated_fraction`` set by :class:`jdelta.toy.build.PairConfig`).

    steps x batch_size rows; AdamW (learning_rate, b1, b2, weight_decay on matrices) with
    ``warmup_steps`` of linear warmup, then cosine to 5%, global-norm clip 1.0. balance: draw rows
    with :class:`BalancedRows` (else shuffled epochs). pixelated_fraction: share of rows shown
    VA-OPD's pixelated image. head_scale, residual_scale, embed_scale, blank_patch_zero: the
    initialisation variants tried in docs/toy_world.md (see :func:`init_model`; defaults off).
    """

    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    head_scale: float = 1.0
    residual_scale: float = 1.0
    b1: float = 0.9
    b2: float = 0.98
    blank_patch_zero: bool = False
    embed_scale: float = 1.0
    balance: bool = True
    pixelated_fraction: float = 0.0  # rows trained on VA-OPD's pixelated view (needs enc.pixelated)

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")


class BalancedRows:
    """Rows drawn so that every batch holds the families in turn and, within a family, its answers
    in turn (each (family, answer) group shuffled, reshuffled when used up).

    Why: at the start a model learns each family's answer prior; with uniformly drawn batches the
    batch-to-batch wobble of the answer mix then dominates the gradient and hides the small,
    consistent signal that ties answers to pixels (measured: a 12-word reading task escapes its
    prior plateau after ~450 steps with balanced batches and not in 2,000 with shuffled ones).
    """

    def __init__(self, families: Sequence[str], answers: Sequence[str], rng: np.random.Generator,
                 weights: dict[str, int] | None = None):
        self.rng = rng
        groups: dict[str, dict[str, list[int]]] = {}
        for i, (f, a) in enumerate(zip(families, answers, strict=True)):
            groups.setdefault(f, {}).setdefault(a, []).append(i)
        self.families = [f for f in sorted(groups) for _ in range((weights or {}).get(f, 1))]
        self.groups = {f: {a: np.asarray(r) for a, r in sorted(g.items())} for f, g in groups.items()}
        self.pools: dict[tuple[str, str], list[int]] = {}
        self.cycles: dict[str, list[str]] = {f: [] for f in groups}
        self.family_cycle: list[str] = []

    def _next(self, family: str) -> int:
        if not self.cycles[family]:
            names = list(self.groups[family])
            self.cycles[family] = [names[i] for i in self.rng.permutation(len(names))]
        answer = self.cycles[family].pop()
        pool = self.pools.get((family, answer))
        if not pool:
            rows = self.groups[family][answer]
            pool = self.pools[(family, answer)] = [int(r) for r in rows[self.rng.permutation(len(rows))]]
        return pool.pop()

    def take(self, n: int) -> np.ndarray:
        out = []
        for _ in range(n):
            if not self.family_cycle:
                self.family_cycle = [self.families[i] for i in self.rng.permutation(len(self.families))]
            out.append(self._next(self.family_cycle.pop()))
        return np.asarray(out, np.int64)


def model_inputs(enc: Encoded, rows: np.ndarray, config, *, pixelated: bool | np.ndarray = False) -> dict[str, np.ndarray]:
    """The model's keyword inputs for ``rows`` of ``enc`` (M-RoPE positions computed here);
    ``pixelated``: all rows' images pixelated, or a ``[len(rows)]`` bool choice per row."""
    from jdelta.models.qwen3_vl.positions import get_rope_index

    ids, mask = enc.input_ids[rows], enc.attention_mask[rows]
    grid = np.tile(np.asarray(enc.grid, np.int32), (len(rows), 1))
    choice = np.broadcast_to(np.asarray(pixelated, bool), (len(rows),))
    if choice.any() and enc.pixelated is None:
        raise ValueError("these rows were encoded without their pixelated view")
    patches = np.where(choice[:, None, None, None], enc.pixelated[rows], enc.patches[rows]) if choice.any() \
        else enc.patches[rows]
    pv = normalise_patches(patches.reshape(-1, *patches.shape[2:]))
    pos, _ = get_rope_index(ids, grid, mask, config)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "pixel_values": pv,
            "image_grid_thw": grid}


def answer_logprobs(model, inputs: dict, target_mask) -> tuple[jax.Array, jax.Array]:
    """Per-token ``log p(next token)`` ``[B, L-1]`` and whether it is the argmax ``[B, L-1]``,
    masked to the answer tokens (``target_mask[:, 1:]``)."""
    ids = inputs["input_ids"]
    out = model(ids, attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"],
                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    logits = out.logits[:, :-1].astype(jnp.float32)
    targets = ids[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    hit = jnp.argmax(logits, axis=-1) == targets
    w = target_mask[:, 1:].astype(jnp.float32)
    return tok * w, jnp.where(w > 0, hit, True)


def _loss(params, graphdef, rest, inputs, target_mask):
    model = nnx.merge(graphdef, params, rest)
    tok, _ = answer_logprobs(model, inputs, target_mask)
    w = target_mask[:, 1:].astype(jnp.float32)
    return -tok.sum() / jnp.maximum(w.sum(), 1.0)


@jax.jit
def _train_step(state: TrainState, inputs, target_mask):
    loss, grads = jax.value_and_grad(_loss)(state.params, state.graphdef, state.rest, inputs, target_mask)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss


def init_model(config, seed: int, *, head_scale: float = 1.0, residual_scale: float = 1.0,
               blank_patch_zero: bool = False, embed_scale: float = 1.0):
    """A freshly initialised model for training from scratch: matrices ``N(0, 1/fan_in)`` (token
    embeddings and the learned vision position table ``N(0, 1)``), norm scales 1,
    biases 0; one ``jax.random`` key per parameter folded from ``seed`` and its position.

    (The model's own initialisers draw every matrix at std 0.02, the released models' value,
    which for a 64-wide toy shrinks each layer's signal ~8x: the images never get through.)
    """
    from jdelta.models.qwen3_vl.weights import abstract_model

    model = abstract_model(config)
    key = jax.random.PRNGKey(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        name = "/".join(str(p) for p in path)
        shape, dtype = tuple(var.get_value().shape), var.get_value().dtype
        k = jax.random.fold_in(key, i)
        if name.endswith("bias"):
            value = jnp.zeros(shape, dtype)
        elif "norm" in name:
            value = jnp.ones(shape, dtype)
        elif name.endswith("pos_embed"):
            value = jax.random.normal(k, shape, dtype)
        elif "embed_tokens" in name:
            value = embed_scale * jax.random.normal(k, shape, dtype)
        else:
            fan_in = int(np.prod(shape[:-1]))
            value = jax.random.normal(k, shape, dtype) / np.sqrt(fan_in)
            if "lm_head" in name:
                value = value * head_scale
            elif any(t in name for t in ("o_proj", "down_proj", "attn/proj", "mlp/linear_fc2")):
                value = value * residual_scale
        var.set_value(value)
    if blank_patch_zero:
        # A white patch (every normalised pixel 1.0) embeds to zero: ink, not paper, carries signal.
        proj = model.visual.patch_embed.proj
        proj.bias.set_value(-jnp.sum(proj.kernel.get_value(), axis=0))
    return model


def training_config(config, enc: Encoded):
    """``config`` with block-local vision attention (one block per image: same result, much less
    work than the dense block-diagonal mask on CPU)."""
    import dataclasses

    return dataclasses.replace(config, vision_max_frame_patches=int(np.prod(enc.grid)))


def train_model(config, enc: Encoded, settings: TrainSettings, *, family_weights: dict[str, int] | None = None,
                log: Callable[[int, float, float], None] | None = None, log_every: int = 50, start=None):
    """Train a model on all rows of ``enc``; returns ``(model, losses [steps])``.

    ``start``: a model to continue training (a curriculum's second phase; its config must equal
    ``config`` up to the vision attention blocking; its parameters are not modified), else a
    fresh one from ``settings.seed`` (:func:`init_model`). Rows are visited in seeded random
    epochs (each row once per epoch). ``log(step, mean loss over the last log_every steps,
    seconds so far)`` is called every ``log_every`` steps.
    """
    config = training_config(config, enc)
    if start is None:
        model = init_model(config, settings.seed, head_scale=settings.head_scale,
                           residual_scale=settings.residual_scale, blank_patch_zero=settings.blank_patch_zero,
                           embed_scale=settings.embed_scale)
    else:
        if training_config(start.config, enc) != config:
            raise ValueError("train_model: the starting model's config differs from the one to train")
        from jdelta.models.qwen3_vl.weights import abstract_model

        model = nnx.merge(nnx.graphdef(abstract_model(config)), nnx.state(start))
    opt = make_optimizer(OptimizerConfig(
        learning_rate=settings.learning_rate, b1=settings.b1, b2=settings.b2, weight_decay=settings.weight_decay,
        schedule="cosine", warmup_steps=settings.warmup_steps, end_lr_fraction=0.05, clip_norm=1.0,
        total_steps=settings.steps))
    state = TrainState.create(model, opt, seed=settings.seed)
    rng = np.random.default_rng(settings.seed)
    sampler = BalancedRows(enc.families, enc.answers, rng, family_weights) if settings.balance else None
    order = np.zeros(0, np.int64)
    losses = np.zeros(settings.steps, np.float32)
    t0 = time.perf_counter()
    for step in range(settings.steps):
        if sampler is not None:
            rows = sampler.take(settings.batch_size)
        else:
            if len(order) < settings.batch_size:
                order = np.concatenate([order, rng.permutation(len(enc))])
            rows, order = order[: settings.batch_size], order[settings.batch_size:]
        pix = rng.random(len(rows)) < settings.pixelated_fraction if settings.pixelated_fraction else False
        inputs = {k: jnp.asarray(v) for k, v in model_inputs(enc, rows, config, pixelated=pix).items()}
        state, loss = _train_step(state, inputs, jnp.asarray(enc.target_mask[rows]))
        losses[step] = float(loss)
        if log is not None and ((step + 1) % log_every == 0 or step + 1 == settings.steps):
            log(step + 1, float(losses[max(0, step + 1 - log_every): step + 1].mean()), time.perf_counter() - t0)
    return state.model(), losses
