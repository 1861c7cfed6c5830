"""Prompt records: round trips through JSONL / ArrayRecord, foreign layouts, TFDS and HF readers, make-seeds."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from jdelta import answers as ans
from jdelta.benchmark_metrics import references_of
from jdelta.cli import main as cli_main
from jdelta.data.charts import generate_records
from jdelta.data.records import (
    LAYOUTS,
    ArrayRecordSource,
    JsonlSource,
    PromptRecord,
    RecordError,
    hf_disk_source,
    open_records,
    read_records_array_record,
    read_records_jsonl,
    tfds_source,
    write_array_record,
    write_jsonl,
)
from jdelta.errors import UserError


def _png(value: int, size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def records():
    return generate_records(12, seed=9, width=96, height=96)


def test_jsonl_round_trip_inline_and_image_folder(records, tmp_path):
    write_jsonl(records, tmp_path / "a.jsonl")
    assert [r.to_json() for r in read_records_jsonl(tmp_path / "a.jsonl")] == [r.to_json() for r in records]
    write_jsonl(records, tmp_path / "b" / "records.jsonl", image_dir=tmp_path / "b" / "images")
    line = json.loads((tmp_path / "b" / "records.jsonl").read_text().splitlines()[0])
    assert "path" in line["images"][0] and not line["images"][0]["path"].startswith("/")
    back = list(read_records_jsonl(tmp_path / "b" / "records.jsonl", image_dir=tmp_path / "b" / "images"))
    assert [r.image_bytes(0) for r in back] == [r.images[0] for r in records]
    assert back[3].cues.hint == records[3].cues.hint and back[3].meta == records[3].meta
    src = open_records(tmp_path / "b")
    assert isinstance(src, JsonlSource) and len(src) == 12


def test_array_record_round_trip(records, tmp_path):
    write_array_record(records, tmp_path / "records.array_record")
    got = list(read_records_array_record(tmp_path / "records.array_record"))
    assert [r.to_json() for r in got] == [r.to_json() for r in records]
    assert isinstance(open_records(tmp_path), ArrayRecordSource)


def test_bad_records_name_file_line_and_id(tmp_path):
    p = tmp_path / "bad.jsonl"
    good = PromptRecord(id="ok", images=[_png(1)], question="Q?", answer="1", answer_type="number")
    lines = [json.dumps(good.to_json()), "", json.dumps({"id": "x7", "images": []}), "{not json"]
    p.write_text("\n".join(lines) + "\n")
    src = JsonlSource(p)
    assert len(src) == 3  # the blank line is not a record
    with pytest.raises(RecordError, match=r"bad\.jsonl:3 \(id 'x7'\): missing field 'question'") as e:
        src.to_record(src[1], 1)
    assert e.value.reason == "missing_field"
    with pytest.raises(RecordError, match=r"bad\.jsonl:4: invalid JSON"):
        src.to_record(src[2], 2)
    with pytest.raises(RecordError, match="answer_type 'float'"):
        PromptRecord.from_json({**good.to_json(), "answer_type": "float"})
    with pytest.raises(RecordError, match="cannot read image 0"):
        PromptRecord(id="p", images=[str(tmp_path / "nope.png")], question="q").image_bytes(0)


def _line(**fields) -> str:
    base = {"id": "r", "images": [{"b64": base64.b64encode(_png(1)).decode()}], "question": "How many?"}
    return json.dumps({**base, **fields})


def test_a_list_of_accepted_answers_stays_a_list(tmp_path):
    """``"answer": ["123", "124"]`` keeps both (it used to become the string "['123', '124']")."""
    p = tmp_path / "multi.jsonl"
    p.write_text(_line(id="m1", answer=["123", "124"]) + "\n" + _line(id="m2", answer=12) + "\n")
    rec, num = read_records_jsonl(p)
    assert rec.answer == "123" and rec.meta["answers"] == ["123", "124"]
    assert rec.answers == references_of(rec) == ["123", "124"]
    # a correct "124" scores 1 against the list (it scored 0 against the stringified list)
    assert ans.score_against_reference(["124"], references_of(rec), metric="exact_match").tolist() == [1.0]
    assert (num.answer, num.answers, "answers" in num.meta) == ("12", ["12"], False)  # a JSON number: its text
    # kept through both writers: JSONL and ArrayRecord (bytes) round trips
    write_jsonl([rec], tmp_path / "again.jsonl")
    write_array_record([rec], tmp_path / "again.array_record")
    for back in (*read_records_jsonl(tmp_path / "again.jsonl"), *read_records_array_record(tmp_path / "again.array_record")):
        assert (back.answer, references_of(back)) == ("123", ["123", "124"])
    # DocVQA / InfoVQA layouts keep every accepted answer too
    doc = LAYOUTS["docvqa"]({"questionId": 1, "question": "Date?", "answers": ["1 May", "May 1"], "image": _png(2)}, 0)
    assert references_of(doc) == ["1 May", "May 1"]
    assert references_of(PromptRecord(id="n", images=[], question="q")) is None


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ([], r"bad\.jsonl:1 \(id 'e'\): answer list is empty"),
        (["a", None], r"bad\.jsonl:1 \(id 'e'\): answer 1 must be a string, got NoneType"),
        (["a", ["b"]], r"bad\.jsonl:1 \(id 'e'\): answer 1 must be a string, got list"),
        (True, r"bad\.jsonl:1 \(id 'e'\): answer must be a string, got bool"),
        ({"text": "a"}, r"bad\.jsonl:1 \(id 'e'\): answer must be a string, got dict"),
    ],
)
def test_bad_answer_lists_name_the_record(tmp_path, answer, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(_line(id="e", answer=answer) + "\n")
    with pytest.raises(RecordError, match=message) as e:
        next(read_records_jsonl(p))
    assert e.value.reason == "invalid_answer" and "\n" not in str(e.value) and isinstance(e.value, UserError)


def test_answer_list_disagreeing_with_meta_answers_and_empty_layout_lists():
    with pytest.raises(RecordError, match=r"record 'x': answer list .* and meta.answers .* differ"):
        PromptRecord.from_json(json.loads(_line(id="x", answer=["1", "2"], meta={"answers": ["3"]})))
    same = PromptRecord.from_json(json.loads(_line(id="y", answer=["1", "2"], meta={"answers": ["1", "2"]})))
    assert same.answers == ["1", "2"]
    with pytest.raises(RecordError, match=r"record 'z': meta.answers must be a non-empty list of strings"):
        PromptRecord.from_json(json.loads(_line(id="z", answer="1", meta={"answers": [1]})))
    with pytest.raises(RecordError, match=r"docvqa\[4\]: answer list is empty"):
        LAYOUTS["docvqa"]({"question": "q", "answers": [], "image": _png(1)}, 4)
    with pytest.raises(RecordError, match=r"chartqa\[0\]: answer 0 must be a string, got NoneType"):
        LAYOUTS["chartqa"]({"query": "q", "label": [None], "image": _png(1)}, 0)


def test_non_utf8_line_names_file_line_and_id(tmp_path):
    """A line with invalid UTF-8 is a RecordError naming file, line and (if readable) id; it used to
    escape as a bare UnicodeDecodeError that the pipeline reported as "source index 2: ..."."""
    p = tmp_path / "latin1.jsonl"
    good = _line(id="ok").encode()
    bad = _line(id="u7", question="caf\u00e9?").encode().replace(b"caf\\u00e9", b"caf\xe9")
    no_id = b'{"id": "\xff", "images": [], "question": "q"}'
    p.write_bytes(good + b"\n" + bad + b"\n" + no_id + b"\n")
    src = JsonlSource(p)
    assert src.to_record(src[0], 0).id == "ok"
    with pytest.raises(RecordError, match=r"latin1\.jsonl:2 \(id 'u7'\): not valid UTF-8 \(byte 0xe9 at offset \d+\)$") as e:
        src.to_record(src[1], 1)
    assert e.value.reason == "invalid_utf8"
    with pytest.raises(RecordError, match=r"latin1\.jsonl:3: not valid UTF-8 \(byte 0xff at offset 8\)$"):
        src.to_record(src[2], 2)
    # the same through ArrayRecord entries (raw bytes too)
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(tmp_path / "r.array_record"), "group_size:1")
    w.write(bad)
    w.close()
    with pytest.raises(RecordError, match=r"r\.array_record\[0\] \(id 'u7'\): not valid UTF-8"):
        next(read_records_array_record(tmp_path / "r.array_record"))


def test_image_name_says_which_file():
    rec = PromptRecord(id="p", images=[_png(1), "/data/x.png"], question="q")
    assert (rec.image_name(0), rec.image_name(1)) == ("image 0", "image 1 (/data/x.png)")


def test_foreign_layouts():
    img = np.zeros((8, 8, 3), np.uint8)
    r = LAYOUTS["chartqa"](
        {"image": img, "query": "How many?", "label": ["12"], "human_or_machine": 0}, 4, "chartqa"
    )
    assert (r.question, r.answer, r.answer_type, r.id) == ("How many?", "12", "number", "chartqa-4")
    assert Image.open(io.BytesIO(r.images[0])).size == (8, 8)
    r = LAYOUTS["docvqa"](
        {"questionId": 57, "question": "Date?", "answers": ["1 May", "May 1"], "image": _png(3)}, 0
    )
    assert r.id == "docvqa-57" and r.answer == "1 May" and r.meta["answers"] == ["1 May", "May 1"]
    r = LAYOUTS["infovqa"](
        {"questionId": "9", "question": "Q", "answers": ["yes"], "image": {"bytes": _png(4)}}, 1
    )
    assert r.family == "infovqa" and r.category == "infographic"
    r = LAYOUTS["ai2d"](
        {"question": "Which?", "options": ["sun", "moon"], "answer": "1", "image": _png(5)}, 2
    )
    assert r.answer == "B" and r.answer_type == "choice" and r.question.endswith("A. sun\nB. moon")
    r = LAYOUTS["charxiv"](
        {"image": _png(6), "reasoning_q": "Max?", "reasoning_a": "3.5", "figure_id": 11}, 0
    )
    assert r.id == "charxiv-11" and r.answer_type == "number"
    with pytest.raises(RecordError, match=r"docvqa\[3\]: missing field 'answers'"):
        LAYOUTS["docvqa"]({"question": "q", "image": _png(1)}, 3)
    with pytest.raises(RecordError, match="out of range"):
        LAYOUTS["ai2d"]({"question": "q", "options": ["a"], "answer": "4", "image": _png(1)}, 0)


# TFDS looks builders up by package, so the test writes this one into a throwaway package.
TFDS_BUILDER = """
import numpy as np
import tensorflow_datasets as tfds


class JdeltaTinyChartqa(tfds.core.GeneratorBasedBuilder):
    \"\"\"A ChartQA-layout TFDS dataset built on disk for the reader test (no TensorFlow needed).\"\"\"

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
                    "query": tfds.features.Text(),
                    "label": tfds.features.Text(),
                }
            )
        )

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        for i in range(4):
            yield i, {"image": np.full((10 + i, 20, 3), 30 * i, np.uint8), "query": f"Value {i}?", "label": str(i * 2)}
"""


def test_tfds_builder_directory(tmp_path, monkeypatch):
    pkg = tmp_path / "jdelta_tfds_test_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tiny_chartqa.py").write_text(TFDS_BUILDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    from jdelta_tfds_test_pkg.tiny_chartqa import JdeltaTinyChartqa

    builder = JdeltaTinyChartqa(data_dir=str(tmp_path / "data"), file_format="array_record")
    builder.download_and_prepare()
    src = tfds_source(builder.data_dir, "test", "chartqa")
    assert len(src) == 4
    recs = sorted((src.to_record(src[i], i) for i in range(4)), key=lambda r: r.question)
    assert [(r.question, r.answer) for r in recs] == [(f"Value {i}?", str(2 * i)) for i in range(4)]
    assert Image.open(io.BytesIO(recs[2].images[0])).size == (20, 12)


def test_hf_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {
            "questionId": [1, 2],
            "question": ["What date?", "Who signed?"],
            "answers": [["1 May"], ["Ann", "ANN"]],
            "image": [Image.new("RGB", (30, 20), (9, 9, 9)), Image.new("RGB", (15, 40), (200, 0, 0))],
        },
        features=datasets.Features(
            {
                "questionId": datasets.Value("int64"),
                "question": datasets.Value("string"),
                "answers": datasets.Sequence(datasets.Value("string")),
                "image": datasets.Image(),
            }
        ),
    )
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "docvqa"))
    with pytest.raises(ValueError, match="pass split"):
        hf_disk_source(tmp_path / "docvqa", "docvqa")
    src = hf_disk_source(tmp_path / "docvqa", "docvqa", split="validation")
    r = src.to_record(src[1], 1)
    assert (r.id, r.answer, r.meta["answers"]) == ("docvqa-2", "Ann", ["Ann", "ANN"])
    assert Image.open(io.BytesIO(r.images[0])).size == (15, 40)


def test_make_seeds_cli(tmp_path, capsys):
    out = tmp_path / "seeds"
    argv = ["make-seeds", "--out", str(out), "--n", "30", "--seed", "4", "--width", "128", "--height", "96"]
    assert cli_main(argv + ["--tokenizer-vocab", "500"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    recs = list(read_records_jsonl(out / "records.jsonl"))
    assert manifest["count"] == len(recs) == 30 and sum(manifest["counts"]["family"].values()) == 30
    assert manifest["config"]["seed"] == 4 and (out / "tokenizer" / "tokenizer.json").is_file()
    assert [r.to_json() for r in recs] == [r.to_json() for r in generate_records(30, 4, width=128, height=96)]
    capsys.readouterr()
    assert cli_main(argv + ["--tokenizer-vocab", "500"]) == 0  # same settings: nothing to do
    assert "already holds this dataset" in capsys.readouterr().out
    assert cli_main(argv) == 2  # other settings: refused, naming the key
    assert "config.tokenizer_vocab (500 -> 0)" in capsys.readouterr().err
    assert cli_main(argv + ["--overwrite", "--workers", "2"]) == 0  # parallel drawing: same records
    assert [r.to_json() for r in read_records_jsonl(out / "records.jsonl")] == [r.to_json() for r in recs]
    assert (
        cli_main(
            [
                "make-seeds",
                "--out",
                str(tmp_path / "ar"),
                "--n",
                "5",
                "--format",
                "array_record",
                "--families",
                "trend,total",
                "--difficulty",
                "trend=3",
            ]
        )
        == 0
    )
    got = list(read_records_array_record(tmp_path / "ar" / "records.array_record"))
    assert {r.family for r in got} <= {"trend", "total"} and len(got) == 5
    assert cli_main(["make-seeds", "--out", str(tmp_path / "x"), "--n", "5", "--families", "bogus"]) == 2
    assert "config key 'families': unknown family 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
