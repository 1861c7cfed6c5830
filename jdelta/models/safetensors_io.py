"""HF safetensors checkpoints in and out, for every model family: reading, checking, sharded
materialisation, and writing (one file or shards with an index), all family-free.

A family's ``weights`` module maps its NNX parameter paths to HF keys, shapes and layouts, and
calls these:

* :func:`checkpoint_tensors` -- every tensor of a checkpoint directory as a memory-mapped
  :class:`TensorSource` (``model.safetensors``, the shards of an index, or every file), keys
  passed through the family's ``rename``; a truncated or corrupt file fails naming it;
* :func:`check_checkpoint` -- missing / unexpected / shape-mismatched keys, one error listing them;
* :func:`materialise` -- one parameter straight onto its ``NamedSharding`` (each device reads
  only its slice of the memory map) or the default device;
* :func:`host_array` -- a (possibly multi-host sharded) parameter gathered to a host NumPy array;
* :func:`write_checkpoint` -- ``config.json`` + safetensors shards (atomic files) + the index.
"""

from __future__ import annotations

import json
import math
import os
import struct as _struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jdelta.errors import UserError

ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}

Entry = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]
"""A tensor to write: ``(key, shape, dtype, make)``; ``make()`` produces it only when written."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model config."""


class CheckpointFileError(UserError, ValueError):
    """A safetensors file that cannot be read (truncated, corrupt header); the message names it."""


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
        if dtype in ST_DTYPES and end - start != math.prod(shape) * ST_DTYPES[dtype].itemsize:
            raise CheckpointFileError(f"{file}: tensor {key!r}: byte range does not match its shape {tuple(shape)}")
        need = max(need, 8 + n + end)
    if size < need:
        raise CheckpointFileError(
            f"{file}: truncated safetensors file ({size} bytes, its header describes {need}); "
            "a half-written save or an interrupted download?")
    return header, 8 + n


class TensorSource:
    """Memory-mapped view of one tensor (numpy, zero copy until sliced)."""

    def __init__(self, file: Path, entry: dict, data_start: int):
        self.file, self.entry, self.data_start = file, entry, data_start
        if entry["dtype"] not in ST_DTYPES:
            raise CheckpointFileError(f"{file}: tensor dtype {entry['dtype']} is not supported")
        self.dtype = ST_DTYPES[entry["dtype"]]
        self.shape = tuple(entry["shape"])

    def array(self) -> np.ndarray:
        start, _ = self.entry["data_offsets"]
        if math.prod(self.shape) == 0:
            return np.zeros(self.shape, self.dtype)
        return np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.data_start + start, shape=self.shape)


def tensors_in(file: Path) -> dict[str, TensorSource]:
    """The tensors of one safetensors file (no key renaming)."""
    header, start = read_safetensors_header(file)
    return {key: TensorSource(file, entry, start) for key, entry in header.items()}


def checkpoint_files(path: str | Path) -> list[Path]:
    """``model.safetensors``, or the shards listed in ``model.safetensors.index.json``, or every
    ``*.safetensors`` file of a checkpoint directory."""
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
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: listed in {index.name} but missing")
    return files


def checkpoint_tensors(path: str | Path, rename: Callable[[str], str] | None = None) -> dict[str, TensorSource]:
    """All tensors of a checkpoint directory (:func:`checkpoint_files`), keyed by ``rename(key)``;
    two tensors under one name is an error naming both files."""
    out: dict[str, TensorSource] = {}
    for file in checkpoint_files(path):
        for key, source in tensors_in(file).items():
            name = rename(key) if rename is not None else key
            if name in out:
                raise CheckpointFileError(f"{file}: tensor {key!r} maps to {name!r}, also in {out[name].file}")
            out[name] = source
    return out


def _summarise(title: str, items: list[str], limit: int = 25) -> str:
    shown = items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown)


def check_checkpoint(path: str | Path, family: str, expected: Mapping[str, tuple[int, ...]],
                     tensors: Mapping[str, TensorSource], *, ignorable: Iterable[str] = (),
                     show: Callable[[str], str] = lambda k: k) -> None:
    """Raise :class:`CheckpointMismatchError` listing the ``expected`` keys (-> HF shapes) the
    checkpoint lacks, the tensors nobody expects (except ``ignorable``) and shape mismatches;
    keys are printed through ``show`` (e.g. the released-checkpoint spelling)."""
    ignorable = set(ignorable)
    missing = sorted(show(k) for k in expected if k not in tensors)
    unexpected = sorted(show(k) for k in tensors if k not in expected and k not in ignorable)
    mismatched = [f"{show(k)}: checkpoint {tensors[k].shape} vs expected {tuple(want)}"
                  for k, want in expected.items() if k in tensors and tensors[k].shape != tuple(want)]
    if missing or unexpected or mismatched:
        parts = [f"{path}: checkpoint does not match its config.json ({family})"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                parts.append(_summarise(title, items))
        raise CheckpointMismatchError("\n".join(parts))


def materialise(abstract: Any, source: np.ndarray, sharding: Any = None) -> jax.Array:
    """``source`` (e.g. a memory map) as a parameter of ``abstract``'s shape and dtype, on
    ``sharding`` (each device reads only its slice) or, without one, on the default device.

    The host data is always copied out of ``source`` first: on CPU, ``jax.device_put`` of an
    aligned NumPy array aliases its memory, so a parameter made from a memory map would read the
    checkpoint file itself for as long as it lives: a file rewritten in place (a save into the
    directory it was loaded from) would change the model under it, and a truncated one kills the
    process with SIGBUS."""
    target = np.dtype(abstract.dtype)
    if sharding is not None:
        return jax.make_array_from_callback(abstract.shape, sharding,
                                            lambda idx: np.array(source[idx], dtype=target, copy=True))
    return jax.device_put(np.array(source, dtype=target, copy=True))


def host_array(arr: jax.Array) -> np.ndarray:
    """A parameter on the host (all-gathered first when it spans hosts)."""
    if not arr.is_fully_addressable:
        from jax.experimental import multihost_utils

        arr = multihost_utils.process_allgather(arr, tiled=True)
    return np.asarray(jax.device_get(arr))


def write_safetensors(file: Path, tensors: Iterable[Entry]) -> None:
    """Stream tensors to a safetensors file; each is produced by its callable only when written.

    The bytes go to ``<file>.tmp``, renamed to ``file`` only once complete: an interrupted save
    never leaves a half-written file under the real name."""
    tensors = list(tensors)
    header, offset = {}, 0
    for key, shape, dtype, _ in tensors:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[key] = {"dtype": ST_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
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


def write_checkpoint(path: str | Path, hf_config: Mapping[str, Any], entries: list[Entry], *,
                     max_shard_bytes: int = 5 * 2**30) -> Path:
    """``config.json`` + the ``entries`` as ``model.safetensors`` or, past ``max_shard_bytes``,
    ``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json``. Process 0
    writes; the others still produce every tensor (they take part in the all-gathers)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], [], 0
    for e in entries:
        nbytes = math.prod(e[1]) * np.dtype(e[2]).itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += nbytes
    if current:
        shards.append(current)
    writer = jax.process_index() == 0
    if writer:
        (path / "config.json").write_text(json.dumps(dict(hf_config), indent=2) + "\n")
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        if writer:
            write_safetensors(path / name, shard)
        else:
            for *_, make in shard:
                make()
        weight_map.update({e[0]: name for e in shard})
    if len(shards) > 1 and writer:
        total = sum(math.prod(e[1]) * np.dtype(e[2]).itemsize for e in entries)
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return path
