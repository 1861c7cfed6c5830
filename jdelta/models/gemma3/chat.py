"""Gemma 3 chat prompts as token ids.

The conversation is rendered with the tokenizer's chat template (a released checkpoint's own)
or, when it has none, :data:`GEMMA3_CHAT_TEMPLATE` (the released template as recalled: a system
turn is folded into the first user turn, the assistant's role is ``model``, an image item is
``<start_of_image>``). Then, as ``transformers``' ``Gemma3Processor`` does on the text, every
``<start_of_image>`` becomes ``"\\n\\n<start_of_image>" + "<image_soft_token>" * mm_tokens_per_image
+ "<end_of_image>\\n\\n"`` (with pan-and-scan crops: ``"Here is the original image {seq} and here
are some crops to help you see better {seq} {seq} ..."``), and the text is tokenised once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jdelta.data.chat import PromptTokens, chat_messages

GEMMA3_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

BOI, EOI, IMAGE, START_TURN, END_TURN = ("<start_of_image>", "<end_of_image>", "<image_soft_token>",
                                         "<start_of_turn>", "<end_of_turn>")


@dataclass(frozen=True)
class Gemma3SpecialTokens:
    """Ids of the tokens prompts and stopping refer to, looked up from a tokenizer."""

    pad: int
    bos: int
    eos: int
    start_of_turn: int
    end_of_turn: int
    boi: int
    eoi: int
    image: int

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end generation (``<end_of_turn>`` and ``<eos>``, the released generation config)."""
        return (self.end_of_turn, self.eos)

    @property
    def sink(self) -> int:
        """The token that opens a turn (``<start_of_turn>``; the cue-recovery module's sink)."""
        return self.start_of_turn

    @property
    def vision_ids(self) -> tuple[int, ...]:
        """Ids that mark images in a prompt (never in a text response)."""
        return (self.image, self.boi, self.eoi)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> Gemma3SpecialTokens:
        def tid(token: str) -> int:
            i = tokenizer.convert_tokens_to_ids(token)
            if i is None or i == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(i) != token:
                raise ValueError(f"tokenizer has no {token!r} token (needed for Gemma 3 prompts)")
            return int(i)

        return cls(pad=tid("<pad>"), bos=tid("<bos>"), eos=tid("<eos>"), start_of_turn=tid(START_TURN),
                   end_of_turn=tid(END_TURN), boi=tid(BOI), eoi=tid(EOI), image=tid(IMAGE))


def image_sequence(mm_tokens_per_image: int = 256) -> str:
    """The text one image becomes (``Gemma3Processor.full_image_sequence``)."""
    return f"\n\n{BOI}{IMAGE * mm_tokens_per_image}{EOI}\n\n"


def expand_images(text: str, crops: Sequence[int], mm_tokens_per_image: int = 256) -> str:
    """Replace the ``i``-th ``<start_of_image>`` of ``text`` by image ``i``'s sequence (with its
    ``crops[i]`` pan-and-scan crops), as ``Gemma3Processor`` does."""
    parts = text.split(BOI)
    if len(parts) - 1 != len(crops):
        raise ValueError(f"prompt has {len(parts) - 1} {BOI} placeholders for {len(crops)} images "
                         f"(does the question text contain {BOI}?)")
    seq = image_sequence(mm_tokens_per_image)
    out = [parts[0]]
    for n, rest in zip(crops, parts[1:], strict=True):
        if n:
            out.append(f"Here is the original image {seq} and here are some crops to help you see better "
                       + " ".join([seq] * n))
        else:
            out.append(seq)
        out.append(rest)
    return "".join(out)


def render_prompt(tokenizer, question: str, num_images: int, *, system: str | None = None,
                  add_generation_prompt: bool = True, hint: str | None = None) -> str:
    """The prompt text with one ``<start_of_image>`` per image, images before the question."""
    return tokenizer.apply_chat_template(
        chat_messages(question, num_images, system=system, hint=hint), tokenize=False,
        add_generation_prompt=add_generation_prompt, chat_template=tokenizer.chat_template or GEMMA3_CHAT_TEMPLATE)


def build_prompt(tokenizer, question: str, crops: Sequence[int], *, system: str | None = None,
                 mm_tokens_per_image: int = 256, add_generation_prompt: bool = True,
                 hint: str | None = None, special: Gemma3SpecialTokens | None = None) -> PromptTokens:
    """Token ids of a Gemma 3 prompt for ``question`` about ``len(crops)`` images (``crops[i]``: the
    pan-and-scan crops of image ``i``, 0 without). ``mm_token_type_ids`` marks the image tokens
    (transformers' ``token_type_ids``)."""
    special = special or Gemma3SpecialTokens.from_tokenizer(tokenizer)
    text = expand_images(render_prompt(tokenizer, question, len(crops), system=system,
                                       add_generation_prompt=add_generation_prompt, hint=hint),
                         crops, mm_tokens_per_image)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    mm = (ids == special.image).astype(np.int32)
    want = (len(crops) + sum(crops)) * mm_tokens_per_image
    if int(mm.sum()) != want:
        raise ValueError(f"prompt tokenised to {int(mm.sum())} image tokens, expected {want} (is "
                         f"{IMAGE} a single token of this tokenizer?)")
    return PromptTokens(input_ids=ids, mm_token_type_ids=mm)


def image_token_counts(config, image_grid_thw) -> np.ndarray:
    """Soft tokens of each image (or pan-and-scan crop) in a prompt: ``mm_tokens_per_image`` per grid row ``[N]``."""
    n = np.asarray(image_grid_thw).reshape(-1, 3).shape[0]
    return np.full(n, int(config.mm_tokens_per_image), np.int64)
