"""``jdelta model-info``: parameter counts and shapes of a Qwen3-VL config, from
``jax.eval_shape`` (no weights are allocated or read).

``--model`` takes a size name (2b, 4b, 8b, 32b -> ``configs/models/qwen3-vl-<size>.json``),
a ``config.json`` file, or a checkpoint directory holding one.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from flax import nnx

from jdelta.models.qwen3_vl.config import Qwen3VLConfig
from jdelta.models.qwen3_vl.weights import abstract_model

SIZES = ("2b", "4b", "8b", "32b")
CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "models"


def resolve_config(model: str) -> Path:
    """Size name or path -> the ``config.json`` to read."""
    if model.lower() in SIZES:
        path = CONFIG_DIR / f"qwen3-vl-{model.lower()}.json"
        if not path.is_file():
            raise FileNotFoundError(f"bundled config {path} not found (is the repository's configs/ present?)")
        return path
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--model {model!r}: not one of {SIZES} and no config.json at {path}")
    return path


def parameter_counts(config: Qwen3VLConfig) -> dict[str, int]:
    """Parameter counts by group, from the abstract model.

    Groups: ``vision`` (the whole vision tower incl. mergers), ``text`` (decoder layers and
    final norm), ``embeddings`` (token embedding, plus the LM head when untied), ``total``.
    """
    _, state = nnx.split(abstract_model(config))
    counts = {"vision": 0, "text": 0, "embeddings": 0}
    for path, var in nnx.to_flat_state(state):
        n = math.prod(var.get_value().shape)
        if path[0] == "visual":
            counts["vision"] += n
        elif path[0] == "lm_head" or path[-1] == "embed_tokens":
            counts["embeddings"] += n
        else:
            counts["text"] += n
    counts["total"] = sum(counts.values())
    return counts


def _fmt(n: int) -> str:
    return f"{n:,} ({n / 1e9:.3f}B)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=f"one of {', '.join(SIZES)}, a config.json, or a checkpoint dir")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")


def run(args: argparse.Namespace) -> int:
    path = resolve_config(args.model)
    config = Qwen3VLConfig.from_pretrained(path)
    counts = parameter_counts(config)
    if args.json:
        print(json.dumps({"config": str(path), **counts}))
        return 0
    t, v = config.text, config.vision
    print(f"config: {path}")
    print(f"text:   {t.num_hidden_layers} layers, hidden {t.hidden_size}, mlp {t.intermediate_size}, "
          f"heads {t.num_attention_heads}/{t.num_key_value_heads} kv, head_dim {t.head_dim}, vocab {t.vocab_size}, "
          f"tied lm_head: {config.tie_word_embeddings}")
    print(f"vision: {v.depth} blocks, hidden {v.hidden_size}, mlp {v.intermediate_size}, heads {v.num_heads}, "
          f"patch {v.patch_size}, merge {v.spatial_merge_size}, deepstack {list(v.deepstack_visual_indexes)}")
    for name in ("vision", "text", "embeddings", "total"):
        print(f"{name + ':':12s}{_fmt(counts[name])}")
    return 0
