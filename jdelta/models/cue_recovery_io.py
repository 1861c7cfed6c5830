"""ViCuR's cue-recovery module beside an exported checkpoint, for every model family.

The plain student is exported as its family's HF checkpoint (which ``transformers`` loads as
usual); the module goes beside it: ``cue_recovery.json`` (its settings) and
``cue_recovery.safetensors`` (``layers.<j>.{q,k,v,o}_proj.weight`` in torch's ``[out, in]``
layout, ``query_norm.weight``, ``kv_norm.weight``). A family's ``load_hf_checkpoint`` attaches it
(:func:`load_cue_recovery`, which needs only ``model.config.text`` and the decoder hook) and its
``save_hf_checkpoint`` writes it (:func:`save_cue_recovery`) and leaves it out of the main weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jdelta.models.safetensors_io import (
    CheckpointFileError,
    CheckpointMismatchError,
    host_array,
    materialise,
    tensors_in,
    write_safetensors,
)
from jdelta.sharding import Rules, state_shardings


def _flat_params(state: nnx.State) -> list[tuple[tuple, nnx.Variable]]:
    return [(tuple(p), v) for p, v in nnx.to_flat_state(state)]


# ----------------------------------------------------------------------------- ViCuR's cue-recovery module
# Exported beside the plain student (which ``transformers`` loads as usual): ``cue_recovery.json``
# (the module's settings) and ``cue_recovery.safetensors`` (``layers.<j>.{q,k,v,o}_proj.weight``
# in torch's ``[out, in]`` layout, ``query_norm.weight``, ``kv_norm.weight``).

CUE_ATTR = "cue_recovery"
CUE_SETTINGS = "cue_recovery.json"
CUE_WEIGHTS = "cue_recovery.safetensors"
CUE_FORMAT = "jdelta.cue_recovery/1"


def _cue_key(path: tuple) -> str:
    parts = [str(p) for p in path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    return ".".join(parts)


def save_cue_recovery(module, path: str | Path, *, dtype=None) -> None:
    """Write ``module``'s settings and weights into the export directory ``path``; None removes
    the files of an earlier export there (so the plain student is not loaded with a stale module)."""
    path = Path(path)
    if jax.process_index() != 0:
        return
    if module is None:
        for name in (CUE_SETTINGS, CUE_WEIGHTS):
            (path / name).unlink(missing_ok=True)
        return
    entries = []
    for p, var in _flat_params(nnx.state(module, nnx.Param)):
        value = var.get_value()
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(value.dtype)
        linear = p[-1] == "kernel"
        shape = tuple(value.shape[::-1]) if linear else tuple(value.shape)

        def make(var=var, linear=linear):
            arr = var.get_value()
            arr = host_array(arr)
            return arr.T if linear else arr

        entries.append((_cue_key(p), shape, out_dtype, make))
    write_safetensors(path / CUE_WEIGHTS, entries)
    settings = {"format": CUE_FORMAT, **module.settings()}
    tmp = path / (CUE_SETTINGS + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(tmp, path / CUE_SETTINGS)


def read_cue_settings(path: str | Path) -> dict:
    """The ``cue_recovery.json`` of an export directory, checked for its format."""
    file = Path(path) / CUE_SETTINGS
    try:
        settings = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointFileError(f"{file}: unreadable cue-recovery settings ({e})") from e
    if not isinstance(settings, dict) or settings.get("format") != CUE_FORMAT:
        raise CheckpointFileError(f"{file}: not a jdelta cue-recovery settings file (format {CUE_FORMAT!r})")
    return settings


def load_cue_recovery(model, path: str | Path, *, mesh: Mesh | None = None, rules: Rules | None = None):
    """Attach the cue-recovery module exported in ``path`` to ``model`` (its weights placed on their
    shardings when ``mesh`` is given); returns ``model``. The settings must fit the model's decoder."""
    from jdelta.config import build
    from jdelta.models.cue_recovery import CueRecoveryConfig, make_cue_recovery

    path = Path(path)
    settings = read_cue_settings(path)
    text = model.config.text
    want = {"hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers,
            "num_heads": text.num_attention_heads}
    bad = [f"{k} {settings.get(k)} (model: {v})" for k, v in want.items() if settings.get(k) != v]
    if bad:
        raise CheckpointMismatchError(f"{path / CUE_SETTINGS}: the module does not fit this model: {', '.join(bad)}")
    cfg = build(CueRecoveryConfig, settings.get("config") or {})
    dtype, pdtype = np.dtype(model.config.dtype), np.dtype(model.config.param_dtype)
    abstract = nnx.eval_shape(lambda: make_cue_recovery(text, cfg, dtype=dtype, param_dtype=pdtype,
                                                        rngs=jax.random.key(0)))
    graphdef, state = nnx.split(abstract)
    shardings = dict(_flat_params(state_shardings(state, mesh, rules))) if mesh is not None else {}
    tensors = tensors_in(path / CUE_WEIGHTS)
    expected = {_cue_key(p): (p, v) for p, v in _flat_params(state)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(f"{path / CUE_WEIGHTS}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, (p, var) in expected.items():
        abstract_value = var.get_value()
        hf = tensors[key].array()
        source = hf.T if p[-1] == "kernel" else hf
        if source.shape != tuple(abstract_value.shape):
            raise CheckpointMismatchError(f"{path / CUE_WEIGHTS}: {key} has shape {hf.shape}, "
                                          f"expected {tuple(abstract_value.shape)} (transposed)")
        var.set_value(materialise(abstract_value, source, shardings.get(p)))
    setattr(model, CUE_ATTR, nnx.data(nnx.merge(graphdef, state)))
    return model


