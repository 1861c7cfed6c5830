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

Entries hold ``"module:attribute"`` references resolved on use, so importing this module imports
no model code. Known gaps (see each family's docs): the sampler's bucket padding handles
Qwen3-VL's patch rows only, and its logits skip ``final_logit_softcapping`` (None in every
released Gemma 3).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jax


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
