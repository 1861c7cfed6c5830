"""Loading models from local checkpoints, their identities, and the checks a teacher/student pair must pass.

* :func:`model_identity` fingerprints a checkpoint (config hash + weights hash) for run manifests;
* :func:`load_model` reads an HF checkpoint directory of any registered family (its
  ``config.json``'s ``model_type``; :mod:`jdelta.models.family`), sharded when given a mesh, no caching;
* :class:`ModelSession` holds the models one piece of work loads and the samplers compiled for
  them: ``score``, ``eval``, the demo and the synthesis scorer pass one around so a teacher used
  twice is loaded (and its sampler compiled) once, and dropping the session frees them;
* :func:`tokenizer_fingerprint` / :func:`check_same_tokenizer` compare tokenizers by content
  (vocabulary and special tokens), :func:`check_pair` the prompt layout of two model configs,
  :func:`check_cross_family` the one-line refusal of per-token distillation across vocabularies;
* :func:`image_config_for` / :func:`pipeline_config_for`: the prompt pipeline's settings matched to
  a model's family and vision layout (one ``min_pixels`` rule for every Qwen3-VL stage).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jdelta.config import ModelSpec, PromptConfig
from jdelta.errors import UserError

if TYPE_CHECKING:
    from jdelta.data.pipeline import PipelineConfig
    from jdelta.sampling import Sampler


class ModelLoadError(UserError, ValueError):
    """A checkpoint directory that cannot be loaded; the message names it."""


def file_sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if limit is None:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        else:
            h.update(f.read(limit))
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


def check_checkpoint_dir(path: str | os.PathLike, role: str = "model") -> Path:
    """``path`` as a Path if it holds ``config.json``; else ``FileNotFoundError`` naming it and ``role``."""
    if path is None:
        raise ModelLoadError(f"{role}: no checkpoint directory given ({role}.path)")
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{role} {p}: no config.json (expected a Hugging Face checkpoint directory of "
                                "Qwen3-VL or Gemma 3)")
    return p


def _spec(spec: ModelSpec | str | os.PathLike) -> ModelSpec:
    return spec if isinstance(spec, ModelSpec) else ModelSpec(path=str(spec))


def load_model(spec: ModelSpec | str | os.PathLike, mesh=None, *, role: str = "model"):
    """``(model, config)`` from an HF checkpoint directory of any registered family, chosen by its
    ``config.json``'s ``model_type`` (``spec``: a :class:`ModelSpec` or a path).

    A checkpoint that cannot be read (truncated safetensors, shapes that do not match its
    ``config.json``, an unsupported ``model_type``) raises :class:`ModelLoadError` naming the directory.
    """
    from jdelta.models.family import family_of_checkpoint

    spec = _spec(spec)
    p = check_checkpoint_dir(spec.path, role)
    overrides = {k: getattr(spec, k) for k in ("remat_policy", "attention_impl") if getattr(spec, k) is not None}
    try:
        return family_of_checkpoint(p).load(p, mesh=mesh, dtype=spec.dtype, **overrides)
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{role} {p}: cannot load the checkpoint ({type(e).__name__}: {e})") from e
    except Exception as e:  # safetensors' own errors (e.g. a half-written file) are plain Exceptions
        if type(e).__module__.split(".")[0].startswith("safetensors"):
            raise ModelLoadError(f"{role} {p}: cannot read its safetensors ({e})") from e
        raise


class ModelSession:
    """The models one piece of work loads, and the samplers compiled for them.

    ``session.model(spec)`` loads a checkpoint once per (identity, dtype, model settings);
    ``session.sampler(model, pipeline=..., pad_id=...)`` keeps one :class:`~jdelta.sampling.Sampler`
    per (model, pad id, batch shape), so its compiled programs are reused. All models of a session
    share its ``mesh`` (None: one device). Nothing is kept beyond the session's lifetime.
    """

    def __init__(self, mesh=None):
        self.mesh = mesh
        self._models: dict[tuple, tuple[Any, Any]] = {}
        self._samplers: dict[tuple, Sampler] = {}

    def load(self, spec: ModelSpec | str | os.PathLike, *, role: str = "model") -> tuple[Any, Any]:
        """``(model, config)`` for ``spec``, loaded on first use."""
        spec = _spec(spec)
        p = check_checkpoint_dir(spec.path, role)
        ident = model_identity(p)
        key = (ident["path"], ident["config_sha256"], ident["weights_fingerprint"], spec.dtype, spec.remat_policy,
               spec.attention_impl)
        if key not in self._models:
            self._models[key] = load_model(spec, self.mesh, role=role)
        return self._models[key]

    def model(self, spec: ModelSpec | str | os.PathLike, *, role: str = "model"):
        """The loaded model for ``spec`` (see :meth:`load`)."""
        return self.load(spec, role=role)[0]

    def sampler(self, model, *, pipeline: PipelineConfig, pad_id: int) -> Sampler:
        """The sampler of ``model`` for batches of the prompt pipeline ``pipeline`` (its buckets)."""
        from jdelta.completions import make_sampler

        key = (id(model), int(pad_id), int(pipeline.batch_size), tuple(pipeline.seq_buckets),
               tuple(pipeline.patch_buckets), tuple(pipeline.image_buckets))
        hit = self._samplers.get(key)
        if hit is None or hit.model is not model:
            hit = self._samplers[key] = make_sampler(model, pipeline=pipeline, pad_id=pad_id, mesh=self.mesh)
        return hit


# ----------------------------------------------------------------------------- tokenizers


def tokenizer_content(tok) -> dict[str, Any]:
    """What makes two tokenizers interchangeable: the vocabulary (token -> id, added tokens
    included) and the special tokens (which added tokens are special, and the named ones)."""
    added = getattr(tok, "added_tokens_decoder", None) or {}
    special_map = getattr(tok, "special_tokens_map", None) or {}
    return {
        "vocab": sorted(tok.get_vocab().items()),
        "special": sorted(int(i) for i, t in added.items() if getattr(t, "special", False)),
        "named": sorted((k, json.dumps(v, sort_keys=True)) for k, v in special_map.items()),
    }


def tokenizer_fingerprint(tok) -> str:
    """sha256 of :func:`tokenizer_content` (vocabulary + special tokens)."""
    return hashlib.sha256(json.dumps(tokenizer_content(tok), sort_keys=True).encode()).hexdigest()


def check_same_tokenizer(a, b, names: tuple[str, str] = ("teacher", "student")) -> None:
    """Raise :class:`~jdelta.errors.UserError` unless tokenizers ``a`` and ``b`` have the same
    vocabulary and special tokens; the message counts the ids that differ and shows the first."""
    if a is b:
        return
    ca, cb = tokenizer_content(a), tokenizer_content(b)
    if ca == cb:
        return
    problems = []
    va, vb = dict(ca["vocab"]), dict(cb["vocab"])
    ia, ib = {i: t for t, i in va.items()}, {i: t for t, i in vb.items()}
    ids = sorted(set(ia) | set(ib))
    diff = [i for i in ids if ia.get(i) != ib.get(i)]
    if len(va) != len(vb):
        problems.append(f"{len(va)} vs {len(vb)} tokens")
    if diff:
        i = diff[0]
        problems.append(f"{len(diff)} of {len(ids)} token ids map to different tokens (first: id {i} is "
                        f"{ia.get(i)!r} vs {ib.get(i)!r})")
    if ca["special"] != cb["special"]:
        problems.append(f"special token ids {ca['special'][:8]} vs {cb['special'][:8]}")
    if ca["named"] != cb["named"]:
        na, nb = dict(ca["named"]), dict(cb["named"])
        keys = sorted(k for k in set(na) | set(nb) if na.get(k) != nb.get(k))
        problems.append(f"special tokens {', '.join(keys)} differ")
    raise UserError(f"the {names[0]} and {names[1]} tokenizers differ ({'; '.join(problems)}); both models must "
                    "share one tokenizer")


# ----------------------------------------------------------------------------- prompt layout


def image_config_for(model_config, max_pixels: int | None = None, min_pixels: int | None = None):
    """The pipeline's Qwen3-VL image settings matching a Qwen3-VL model's vision patch layout.

    ``max_pixels`` below the default floor lowers the floor with it (so a small pixel budget is
    honoured); an explicit ``min_pixels`` wins.
    """
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


def pipeline_config_for(model_config, prompt: PromptConfig, *, batch_size: int, **pipeline: Any) -> PipelineConfig:
    """The prompt pipeline's settings for sampling ``model_config`` (any family) with ``prompt``
    (records that fail are skipped and counted); ``pipeline``: other
    :class:`~jdelta.data.pipeline.PipelineConfig` fields."""
    from jdelta.data.pipeline import PipelineConfig

    cfg = PipelineConfig(batch_size=int(batch_size), system=prompt.system, enable_thinking=prompt.enable_thinking,
                         **{"on_error": "skip", **pipeline})
    return with_model_images(cfg, model_config, prompt)


def with_model_images(cfg: PipelineConfig, model_config, prompt: PromptConfig | None = None) -> PipelineConfig:
    """``cfg`` with ``family`` and the family's image settings taken from ``model_config``
    (Qwen3-VL: patch layout and ``prompt``'s pixel budget; Gemma 3: image size, soft tokens per image)."""
    import dataclasses

    from jdelta.models.family import family_of_config

    family = family_of_config(model_config)
    if family.name == "gemma3":
        g = cfg.gemma3
        image = dataclasses.replace(g.image, size=int(model_config.vision.image_size))
        return dataclasses.replace(cfg, family="gemma3", gemma3=dataclasses.replace(
            g, image=image, mm_tokens_per_image=int(model_config.mm_tokens_per_image)))
    image = image_config_for(model_config, None if prompt is None else prompt.max_pixels,
                             None if prompt is None else prompt.min_pixels)
    return dataclasses.replace(cfg, family=family.name, image=image)


def check_pair(teacher_config, student_config) -> None:
    """The two models must read the same prompt tokens and image pixels (same family, same
    vision placeholder ids and image layout)."""
    from jdelta.models.family import family_of_config

    ft, fs = family_of_config(teacher_config).name, family_of_config(student_config).name
    if ft != fs:
        raise UserError(f"teacher and student are of different model families (teacher {ft}, student {fs}); "
                        "both must read the same prompts")
    if ft == "gemma3":
        problems = [f"{n}: teacher {getattr(teacher_config, n)} vs student {getattr(student_config, n)}"
                    for n in ("image_token_id", "boi_token_id", "eoi_token_id", "mm_tokens_per_image")
                    if getattr(teacher_config, n) != getattr(student_config, n)]
        if teacher_config.vision.image_size != student_config.vision.image_size:
            problems.append(f"vision.image_size: teacher {teacher_config.vision.image_size} vs student "
                            f"{student_config.vision.image_size}")
        if problems:
            raise UserError("teacher and student disagree on the prompt layout: " + "; ".join(problems))
        return
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
        raise UserError("teacher and student disagree on the prompt layout: " + "; ".join(problems))


def vocabulary_line(role: str, vocab_size: int, tokenizer=None) -> str:
    """``"teacher: 151,936 ids, tokenizer sha256 1a2b3c4d5e6f"`` (fingerprint: :func:`tokenizer_fingerprint`)."""
    fp = "no tokenizer" if tokenizer is None else f"tokenizer {len(tokenizer):,} tokens sha256 " \
        f"{tokenizer_fingerprint(tokenizer)[:12]}"
    return f"{role} vocabulary {vocab_size:,} ids ({fp})"


def check_cross_family(teacher_config, student_config, teacher_tokenizer=None, student_tokenizer=None) -> None:
    """Refuse per-token (on-policy) distillation between models of different families or
    vocabulary sizes: one line naming both vocabularies (sizes, tokenizer sizes and fingerprints). No cross-tokenizer method is
    implemented; off-policy SFT on the teacher's text is the way across families."""
    from jdelta.models.family import family_of_config

    ft, fs = family_of_config(teacher_config).name, family_of_config(student_config).name
    vt, vs = int(teacher_config.text.vocab_size), int(student_config.text.vocab_size)
    if ft == fs and vt == vs:  # same-sized vocabularies of one family: check_same_tokenizer compares them
        return
    raise UserError(
        f"on-policy distillation needs one vocabulary, but the {vocabulary_line(f'teacher ({ft})', vt, teacher_tokenizer)}"
        f" differs from the {vocabulary_line(f'student ({fs})', vs, student_tokenizer)}; no cross-tokenizer method "
        "is implemented: use method=sft on the teacher's sampled text (data.source=sample_output, data.response=text)")
