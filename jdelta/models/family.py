"""Model families: what a vision-language family provides, and what the rest of jdelta may assume.

A *family* is one HF architecture ported to Flax NNX (Qwen3-VL, Gemma 3). Everything
family-specific is reached through its :class:`ModelFamily` entry in :data:`FAMILIES`; code
outside a family's package (sampler, scoring, losses, distillation, stages) may assume only:

* **Config** -- ``family.config_class.from_pretrained(dir_or_config_json, **overrides)``; the
  result has ``.text.vocab_size``, ``.text.hidden_size``, ``.text.num_hidden_layers``,
  ``.text.num_key_value_heads``, ``.text.head_dim``, ``.text.max_position_embeddings``,
  ``.image_token_id``, ``.tie_word_embeddings``, ``.dtype``, ``.replace(...)``, ``.to_hf_dict()``.
* **Weights** -- ``family.load(path, mesh=None, rules=None, dtype=None, **overrides) -> (model, config)``
  reads an HF safetensors directory straight into sharded parameters (logical axis names from
  :mod:`jdelta.sharding` on every parameter); ``family.export(model, config, path, dtype=None)``
  writes a directory ``transformers`` loads.
* **The model call** (:class:`FamilyModel`) -- ``model(input_ids, attention_mask=, position_ids=,
  pixel_values=, image_grid_thw=, cache=, return_logits=, layer_hook=)`` returning
  ``(logits | None, hidden_states, cache, rope_deltas)``; ``lm_head_weight() [H, V]``;
  ``init_cache(batch, max_len)``.
* **Positions** -- ``family.positions(input_ids, image_grid_thw, attention_mask, config) ->
  (position_ids [3, B, S], rope_deltas [B])`` on the host (also ``model.get_rope_index`` without
  the config). The decode position of cache slot ``i`` is ``i + rope_deltas`` for every family, so
  the decode loop passes ``cache.index + rope_deltas`` broadcast to ``[3, B, 1]``. Qwen3-VL's
  three rows are M-RoPE's (t, h, w); Gemma 3's are three equal copies of its 1D positions.
* **KV cache** -- ``KVCache(k, v [num_layers, B, max_len, kv_heads, head_dim], valid [B, max_len],
  index)``: a call writes slots ``index .. index+S-1``; attention masks come from ``valid`` and
  slot indices (Gemma 3's local layers mask ``slot_q - slot_k >= sliding_window``).
* **Decoder hook** -- ``layer_hook(i, hidden [B,S,H], visual_mask [B,S], attention_mask [B,S]) ->
  hidden`` after decoder layer ``i`` (ViCuR's cue-recovery module uses it on Qwen3-VL).
* **Images** -- ``family.image_processing``: the module that turns images into the family's
  ``pixel_values`` (Qwen3-VL: patch rows ``[P, C*T*ps*ps]`` + ``image_grid_thw``; Gemma 3: whole
  images ``[N, 3, 896, 896]``, optional pan-and-scan crops).
* **Prompts** -- ``family.chat``: the module that renders the family's chat format and expands
  image placeholders to the image tokens (special tokens looked up from the tokenizer).

* **Pixel rows** -- every family's batch layout is ``pixel_values [P, ...]`` (rows: Qwen3-VL's
  patch rows ``[P, D]``, Gemma 3's whole images ``[P, 3, S, S]``) plus ``image_grid_thw [N, 3]``
  whose row ``i`` has ``prod = `` the pixel rows of image ``i`` (Qwen3-VL: ``(t, h, w)``; Gemma 3:
  ``(1, 1, 1)``, one row per image or pan-and-scan crop); ``(0, 0, 0)`` rows and pixel rows past
  the images are padding. So padding, per-sample stacking and flattening are family-free.
* **Image tokens** -- ``family.image_tokens(config, image_grid_thw [N, 3]) -> [N]``: the image
  placeholder tokens (``config.image_token_id``) each grid row puts in a prompt (Qwen3-VL:
  ``t*h*w / merge**2``; Gemma 3: ``mm_tokens_per_image``). With it, :func:`split_images` cuts a
  batch's pixel and grid rows back into per-prompt pieces, family-free.
* **Prompt pipeline** -- ``family.prompt_format(tokenizer, pipeline_config)`` (a
  :class:`PromptFormat`): the pipeline's per-record image processing, prompt tokens and pixel
  collation; :func:`prompt_special_tokens` gives the tokenizer's ``pad``, ``stop_ids``, ``image``
  (placeholder id) and ``sink`` (first token of a turn) for whichever family's chat format it carries.
* **Logits** -- :func:`logits_from_hidden` (soft-capped where the config says so) and
  :func:`logit_softcap`; code that forms logits from ``hidden @ lm_head_weight()`` itself must
  apply the cap (:mod:`jdelta.logprobs`) or refuse a capped model (the distillation losses).
* **Special ids** -- :func:`vision_special_ids`: ids a completion must not hold (placeholders).

Entries hold ``"module:attribute"`` references resolved on use, so importing this module imports
no model code.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np


class FamilyModel(Protocol):
    """The call contract every family's model honours (see the module docstring)."""

    config: Any

    def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array, position_ids: jax.Array | None = None,
                 pixel_values: jax.Array | None = None, image_grid_thw: jax.Array | None = None, cache: Any = None,
                 return_logits: bool = True, layer_hook: Any = None) -> Any: ...

    def lm_head_weight(self) -> jax.Array: ...

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> Any: ...

    def get_rope_index(self, input_ids, image_grid_thw, attention_mask) -> tuple[Any, Any]: ...


def _resolve(ref: str | None):
    if ref is None:
        return None
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


@dataclass(frozen=True)
class ModelFamily:
    """One family's hooks, as ``"module:attribute"`` references (``None``: not provided yet)."""

    name: str
    model_types: tuple[str, ...]  # HF config.json ``model_type`` values
    config_ref: str
    model_ref: str
    load_ref: str
    export_ref: str
    positions_ref: str
    parameter_counts_ref: str
    bundled_config_ref: str
    image_processing_ref: str | None
    chat_ref: str | None
    prompt_format_ref: str | None = None
    special_tokens_ref: str | None = None
    describe_ref: str | None = None
    image_tokens_ref: str | None = None
    bundled_prefix: str = ""  # bundled config names: ``<prefix><size>`` (jdelta/configs/models)

    @property
    def config_class(self):
        return _resolve(self.config_ref)

    @property
    def model_class(self):
        return _resolve(self.model_ref)

    @property
    def load(self):
        return _resolve(self.load_ref)

    @property
    def export(self):
        return _resolve(self.export_ref)

    @property
    def positions(self):
        return _resolve(self.positions_ref)

    @property
    def parameter_counts(self):
        return _resolve(self.parameter_counts_ref)

    @property
    def bundled_config(self):
        return _resolve(self.bundled_config_ref)

    @property
    def image_processing(self):
        return _resolve(self.image_processing_ref)

    @property
    def chat(self):
        return _resolve(self.chat_ref)

    @property
    def describe(self):
        """``config -> list[str]``: human-readable shape lines."""
        return _resolve(self.describe_ref)

    @property
    def prompt_format(self):
        """``(tokenizer, pipeline_config) -> PromptFormat`` (the prompt pipeline's family part)."""
        return _resolve(self.prompt_format_ref)

    @property
    def image_tokens(self):
        """``(config, image_grid_thw [N, 3]) -> [N]``: image placeholder tokens per grid row."""
        return _resolve(self.image_tokens_ref)

    @property
    def special_tokens(self):
        """The class whose ``from_tokenizer(tok)`` gives ``pad``, ``stop_ids``, ``image``, ``sink``."""
        return _resolve(self.special_tokens_ref)


FAMILIES: dict[str, ModelFamily] = {
    "qwen3_vl": ModelFamily(
        name="qwen3_vl",
        model_types=("qwen3_vl",),
        config_ref="jdelta.models.qwen3_vl.config:Qwen3VLConfig",
        model_ref="jdelta.models.qwen3_vl.model:Qwen3VLForConditionalGeneration",
        load_ref="jdelta.models.qwen3_vl.weights:load_hf_checkpoint",
        export_ref="jdelta.models.qwen3_vl.weights:save_hf_checkpoint",
        positions_ref="jdelta.models.qwen3_vl.positions:get_rope_index",
        parameter_counts_ref="jdelta.models.qwen3_vl.info:parameter_counts",
        bundled_config_ref="jdelta.models.qwen3_vl.info:bundled_config",
        image_processing_ref="jdelta.data.image_processor",
        chat_ref="jdelta.data.chat",
        prompt_format_ref="jdelta.data.prompt_format:QwenPromptFormat",
        special_tokens_ref="jdelta.data.tokenizer:SpecialTokens",
        describe_ref="jdelta.models.qwen3_vl.info:describe",
        image_tokens_ref="jdelta.models.qwen3_vl.positions:image_token_counts",
        bundled_prefix="qwen3-vl-",
    ),
    "gemma3": ModelFamily(
        name="gemma3",
        model_types=("gemma3",),
        config_ref="jdelta.models.gemma3.config:Gemma3Config",
        model_ref="jdelta.models.gemma3.model:Gemma3ForConditionalGeneration",
        load_ref="jdelta.models.gemma3.weights:load_hf_checkpoint",
        export_ref="jdelta.models.gemma3.weights:save_hf_checkpoint",
        positions_ref="jdelta.models.gemma3.model:get_rope_index",
        parameter_counts_ref="jdelta.models.gemma3.info:parameter_counts",
        bundled_config_ref="jdelta.models.gemma3.info:bundled_config",
        image_processing_ref="jdelta.models.gemma3.image_processing",
        chat_ref="jdelta.models.gemma3.chat",
        prompt_format_ref="jdelta.models.gemma3.prompt_format:Gemma3PromptFormat",
        special_tokens_ref="jdelta.models.gemma3.chat:Gemma3SpecialTokens",
        describe_ref="jdelta.models.gemma3.info:describe",
        image_tokens_ref="jdelta.models.gemma3.chat:image_token_counts",
        bundled_prefix="gemma3-",
    ),
}


def get_family(name: str) -> ModelFamily:
    """The family registered as ``name`` (e.g. ``"gemma3"``)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def family_for_model_type(model_type: str | None, where: str = "config.json") -> ModelFamily:
    """The family whose HF ``model_type`` this is."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"{where}: model_type {model_type!r} is not a supported family (supported: {', '.join(known)})")


def family_of_checkpoint(path: str | Path) -> ModelFamily:
    """The family of an HF checkpoint directory (or its ``config.json``), from ``model_type``."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no config.json at {file}")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    return family_for_model_type(d.get("model_type") if isinstance(d, dict) else None, str(file))


def family_of_model(model: Any) -> ModelFamily:
    """The family of a loaded model (by its config's class)."""
    for family in FAMILIES.values():
        if isinstance(getattr(model, "config", None), family.config_class):
            return family
    raise ValueError(f"{type(model).__name__} is not a model of a registered family")


def load_checkpoint(path: str | Path, **kwargs):
    """``(model, config)`` from an HF checkpoint directory of any registered family."""
    return family_of_checkpoint(path).load(path, **kwargs)


def resolve_config(model: str) -> tuple[ModelFamily, Path]:
    """``(family, config.json)`` for a bundled config name (``gemma3-4b``, ``qwen3-vl-8b``; a bare
    size such as ``8b`` means Qwen3-VL, as before Gemma 3 existed), a ``config.json`` file or a
    checkpoint directory."""
    name = model.lower()
    for family in FAMILIES.values():
        size = name[len(family.bundled_prefix):] if name.startswith(family.bundled_prefix) else None
        if size:
            try:
                return family, family.bundled_config(size)
            except (FileNotFoundError, ValueError):
                pass
    qwen = FAMILIES["qwen3_vl"]
    path = Path(model)
    if not path.exists() and "/" not in model:
        try:
            return qwen, qwen.bundled_config(name)
        except FileNotFoundError:
            pass
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        from jdelta.models.gemma3.info import SIZES as GEMMA3_SIZES
        from jdelta.models.qwen3_vl.info import SIZES as QWEN3_VL_SIZES

        names = [*QWEN3_VL_SIZES, *(f"gemma3-{size}" for size in GEMMA3_SIZES)]
        raise FileNotFoundError(f"model {model!r}: not one of {', '.join(names)} and no config.json at {file}")
    return family_of_checkpoint(file), file


def family_of_config(config: Any) -> ModelFamily:
    """The family of a model config object (by its class)."""
    for family in FAMILIES.values():
        if isinstance(config, family.config_class):
            return family
    raise ValueError(f"{type(config).__name__} is not the config of a registered family")


def family_of_tokenizer(tokenizer: Any) -> ModelFamily:
    """The family whose chat format ``tokenizer`` carries (the first whose special tokens it holds)."""
    problems = []
    for family in FAMILIES.values():
        try:
            family.special_tokens.from_tokenizer(tokenizer)
            return family
        except ValueError as e:
            problems.append(f"{family.name}: {e}")
    raise ValueError("the tokenizer carries no registered family's special tokens (" + "; ".join(problems) + ")")


def prompt_special_tokens(tokenizer: Any):
    """The special tokens of ``tokenizer``'s family: ``.pad``, ``.stop_ids``, ``.image`` (the image
    placeholder id), ``.sink`` (the token that opens a turn) and the family's own names."""
    return family_of_tokenizer(tokenizer).special_tokens.from_tokenizer(tokenizer)


# ----------------------------------------------------------------------------- shared model helpers


def logit_softcap(model_or_config: Any) -> float | None:
    """The config's ``final_logit_softcapping`` (``cap * tanh(logits / cap)``), or None."""
    cfg = getattr(model_or_config, "config", model_or_config)
    for c in (getattr(cfg, "text", None), cfg):
        cap = getattr(c, "final_logit_softcapping", None)
        if cap is not None:
            return float(cap)
    return None


def softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(logits / cap)`` (identity for None)."""
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def logits_from_hidden(model: Any, hidden: jax.Array, dtype: Any = None) -> jax.Array:
    """``hidden [..., H]`` -> logits ``[..., V]`` as the model's own forward forms them (LM head,
    then the soft-cap where configured); computed in ``dtype`` (default: ``hidden``'s)."""
    dtype = dtype or hidden.dtype
    logits = jnp.dot(hidden.astype(dtype), model.lm_head_weight().astype(dtype))
    return softcap(logits, logit_softcap(model))


VISION_ID_NAMES = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                   "boi_token_id", "eoi_token_id")


def vision_special_ids(config: Any) -> tuple[int, ...]:
    """Ids that mark images in a prompt (placeholders, begin/end of image) for any family's config."""
    return tuple(int(getattr(config, n)) for n in VISION_ID_NAMES if getattr(config, n, None) is not None)



def split_images(config: Any, input_ids: Any, attention_mask: Any, pixel_values: Any,
                 image_grid_thw: Any) -> list[dict[str, np.ndarray] | None]:
    """A batch's images cut back into per-prompt pieces (any family, see *Pixel rows*).

    ``input_ids, attention_mask [b, S]``; ``pixel_values [P, ...]`` and ``image_grid_thw [N, 3]``
    as the prompt pipeline collates them (images in row order, padding rows past them). Row ``i``
    gets ``{"pixel_values": [p_i, ...], "image_grid_thw": [n_i, 3]}`` (its images' rows, in order),
    or None when it holds no image token. Raises ValueError when the rows' image tokens and the
    grid rows do not match up.
    """
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    grids = np.asarray(image_grid_thw).reshape(-1, 3)
    grids = grids[grids.prod(-1) > 0]
    pixels = np.asarray(pixel_values)
    per_image = np.asarray(family_of_config(config).image_tokens(config, grids), np.int64).reshape(-1)
    rows = np.asarray(grids.prod(-1), np.int64)
    if int(rows.sum()) > pixels.shape[0]:
        raise ValueError(f"image_grid_thw needs {int(rows.sum())} pixel rows, pixel_values has {pixels.shape[0]}")
    want = ((ids == int(config.image_token_id)) & (mask > 0)).sum(-1)
    out: list[dict[str, np.ndarray] | None] = []
    img = row = 0
    for i, tokens in enumerate(want.tolist()):
        first, got = img, 0
        while got < tokens and img < len(grids):
            got += int(per_image[img])
            img += 1
        if got != tokens:
            raise ValueError(f"prompt row {i} holds {tokens} image tokens but the batch's next images "
                             f"(grid rows {first}..{img - 1}) give {got}")
        n = int(rows[first:img].sum())
        out.append({"pixel_values": pixels[row:row + n], "image_grid_thw": grids[first:img].astype(np.int32)}
                   if img > first else None)
        row += n
    if img != len(grids):
        raise ValueError(f"the batch has {len(grids)} images but its prompts' image tokens account for {img}")
    return out
