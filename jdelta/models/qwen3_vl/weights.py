"""HF safetensors checkpoints in and out, straight into sharded parameters.

Loading builds the abstract model with ``nnx.eval_shape`` (no parameter memory), checks every
checkpoint key and shape against it, then materialises each parameter directly on its
``NamedSharding``: every device reads only its own slice of the memory-mapped tensor
(``jax.make_array_from_callback``), cast to the parameter dtype. The whole model is never
put on one device first.

Name mapping: the NNX attribute path joined with dots is the HF key under ``model.`` (the LM
head is ``lm_head``); ``Dense.kernel [in, out]`` is the transpose of torch's ``weight``; the
patch embedding kernel ``[C*T*ps*ps, E]`` is the Conv3d weight ``[E, C, T, ps, ps]`` flattened.
"""

from __future__ import annotations

import json
import math
import os
import struct as _struct
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jdelta.errors import UserError
from jdelta.models.qwen3_vl.config import Qwen3VLConfig
from jdelta.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
from jdelta.sharding import Rules, state_shardings

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model config."""


class CheckpointFileError(UserError, ValueError):
    """A safetensors file that cannot be read (truncated, corrupt header); the message names it."""


# ----------------------------------------------------------------------------- safetensors I/O

def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """``(header dict, data start offset)`` of a safetensors file.

    Checks that the file holds every byte its header describes, so a half-written or partly
    downloaded file fails here, naming the file, instead of deep inside a memory map.
    """
    size = Path(file).stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointFileError(f"{file}: not a safetensors file (only {size} bytes)")
        (n,) = _struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointFileError(
                f"{file}: truncated or not a safetensors file (header of {n} bytes, file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointFileError(f"{file}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{file}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    need = 8 + n
    for key, entry in header.items():
        try:
            start, end = (int(v) for v in entry["data_offsets"])
            shape = [int(d) for d in entry["shape"]]
            dtype = str(entry["dtype"])
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointFileError(f"{file}: corrupt safetensors header entry for {key!r} ({e!r})") from e
        if not 0 <= start <= end:
            raise CheckpointFileError(f"{file}: tensor {key!r} has invalid data offsets [{start}, {end}]")
        if dtype in _ST_DTYPES and end - start != math.prod(shape) * _ST_DTYPES[dtype].itemsize:
            raise CheckpointFileError(f"{file}: tensor {key!r}: byte range does not match its shape {tuple(shape)}")
        need = max(need, 8 + n + end)
    if size < need:
        raise CheckpointFileError(
            f"{file}: truncated safetensors file ({size} bytes, its header describes {need}); "
            "a half-written save or an interrupted download?")
    return header, 8 + n


class _TensorSource:
    """Memory-mapped view of one tensor (numpy, zero copy until sliced)."""

    def __init__(self, file: Path, entry: dict, data_start: int):
        self.file, self.entry, self.data_start = file, entry, data_start
        if entry["dtype"] not in _ST_DTYPES:
            raise CheckpointFileError(f"{file}: tensor dtype {entry['dtype']} is not supported")
        self.dtype = _ST_DTYPES[entry["dtype"]]
        self.shape = tuple(entry["shape"])

    def array(self) -> np.ndarray:
        start, _ = self.entry["data_offsets"]
        if math.prod(self.shape) == 0:
            return np.zeros(self.shape, self.dtype)
        return np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.data_start + start, shape=self.shape)


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


def checkpoint_tensors(path: str | Path) -> dict[str, _TensorSource]:
    """All tensors of a checkpoint directory: ``model.safetensors``, or the shards listed in
    ``model.safetensors.index.json``, or every ``*.safetensors`` file. Keys in the older
    ``visual.*`` / ``model.layers.*`` layout are renamed to the current one."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointFileError(f"{index}: invalid index file ({e!r})") from e
        files = sorted({path / f for f in weight_map.values()})
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no safetensors files (model.safetensors or an index)")
    out: dict[str, _TensorSource] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: listed in {index.name} but missing")
        header, start = read_safetensors_header(file)
        for key, entry in header.items():
            key = _canonical_key(key)
            if key in out:
                raise ValueError(f"{file}: tensor {key!r} also in {out[key].file}")
            out[key] = _TensorSource(file, entry, start)
    return out


def write_safetensors(file: Path, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]):
    """Stream tensors to a safetensors file; each is produced by its callable only when written.

    The bytes go to ``<file>.tmp``, renamed to ``file`` only once complete: an interrupted save
    never leaves a half-written file under the real name."""
    tensors = list(tensors)
    header, offset = {}, 0
    for key, shape, dtype, _ in tensors:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[key] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    file = Path(file)
    tmp = file.with_name(file.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_struct.pack("<Q", len(blob)))
            f.write(blob)
            for key, shape, dtype, make in tensors:
                arr = np.ascontiguousarray(make(), dtype=dtype)
                if arr.shape != tuple(shape):
                    raise ValueError(f"{file}: tensor {key} has shape {arr.shape}, expected {shape}")
                f.write(arr.tobytes())
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


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


def _summarise(title: str, items: list[str], limit: int = 25) -> str:
    shown = items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown)


# ----------------------------------------------------------------------------- load / save

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
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(k for k in expected if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected and k not in ignorable)
    mismatched = []
    for key, (p, v) in expected.items():
        if key in tensors:
            want = hf_shape(p, v.get_value().shape, config)
            if tensors[key].shape != want:
                mismatched.append(f"{key}: checkpoint {tensors[key].shape} vs expected {want}")
    if missing or unexpected or mismatched:
        parts = [f"{path}: checkpoint does not match its config.json (Qwen3-VL)"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                parts.append(_summarise(title, items))
        raise CheckpointMismatchError("\n".join(parts))

    for key, (p, var) in expected.items():
        abstract = var.get_value()
        source = to_jdelta_layout(p, tensors[key].array())
        target = np.dtype(abstract.dtype)
        if p in shardings:
            value = jax.make_array_from_callback(
                abstract.shape, shardings[p], lambda idx, s=source, t=target: np.asarray(s[idx], dtype=t))
        else:
            value = jax.device_put(np.asarray(source, dtype=target))
        var.set_value(value)
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
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_cfg = config.to_hf_dict()
    params = [(p, v) for p, v in _flat_params(nnx.state(model, nnx.Param)) if p[0] != CUE_ATTR]
    entries = []
    for p, var in params:
        value = var.get_value()
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(value.dtype)

        def make(p=p, var=var):
            arr = var.get_value()
            if not arr.is_fully_addressable:
                from jax.experimental import multihost_utils
                arr = multihost_utils.process_allgather(arr, tiled=True)
            return to_hf_layout(p, np.asarray(jax.device_get(arr)), config)

        entries.append((hf_key(p), hf_shape(p, value.shape, config), out_dtype, make))
    if dtype is not None:
        hf_cfg["dtype"] = np.dtype(dtype).name
    shards, current, size = [], [], 0
    for e in entries:
        nbytes = math.prod(e[1]) * e[2].itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += nbytes
    if current:
        shards.append(current)
    if jax.process_index() == 0:
        (path / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        if jax.process_index() == 0:
            write_safetensors(path / name, shard)
        else:  # other hosts still take part in the all-gathers
            for *_, make in shard:
                make()
        weight_map.update({e[0]: name for e in shard})
    if len(shards) > 1 and jax.process_index() == 0:
        total = sum(math.prod(e[1]) * e[2].itemsize for e in entries)
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    save_cue_recovery(getattr(model, CUE_ATTR, None), path, dtype=dtype)
    return path


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
            if not arr.is_fully_addressable:
                from jax.experimental import multihost_utils
                arr = multihost_utils.process_allgather(arr, tiled=True)
            arr = np.asarray(jax.device_get(arr))
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


def load_cue_recovery(model: Qwen3VLForConditionalGeneration, path: str | Path, *, mesh: Mesh | None = None,
                      rules: Rules | None = None) -> Qwen3VLForConditionalGeneration:
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
    tensors = checkpoint_tensors_in(path / CUE_WEIGHTS)
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
        target = np.dtype(abstract_value.dtype)
        if p in shardings:
            value = jax.make_array_from_callback(
                abstract_value.shape, shardings[p], lambda idx, s=source, t=target: np.asarray(s[idx], dtype=t))
        else:
            value = jax.device_put(np.asarray(source, dtype=target))
        var.set_value(value)
    setattr(model, CUE_ATTR, nnx.data(nnx.merge(graphdef, state)))
    return model


def checkpoint_tensors_in(file: Path) -> dict[str, _TensorSource]:
    """The tensors of one safetensors file (no key renaming)."""
    header, start = read_safetensors_header(file)
    return {key: _TensorSource(file, entry, start) for key, entry in header.items()}
