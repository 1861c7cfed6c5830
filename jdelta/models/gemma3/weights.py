"""Gemma 3 HF safetensors checkpoints in and out, straight into sharded parameters.

Loading builds the abstract model (``nnx.eval_shape``), checks every checkpoint key and shape,
then materialises each parameter on its ``NamedSharding`` from the memory-mapped tensor (each
device reads only its slice), as :mod:`jdelta.models.qwen3_vl.weights` does; reading, checking,
materialising and writing are :mod:`jdelta.models.safetensors_io`'s, shared with it.

Key layouts. Checkpoints name tensors in one of three ways, all read:
``language_model.model.* / vision_tower.vision_model.* / multi_modal_projector.* /
language_model.lm_head.weight`` (the released checkpoints), ``vision_tower.*`` without
``vision_model`` (written by transformers 5), or transformers 5's module names
``model.language_model.* / model.vision_tower.* / model.multi_modal_projector.* / lm_head.weight``.
The export writes the first (the released layout, which every transformers version loads).

Name mapping to NNX paths: the module names are the canonical key under ``model.`` with
``vision_tower.encoder.layers`` flattened to ``vision_tower.layers``; ``Dense.kernel [in, out]``
is torch's ``weight`` transposed; the patch embedding kernel ``[C*ps*ps, E]`` is the Conv2d
weight ``[E, C, ps, ps]`` flattened; ``mm_input_projection_weight [D_v, H]`` is stored as is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jdelta.models.cue_recovery_io import CUE_ATTR, CUE_SETTINGS, load_cue_recovery, save_cue_recovery
from jdelta.models.gemma3.config import Gemma3Config
from jdelta.models.gemma3.model import Gemma3ForConditionalGeneration
from jdelta.models.safetensors_io import (
    CheckpointFileError,
    CheckpointMismatchError,
    check_checkpoint,
    checkpoint_tensors,
    host_array,
    materialise,
    write_checkpoint,
)
from jdelta.sharding import Rules, state_shardings

__all__ = ["CheckpointFileError", "CheckpointMismatchError", "abstract_model", "canonical_key", "hf_key",
           "load_hf_checkpoint", "release_key", "save_hf_checkpoint"]

# stored prefix -> canonical (transformers 5 module) prefix; first match wins
_TO_CANONICAL = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
# canonical prefix -> released-checkpoint prefix (the export layout)
_TO_RELEASE = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def _rename(key: str, table) -> str:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def canonical_key(key: str) -> str:
    """Any of the three stored layouts -> transformers 5's module name."""
    return _rename(key, _TO_CANONICAL)


def release_key(key: str) -> str:
    """Canonical name -> the released checkpoints' name (what the export writes)."""
    return _rename(key, _TO_RELEASE)


def _kind(path: tuple) -> str:
    if path[-1] == "kernel":
        return "patch" if path[:3] == ("vision_tower", "embeddings", "patch_embedding") else "linear"
    return "same"


def hf_key(path: tuple) -> str:
    """NNX param path -> canonical HF key."""
    parts = [str(p) for p in path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    elif parts[-1] in ("position_embedding", "embed_tokens"):
        parts.append("weight")
    if parts[:2] == ["vision_tower", "layers"]:
        parts.insert(1, "encoder")
    key = ".".join(parts)
    return key if parts[0] == "lm_head" else "model." + key


def hf_shape(path: tuple, shape: tuple[int, ...], config: Gemma3Config) -> tuple[int, ...]:
    kind = _kind(path)
    if kind == "linear":
        return (shape[1], shape[0])
    if kind == "patch":
        v = config.vision
        return (shape[1], v.num_channels, v.patch_size, v.patch_size)
    return tuple(shape)


def to_jdelta_layout(path: tuple, hf: np.ndarray) -> np.ndarray:
    kind = _kind(path)
    if kind == "linear":
        return hf.T
    if kind == "patch":
        return hf.reshape(hf.shape[0], -1).T
    return hf


def to_hf_layout(path: tuple, value: np.ndarray, config: Gemma3Config) -> np.ndarray:
    kind = _kind(path)
    if kind == "linear":
        return value.T
    if kind == "patch":
        return value.T.reshape(hf_shape(path, value.shape, config))
    return value


def _flat(state: nnx.State) -> list[tuple[tuple, nnx.Variable]]:
    return [(tuple(p), v) for p, v in nnx.to_flat_state(state)]


def abstract_model(config: Gemma3Config) -> Gemma3ForConditionalGeneration:
    """The model with ``ShapeDtypeStruct`` parameters (no memory)."""
    return nnx.eval_shape(lambda: Gemma3ForConditionalGeneration(config, rngs=nnx.Rngs(0)))


def load_hf_checkpoint(path: str | Path, *, mesh: Mesh | None = None, rules: Rules | None = None, dtype=None,
                       cue_recovery: bool = True,
                       **config_overrides) -> tuple[Gemma3ForConditionalGeneration, Gemma3Config]:
    """Load an HF ``Gemma3ForConditionalGeneration`` directory into a (sharded) NNX model.

    Args:
      path: directory with ``config.json`` and safetensors (one file or shards with an index).
      mesh: place each parameter on its ``NamedSharding`` (logical-axis ``rules``); None: default device.
      dtype: parameter and compute dtype (e.g. "bfloat16"); default: the config's (float32).
      config_overrides: other jdelta config fields (``attention_impl``, ``remat_policy``).
    Returns:
      ``(model, config)``; a ViCuR cue-recovery module exported beside the weights
      (:mod:`jdelta.models.cue_recovery_io`) is attached unless ``cue_recovery=False``.
    Raises:
      CheckpointMismatchError listing missing, unexpected and shape-mismatched keys.
    """
    path = Path(path)
    if dtype is not None:
        name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
        config_overrides = {"dtype": name, "param_dtype": name, **config_overrides}
    config = Gemma3Config.from_pretrained(path, **config_overrides)
    graphdef, state = nnx.split(abstract_model(config))
    shardings = dict(_flat(state_shardings(state, mesh, rules))) if mesh is not None else {}
    tensors = checkpoint_tensors(path, canonical_key)
    expected = {hf_key(p): (p, v) for p, v in _flat(state)}
    check_checkpoint(path, "Gemma 3", {k: hf_shape(p, v.get_value().shape, config) for k, (p, v) in expected.items()},
                     tensors, ignorable={"lm_head.weight"} if config.tie_word_embeddings else (), show=release_key)
    for key, (p, var) in expected.items():
        var.set_value(materialise(var.get_value(), to_jdelta_layout(p, tensors[key].array()), shardings.get(p)))
    model = nnx.merge(graphdef, state)
    if cue_recovery and (path / CUE_SETTINGS).is_file():
        load_cue_recovery(model, path, mesh=mesh, rules=rules)
    return model, config


def save_hf_checkpoint(model: Gemma3ForConditionalGeneration, config: Gemma3Config, path: str | Path, *,
                       dtype=None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``config.json`` + safetensors in the released layout (``transformers`` loads them).

    Tensors are fetched to the host one at a time (all-gathered across hosts when sharded);
    more than ``max_shard_bytes`` gives several files and a ``model.safetensors.index.json``.
    ``dtype`` defaults to each parameter's dtype. Files are written atomically.
    """
    hf_cfg = config.to_hf_dict()
    entries = []
    for p, var in _flat(nnx.state(model, nnx.Param)):
        if p[0] == CUE_ATTR:  # ViCuR's module goes beside the weights
            continue
        value = var.get_value()
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(value.dtype)

        def make(p=p, var=var):
            return to_hf_layout(p, host_array(var.get_value()), config)

        entries.append((release_key(hf_key(p)), hf_shape(p, value.shape, config), out_dtype, make))
    if dtype is not None:
        hf_cfg["dtype"] = np.dtype(dtype).name
    path = write_checkpoint(path, hf_cfg, entries, max_shard_bytes=max_shard_bytes)
    save_cue_recovery(getattr(model, CUE_ATTR, None), path, dtype=dtype)
    return path
