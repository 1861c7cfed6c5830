"""Parameter counts and shapes of a Gemma 3 config, from ``jax.eval_shape`` (no weights are
allocated or read), and the bundled configs of the 4B, 12B and 27B sizes.

The bundled ``jdelta/configs/models/gemma3-<size>.json`` hold the shapes of
``google/gemma-3-{4b,12b,27b}-it`` as recalled (written in the released transformers-4.50 form:
``rope_theta`` + ``rope_local_base_freq`` + linear ``rope_scaling`` factor 8, ``sliding_window``
1024, every 6th layer global). They were NOT checked against the hub (no network here); the
published sizes in ``tests/test_gemma3_info.py`` are recalled the same way.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

from flax import nnx

from jdelta.models.gemma3.config import Gemma3Config
from jdelta.models.gemma3.weights import abstract_model

SIZES = ("4b", "12b", "27b")


def bundled_config(size: str) -> Path:
    """The shipped ``config.json`` of a size (one of :data:`SIZES`)."""
    ref = resources.files("jdelta") / "configs" / "models" / f"gemma3-{size.lower()}.json"
    path = Path(str(ref))
    if not path.is_file():
        raise FileNotFoundError(f"bundled config {path} not found (the install lacks jdelta/configs)")
    return path


def parameter_counts(config: Gemma3Config) -> dict[str, int]:
    """Parameter counts by group, from the abstract model: ``vision`` (SigLIP tower),
    ``projector`` (pooling norm + projection), ``text`` (decoder layers and final norm),
    ``embeddings`` (token embedding, plus the LM head when untied), ``total``."""
    _, state = nnx.split(abstract_model(config))
    counts = {"vision": 0, "projector": 0, "text": 0, "embeddings": 0}
    for path, var in nnx.to_flat_state(state):
        n = math.prod(var.get_value().shape)
        if path[0] == "vision_tower":
            counts["vision"] += n
        elif path[0] == "multi_modal_projector":
            counts["projector"] += n
        elif path[0] == "lm_head" or path[-1] == "embed_tokens":
            counts["embeddings"] += n
        else:
            counts["text"] += n
    counts["total"] = sum(counts.values())
    return counts


def describe(config: Gemma3Config) -> list[str]:
    """Human-readable shape lines of the text and vision towers."""
    t, v = config.text, config.vision
    n_global = t.layer_types.count("full_attention")
    return [
        f"text:   {t.num_hidden_layers} layers ({n_global} global, {t.num_hidden_layers - n_global} local, window "
        f"{t.sliding_window}), hidden {t.hidden_size}, mlp {t.intermediate_size}, heads {t.num_attention_heads}/"
        f"{t.num_key_value_heads} kv, head_dim {t.head_dim}, vocab {t.vocab_size}, tied lm_head: {config.tie_word_embeddings}",
        f"vision: SigLIP {v.num_hidden_layers} layers, hidden {v.hidden_size}, mlp {v.intermediate_size}, heads "
        f"{v.num_attention_heads}, {v.image_size} px / {v.patch_size} px patches -> {config.mm_tokens_per_image} tokens",
    ]
