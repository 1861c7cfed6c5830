"""A small Gemma 3-style tokenizer for tests and demos: byte-level BPE trained on given text,
carrying Gemma 3's special tokens and chat template, saved in HF layout.

The released tokenizer (SentencePiece, 262,144 ids) cannot be fetched here; this one has the
same special tokens (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, then ``<start_of_turn>``,
``<end_of_turn>``, ``<start_of_image>``, ``<end_of_image>``, ``<image_soft_token>``) and the
template of :data:`jdelta.models.gemma3.chat.GEMMA3_CHAT_TEMPLATE`, so prompts built with it go
through the same code path as the released checkpoints'.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from jdelta.models.gemma3.chat import BOI, END_TURN, EOI, GEMMA3_CHAT_TEMPLATE, IMAGE, START_TURN

GEMMA3_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", START_TURN, END_TURN, BOI, EOI, IMAGE)


def build_gemma3_demo_tokenizer(out_dir: str | os.PathLike, corpus: Iterable[str], vocab_size: int = 512, *,
                                min_frequency: int = 2):
    """Train a byte-level BPE of ``vocab_size`` ids (specials first) on ``corpus``; save it under
    ``out_dir`` and return it loaded (:func:`jdelta.data.tokenizer.load_tokenizer`). Deterministic."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from jdelta.data.tokenizer import load_tokenizer

    if vocab_size < 256 + len(GEMMA3_SPECIALS) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small (needs > {256 + len(GEMMA3_SPECIALS)})")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(GEMMA3_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", model_max_length=131072, clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                                          for t in (START_TURN, END_TURN, BOI, EOI, IMAGE)]})
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    if not (out / "chat_template.jinja").is_file():
        (out / "chat_template.jinja").write_text(GEMMA3_CHAT_TEMPLATE)
    return load_tokenizer(out)
