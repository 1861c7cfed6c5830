"""On-policy distillation (reverse KL / GKD / VA-OPD / ViCuR) or SFT of a student, resumable from Orbax checkpoints.

``jdelta distill --config configs/distill_demo.yaml train.steps=20 distill.mode=reverse_kl``

ViCuR (``distill.mode=vicur``): the teacher sees ``distill.privileged`` (the records' hint, their
reference answer, or nothing extra); ``distill.cue_recovery`` gives the student the cue-recovery
module (saved in checkpoints, exported beside the plain student); without a ``teacher`` the teacher
is the student's initial weights (self-distillation).

Sections: ``run_dir``; ``method`` (on_policy | sft); ``student`` / ``teacher``: ``{path: HF checkpoint
dir, dtype, remat_policy, attention_impl}`` or ``{random: {hidden, layers, vocab, seed, logit_scale}}``;
``dtype`` (both models, unless their spec sets one); ``mesh``; ``data`` (:class:`DataConfig`);
``train``; ``optimizer`` (``total_steps`` defaults to ``train.steps``); ``checkpoint``; ``distill``
(:class:`DistillConfig`); ``sft`` (:class:`SFTConfig`); ``export``.

The run directory holds ``manifest.json`` (config, input fingerprints), ``metrics.jsonl``,
``tensorboard/`` and ``checkpoints/``. A rerun resumes from the latest checkpoint (model,
optimiser, step, RNG, data position: exact for every data source); a rerun with other settings
is refused naming the keys that differ, except ``train.steps`` (extend a run), logging,
checkpoint and export settings, the mesh, ``progress`` and the rollout engine (``distill.engine``:
``static`` or ``continuous`` batching, ``distill.engine_slots``: the same rollouts either way).
SIGTERM saves a checkpoint and exits 0.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BeforeValidator

from jdelta.config import MeshConfig, check, to_dict
from jdelta.distill.on_policy import DistillConfig
from jdelta.distill.setup import DataConfig, DistillModelSpec, Method
from jdelta.distill.sft import SFTConfig
from jdelta.distill.train_state import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """steps: train steps in all (a rerun with more extends the run). grad_accum_steps: micro-batches
    per update. compute_dtype: forward/backward dtype on fp32 master weights (None: the weights').
    max_nan_steps: stop after this many non-finite steps (None: never). log_every: metrics row
    every N steps. seed: the train state's RNG seed."""

    steps: int = 100
    grad_accum_steps: int = 1
    compute_dtype: Literal["bfloat16", "float16", "float32"] | None = None
    max_nan_steps: int | None = 10
    log_every: int = 1
    seed: int = 0

    def __post_init__(self):
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.grad_accum_steps >= 1, "grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")
        check(self.max_nan_steps is None or self.max_nan_steps >= 1, "max_nan_steps",
              f"must be >= 1, got {self.max_nan_steps}")
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """save_every: checkpoint every N steps (and at the end, and on SIGTERM). keep: most recent
    checkpoints kept. async_save (YAML also ``async``): write in a background thread."""

    save_every: int = 100
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        check(self.save_every >= 1, "save_every", f"must be >= 1, got {self.save_every}")
        check(self.keep >= 1, "keep", f"must be >= 1, got {self.keep}")


def _async_alias(section: Any) -> Any:
    """``checkpoint.async`` (the YAML key before ``async`` became a keyword clash) -> ``async_save``."""
    if isinstance(section, dict) and "async" in section:
        section = {**section, "async_save": section["async"]}
        del section["async"]
    return section


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """path: HF safetensors directory of the trained student, written when the run completes (None: none)."""

    path: str | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    """See the module docstring; progress: tqdm bar; overwrite: discard a run directory holding
    another run instead of refusing it."""

    student: DistillModelSpec
    teacher: DistillModelSpec | None = None
    run_dir: str = "runs/distill"
    method: Method = "on_policy"
    dtype: str | None = None
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    checkpoint: Annotated[CheckpointConfig, BeforeValidator(_async_alias)] = dataclasses.field(
        default_factory=CheckpointConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self):
        if self.method == "on_policy":
            check(self.teacher is not None or self.distill.mode == "vicur", "teacher",
                  "method=on_policy needs a teacher (path or random); only distill.mode=vicur runs without one "
                  "(self-distillation from the student's initial weights)")
            check(self.data.source in ("synthetic", "records"), "method",
                  f"data.source={self.data.source} holds teacher-written responses: use method=sft")
        else:
            check(self.data.source in ("sft_jsonl", "sample_output"), "method",
                  f"method=sft trains on teacher-written responses: data.source must be sft_jsonl or "
                  f"sample_output, got {self.data.source}")


RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.max_nan_steps", "checkpoint", "export", "mesh",
                     "progress", "overwrite", "run_dir", "distill.engine", "distill.engine_slots")
"""Config keys a rerun may change and still resume the run (they do not change what a step computes)."""


class Trained(NamedTuple):
    """What :func:`train` returns: the final train state and a JSON-able summary."""

    state: Any
    summary: dict[str, Any]


def input_fingerprints(cfg: Config) -> dict[str, Any]:
    """Content fingerprints of everything the run reads: data files, tokenizer files, checkpoints."""
    from jdelta.models.loading import model_identity
    from jdelta.runs import input_fingerprint

    out: dict[str, Any] = {}
    for key, path in cfg.data.input_paths().items():
        out[key] = tokenizer_fingerprint(path) if key == "data.tokenizer" else input_fingerprint(path)
    for role in ("student", "teacher"):
        spec = getattr(cfg, role)
        if spec is not None and spec.path is not None and (role == "student" or cfg.method == "on_policy"):
            out[role] = model_identity(spec.path)
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json")


def tokenizer_fingerprint(path: str) -> dict[str, Any]:
    """Content hashes of a tokenizer directory's tokenizer and chat-template files (not its weights)."""
    from jdelta.runs import content_hash

    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"data.tokenizer {p}: no tokenizer.json (expected a Hugging Face tokenizer directory)")
    return {"path": str(p.resolve()), **{name: content_hash(p / name) for name in TOKENIZER_FILES
                                         if (p / name).is_file()}}


def train(cfg: Config) -> Trained:
    """Run (or resume) the job of ``cfg`` in its run directory."""
    import contextlib

    import jax
    import jax.numpy as jnp

    from jdelta.checkpoint import Checkpointer
    from jdelta.distill.loop import run_loop
    from jdelta.distill.metrics import MetricsLogger
    from jdelta.distill.setup import build_model, check_tokenizers, prompt_source
    from jdelta.distill.step import jit_train_step, make_train_step, shard_state
    from jdelta.distill.train_state import TrainState, make_optimizer, make_schedule
    from jdelta.distributed import check_batch, run_dir
    from jdelta.models.loading import check_pair

    on_policy = cfg.method == "on_policy"
    teacher_spec = cfg.teacher if on_policy else None
    check_tokenizers(cfg.student, teacher_spec, cfg.data.tokenizer)
    inputs = input_fingerprints(cfg)
    # multi-host: process 0 holds the run directory; every process writes its part of the checkpoints
    with run_dir(cfg.run_dir, "distill", config=to_dict(cfg), inputs=inputs, overwrite=cfg.overwrite,
                 ignore=RESUMABLE_CHANGES) as run:
        mesh = cfg.mesh.make()
        check_batch(cfg.data.batch_size, key="data.batch_size")
        student, student_cfg = build_model(cfg.student, role="student", mesh=mesh, dtype=cfg.dtype)
        vicur = on_policy and cfg.distill.mode == "vicur"
        source = prompt_source(cfg.data, student_cfg, mode=cfg.distill.mode,
                               teacher_prompt=cfg.distill.teacher_prompt if on_policy else None)
        if vicur:
            from jdelta.distill.vicur import self_teacher, with_cue_recovery

            own_teacher = self_teacher(student) if teacher_spec is None else None  # before the module
            if cfg.distill.cue_recovery:
                with_cue_recovery(student, cfg.distill.cue, sink_token_id=sink_token_of(source.tokenizer))
        ocfg = cfg.optimizer
        if ocfg.total_steps is None:
            ocfg = dataclasses.replace(ocfg, total_steps=cfg.train.steps)
        state = TrainState.create(student, make_optimizer(ocfg), seed=cfg.train.seed)
        # On a mesh: sharded by the rules. Without one: committed to this process's first device, as a
        # resumed state is (Orbax restores committed arrays), so that a resumed run compiles the same
        # programs as a fresh one (uncommitted inputs lower without a sharding: another program).
        state = shard_state(state, mesh) if mesh is not None else jax.device_put(state, jax.local_devices()[0])
        if on_policy:
            from jdelta.distill.on_policy import OnPolicyDistiller, make_distill_loss

            if vicur and own_teacher is not None:
                teacher, teacher_cfg = own_teacher, student_cfg
            else:
                teacher, teacher_cfg = build_model(teacher_spec, role="teacher", mesh=mesh, dtype=cfg.dtype)
            check_pair(teacher_cfg, student_cfg)
            dcfg = cfg.distill.resolved(source.stop_ids, source.pad_id,
                                        None if source.tokenizer is None else len(source.tokenizer))
            producer = OnPolicyDistiller(state.model(), teacher, dcfg, source.batches, mesh=mesh)
            loss_fn = make_distill_loss(dcfg)
        else:
            from jdelta.distill.sft import SFTProducer, make_sft_loss

            scfg = cfg.sft.resolved(source.pad_id)
            producer = SFTProducer(state.model(), source.batches, scfg, mesh=mesh)
            loss_fn = make_sft_loss(scfg)
        compute_dtype = jnp.dtype(cfg.train.compute_dtype) if cfg.train.compute_dtype else None
        step_fn = make_train_step(loss_fn, grad_accum_steps=cfg.train.grad_accum_steps, compute_dtype=compute_dtype,
                                  schedule=make_schedule(ocfg))
        step = jit_train_step(step_fn, state, mesh)
        ck = cfg.checkpoint
        ckpt = Checkpointer(run.path / "checkpoints", save_every=ck.save_every, keep=ck.keep,
                            async_save=ck.async_save)
        try:
            with MetricsLogger(run.path) if run.writes else contextlib.nullcontext() as logger:
                result = run_loop(state, step, producer.produce, num_steps=cfg.train.steps, checkpointer=ckpt,
                                  data_iter=source.checkpointable, logger=logger,
                                  max_nan_steps=cfg.train.max_nan_steps, meta={"config": to_dict(cfg)},
                                  progress=cfg.progress, log_every=cfg.train.log_every,
                                  after_step=lambda _: run.commit())
        finally:
            ckpt.close()
        summary: dict[str, Any] = {
            "steps": int(result.state.step), "steps_run": result.steps_run, "preempted": result.preempted,
            "nan_steps": int(result.state.nan_steps), "last": result.last_metrics,
            "time_split": result.time_split(), "run_dir": str(run.path)}
        skip_report = getattr(source.checkpointable, "skip_report", None)
        if skip_report is not None:  # records the data source left out, by reason
            summary["data_skipped"] = skip_report.as_dict()
        if cfg.export.path and not result.preempted:
            from jdelta.distributed import gathered_model
            from jdelta.models.family import family_of_config

            model = gathered_model(result.state.model())  # multi-host: every process gathers, process 0 writes
            if run.writes:
                family_of_config(student_cfg).export(model, student_cfg, cfg.export.path)
            summary["export"] = str(cfg.export.path)
        run.update(counts={"steps": summary["steps"], "nan_steps": summary["nan_steps"],
                           **({"data_skipped": summary["data_skipped"]["counts"]} if "data_skipped" in summary
                              else {})},
                   complete=not result.preempted)
    return Trained(result.state, summary)


def sink_token_of(tokenizer) -> int | None:
    """The tokenizer's turn-opening id (``<|im_start|>``, ``<start_of_turn>``: the cue-recovery module's
    sink), or None without a tokenizer."""
    if tokenizer is None:
        return None
    from jdelta.models.family import prompt_special_tokens

    return prompt_special_tokens(tokenizer).sink


def run(cfg: Config) -> int:
    from jdelta.distill.loop import NonFiniteLossError

    try:
        s = train(cfg).summary
    except NonFiniteLossError as e:
        print(f"jdelta distill: error: {e}", file=sys.stderr)
        return 1
    last = s["last"]
    status = "preempted (checkpoint saved)" if s["preempted"] else "done"
    print(f"distill {status}: step {s['steps']} ({s['steps_run']} this run), loss {last.get('loss', float('nan')):.4f}, "
          f"{s['nan_steps']} non-finite steps skipped; time split: {s['time_split']}; -> {s['run_dir']}"
          + (f"; exported {s['export']}" if s.get("export") else ""), file=sys.stderr)
    skipped = s.get("data_skipped") or {}
    if skipped.get("counts"):
        print(f"distill: data records skipped: {skipped['counts']} (e.g. {skipped['examples']})", file=sys.stderr)
    return 0
