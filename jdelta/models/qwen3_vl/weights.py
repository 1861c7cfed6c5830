"""HF safetensors checkpoints in and out, straight into sharded parameters.

Loading builds the abstract model with ``nnx.eval_shape`` (no parameter memory), checks every
checkpoint key and shape against it, then materialises each parameter directly on its
``NamedSharding``: every device reads only its own slice of the memory-mapped tensor
(``jax.make_array_from_callback``), cast to the parameter dtype. The whole model is never
put on one device first.

Name mapping: the NNX attribute path joined with dots is the HF key under ``model.`` (the LM
head is ``lm_head``); ``Dense.kernel [in, out]`` is the transpose of torch's ``weight``; the
patch embedding kernel ``[C*T*ps*ps, E]`` is the Conv3d weight ``[E, C, T, ps, ps]`` flattened.
Reading, checking, materialising and writing safetensors are :mod:`jdelta.models.safetensors_io`'s
(shared with every family); the names it had here are re-exported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jdelta.models.cue_recovery_io import (
    CUE_ATTR,
    CUE_FORMAT,
    CUE_SETTINGS,
    CUE_WEIGHTS,
    load_cue_recovery,
    read_cue_settings,
    save_cue_recovery,
)
from jdelta.models.qwen3_vl.config import Qwen3VLConfig
from jdelta.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
from jdelta.models.safetensors_io import (
    CheckpointFileError,
    CheckpointMismatchError,
    TensorSource,
    check_checkpoint,
    host_array,
    materialise,
    read_safetensors_header,
    tensors_in,
    write_checkpoint,
    write_safetensors,
)
from jdelta.models.safetensors_io import checkpoint_tensors as _checkpoint_tensors
from jdelta.sharding import Rules, state_shardings

__all__ = ["CUE_ATTR", "CUE_FORMAT", "CUE_SETTINGS", "CUE_WEIGHTS", "CheckpointFileError", "CheckpointMismatchError", "abstract_model", "checkpoint_tensors",
           "checkpoint_tensors_in", "hf_key", "load_hf_checkpoint", "load_cue_recovery", "read_cue_settings", "read_safetensors_header",
           "save_cue_recovery", "save_hf_checkpoint", "write_safetensors"]

# Older Qwen-VL layouts (pre transformers 4.52) -> the current ``model.visual`` /
# ``model.language_model`` layout.
_LEGACY_PREFIXES = (
    ("visual.", "model.visual."),
    ("model.layers.", "model.language_model.layers."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.norm.", "model.language_model.norm."),
)


def _canonical_key(key: str) -> str:
    for old, new in _LEGACY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def checkpoint_tensors(path: str | Path) -> dict[str, TensorSource]:
    """All tensors of a checkpoint directory: ``model.safetensors``, or the shards listed in
    ``model.safetensors.index.json``, or every ``*.safetensors`` file. Keys in the older
    ``visual.*`` / ``model.layers.*`` layout are renamed to the current one."""
    return _checkpoint_tensors(path, _canonical_key)


# ----------------------------------------------------------------------------- name mapping

def _kind(path: tuple) -> str:
    if path[-1] == "kernel":
        return "patch" if path[:2] == ("visual", "patch_embed") else "linear"
    return "same"


def hf_key(path: tuple) -> str:
    """NNX param path -> HF state-dict key."""
    parts = [str(p) for p in path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    elif parts[-1] in ("pos_embed", "embed_tokens"):
        parts.append("weight")
    key = ".".join(parts)
    return key if parts[0] == "lm_head" else "model." + key


def hf_shape(path: tuple, shape: tuple[int, ...], config: Qwen3VLConfig) -> tuple[int, ...]:
    kind = _kind(path)
    if kind == "linear":
        return (shape[1], shape[0])
    if kind == "patch":
        v = config.vision
        return (shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return tuple(shape)


def to_jdelta_layout(path: tuple, hf: np.ndarray) -> np.ndarray:
    """HF tensor -> jdelta parameter layout (views where possible)."""
    kind = _kind(path)
    if kind == "linear":
        return hf.T
    if kind == "patch":
        return hf.reshape(hf.shape[0], -1).T
    return hf


def to_hf_layout(path: tuple, value: np.ndarray, config: Qwen3VLConfig) -> np.ndarray:
    kind = _kind(path)
    if kind == "linear":
        return value.T
    if kind == "patch":
        return value.T.reshape(hf_shape(path, value.shape, config))
    return value


def _flat_params(state: nnx.State) -> list[tuple[tuple, nnx.Variable]]:
    return [(tuple(p), v) for p, v in nnx.to_flat_state(state)]


def abstract_model(config: Qwen3VLConfig) -> Qwen3VLForConditionalGeneration:
    """The model with ``ShapeDtypeStruct`` parameters (no memory)."""
    return nnx.eval_shape(lambda: Qwen3VLForConditionalGeneration(config, rngs=nnx.Rngs(0)))


def load_hf_checkpoint(path: str | Path, *, mesh: Mesh | None = None, rules: Rules | None = None,
                       dtype=None, cue_recovery: bool = True,
                       **config_overrides) -> tuple[Qwen3VLForConditionalGeneration, Qwen3VLConfig]:
    """Load an HF Qwen3-VL checkpoint directory into a (sharded) NNX model.

    Args:
      path: directory with ``config.json`` and safetensors (single file or sharded with an index).
      mesh: place each parameter on its ``NamedSharding`` from the logical-axis ``rules``;
        None puts everything on the default device.
      dtype: parameter and compute dtype (e.g. "bfloat16"); default: the config's (float32).
      config_overrides: other jdelta config fields (``attention_impl``, ``remat_policy``, ...).
    Returns:
      ``(model, config)``.
    A ViCuR cue-recovery module exported beside the weights (``cue_recovery.json`` +
    ``cue_recovery.safetensors``) is attached to the model unless ``cue_recovery=False``.
    Raises:
      CheckpointMismatchError listing missing, unexpected and shape-mismatched keys.
    """
    path = Path(path)
    if dtype is not None:
        name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
        config_overrides = {"dtype": name, "param_dtype": name, **config_overrides}
    config = Qwen3VLConfig.from_pretrained(path, **config_overrides)
    graphdef, state = nnx.split(abstract_model(config))
    shardings = dict(_flat_params(state_shardings(state, mesh, rules))) if mesh is not None else {}
    params = _flat_params(state)
    tensors = checkpoint_tensors(path)

    expected = {hf_key(p): (p, v) for p, v in params}
    check_checkpoint(path, "Qwen3-VL", {k: hf_shape(p, v.get_value().shape, config) for k, (p, v) in expected.items()},
                     tensors, ignorable={"lm_head.weight"} if config.tie_word_embeddings else ())
    for key, (p, var) in expected.items():
        var.set_value(materialise(var.get_value(), to_jdelta_layout(p, tensors[key].array()), shardings.get(p)))
    model = nnx.merge(graphdef, state)
    if cue_recovery and (path / CUE_SETTINGS).is_file():
        load_cue_recovery(model, path, mesh=mesh, rules=rules)
    return model, config


def save_hf_checkpoint(model: Qwen3VLForConditionalGeneration, config: Qwen3VLConfig, path: str | Path, *,
                       dtype=None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``config.json`` + safetensors that ``transformers`` loads.

    Tensors are fetched to the host one at a time; more than ``max_shard_bytes`` in total
    gives several files and a ``model.safetensors.index.json``. ``dtype`` defaults to each
    parameter's dtype.
    """
    hf_cfg = config.to_hf_dict()
    params = [(p, v) for p, v in _flat_params(nnx.state(model, nnx.Param)) if p[0] != CUE_ATTR]
    entries = []
    for p, var in params:
        value = var.get_value()
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(value.dtype)

        def make(p=p, var=var):
            return to_hf_layout(p, host_array(var.get_value()), config)

        entries.append((hf_key(p), hf_shape(p, value.shape, config), out_dtype, make))
    if dtype is not None:
        hf_cfg["dtype"] = np.dtype(dtype).name
    path = write_checkpoint(path, hf_cfg, entries, max_shard_bytes=max_shard_bytes)
    save_cue_recovery(getattr(model, CUE_ATTR, None), path, dtype=dtype)
    return path


def checkpoint_tensors_in(file: Path) -> dict[str, TensorSource]:
    """The tensors of one safetensors file (no key renaming)."""
    return tensors_in(file)
