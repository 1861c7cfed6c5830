"""The per-sample train batch shared by on-policy distillation and SFT (host side + model call layout).

:func:`assemble_batch` turns left-padded prompts and their completions into the batch the
train step consumes (``prompt ++ completion`` rows, M-RoPE positions, per-sample vision);
:func:`model_inputs` / :func:`completion_hidden` are the jit-side counterparts that call a
model on it. :func:`cut_at_special` / :func:`special_ids` keep vision placeholder ids out of
completions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdelta.buckets import bucket
from jdelta.distill.rollout import flatten_vision, images_per_row, repeat_prompts, stack_vision
from jdelta.logprobs import prepare_score_inputs

RopeIndexFn = Callable[..., tuple[np.ndarray, np.ndarray]]
"""``(input_ids [B, S], image_grid_thw [N, 3] | None, attention_mask [B, S]) -> (positions [3, B, S], deltas)``."""


def rope_index_fn(model: nnx.Module) -> RopeIndexFn:
    """The model's position function (its ``get_rope_index``, else its family's with its config)."""
    from jdelta.sampling import default_rope_index

    return default_rope_index(model)


def special_ids(model: nnx.Module) -> tuple[int, ...]:
    """Token ids a completion must not contain (they would be read as image placeholders or
    image boundaries; any family's, :func:`jdelta.models.family.vision_special_ids`)."""
    from jdelta.models.family import vision_special_ids

    return vision_special_ids(getattr(model, "config", None))


def cut_at_special(tokens: np.ndarray, lengths: np.ndarray, ids: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """Truncate each row before its first vision special token (a rollout that emits an image
    placeholder would make the training sequence claim an image it does not have).
    Returns the new lengths and how many rows were cut."""
    lengths = np.asarray(lengths, np.int32)
    if not ids:
        return lengths, 0
    hit = np.isin(np.asarray(tokens), np.asarray(ids)) & (np.arange(tokens.shape[1])[None] < lengths[:, None])
    first = np.where(hit.any(1), hit.argmax(1), lengths).astype(np.int32)
    return first, int((first < lengths).sum())




def cut_at_padded_ids(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int | None) -> tuple[np.ndarray, int]:
    """Truncate each row before its first id ``>= vocab_size`` (an LM-head padding column the sampler
    drew: no tokenizer id, and no probability in the training softmax). Returns the new lengths and
    how many rows were cut."""
    lengths = np.asarray(lengths, np.int32)
    if vocab_size is None:
        return lengths, 0
    hit = (np.asarray(tokens) >= vocab_size) & (np.arange(tokens.shape[1])[None] < lengths[:, None])
    first = np.where(hit.any(1), hit.argmax(1), lengths).astype(np.int32)
    return first, int((first < lengths).sum())


def model_inputs(batch: Mapping[str, jax.Array], prefix: str = "") -> dict[str, Any]:
    """Train-batch layout (per-sample, splittable) -> the model's call layout.

    ``position_ids [B, 3, S] -> [3, B, S]``; ``pixel_values [B, P, ...] -> [B*P, ...]`` (any family's rows).
    """
    pv, grid = flatten_vision(batch.get(prefix + "pixel_values"), batch.get(prefix + "image_grid_thw"))
    return {
        "attention_mask": batch[prefix + "attention_mask"],
        "position_ids": jnp.swapaxes(batch[prefix + "position_ids"], 0, 1),
        "pixel_values": pv,
        "image_grid_thw": grid,
    }


def completion_hidden(model: nnx.Module, input_ids: jax.Array, inputs: Mapping[str, Any], t: int) -> jax.Array:
    """Final hidden states that predict the last ``t`` tokens: ``[B, t, H]``."""
    out = model(input_ids, return_logits=False, **inputs)
    return out.hidden_states[:, -t - 1:-1, :]


TEACHER_ONLY = ("prompt_index", "pixel_values_pixelated")
"""Entries of an assembled batch that the student's train step does not read (besides ``teacher_*``)."""


def student_view(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of an assembled batch that the student's train step reads."""
    return {k: v for k, v in batch.items() if not k.startswith("teacher_") and k not in TEACHER_ONLY}


def assemble_batch(
    prompts: Mapping[str, Any],
    completion: np.ndarray,
    lengths: np.ndarray,
    *,
    rollouts_per_prompt: int,
    rope_fn: RopeIndexFn,
    teacher_rope_fn: RopeIndexFn | None = None,
    pad_id: int = 0,
    completion_bucket: int = 32,
    prompt_bucket: int = 1,
    image_token_id: int | None = None,
    teacher_prompts: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Host side: left-padded prompts (``B`` rows, model vision layout) and their completions
    (``[B*K, T]``, lengths ``[B*K]``, rows prompt-major) -> the per-sample train batch.

    Returns NumPy ``input_ids, attention_mask [B*K, S+T']``, ``position_ids [B*K, 3, S+T']``,
    ``completion, completion_mask [B*K, T']`` (``T'``: longest length rounded up to
    ``completion_bucket``), per-sample vision ``pixel_values [B*K, P, D]``,
    ``image_grid_thw [B*K, N, 3]`` (+ ``pixel_values_pixelated``), the same under ``teacher_*``
    (teacher positions from ``teacher_rope_fn``), and ``prompt_index``. Images are assigned
    to rows by counting image-token runs (``image_token_id``) unless the batch gives
    ``images_per_sample``. ``teacher_prompts`` (``input_ids``, ``attention_mask [B, S_t]``, left-padded,
    the same images in the same order: ViCuR's privileged prompts) gives the teacher its own sequences
    ``teacher_input_ids, teacher_attention_mask, teacher_position_ids`` ending in the same completions.
    """
    k = rollouts_per_prompt
    b = np.asarray(prompts["input_ids"]).shape[0]
    if completion.shape[0] != b * k:
        raise ValueError(f"{completion.shape[0]} completions for {b} prompts x {k} rollouts")
    lengths = np.asarray(lengths, np.int32)
    if int(lengths.sum()) == 0:
        raise ValueError("the completion mask is empty (every rollout has length 0); nothing to train on")
    t = min(completion.shape[1], bucket(int(lengths.max()), (completion_bucket,)))
    completion = completion[:, :t]
    lengths = np.minimum(lengths, t)
    cmask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
    ids, pmask = np.asarray(prompts["input_ids"], np.int32), np.asarray(prompts["attention_mask"], np.int32)
    extra = bucket(ids.shape[1], (prompt_bucket,)) - ids.shape[1]
    if extra:
        ids = np.concatenate([np.full((b, extra), pad_id, np.int32), ids], axis=1)
        pmask = np.concatenate([np.zeros((b, extra), np.int32), pmask], axis=1)
    per_sample: dict[str, Any] = {"input_ids": ids, "attention_mask": pmask}
    if prompts.get("pixel_values") is not None:
        per_row = prompts.get("images_per_sample")
        if per_row is None and image_token_id is not None:
            per_row = images_per_row(ids, pmask, image_token_id)
        per_sample["pixel_values"], per_sample["image_grid_thw"] = stack_vision(
            prompts["pixel_values"], prompts["image_grid_thw"], images_per_sample=per_row)
        pixelated = prompts.get("pixel_values_pixelated")
        if pixelated is not None:
            per_sample["pixel_values_pixelated"], _ = stack_vision(
                pixelated, prompts["image_grid_thw"], images_per_sample=per_row)
    rep = repeat_prompts(per_sample, k)
    flat_pv, flat_grid = flatten_vision(rep.get("pixel_values"), rep.get("image_grid_thw"))
    host_prompt = {"input_ids": rep["input_ids"], "attention_mask": rep["attention_mask"],
                   "pixel_values": flat_pv, "image_grid_thw": flat_grid}
    s_in = prepare_score_inputs(host_prompt, completion, cmask, rope_fn, pad_id=pad_id)
    t_pos = s_in["position_ids"]
    if teacher_rope_fn is not None and teacher_rope_fn is not rope_fn:
        t_pos, _ = teacher_rope_fn(s_in["input_ids"], flat_grid, s_in["attention_mask"])
    out = {
        "input_ids": s_in["input_ids"],
        "attention_mask": s_in["attention_mask"],
        "position_ids": np.swapaxes(s_in["position_ids"], 0, 1),
        "completion": np.where(cmask > 0, completion, pad_id).astype(np.int32),
        "completion_mask": cmask,
        "teacher_attention_mask": s_in["attention_mask"],
        "teacher_position_ids": np.swapaxes(np.asarray(t_pos, np.int32), 0, 1),
        "prompt_index": rep["prompt_index"],
    }
    if teacher_prompts is not None:
        t_ids = np.asarray(teacher_prompts["input_ids"], np.int32)
        t_mask = np.asarray(teacher_prompts["attention_mask"], np.int32)
        if t_ids.shape[0] != b:
            raise ValueError(f"{t_ids.shape[0]} teacher prompts for {b} prompts")
        t_extra = bucket(t_ids.shape[1], (prompt_bucket,)) - t_ids.shape[1]
        if t_extra:
            t_ids = np.concatenate([np.full((b, t_extra), pad_id, np.int32), t_ids], axis=1)
            t_mask = np.concatenate([np.zeros((b, t_extra), np.int32), t_mask], axis=1)
        t_rep = repeat_prompts({"input_ids": t_ids, "attention_mask": t_mask}, k)
        t_in = prepare_score_inputs({"input_ids": t_rep["input_ids"], "attention_mask": t_rep["attention_mask"],
                                     "pixel_values": flat_pv, "image_grid_thw": flat_grid},
                                    completion, cmask, teacher_rope_fn or rope_fn, pad_id=pad_id)
        out["teacher_input_ids"] = t_in["input_ids"]
        out["teacher_attention_mask"] = t_in["attention_mask"]
        out["teacher_position_ids"] = np.swapaxes(np.asarray(t_in["position_ids"], np.int32), 0, 1)
    if "pixel_values" in rep:
        out["pixel_values"], out["image_grid_thw"] = rep["pixel_values"], rep["image_grid_thw"]
        out["teacher_pixel_values"], out["teacher_image_grid_thw"] = rep["pixel_values"], rep["image_grid_thw"]
        if "pixel_values_pixelated" in rep:
            out["pixel_values_pixelated"] = rep["pixel_values_pixelated"]
    return out

