"""``jdelta distill --config configs/X.yaml key=value ...``: on-policy distillation or SFT.

Config sections (see ``configs/distill_demo.yaml``)::

    run_dir: where metrics.jsonl, tensorboard/, checkpoints/ and the export go
    method: on_policy | sft
    student / teacher: {path: HF checkpoint dir, remat_policy, attention_impl}
                       or {random: {hidden, layers, vocab, seed, logit_scale}}
    dtype: checkpoint compute dtype override (e.g. bfloat16), optional
    mesh: {data, fsdp, tensor} (default: one device)
    data: {source: synthetic | records | sft_jsonl | sample_output, path, tokenizer, batch_size, seed,
           pipeline: {...}}; sample_output (method=sft): path = `jdelta sample` JSONL, prompts = the
           prompt records it was sampled from, drop_truncated; the pipeline settings (image
           min/max pixels, enable_thinking, system) must match the sampler's
    train: {steps, grad_accum_steps, compute_dtype, max_nan_steps, log_every, seed}
    optimizer: OptimizerConfig fields (total_steps defaults to train.steps)
    checkpoint: {save_every, keep, async}
    distill: DistillConfig fields;  sft: SFTConfig fields
    export: {path}: HF safetensors of the trained student (written at the end)

A run resumes from ``run_dir/checkpoints`` when one exists (model, optimiser, step, RNG,
data-iterator position). SIGTERM saves a checkpoint and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SECTIONS = ("run_dir", "method", "student", "teacher", "dtype", "mesh", "data", "train", "optimizer", "checkpoint",
            "distill", "sft", "export")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (see configs/distill_demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=10")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def _load_model(spec: dict[str, Any], role: str, mesh, dtype: str | None):
    from jdelta.distill.synthetic import random_model, tiny_config

    if spec.get("path"):
        from jdelta.models.qwen3_vl.weights import load_hf_checkpoint

        kwargs: dict[str, Any] = {"mesh": mesh}
        if dtype:
            kwargs["dtype"] = dtype
        for key in ("remat_policy", "attention_impl"):  # jdelta-side model settings
            if spec.get(key):
                kwargs[key] = spec[key]
        return load_hf_checkpoint(spec["path"], **kwargs)
    if spec.get("random"):
        r = dict(spec["random"])
        cfg = tiny_config(hidden=int(r.get("hidden", 32)), layers=int(r.get("layers", 1)),
                          vocab=int(r.get("vocab", 64)))
        return random_model(cfg, int(r.get("seed", 0)), logit_scale=float(r.get("logit_scale", 1.0))), cfg
    raise ValueError(f"config section {role!r} needs 'path' (HF checkpoint) or 'random' (tiny random model)")


def _prompt_source(data: dict[str, Any], student_cfg, method: str, mode: str):
    """(iterator, checkpointable grain iterator or None, stop ids, pad id)."""
    source = data.get("source", "synthetic")
    batch_size = int(data.get("batch_size", 4))
    seed = int(data.get("seed", 0))
    if source == "synthetic":
        from jdelta.distill.synthetic import random_prompts

        it = random_prompts(student_cfg, batch=batch_size, seed=seed, with_image=bool(data.get("with_image", True)))
        return it, None, tuple(data.get("stop_token_ids", (3,))), int(data.get("pad_id", 0))
    if source in ("records", "sample_output"):
        from jdelta.data.pipeline import config_from_dict, make_prompt_batches
        from jdelta.data.records import open_records
        from jdelta.data.tokenizer import SpecialTokens, load_tokenizer
        from jdelta.models.loading import image_config_for as _image_config

        if not data.get("path") or not data.get("tokenizer"):
            raise ValueError(f"data.source={source} needs data.path and data.tokenizer")
        tok = load_tokenizer(data["tokenizer"])
        sp = SpecialTokens.from_tokenizer(tok)
        pipe = dict(data.get("pipeline") or {})
        pipe.update(batch_size=batch_size, num_epochs=None, drop_remainder=True, with_pixelated=mode == "va_opd")
        pcfg = config_from_dict(pipe)
        if "image" not in (data.get("pipeline") or {}):
            import dataclasses

            pcfg = dataclasses.replace(pcfg, image=_image_config(student_cfg))
        if source == "sample_output":
            if method != "sft":
                raise ValueError("data.source=sample_output holds teacher-written responses: use method=sft")
            if not data.get("prompts"):
                raise ValueError("data.source=sample_output needs data.prompts (the records it was sampled from)")
            from jdelta.distill.sft import sample_sft_batches

            it = sample_sft_batches(data["path"], data["prompts"], tokenizer=tok, config=pcfg, seed=seed,
                                    drop_truncated=bool(data.get("drop_truncated", False)))
        else:
            it = make_prompt_batches(open_records(data["path"]), tokenizer=tok, seed=seed, config=pcfg)
        return it, it, tuple(sp.stop_ids), int(sp.pad)
    if source == "sft_jsonl":
        if method != "sft":
            raise ValueError("data.source=sft_jsonl holds teacher-written responses: use method=sft")
        from jdelta.distill.sft import read_sft_records, sft_batches

        if not data.get("path"):
            raise ValueError("data.source=sft_jsonl needs data.path")
        pad = int(data.get("pad_id", 0))
        it = sft_batches(read_sft_records(data["path"]), batch_size=batch_size, seed=seed, pad_id=pad)
        return it, it, (), pad
    raise ValueError(f"data.source={source!r}; expected synthetic, records, sft_jsonl or sample_output")


def run_distill(cfg: dict[str, Any], *, progress: bool = True) -> dict[str, Any]:
    """Run a distillation/SFT job from a config dict; returns a summary."""
    import jax
    import jax.numpy as jnp

    from jdelta.checkpoint import Checkpointer
    from jdelta.distill.loop import run_loop
    from jdelta.distill.metrics import MetricsLogger
    from jdelta.distill.on_policy import DistillConfig, OnPolicyDistiller, make_distill_loss
    from jdelta.distill.sft import SFTConfig, SFTProducer, make_sft_loss
    from jdelta.distill.step import jit_train_step, make_train_step, shard_state
    from jdelta.distill.train_state import OptimizerConfig, TrainState, make_optimizer, make_schedule
    from jdelta.sharding import make_mesh

    unknown = set(cfg) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown config sections {sorted(unknown)}; known: {list(SECTIONS)}")
    method = cfg.get("method", "on_policy")
    if method not in ("on_policy", "sft"):
        raise ValueError(f"method={method!r}; expected on_policy or sft")
    run_dir = Path(cfg.get("run_dir", "runs/distill"))
    train = dict(cfg.get("train") or {})
    steps = int(train.get("steps", 100))
    mesh = make_mesh(cfg["mesh"]) if cfg.get("mesh") else None
    dtype = cfg.get("dtype")

    student, student_cfg = _load_model(dict(cfg.get("student") or {}), "student", mesh, dtype)
    dcfg_dict = dict(cfg.get("distill") or {})
    mode = dcfg_dict.get("mode", "reverse_kl")
    prompts, data_iter, stop_ids, pad_id = _prompt_source(dict(cfg.get("data") or {}), student_cfg, method, mode)

    ocfg_dict = {"total_steps": steps, **dict(cfg.get("optimizer") or {})}
    ocfg = OptimizerConfig.from_dict(ocfg_dict)
    state = TrainState.create(student, make_optimizer(ocfg), seed=int(train.get("seed", 0)))
    if mesh is not None:
        state = shard_state(state, mesh)
    compute_dtype = jnp.dtype(train["compute_dtype"]) if train.get("compute_dtype") else None

    if method == "on_policy":
        teacher, _ = _load_model(dict(cfg.get("teacher") or {}), "teacher", mesh, dtype)
        dcfg_dict.setdefault("stop_token_ids", list(stop_ids))
        dcfg_dict.setdefault("pad_id", pad_id)
        dcfg = DistillConfig.from_dict(dcfg_dict)
        producer = OnPolicyDistiller(state.model(), teacher, dcfg, prompts, mesh=mesh)
        loss_fn = make_distill_loss(dcfg)
        meta = {"method": method, "distill": {k: (list(v) if isinstance(v, tuple) else v)
                                              for k, v in dcfg.__dict__.items()}}
    else:
        scfg_dict = dict(cfg.get("sft") or {})
        scfg_dict.setdefault("pad_id", pad_id)
        scfg = SFTConfig.from_dict(scfg_dict)
        producer = SFTProducer(state.model(), prompts, scfg, mesh=mesh)
        loss_fn = make_sft_loss(scfg)
        meta = {"method": method, "sft": dict(scfg.__dict__)}

    step_fn = make_train_step(loss_fn, grad_accum_steps=int(train.get("grad_accum_steps", 1)),
                              compute_dtype=compute_dtype, schedule=make_schedule(ocfg))
    step = jit_train_step(step_fn, state, mesh)
    ck = dict(cfg.get("checkpoint") or {})
    ckpt = Checkpointer(run_dir / "checkpoints", save_every=int(ck.get("save_every", 100)),
                        keep=int(ck.get("keep", 3)), async_save=bool(ck.get("async", True)))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    try:
        with MetricsLogger(run_dir) as logger:
            result = run_loop(state, step, producer.produce, num_steps=steps, checkpointer=ckpt, data_iter=data_iter,
                              logger=logger, max_nan_steps=train.get("max_nan_steps", 10), meta=meta,
                              progress=progress, log_every=int(train.get("log_every", 1)))
    finally:
        ckpt.close()
    summary = {"steps": int(result.state.step), "steps_run": result.steps_run, "preempted": result.preempted,
               "nan_steps": int(result.state.nan_steps), "last": result.last_metrics,
               "time_split": result.time_split(), "run_dir": str(run_dir)}
    if getattr(data_iter, "skip_report", None) is not None:  # records the data source left out, by reason
        summary["data_skipped"] = data_iter.skip_report.as_dict()
    export = (cfg.get("export") or {}).get("path")
    if export and not result.preempted:
        from jdelta.models.qwen3_vl.weights import save_hf_checkpoint

        save_hf_checkpoint(result.state.model(), student_cfg, export)
        summary["export"] = str(export)
    del jax
    return summary


def run(args: argparse.Namespace) -> int:
    from jdelta.config import load_config
    from jdelta.distill.loop import NonFiniteLossError

    cfg = load_config(args.config, args.overrides)
    try:
        s = run_distill(cfg, progress=not args.no_progress)
    except NonFiniteLossError as e:
        print(f"distill: {e}", file=sys.stderr)
        return 1
    last = s["last"]
    state = "preempted (checkpoint saved)" if s["preempted"] else "done"
    print(f"distill {state}: step {s['steps']} ({s['steps_run']} this run), loss {last.get('loss', float('nan')):.4f}, "
          f"{s['nan_steps']} non-finite steps skipped; time split: {s['time_split']}; -> {s['run_dir']}"
          + (f"; exported {s['export']}" if s.get("export") else ""), file=sys.stderr)
    skipped = s.get("data_skipped") or {}
    if skipped.get("counts"):
        print(f"distill: data records skipped: {skipped['counts']} (e.g. {skipped['examples']})", file=sys.stderr)
    return 0
