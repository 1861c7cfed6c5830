"""Tokenizers: load a local Hugging Face tokenizer directory, or build jdelta's small demo tokenizer.

The demo tokenizer is a byte-level BPE trained deterministically with the ``tokenizers``
library on generated text, carrying Qwen3-VL's special tokens and chat template and saved in
the same layout as a released checkpoint (``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``), so the demo and real models go through one code path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jdelta.data.chat_template import QWEN3_VL_CHAT_TEMPLATE

# Qwen3-VL's added tokens, in its vocabulary order. ``special`` ones are dropped by
# ``decode(skip_special_tokens=True)``; the think / tool markers are ordinary added tokens there.
QWEN3_VL_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the pipeline, sampler and models refer to, looked up from a tokenizer."""

    pad: int
    eos: int  # <|im_end|>: ends an assistant turn
    endoftext: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    think_start: int
    think_end: int

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end generation (``<|im_end|>`` and ``<|endoftext|>``)."""
        return (self.im_end, self.endoftext)

    @property
    def image(self) -> int:
        """The image placeholder id (the family-generic name, :func:`jdelta.models.family.prompt_special_tokens`)."""
        return self.image_pad

    @property
    def sink(self) -> int:
        """The token that opens a turn (``<|im_start|>``; the cue-recovery module's sink)."""
        return self.im_start

    @property
    def vision_ids(self) -> tuple[int, ...]:
        """Ids that mark images and videos in a prompt (never in a text response)."""
        return (self.image_pad, self.video_pad, self.vision_start, self.vision_end)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        def tid(token: str) -> int:
            i = tokenizer.convert_tokens_to_ids(token)
            if i is None or i == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(i) != token:
                raise ValueError(f"tokenizer has no {token!r} token (needed for Qwen3-VL prompts)")
            return int(i)

        endoftext = tid("<|endoftext|>")
        pad = tokenizer.pad_token_id
        return cls(
            pad=int(pad) if pad is not None else endoftext,
            eos=tid("<|im_end|>"),
            endoftext=endoftext,
            im_start=tid("<|im_start|>"),
            im_end=tid("<|im_end|>"),
            vision_start=tid("<|vision_start|>"),
            vision_end=tid("<|vision_end|>"),
            image_pad=tid("<|image_pad|>"),
            video_pad=tid("<|video_pad|>"),
            think_start=tid("<think>"),
            think_end=tid("</think>"),
        )


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Fast tokenizer from a local HF directory holding ``tokenizer.json`` (no network).

    If the tokenizer config carries no chat template, one is taken from ``chat_template.jinja``
    or ``chat_template.json`` in the same directory (released VLM checkpoints keep it there).
    """
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (expected a Hugging Face tokenizer directory)")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    if not tok.chat_template:
        if (path / "chat_template.jinja").is_file():
            tok.chat_template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").is_file():
            tok.chat_template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"
    return tok


def build_demo_tokenizer(
    out_dir: str | os.PathLike,
    corpus: Iterable[str],
    vocab_size: int = 2048,
    *,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and save it in HF layout under ``out_dir``.

    Deterministic: the same corpus (in the same order) and settings give byte-identical files.
    ``vocab_size`` counts the 256 byte symbols, the merges and Qwen3-VL's added tokens.
    """
    specials = [t for t, _ in QWEN3_VL_ADDED_TOKENS]
    if vocab_size < 256 + len(specials) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small (needs > {256 + len(specials)})")
    bpe = Tokenizer(models.BPE())
    # Byte-level BPE like Qwen's (GPT-2 style pre-split), so any text round-trips.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN3_VL_ADDED_TOKENS if not s])
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(t, special=True, normalized=False) for t, s in QWEN3_VL_ADDED_TOKENS if s
            ]
        }
    )
    tok.chat_template = QWEN3_VL_CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    if not (out_dir / "chat_template.jinja").is_file():
        (out_dir / "chat_template.jinja").write_text(QWEN3_VL_CHAT_TEMPLATE)
    return load_tokenizer(out_dir)
