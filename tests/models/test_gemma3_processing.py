"""Gemma 3 image processor and prompt format: equal to transformers' ``Gemma3ImageProcessorPil`` and
``Gemma3Processor`` (pixel values bit-exact, token ids exact), with and without pan-and-scan."""

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Gemma3ImageProcessorPil, Gemma3Processor, PreTrainedTokenizerFast

from jdelta.models.gemma3.chat import GEMMA3_CHAT_TEMPLATE, Gemma3SpecialTokens, build_prompt, expand_images
from jdelta.models.gemma3.image_processing import Gemma3ImageConfig, pan_and_scan_boxes, process_images

SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
            "<image_soft_token>"]
QUESTION = "What is in the picture?"
SYSTEM = "You are helpful."


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE with Gemma 3's special tokens (the real tokenizer is not available offline)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [QUESTION, SYSTEM, "\n\nHere is the original image and here are some crops to help you see better"]
    bpe.train_from_iterator(corpus * 3, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    return tok


def _images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 130, 3), dtype=np.uint8)),  # wide: 3 crops
        Image.fromarray(rng.integers(0, 256, (50, 50, 4), dtype=np.uint8), "RGBA"),  # square, transparency
        Image.fromarray(rng.integers(0, 256, (90, 35), dtype=np.uint8), "L"),  # tall, grey: 3 crops
        Image.fromarray(rng.integers(0, 256, (20, 23, 3), dtype=np.uint8)),  # crops would be too small
    ]


@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_pixel_values_equal_transformers(pan_and_scan):
    images = _images()
    hf = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ref = hf(images=images, do_pan_and_scan=pan_and_scan, pan_and_scan_min_crop_size=16,
             pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2, return_tensors="np")
    cfg = Gemma3ImageConfig(size=32, pan_and_scan=pan_and_scan, min_crop_size=16)
    pv, crops = process_images(images, cfg)
    assert crops == [int(c) for c in np.asarray(ref["num_crops"]).ravel()]
    assert crops == ([3, 0, 3, 0] if pan_and_scan else [0, 0, 0, 0])
    assert pv.dtype == np.float32 and pv.shape == (len(images) + sum(crops), 3, 32, 32)
    np.testing.assert_array_equal(pv, np.asarray(ref["pixel_values"]))


def test_pan_and_scan_boxes_and_preprocessor_config():
    cfg = Gemma3ImageConfig.from_preprocessor_config(
        {"size": {"height": 896, "width": 896}, "do_pan_and_scan": None, "pan_and_scan_min_crop_size": 256,
         "pan_and_scan_max_num_crops": 4, "pan_and_scan_min_ratio_to_activate": 1.2, "image_mean": [0.5] * 3,
         "image_std": [0.5] * 3, "resample": 2, "rescale_factor": 1 / 255}, pan_and_scan=True)
    assert cfg == Gemma3ImageConfig(pan_and_scan=True)
    assert pan_and_scan_boxes(1000, 1100, cfg) == []  # ratio 1.1 < 1.2
    assert pan_and_scan_boxes(600, 3000, cfg) == [(0, 0, 600, 750), (0, 750, 600, 750), (0, 1500, 600, 750),
                                                  (0, 2250, 600, 750)]  # 5 crops by ratio, capped at 4
    assert pan_and_scan_boxes(700, 300, cfg) == [(0, 0, 350, 300), (350, 0, 350, 300)]
    assert len(pan_and_scan_boxes(1000, 300, cfg)) == 3  # ceil(1000 / 3) = 334 rows each, the last one shorter
    assert pan_and_scan_boxes(1000, 200, cfg) == []  # crops narrower than 256 px
    with pytest.raises(ValueError, match="only bilinear"):
        Gemma3ImageConfig.from_preprocessor_config({"resample": 3})


@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_prompt_ids_equal_gemma3_processor(tokenizer, pan_and_scan):
    images = _images()[:3]
    hf_images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = Gemma3Processor(image_processor=hf_images, tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE,
                           image_seq_length=4)
    msgs = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
            {"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": QUESTION}]}]
    ref = proc.apply_chat_template(msgs, tokenize=True, return_dict=True, add_generation_prompt=True,
                                   processor_kwargs={"do_pan_and_scan": pan_and_scan, "pan_and_scan_min_crop_size": 16},
                                   return_tensors="np")
    pv, crops = process_images(images, Gemma3ImageConfig(size=32, pan_and_scan=pan_and_scan, min_crop_size=16))
    prompt = build_prompt(tokenizer, QUESTION, crops, system=SYSTEM, mm_tokens_per_image=4)
    np.testing.assert_array_equal(prompt.input_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(prompt.mm_token_type_ids, ref["token_type_ids"][0])
    np.testing.assert_array_equal(pv, ref["pixel_values"])
    special = Gemma3SpecialTokens.from_tokenizer(tokenizer)
    assert prompt.input_ids[0] == special.bos and special.stop_ids == (special.end_of_turn, special.eos)
    assert int(prompt.mm_token_type_ids.sum()) == 4 * (3 + sum(crops))
    text = tokenizer.decode(prompt.input_ids)
    assert text.startswith(f"<bos><start_of_turn>user\n{SYSTEM}\n\n")
    assert text.endswith(f"{QUESTION}<end_of_turn>\n<start_of_turn>model\n")


def test_placeholder_count_is_checked(tokenizer):
    with pytest.raises(ValueError, match="prompt has 2 <start_of_image> placeholders for 1 images"):
        build_prompt(tokenizer, "compare <start_of_image> with this", [0], mm_tokens_per_image=4)
    assert expand_images("a<start_of_image>b", [0], 2) == (
        "a\n\n<start_of_image><image_soft_token><image_soft_token><end_of_image>\n\nb")
