"""Chat prompts and the demo tokenizer: parity with transformers' Qwen3VLProcessor."""

import numpy as np
import pytest
from PIL import Image

from jdelta.data.chat import build_prompt, render_prompt
from jdelta.data.tokenizer import QWEN3_VL_ADDED_TOKENS, SpecialTokens, build_demo_tokenizer, load_tokenizer

CORPUS = [
    "What is the value of the bar labelled Mar? Answer: 42",
    "Which category has the highest share in the pie chart?",
    "Total of the receipt is 17.50 dollars. How many items were bought?",
    "Is the line increasing from 2019 to 2021? yes no",
] * 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_demo_tokenizer(d, CORPUS, vocab_size=400)
    return d


def _hf_processor(tok):
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        min_pixels=32 * 32 * 4,
        max_pixels=32 * 32 * 64,
    )

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        # Qwen3-VL's video processor needs torchvision (not installed); images and text are untouched.
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen3VLProcessor(
        image_processor=ip, tokenizer=tok, video_processor=None, chat_template=tok.chat_template
    )


def test_demo_tokenizer_is_deterministic_and_carries_specials(tok_dir, tmp_path):
    build_demo_tokenizer(tmp_path, CORPUS, vocab_size=400)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert (tok_dir / "chat_template.jinja").is_file()
    tok = load_tokenizer(tok_dir)
    for token, _ in QWEN3_VL_ADDED_TOKENS:
        ids = tok(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == token
    sp = SpecialTokens.from_tokenizer(tok)
    assert len({sp.im_start, sp.im_end, sp.image_pad, sp.vision_start, sp.vision_end, sp.think_start}) == 6
    assert sp.pad == sp.endoftext and sp.eos == sp.im_end
    text = "The bar 'Mar' reaches 42.5 — ünïcode ok"
    assert tok.decode(tok(text)["input_ids"]) == text


@pytest.mark.parametrize(
    "sizes,system,thinking,hint",
    [
        ([(64, 96)], None, None, None),
        ([(40, 300), (128, 128)], "You are a careful chart reader.", None, None),
        ([(100, 100)], None, True, "the bar labelled 'Mar' reaches 42"),
        ([], "sys", False, None),
    ],
)
def test_prompt_matches_qwen3vl_processor(tok_dir, sizes, system, thinking, hint):
    tok = load_tokenizer(tok_dir)
    proc = _hf_processor(tok)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    question = "What is the value of Mar?"
    text = render_prompt(tok, question, len(images), system=system, enable_thinking=thinking, hint=hint)
    ref = proc(images=images or None, text=[text], return_tensors="np")
    grids = [tuple(int(v) for v in g) for g in ref["image_grid_thw"]] if images else []
    got = build_prompt(tok, question, grids, system=system, enable_thinking=thinking, hint=hint)
    np.testing.assert_array_equal(got.input_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(got.mm_token_type_ids, ref["mm_token_type_ids"][0])
    assert got.input_ids.dtype == np.int32
    # The text the processor rendered through the same template (not just the same ids).
    messages = [
        {"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]}
    ]
    if system is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    if hint is None:
        kw = {} if thinking is None else {"enable_thinking": thinking}
        assert proc.apply_chat_template(messages, add_generation_prompt=True, **kw) == text


def test_load_tokenizer_takes_template_from_chat_template_json(tok_dir, tmp_path):
    import json
    import shutil

    # Released VLM checkpoints may keep the template only in chat_template.json (processor side).
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, tmp_path / name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    template = (tok_dir / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template == template
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_prompt_structure(tok_dir):
    tok = load_tokenizer(tok_dir)
    sp = SpecialTokens.from_tokenizer(tok)
    p = build_prompt(tok, "Q?", [(1, 4, 6), (1, 2, 2)], hint="[Hint]: look at the tallest bar")
    ids = p.input_ids.tolist()
    starts = [i for i, t in enumerate(ids) if t == sp.vision_start]
    assert len(starts) == 2
    assert ids[starts[0] + 1 : starts[0] + 7] == [sp.image_pad] * 6 and ids[starts[0] + 7] == sp.vision_end
    assert ids[starts[1] + 1] == sp.image_pad and ids[starts[1] + 2] == sp.vision_end
    assert int(p.mm_token_type_ids.sum()) == 7
    decoded = tok.decode(ids)
    assert decoded.count("[Hint]:") == 1 and decoded.endswith("<|im_start|>assistant\n")
    assert tok.decode(build_prompt(tok, "Q?", [], enable_thinking=True).input_ids).endswith(
        "assistant\n<think>\n"
    )
    with pytest.raises(ValueError, match="not a whole number"):
        build_prompt(tok, "Q?", [(1, 3, 3)])
