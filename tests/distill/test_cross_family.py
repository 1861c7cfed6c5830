"""DeltaPrompts' transfer setting across model families, end to end through the CLI.

* prompts chosen with a (tiny random) Qwen3-VL pair (``jdelta score``, Δ ranking) distil a Gemma 3
  pair (``jdelta distill``, on-policy, data.source=records): the prompts go through Gemma 3's chat
  format and image processor, the student is trained and exported as a Gemma 3 checkpoint;
* SFT of a Gemma 3 student on a Qwen3-VL teacher's ``jdelta sample`` output (off-policy across
  families): the sampled text is retokenised by the student's tokenizer (``data.response=text``);
  the Qwen3-VL token ids themselves are refused;
* on-policy distillation across vocabularies is refused: exit 2, one line naming both vocabularies.
"""

import json
import warnings

import numpy as np
import pytest
from gemma3_tiny import make_random_gemma3_dir, tiny_config_for_tokenizer

from jdelta.cli import main
from jdelta.data.charts import corpus_text
from jdelta.data.records import read_records_jsonl, write_jsonl
from jdelta.data.tokenizer import load_tokenizer
from jdelta.models.family import load_checkpoint
from jdelta.models.gemma3 import Gemma3ForConditionalGeneration
from jdelta.models.gemma3.chat import Gemma3SpecialTokens
from jdelta.models.gemma3.tokenizer import build_gemma3_demo_tokenizer
from jdelta.models.loading import tokenizer_fingerprint
from jdelta.testing import make_seeds, make_tiny_pair, make_tokenizer

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
N_RECORDS, N_SELECTED = 8, 4
DISTILL = ["--config", "configs/distill_demo.yaml", "--no-progress", "train.steps=2", "data.batch_size=2",
           "checkpoint.async_save=false", "student.random=null", "distill.max_new_tokens=6",
           "optimizer.warmup_fraction=0.0"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross_family")
    records = make_seeds(root / "seeds", N_RECORDS, seed=3, width=64, height=64)
    qwen_tok = make_tokenizer(records, root / "qwen_tok", vocab_size=400)
    q_teacher, q_student = make_tiny_pair(root / "qwen", qwen_tok)
    g_tok = build_gemma3_demo_tokenizer(root / "gemma_tok", corpus_text(list(read_records_jsonl(records))), 400)
    g_teacher = make_random_gemma3_dir(tiny_config_for_tokenizer(g_tok, hidden=48), g_tok, root / "gemma" / "teacher",
                                       1, logit_scale=4.0)
    g_student = make_random_gemma3_dir(tiny_config_for_tokenizer(g_tok, hidden=32), g_tok, root / "gemma" / "student",
                                       2)
    return root, records, q_teacher, q_student, g_teacher, g_student


def _params(path):
    from flax import nnx

    model, _ = load_checkpoint(path)
    return model, {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def _changed(before: dict, after: dict) -> list[str]:
    assert before.keys() == after.keys()
    return [k for k in before if not np.array_equal(before[k], after[k])]


def test_transfer_setting_qwen_prompts_distil_a_gemma_pair(world, tmp_path):
    root, records, q_teacher, q_student, g_teacher, g_student = world
    # 1. the Qwen3-VL pair scores the seeds; the prompts with the largest Δ are kept
    score_dir = tmp_path / "score"
    assert main(["score", "--teacher", str(q_teacher), "--student", str(q_student), "--prompts", str(records),
                 "--out", str(score_dir), "--n", "2", "--max-new-tokens", "6", "--batch-size", "4",
                 "--max-pixels", str(64 * 64), "--num-permutations", "99", "--num-posterior-draws", "100",
                 "--no-progress"]) == 0
    entries = [json.loads(x) for x in (score_dir / "scores.jsonl").read_text().splitlines()]
    scored = sorted((e for e in entries if e["status"] == "scored"), key=lambda e: (-e["delta"]["tv"], e["index"]))
    assert len(scored) == N_RECORDS
    keep = {e["id"] for e in scored[:N_SELECTED]}
    selected = [r for r in read_records_jsonl(records) if r.id in keep]
    write_jsonl(selected, tmp_path / "selected.jsonl")
    # 2. those prompts distil the Gemma 3 student from the Gemma 3 teacher, no data regenerated
    _, before = _params(g_student)
    run, export = tmp_path / "distill", tmp_path / "student-out"
    assert main(["distill", *DISTILL, "distill.mode=reverse_kl", "distill.rollouts_per_prompt=2",
                 f"student.path={g_student}", "teacher.random=null", f"teacher.path={g_teacher}",
                 "data.source=records", f"data.path={tmp_path / 'selected.jsonl'}", f"data.tokenizer={g_student}",
                 f"run_dir={run}", f"export.path={export}"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["reverse_kl"] >= 0 for r in rows)
    assert json.loads((run / "manifest.json").read_text())["complete"] is True
    student, after = _params(export)
    assert isinstance(student, Gemma3ForConditionalGeneration)
    changed = _changed(before, after)
    assert any("language_model" in k for k in changed) and any("vision_tower" in k for k in changed), changed


def test_the_pipeline_builds_gemma_prompts_for_a_gemma_student(world):
    """What the distill stage's data source feeds the Gemma 3 student: its chat format, its image
    size and soft tokens, one (1, 1, 1) grid row per image."""
    from jdelta.distill.setup import DataConfig, prompt_source

    _, records, _, _, _, g_student = world
    _, cfg = load_checkpoint(g_student)
    src = prompt_source(DataConfig(source="records", path=str(records), tokenizer=str(g_student), batch_size=2),
                        cfg, mode="reverse_kl")
    batch = next(src.batches)
    sp = Gemma3SpecialTokens.from_tokenizer(load_tokenizer(g_student))
    assert src.stop_ids == (sp.end_of_turn, sp.eos) and src.pad_id == sp.pad
    assert batch["pixel_values"].shape[1:] == (3, cfg.vision.image_size, cfg.vision.image_size)
    n_img = int((np.asarray(batch["image_grid_thw"]).prod(-1) > 0).sum())
    assert n_img == 2 and (np.asarray(batch["image_grid_thw"])[:n_img] == 1).all()
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    for row in range(2):
        real = ids[row][mask[row] > 0]
        assert real[0] == sp.bos and real[1] == sp.start_of_turn
        assert (real == sp.image).sum() == cfg.mm_tokens_per_image
        tail = [sp.start_of_turn, *load_tokenizer(g_student)("model\n", add_special_tokens=False)["input_ids"]]
        assert list(real[-len(tail):]) == tail  # the generation prompt: <start_of_turn>model\n


def test_sft_of_a_gemma_student_on_qwen_teacher_samples(world, tmp_path, capsys):
    root, records, q_teacher, _, _, g_student = world
    samples = tmp_path / "sample"
    assert main(["sample", "--model", str(q_teacher), "--prompts", str(records), "--out", str(samples), "--n", "2",
                 "--batch-size", "4", "--max-new-tokens", "6", "--temperature", "1.0", "--max-pixels",
                 str(64 * 64), "--no-progress"]) == 0
    capsys.readouterr()
    base = [*DISTILL, "method=sft", "teacher=null", f"student.path={g_student}", "data.source=sample_output",
            f"data.path={samples}", f"data.prompts={records}", f"data.tokenizer={g_student}"]
    # the Qwen3-VL token ids are not the Gemma 3 student's: refused, naming both tokenizers
    assert main(["distill", *base, f"run_dir={tmp_path / 'refused'}"]) == 2
    line = _error_line(capsys)
    q_fp, g_fp = tokenizer_fingerprint(load_tokenizer(q_teacher)), tokenizer_fingerprint(load_tokenizer(g_student))
    assert "token ids are of another tokenizer" in line and q_fp[:12] in line and g_fp[:12] in line
    assert "data.response=text" in line
    # the sampled text, retokenised by the student's tokenizer: trained and exported
    _, before = _params(g_student)
    run, export = tmp_path / "sft", tmp_path / "sft-out"
    assert main(["distill", *base, "data.response=text", f"run_dir={run}", f"export.path={export}"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    _, after = _params(export)
    assert _changed(before, after)


def test_sft_responses_are_the_retokenised_text(world, tmp_path):
    """Unit level: ``data.response=text`` trains on ``gemma_tokenizer(text) + <end_of_turn>`` for a
    stopped sample, the text's tokens alone for a length-capped one."""
    from jdelta.data.records import open_records
    from jdelta.distill.sft import read_sample_output

    _, records, _, _, _, g_student = world
    tok = load_tokenizer(g_student)
    sp = Gemma3SpecialTokens.from_tokenizer(tok)
    src = open_records(records)
    first, second = (src.to_record(src[i], i).id for i in (0, 1))
    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in [
        {"prompt_id": first, "text": "The answer is 42", "token_ids": [9999, 5], "finish_reason": "stop"},
        # the id of <end_of_image> in the student's tokenizer, not in the teacher's: no reason to skip
        {"prompt_id": second, "text": "bar chart", "token_ids": [sp.eoi], "finish_reason": "length"},
        {"prompt_id": second, "text": "", "token_ids": [7], "finish_reason": "length"},
    ]) + "\n")
    rows, skips = read_sample_output(path, src, vision_ids=sp.vision_ids, retokenize=tok, end_id=sp.end_of_turn)
    ids = lambda t: tuple(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert [r.token_ids for r in rows] == [ids("The answer is 42") + (sp.end_of_turn,), ids("bar chart")]
    assert dict(skips.counts) == {"empty_response": 1}


def test_on_policy_across_vocabularies_is_refused_in_one_line(world, tmp_path, capsys):
    _, records, q_teacher, _, _, g_student = world
    run = tmp_path / "run"
    assert main(["distill", *DISTILL, f"student.path={g_student}", "teacher.random=null", f"teacher.path={q_teacher}",
                 "data.source=records", f"data.path={records}", f"data.tokenizer={g_student}",
                 f"run_dir={run}"]) == 2
    line = _error_line(capsys)
    q_tok, g_tok = load_tokenizer(q_teacher), load_tokenizer(g_student)
    _, q_cfg = load_checkpoint(q_teacher)
    _, g_cfg = load_checkpoint(g_student)
    assert line.startswith("jdelta distill: error: on-policy distillation needs one vocabulary")
    assert f"teacher (qwen3_vl) vocabulary {q_cfg.text.vocab_size:,} ids (tokenizer {len(q_tok):,} tokens sha256 " \
           f"{tokenizer_fingerprint(q_tok)[:12]})" in line
    assert f"student (gemma3) vocabulary {g_cfg.text.vocab_size:,} ids (tokenizer {len(g_tok):,} tokens sha256 " \
           f"{tokenizer_fingerprint(g_tok)[:12]})" in line
    assert not run.exists()  # refused before the run directory is bound
