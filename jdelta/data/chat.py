"""Qwen3-VL chat prompts as token ids.

The tokenizer's chat template renders the conversation (so a released checkpoint's own template
is used when it has one); each ``<|image_pad|>`` is then expanded to ``t*h*w / merge_size**2``
copies, exactly as ``transformers``' ``Qwen3VLProcessor`` does, but on ids rather than text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jdelta.data.tokenizer import SpecialTokens

HINT_PREFIX = "[Hint]: "
ANSWER_PREFIX = "[Answer]: "  # answer-privileged self-distillation (ViCuR's baseline); wording not published


@dataclass(frozen=True)
class PromptTokens:
    """One tokenised prompt.

    input_ids: [S] int32. mm_token_type_ids: [S] int32, 1 at ``<|image_pad|>`` positions, else 0.
    """

    input_ids: np.ndarray
    mm_token_type_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def with_hint(question: str, hint: str | None) -> str:
    """ViCuR's privileged teacher prompt: the question followed by a ``[Hint]: ...`` block."""
    if not hint:
        return question
    hint = hint.strip()
    if not hint.startswith(HINT_PREFIX.strip()):
        hint = HINT_PREFIX + hint
    return f"{question}\n{hint}"


def with_answer(question: str, answer: str) -> str:
    """The answer-privileged teacher prompt: the question followed by an ``[Answer]: ...`` line."""
    return f"{question}\n{ANSWER_PREFIX}{answer.strip()}"


def chat_messages(
    question: str, num_images: int, *, system: str | None = None, hint: str | None = None
) -> list[dict]:
    """The conversation for one visual question: optional system turn, a user turn with the images
    first and then the question (the layout Qwen3-VL's examples use)."""
    messages: list[dict] = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": with_hint(question, hint)})
    messages.append({"role": "user", "content": content})
    return messages


def render_prompt(
    tokenizer,
    question: str,
    num_images: int,
    *,
    system: str | None = None,
    add_generation_prompt: bool = True,
    enable_thinking: bool | None = None,
    hint: str | None = None,
) -> str:
    """The prompt text with one ``<|image_pad|>`` per image (before expansion)."""
    if not tokenizer.chat_template:
        raise ValueError("tokenizer has no chat template; load it with jdelta.data.tokenizer.load_tokenizer")
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(
        chat_messages(question, num_images, system=system, hint=hint),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )


def build_prompt(
    tokenizer,
    question: str,
    image_grids: Sequence[Sequence[int]],
    *,
    system: str | None = None,
    merge_size: int = 2,
    add_generation_prompt: bool = True,
    enable_thinking: bool | None = None,
    hint: str | None = None,
    special: SpecialTokens | None = None,
) -> PromptTokens:
    """Token ids of a Qwen3-VL prompt for ``question`` about images with the given ``(t, h, w)`` grids.

    Each image becomes ``<|vision_start|>`` + ``t*h*w // merge_size**2`` ``<|image_pad|>`` + ``<|vision_end|>``.
    """
    special = special or SpecialTokens.from_tokenizer(tokenizer)
    text = render_prompt(
        tokenizer,
        question,
        len(image_grids),
        system=system,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        hint=hint,
    )
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: same ids, less overhead
    if backend is not None:
        ids = np.asarray(backend.encode(text, add_special_tokens=False).ids, dtype=np.int32)
    else:
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    pad_positions = np.flatnonzero(ids == special.image_pad)
    if len(pad_positions) != len(image_grids):
        raise ValueError(
            f"prompt has {len(pad_positions)} image placeholders for {len(image_grids)} images "
            "(does the question text contain <|image_pad|>?)"
        )
    counts = np.ones(len(ids), dtype=np.int64)
    for pos, (t, h, w) in zip(pad_positions, image_grids, strict=True):
        n, rem = divmod(int(t) * int(h) * int(w), merge_size**2)
        if rem or n == 0:
            raise ValueError(
                f"image grid {(t, h, w)} is not a whole number of {merge_size}x{merge_size} merges"
            )
        counts[pos] = n
    input_ids = np.repeat(ids, counts).astype(np.int32)
    mm = (input_ids == special.image_pad).astype(np.int32)
    return PromptTokens(input_ids=input_ids, mm_token_type_ids=mm)
