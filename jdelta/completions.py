"""Decoded completions of prompt records, through the one batch path every sampling stage uses.

records (a source or a list of :class:`~jdelta.data.records.PromptRecord`) -> the Grain prompt
pipeline (:func:`jdelta.data.pipeline.make_prompt_batches`: each record parsed once, images
processed, chat template, bucketed batches, failures skipped and listed) -> a
:class:`~jdelta.sampling.Sampler` built with the pipeline's buckets (nothing is padded twice) ->
decoded text.

* :func:`prompt_batches` yields ``PromptBatch(indices, records, inputs)`` and lists the records
  left out in ``.skipped``; ``inputs`` holds only the batch's real rows (the sampler's batch bucket
  restores the row count, so the compiled shapes stay fixed);
* :func:`sample_texts` samples ``n`` completions per prompt row and decodes them;
* :func:`make_sampler` / :func:`sampling_params` build the sampler and its parameters for a
  pipeline config and a :class:`~jdelta.config.SamplingConfig`;
* :class:`ContinuousSampler` samples all the batches through one continuous-batching
  :class:`~jdelta.rollout_engine.RolloutEngine` call, each row keeping the static sampler's key;
  :func:`split_prompts` cuts a batch into the engine's per-prompt inputs (images included).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from jdelta.config import SamplingConfig
    from jdelta.data.pipeline import PipelineConfig
    from jdelta.data.records import PromptRecord
    from jdelta.sampling import Sampler, SamplingParams


@dataclass
class PromptBatch:
    """One batch of prompts ready for a sampler.

    indices: source index of each row; records: the parsed records (images dropped);
    inputs: ``input_ids, attention_mask [b, S]`` (the ``b`` real rows only), and when the batch
    has images ``pixel_values [P, D]``, ``image_grid_thw [N, 3]`` (bucket-padded by the pipeline).
    """

    indices: list[int]
    records: list[PromptRecord]
    inputs: dict[str, np.ndarray]


class PromptBatches:
    """Iterator of :class:`PromptBatch` over ``source`` (see :func:`prompt_batches`)."""

    def __init__(self, source, tokenizer, config: PipelineConfig, select: slice | None = None):
        from jdelta.distributed import prompt_batches as batches_of_one_program

        # One process: the Grain pipeline; several (multi-host): each reads its slice of every batch
        # and all see the same global batch (jdelta.distributed.GlobalPromptBatches).
        self._it = batches_of_one_program(source, tokenizer=tokenizer, shuffle=False, config=config, select=select,
                                          keep_skipped=True)

    def __iter__(self) -> Iterator[PromptBatch]:
        for batch in self._it:
            rows = np.asarray(batch["record_index"])
            k = int((rows >= 0).sum())  # collate puts the real rows first
            inputs = {"input_ids": batch["input_ids"][:k], "attention_mask": batch["attention_mask"][:k]}
            if np.asarray(batch["image_grid_thw"]).any():
                inputs["pixel_values"] = batch["pixel_values"]
                inputs["image_grid_thw"] = batch["image_grid_thw"]
            yield PromptBatch([int(i) for i in rows[:k]], list(batch["records"][:k]), inputs)

    @property
    def skipped(self) -> list[dict]:
        """Records left out so far: ``{"record_index", "id", "reason", "message"}`` each."""
        return list(self._it.skipped)

    @property
    def skip_report(self):
        return self._it.skip_report


def prompt_batches(source, tokenizer, config: PipelineConfig, *, select: slice | None = None) -> PromptBatches:
    """Batches of ``source`` (records source or list of records; ``select``: a slice of it) in
    source order. In a multi-process run every process gets the same global batches (it reads and
    processes only its slice of each; the batch is then placed on the global mesh by the sampler)."""
    return PromptBatches(source, tokenizer, config, select)


def make_sampler(model, *, pipeline: PipelineConfig, pad_id: int, mesh=None) -> Sampler:
    """A :class:`~jdelta.sampling.Sampler` for batches of ``pipeline`` (same buckets; the batch row
    count is fixed at ``pipeline.batch_size`` so a short final batch compiles nothing new)."""
    from jdelta.sampling import Sampler

    return Sampler(model, mesh=mesh, pad_id=pad_id, seq_buckets=pipeline.seq_buckets,
                   patch_buckets=pipeline.patch_buckets, image_buckets=pipeline.image_buckets,
                   batch_buckets=(pipeline.batch_size,))


def sampling_params(sampling: SamplingConfig, stop_token_ids: Sequence[int], *, greedy: bool = False) -> SamplingParams:
    """The sampler's parameters for ``sampling`` (``greedy``: temperature 0)."""
    from jdelta.sampling import SamplingParams

    return SamplingParams(temperature=0.0 if greedy else float(sampling.temperature), top_p=float(sampling.top_p),
                          top_k=int(sampling.top_k), max_new_tokens=int(sampling.max_new_tokens),
                          stop_token_ids=tuple(stop_token_ids), n=int(sampling.n))


def decode_completions(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    """Text of each row's first ``length`` tokens (special tokens such as ``<|im_end|>`` dropped)."""
    return [
        tokenizer.decode([int(t) for t in row[: int(n)]], skip_special_tokens=True)
        for row, n in zip(tokens, lengths, strict=True)
    ]


def sample_texts(sampler, tokenizer, batch: Mapping[str, np.ndarray], params, rng) -> tuple[list[list[str]], list]:
    """``n`` decoded completions per prompt row (``[b][n]``) and their finish reasons (``[b][n]``)."""
    res = sampler.generate(batch, params, rng=rng)
    texts = decode_completions(tokenizer, res.tokens, res.lengths)
    b = batch["input_ids"].shape[0]
    n = params.n
    by_prompt = [texts[i * n : (i + 1) * n] for i in range(b)]
    finish = [res.finish_reason[i * n : (i + 1) * n] for i in range(b)]
    return by_prompt, finish


def split_prompts(config, inputs: Mapping[str, np.ndarray], ids: Sequence[str] | None = None) -> list[dict]:
    """A left-padded prompt batch (``input_ids, attention_mask [b, S]``, optional ``pixel_values``,
    ``image_grid_thw`` as collated) -> one prompt per row (``input_ids [s_i]`` without padding, and
    its own images: :func:`jdelta.models.family.split_images`), as the rollout engine takes them.
    ``ids``: the rows' record ids, named when the images do not match up."""
    from jdelta.models.family import split_images

    tokens, mask = np.asarray(inputs["input_ids"]), np.asarray(inputs["attention_mask"])
    prompts = [{"input_ids": tokens[i][mask[i] > 0]} for i in range(tokens.shape[0])]
    if inputs.get("pixel_values") is not None:
        try:
            images = split_images(config, tokens, mask, inputs["pixel_values"], inputs["image_grid_thw"])
        except ValueError as e:
            where = f"records {', '.join(map(repr, ids))}" if ids else "a prompt batch"
            raise ValueError(f"{where}: cannot give each prompt its images: {e}") from e
        for p, im in zip(prompts, images, strict=True):
            if im is not None:
                p.update(im)
    return prompts


class ContinuousSampler:
    """The pipeline's batches through one :class:`~jdelta.rollout_engine.RolloutEngine` call, with
    the static sampler's results: row ``r`` of batch ``step`` draws its token ``t`` from
    ``fold_in(fold_in(batch_key(step), r), t)`` as ``Sampler.generate(batch, rng=batch_key(step))``.

    ``slots``: decode rows kept busy. Images go with their prompts (:func:`split_prompts`). One
    device, one process (refused otherwise).
    """

    def __init__(self, model, pipeline: PipelineConfig, *, pad_id: int, slots: int, mesh=None):
        from jdelta.distributed import is_multiprocess

        if is_multiprocess() or mesh is not None:
            raise ValueError("engine=continuous runs on one device in one process; use engine=static with a mesh "
                             "or several processes")
        self.model, self.pipeline, self.pad_id, self.slots = model, pipeline, int(pad_id), int(slots)
        self.compile_count = 0
        self.stats: dict = {}
        self._engines: dict[int, Any] = {}  # by prompt length: compiled programs reused across calls

    def results(self, batches, params: SamplingParams, batch_key) -> Iterator[tuple[PromptBatch, Any]]:
        """``(batch, GenerationResult)`` per batch of ``batches`` in order, as the static sampler's
        (``prompt_index`` within the batch); all are computed before the first is yielded."""
        import jax.numpy as jnp

        from jdelta.buckets import bucket
        from jdelta.rollout_engine import RolloutEngine
        from jdelta.sampling import row_keys

        batches = list(batches)
        prompts, keys = [], []
        for step, batch in enumerate(batches):
            prompts += split_prompts(self.model.config, batch.inputs, [r.id for r in batch.records])
            keys.append(row_keys(batch_key(step), len(batch.indices) * params.n))
        if not prompts:
            return
        prompt_len = bucket(max(p["input_ids"].size for p in prompts), self.pipeline.seq_buckets)
        engine = self._engines.get(prompt_len)
        if engine is None:
            engine = self._engines[prompt_len] = RolloutEngine(
                self.model, slots=self.slots, prompt_len=prompt_len, pad_id=self.pad_id,
                patch_buckets=self.pipeline.patch_buckets, image_buckets=self.pipeline.image_buckets)
        res = engine.generate(prompts, params, rng=batch_key(0), row_keys=jnp.concatenate(keys))
        self.compile_count = sum(e.compile_count for e in self._engines.values())
        self.stats = res.stats
        n, start = params.n, 0
        for batch in batches:
            rows = slice(start * n, (start + len(batch.indices)) * n)
            yield batch, res._replace(
                tokens=res.tokens[rows], logprobs=res.logprobs[rows], raw_logprobs=res.raw_logprobs[rows],
                lengths=res.lengths[rows], finish_reason=res.finish_reason[rows],
                prompt_index=res.prompt_index[rows] - start, sample_index=res.sample_index[rows])
            start += len(batch.indices)


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0) -> Any:
    """A tqdm bar over prompts, or None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="prompt", dynamic_ncols=True)


__all__ = [
    "ContinuousSampler",
    "PromptBatch",
    "PromptBatches",
    "decode_completions",
    "make_sampler",
    "progress_bar",
    "prompt_batches",
    "sample_texts",
    "sampling_params",
    "split_prompts",
]
