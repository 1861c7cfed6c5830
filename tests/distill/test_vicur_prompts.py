"""ViCuR's privileged teacher prompts from the prompt pipeline: ``question + [Hint]: ...`` (or the
reference answer, for answer-privileged self-distillation) for the teacher only; records without
one skipped and counted, or an error, by ``on_error``."""

import dataclasses

import numpy as np
import pytest

from jdelta.data.charts import corpus_text, generate_records
from jdelta.data.image_processor import ImageConfig
from jdelta.data.pipeline import PipelineConfig, make_prompt_batches
from jdelta.data.records import ListSource, RecordError
from jdelta.data.tokenizer import build_demo_tokenizer

CFG = PipelineConfig(batch_size=4, seq_buckets=(96, 128, 256), patch_buckets=(64, 128, 256), image_buckets=(8,),
                     image=ImageConfig(min_pixels=32 * 32 * 4, max_pixels=64 * 64), with_hint=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    records = generate_records(12, seed=1, width=64, height=64)
    tok = build_demo_tokenizer(tmp_path_factory.mktemp("tok"), corpus_text(records), vocab_size=600)
    return records, tok


def _decode(tok, ids, mask):
    return tok.decode(ids[mask == 1])


def _run(records, tok, cfg):
    it = make_prompt_batches(ListSource(records), tokenizer=tok, shuffle=False, config=cfg, process_index=0,
                             process_count=1)
    return list(it), it


def test_teacher_prompt_is_question_plus_hint_and_student_never_sees_it(data):
    records, tok = data
    assert all(r.cues is not None and r.cues.hint for r in records)  # the generator writes exact hints
    batches, it = _run(records[:4], tok, CFG)
    b = batches[0]
    for i, rec in enumerate(records[:4]):
        teacher = _decode(tok, b["teacher_input_ids"][i], b["teacher_attention_mask"][i])
        student = _decode(tok, b["input_ids"][i], b["attention_mask"][i])
        assert f"{rec.question}\n[Hint]: {rec.cues.hint.strip()}" in teacher
        assert "[Hint]" not in student and rec.cues.hint.strip() not in student and rec.question in student
        # the same images: identical visual-token layout before the question text
        assert (b["teacher_mm_token_type_ids"][i].sum() == b["mm_token_type_ids"][i].sum() > 0)
    assert it.skip_report.total == 0


def test_answer_privileged_teacher_prompt(data):
    records, tok = data
    batches, _ = _run(records[:4], tok, dataclasses.replace(CFG, privileged="answer"))
    b = batches[0]
    for i, rec in enumerate(records[:4]):
        teacher = _decode(tok, b["teacher_input_ids"][i], b["teacher_attention_mask"][i])
        student = _decode(tok, b["input_ids"][i], b["attention_mask"][i])
        assert f"{rec.question}\n[Answer]: {rec.answer}" in teacher and "[Hint]" not in teacher
        assert "[Answer]" not in student


def test_record_without_hint_is_skipped_and_counted_or_an_error(data):
    records, tok = data
    recs = [dataclasses.replace(r) for r in records[:8]]
    recs[2] = dataclasses.replace(recs[2], cues=None)
    recs[5] = dataclasses.replace(recs[5], cues=dataclasses.replace(recs[5].cues, hint="  "))
    batches, it = _run(recs, tok, CFG)
    kept = np.concatenate([b["record_index"] for b in batches])
    assert sorted(kept[kept >= 0].tolist()) == [0, 1, 3, 4, 6, 7]
    assert it.skip_report.counts == {"missing_hint": 2}
    assert f"record {recs[2].id!r}: no cue hint (cues.hint)" in it.skip_report.examples["missing_hint"][0]
    with pytest.raises(RecordError, match=rf"record {recs[2].id!r}: no cue hint \(cues.hint\) for the privileged"):
        _run(recs, tok, dataclasses.replace(CFG, on_error="raise"))
    # without with_hint nothing is required (and no teacher prompt is built)
    batches, it = _run(recs, tok, dataclasses.replace(CFG, with_hint=False))
    assert it.skip_report.total == 0 and "teacher_input_ids" not in batches[0]
    # answer-privileged: a record without a reference answer is the one left out
    recs[2] = dataclasses.replace(records[2], answer=None)
    _, it = _run(recs, tok, dataclasses.replace(CFG, privileged="answer"))
    assert it.skip_report.counts == {"missing_answer": 1}


def test_privileged_is_validated():
    with pytest.raises(ValueError, match="privileged"):
        PipelineConfig(privileged="box")
