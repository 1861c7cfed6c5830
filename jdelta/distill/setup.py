"""What a distillation run is made of, built from its config: the models and the prompt stream.

* :class:`DistillModelSpec`: a :class:`jdelta.config.ModelSpec` (HF checkpoint ``path``) or, for
  smoke tests and the demo config, ``random``: a tiny random Qwen3-VL (:class:`RandomModelConfig`).
  :func:`build_model` makes either; a checkpoint may be of any family (``config.json``'s ``model_type``).
* :class:`DataConfig`: where prompt (or SFT) batches come from; :func:`prompt_source` opens it as a
  :class:`PromptSource` whose iterator is checkpointable for every source, so a resumed run sees
  the batches an uninterrupted one would have.
* :func:`check_tokenizers`: teacher, student and data tokenizers compared by content; teacher and
  student of different vocabularies (e.g. across families) refused in one line naming both.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal, NamedTuple

from jdelta.config import ModelSpec, check
from jdelta.data.pipeline import PipelineConfig

log = logging.getLogger(__name__)

Source = Literal["synthetic", "records", "sft_jsonl", "sample_output"]
Method = Literal["on_policy", "sft"]


@dataclasses.dataclass(frozen=True)
class RandomModelConfig:
    """A tiny randomly initialised Qwen3-VL (:func:`jdelta.testing.tiny_config`): ``vocab`` ids, the
    last 4 the vision specials. ``logit_scale`` multiplies the LM head (a peaked teacher)."""

    hidden: int = 32
    layers: int = 1
    vocab: int = 64
    seed: int = 0
    logit_scale: float = 1.0

    def __post_init__(self):
        check(self.hidden >= 8 and self.hidden % 8 == 0, "hidden", f"must be a positive multiple of 8, got {self.hidden}")
        check(self.layers >= 1, "layers", f"must be >= 1, got {self.layers}")
        check(self.vocab >= 8, "vocab", f"must be >= 8 (4 ids are vision specials), got {self.vocab}")
        check(self.logit_scale > 0, "logit_scale", f"must be > 0, got {self.logit_scale}")


@dataclasses.dataclass(frozen=True)
class DistillModelSpec(ModelSpec):
    """A student or teacher: an HF checkpoint (``path`` and the :class:`~jdelta.config.ModelSpec`
    settings) or ``random``, a tiny random model. Exactly one of the two."""

    random: RandomModelConfig | None = None

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        check((self.path is None) != (self.random is None), "path",
              "give either path (an HF checkpoint directory) or random (a tiny random model), not "
              + ("both" if self.path is not None else "neither"))
        if self.random is not None:
            check(self.remat_policy is None and self.attention_impl is None, "random",
                  "a random model takes no remat_policy / attention_impl")


def build_model(spec: DistillModelSpec, *, role: str, mesh=None, dtype: str | None = None):
    """``(model, config)`` for ``spec``; ``dtype`` applies when the spec sets none (checkpoints only)."""
    if spec.random is not None:
        from jdelta.testing import random_model, tiny_config

        r = spec.random
        cfg = tiny_config(hidden=r.hidden, layers=r.layers, vocab=r.vocab)
        return random_model(cfg, r.seed, logit_scale=r.logit_scale), cfg
    from jdelta.models.loading import load_model

    if spec.dtype is None and dtype is not None:
        spec = dataclasses.replace(spec, dtype=dtype)
    return load_model(spec, mesh, role=role)


# ----------------------------------------------------------------------------- data


STAGE_SET = ("batch_size", "num_epochs", "drop_remainder", "with_pixelated", "with_hint", "privileged")
"""PipelineConfig fields the distill stage sets itself (data.batch_size, endless epochs, whole
batches, pixelated views for va_opd, ViCuR's privileged teacher prompts from distill.privileged)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where a run's batches come from.

    source: ``synthetic`` (random prompts for the student's vocabulary; ``with_image``,
    ``stop_token_ids``, ``pad_id``), ``records`` (prompt records at ``path`` through the prompt
    pipeline with ``tokenizer``), ``sft_jsonl`` (pre-tokenised ``prompt_ids``/``response_ids`` at
    ``path``; method sft; ``pad_id``) or ``sample_output`` (``jdelta sample`` JSONL at ``path`` joined
    to the ``prompts`` records it was sampled from; method sft; ``drop_truncated`` leaves out
    length-capped samples; ``response``: train on the sampled ``token_ids`` as they are, or on the
    sampled ``text`` tokenised by ``tokenizer`` (plus its end-of-turn id after a stopped sample): SFT
    of a student of another family / tokenizer on the teacher's outputs).
    batch_size: prompts per step. seed: shuffle / stream seed.
    pipeline: the prompt pipeline (records, sample_output); its image settings default to the
    student's patch layout, and batch_size / num_epochs / drop_remainder / with_pixelated are set
    by the stage. The pipeline settings must match the sampler's for sample_output.
    """

    source: Source = "synthetic"
    path: str | None = None
    prompts: str | None = None
    tokenizer: str | None = None
    batch_size: int = 4
    seed: int = 0
    with_image: bool = True
    stop_token_ids: tuple[int, ...] = (3,)
    pad_id: int = 0
    drop_truncated: bool = False
    response: Literal["token_ids", "text"] = "token_ids"
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.pad_id >= 0, "pad_id", f"must be >= 0, got {self.pad_id}")
        if self.source != "synthetic":
            check(self.path is not None, "path", f"data.source={self.source} needs data.path")
        if self.source in ("records", "sample_output"):
            check(self.tokenizer is not None, "tokenizer", f"data.source={self.source} needs data.tokenizer")
        if self.source == "sample_output":
            check(self.prompts is not None, "prompts",
                  "data.source=sample_output needs data.prompts (the records it was sampled from)")
        default = PipelineConfig()
        for name in STAGE_SET:
            check(getattr(self.pipeline, name) == getattr(default, name), "pipeline",
                  f"{name} is set by the distill stage (data.batch_size, endless epochs, whole batches, "
                  "pixelated views for va_opd, privileged teacher prompts from distill.privileged); leave it out")

    def input_paths(self) -> dict[str, str]:
        """The files this source reads (for a run directory's content fingerprints)."""
        if self.source == "synthetic":
            return {}
        return {f"data.{k}": getattr(self, k) for k in ("path", "prompts", "tokenizer") if getattr(self, k)}


class PromptSource(NamedTuple):
    """An opened data source.

    batches: endless iterator of batches (prompts; SFT batches add ``completion``).
    checkpointable: the same iterator when it has ``get_state``/``set_state`` (every source here).
    stop_ids / pad_id: the source's end-of-completion ids and padding id.
    tokenizer: the data tokenizer (None for synthetic and sft_jsonl).
    """

    batches: Any
    checkpointable: Any
    stop_ids: tuple[int, ...]
    pad_id: int
    tokenizer: Any = None


def prompt_source(data: DataConfig, student_config, *, mode: str = "reverse_kl",
                  teacher_prompt: Literal["hint", "answer"] | None = None) -> PromptSource:
    """Open ``data`` (``mode``: the distill mode; ``va_opd`` adds pixelated views of the images;
    ``teacher_prompt``: ViCuR's privileged teacher prompts, the record's hint or reference answer;
    records without one are skipped and counted, or an error with ``data.pipeline.on_error=raise``)."""
    if teacher_prompt is not None and data.source != "records":
        raise ValueError(f"distill.privileged={teacher_prompt} needs prompt records (data.source=records, whose "
                         f"records carry cues.hint / answer), not data.source={data.source}")
    if data.source == "synthetic":
        from jdelta.distill.synthetic import SyntheticPromptIterator
        from jdelta.models.family import family_of_config

        if family_of_config(student_config).name != "qwen3_vl":
            raise ValueError(f"data.source=synthetic makes Qwen3-VL prompts (M-RoPE, patch rows); the student is "
                             f"{family_of_config(student_config).name}: use data.source=records (prompt records "
                             "with data.tokenizer)")

        it = SyntheticPromptIterator(student_config, batch=data.batch_size, seed=data.seed, with_image=data.with_image)
        return PromptSource(it, it, tuple(data.stop_token_ids), data.pad_id)
    if data.source == "sft_jsonl":
        from jdelta.distill.sft import read_sft_records, sft_batches

        it = sft_batches(read_sft_records(data.path), batch_size=data.batch_size, seed=data.seed, pad_id=data.pad_id)
        return PromptSource(it, it, (), data.pad_id)
    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.models.family import prompt_special_tokens

    tok = load_tokenizer(data.tokenizer)
    sp = prompt_special_tokens(tok)
    pcfg = pipeline_for(data, student_config, with_pixelated=mode == "va_opd", teacher_prompt=teacher_prompt)
    if data.source == "sample_output":
        from jdelta.distill.sft import sample_sft_batches

        it = sample_sft_batches(data.path, data.prompts, tokenizer=tok, config=pcfg, seed=data.seed,
                                drop_truncated=data.drop_truncated, response=data.response)
    else:
        from jdelta.data.records import open_records
        from jdelta.distributed import prompt_batches

        # multi-host: each process reads its slice of every global batch, all train on the same batches
        it = prompt_batches(open_records(data.path), tokenizer=tok, seed=data.seed, config=pcfg)
    return PromptSource(it, it, tuple(sp.stop_ids), int(sp.pad), tok)


def pipeline_for(data: DataConfig, student_config, *, with_pixelated: bool,
                 teacher_prompt: Literal["hint", "answer"] | None = None) -> PipelineConfig:
    """``data.pipeline`` for an endless stream of whole ``data.batch_size`` batches; the prompt
    format is the student's family's (``family``), the image settings default to the student's
    (Qwen3-VL: patch layout, unless set; Gemma 3: image size and soft tokens per image);
    ``teacher_prompt``: also the privileged teacher prompts (``with_hint``, ``privileged``)."""
    from jdelta.data.image_processor import ImageConfig
    from jdelta.models.family import family_of_config
    from jdelta.models.loading import with_model_images

    pcfg = dataclasses.replace(data.pipeline, batch_size=data.batch_size, num_epochs=None, drop_remainder=True,
                               with_pixelated=with_pixelated, with_hint=teacher_prompt is not None,
                               privileged=teacher_prompt or "hint")
    family = family_of_config(student_config).name
    if family != "qwen3_vl" or pcfg.image == ImageConfig():
        pcfg = with_model_images(pcfg, student_config)
    return pcfg


# ----------------------------------------------------------------------------- tokenizers


def check_tokenizers(student: DistillModelSpec, teacher: DistillModelSpec | None,
                     data_tokenizer: str | None = None) -> None:
    """Raise (one line naming both directories) unless the checkpoints' tokenizers, and the data
    tokenizer directory if given, have the same vocabulary and special tokens. Random models and
    checkpoint directories without ``tokenizer.json`` are not compared (the LM head sizes still are).
    A teacher whose family or vocabulary differs from the student's is refused first, in one line
    naming both vocabularies (:func:`jdelta.models.loading.check_cross_family`)."""
    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.models.loading import check_same_tokenizer

    if teacher is not None:
        check_teacher_vocabulary(student, teacher)

    found: list[tuple[str, Any]] = []
    for role, spec in (("student", student), ("teacher", teacher)):
        if spec is not None and spec.path is not None:
            if (Path(spec.path) / "tokenizer.json").is_file():
                found.append((f"{role} {spec.path}", load_tokenizer(spec.path)))
            else:
                log.warning("%s %s holds no tokenizer.json: its tokenizer is not compared", role, spec.path)
    if data_tokenizer is not None and all(Path(data_tokenizer) != Path(spec.path) for spec in (student, teacher)
                                          if spec is not None and spec.path is not None):
        found.append((f"data.tokenizer {data_tokenizer}", load_tokenizer(data_tokenizer)))
    for (name_a, a), (name_b, b) in zip(found, found[1:], strict=False):
        check_same_tokenizer(a, b, names=(name_a, name_b))


def _spec_config(spec: DistillModelSpec):
    """The model config a spec stands for (read from ``config.json``, or the random model's)."""
    if spec.random is not None:
        from jdelta.testing import tiny_config

        return tiny_config(hidden=spec.random.hidden, layers=spec.random.layers, vocab=spec.random.vocab)
    from jdelta.models.family import family_of_checkpoint
    from jdelta.models.loading import check_checkpoint_dir

    path = check_checkpoint_dir(spec.path, "model")
    return family_of_checkpoint(path).config_class.from_pretrained(path)


def check_teacher_vocabulary(student: DistillModelSpec, teacher: DistillModelSpec) -> None:
    """Refuse an on-policy teacher whose family or vocabulary differs from the student's, before
    anything is loaded: one line with both vocabularies' sizes and tokenizer fingerprints."""
    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.models.loading import check_cross_family

    def tok(spec):
        ok = spec.path is not None and (Path(spec.path) / "tokenizer.json").is_file()
        return load_tokenizer(spec.path) if ok else None

    try:
        configs = _spec_config(teacher), _spec_config(student)
    except (OSError, ValueError):  # an unreadable checkpoint: loading it reports that, naming it
        return
    check_cross_family(*configs, tok(teacher), tok(student))
