"""Loading models from local checkpoints, their identities, and the checks a teacher/student pair must pass.

:func:`model_identity` fingerprints a checkpoint (config hash + weights hash) for run manifests;
:func:`load_model` reads an HF Qwen3-VL directory (sharded when given a mesh) and keeps it per
process so a score and a re-score against one teacher load it once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def file_sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read() if limit is None else f.read(limit))
    return h.hexdigest()


FULL_HASH_BYTES = 1 << 30
"""Checkpoints up to this size get a full sha256 of their weights in the model identity."""


def model_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Path, sha256 of ``config.json`` and a weights fingerprint (full sha256 up to
    :data:`FULL_HASH_BYTES`; beyond, names + sizes + first MiB + mtimes)."""
    p = Path(path)
    ident: dict[str, Any] = {"path": str(p.resolve())}
    cfg = p / "config.json"
    ident["config_sha256"] = file_sha256(cfg) if cfg.is_file() else None
    files = sorted(p.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    full = total <= FULL_HASH_BYTES  # small checkpoints: hash everything; large: header + size + mtime
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f.name.encode())
        h.update(str(st.st_size).encode())
        if full:
            h.update(file_sha256(f).encode())
        else:
            h.update(file_sha256(f, limit=1 << 20).encode())
            h.update(str(st.st_mtime_ns).encode())
    ident["weights_bytes"] = total
    ident["weights_fingerprint"] = ("sha256:" if full else "header+mtime:") + h.hexdigest()
    return ident


def parse_mesh(spec: str | None):
    """``"fsdp=4,tensor=2"`` -> a mesh (``None`` for no mesh). Prefer :class:`jdelta.config.MeshConfig`."""
    if not spec:
        return None
    from jdelta.sharding import make_mesh

    shape = {}
    for part in spec.split(","):
        if "=" not in part:
            raise ValueError(f"mesh {spec!r}: expected axis=size pairs like fsdp=4,tensor=2")
        k, v = part.split("=", 1)
        shape[k.strip()] = int(v)
    return make_mesh(shape)


_MODEL_CACHE: dict[tuple, tuple] = {}

def load_model(path: str | os.PathLike, mesh=None, dtype: str | None = None, *, cache: bool = True):
    """``(model, config)`` from an HF Qwen3-VL directory.

    Loaded models are kept per (path, weights fingerprint, mesh, dtype) in this process, so a
    score and a re-score against the same teacher load it (and compile its sampler) once.
    """
    from jdelta.models.qwen3_vl.weights import load_hf_checkpoint

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: no config.json (expected a Hugging Face Qwen3-VL checkpoint directory)")
    if not cache:
        return load_hf_checkpoint(p, mesh=mesh, dtype=dtype)
    ident = model_identity(p)
    key = (ident["path"], ident["config_sha256"], ident["weights_fingerprint"], id(mesh), dtype)
    if key not in _MODEL_CACHE:
        if len(_MODEL_CACHE) >= 4:
            _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = load_hf_checkpoint(p, mesh=mesh, dtype=dtype)
    return _MODEL_CACHE[key]


def tokenizer_fingerprint(tok) -> str:
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def image_config_for(model_config, max_pixels: int | None = None, min_pixels: int | None = None):
    """The pipeline's image settings matching a model's vision patch layout."""
    from jdelta.data.image_processor import ImageConfig

    vis = model_config.vision
    kw: dict[str, Any] = dict(
        patch_size=vis.patch_size, merge_size=vis.spatial_merge_size, temporal_patch_size=vis.temporal_patch_size
    )
    if max_pixels is not None:
        kw["max_pixels"] = int(max_pixels)
    if min_pixels is not None:
        kw["min_pixels"] = int(min_pixels)
    elif max_pixels is not None:
        kw["min_pixels"] = min(ImageConfig().min_pixels, int(max_pixels))
    return ImageConfig(**kw)


def check_pair(teacher_config, student_config) -> None:
    """The two models must read the same prompt tokens and image patches."""
    problems = []
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        a, b = getattr(teacher_config, name), getattr(student_config, name)
        if a != b:
            problems.append(f"{name}: teacher {a} vs student {b}")
    for name in ("patch_size", "spatial_merge_size", "temporal_patch_size"):
        a, b = getattr(teacher_config.vision, name), getattr(student_config.vision, name)
        if a != b:
            problems.append(f"vision.{name}: teacher {a} vs student {b}")
    if problems:
        raise ValueError("teacher and student disagree on the prompt layout: " + "; ".join(problems))
