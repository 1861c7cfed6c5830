"""The shared machinery on Gemma 3 through the family interface: the sampler's bucket padding of
whole-image pixel rows, logit soft-capping in the sampler and in scoring, per-family special
tokens, pipeline settings, the pair checks, and ``jdelta model-info`` on Gemma 3 configs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gemma3_tiny import IMAGE_SIZE, make_batch, tiny_config_for_tokenizer

from jdelta.cli import main
from jdelta.config import PromptConfig
from jdelta.errors import UserError
from jdelta.logprobs import score_completions
from jdelta.models.family import (
    family_of_tokenizer,
    logit_softcap,
    logits_from_hidden,
    prompt_special_tokens,
    resolve_config,
    vision_special_ids,
)
from jdelta.models.gemma3 import Gemma3ForConditionalGeneration
from jdelta.models.gemma3.chat import Gemma3SpecialTokens
from jdelta.models.gemma3.tokenizer import build_gemma3_demo_tokenizer
from jdelta.models.loading import check_pair, pipeline_config_for
from jdelta.sampling import Sampler, SamplingParams, pad_batch
from jdelta.testing import tiny_config

CORPUS = ["the bar chart shows the largest value in 2019", "what is the sum of the values? 42", "pie line table"] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_gemma3_demo_tokenizer(tmp_path_factory.mktemp("gtok"), CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def capped(tok):
    """A random tiny Gemma 3 whose logits are soft-capped at 0.5 (so the cap changes every log-prob)."""
    cfg = tiny_config_for_tokenizer(tok, softcap=0.5)
    model = Gemma3ForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    emb = model.language_model.embed_tokens
    emb.set_value(emb.get_value() * 20.0)  # large raw logits: the cap binds
    return model, cfg


def test_special_tokens_are_found_per_family(tok, tmp_path):
    from jdelta.testing import make_seeds, make_tokenizer

    sp = prompt_special_tokens(tok)
    assert family_of_tokenizer(tok).name == "gemma3" and isinstance(sp, Gemma3SpecialTokens)
    ids = tok.convert_tokens_to_ids(["<pad>", "<end_of_turn>", "<eos>", "<start_of_turn>", "<image_soft_token>"])
    assert [sp.pad, *sp.stop_ids, sp.sink, sp.image] == ids
    qwen = make_tokenizer(make_seeds(tmp_path / "seeds", 2, width=32, height=32), tmp_path / "qtok", 300)
    q = prompt_special_tokens(qwen)
    assert family_of_tokenizer(qwen).name == "qwen3_vl"
    assert (q.sink, q.image, q.stop_ids) == (q.im_start, q.image_pad, (q.im_end, q.endoftext))
    with pytest.raises(ValueError, match="carries no registered family's special tokens"):
        family_of_tokenizer(type("T", (), {"convert_tokens_to_ids": lambda self, t: None, "unk_token_id": None})())


def test_pad_batch_and_the_sampler_bucket_whole_images_by_image_buckets():
    ids, mask, pv = make_batch([[3, "img", 2], ["img", "img", 1]])
    grid = np.ones((3, 3), np.int32)
    out = pad_batch({"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "image_grid_thw": grid},
                    seq_len=32, num_patches=4, num_images=4)
    assert out["pixel_values"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_array_equal(out["pixel_values"][:3], pv)
    assert not out["pixel_values"][3].any() and out["image_grid_thw"][3].tolist() == [0, 0, 0]

    class Stub:  # only prepare() is exercised: no model call
        config = None

        def get_rope_index(self, input_ids, image_grid_thw, attention_mask):
            return np.zeros((3, *input_ids.shape), np.int32), np.zeros(input_ids.shape[0], np.int32)

    s = Sampler(Stub(), seq_buckets=(32,), patch_buckets=(512,), image_buckets=(8,))
    host = s.prepare({"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "image_grid_thw": grid})
    assert host["pixel_values"].shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE)  # not 512 images
    patches = np.zeros((20, 1536), np.float32)
    host = s.prepare({"input_ids": ids, "attention_mask": mask, "pixel_values": patches,
                      "image_grid_thw": np.array([[1, 4, 5]])})
    assert host["pixel_values"].shape == (512, 1536)  # Qwen3-VL patch rows: patch buckets, as before


def test_sampler_and_scoring_apply_the_logit_softcap(capped):
    model, cfg = capped
    assert logit_softcap(model) == 0.5
    ids, mask, _ = make_batch([[5], [9]], seed=3)
    ids = np.minimum(ids, cfg.text.vocab_size - 1)
    res = Sampler(model, seq_buckets=(16,)).generate({"input_ids": ids, "attention_mask": mask},
                                                     SamplingParams(temperature=0.0, max_new_tokens=3), rng=0)
    # reference: the model's own forward (soft-capped logits) on prompt + greedy tokens
    full = np.concatenate([ids, res.tokens], axis=1)
    fmask = np.concatenate([mask, np.ones_like(res.tokens)], axis=1)
    logits = np.asarray(model(jnp.asarray(full), attention_mask=jnp.asarray(fmask)).logits, np.float64)
    assert np.abs(logits).max() <= 0.5 + 1e-6
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    s = ids.shape[1]
    want = np.take_along_axis(lp[:, s - 1:-1], res.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(res.raw_logprobs, want, atol=1e-4)
    np.testing.assert_array_equal(res.tokens, lp[:, s - 1:-1].argmax(-1))
    # uncapped, every log-prob would differ by far more than the tolerance
    hidden = model(jnp.asarray(full), attention_mask=jnp.asarray(fmask), return_logits=False).hidden_states
    raw_lp = np.asarray(jax.nn.log_softmax(jnp.dot(hidden, model.lm_head_weight()), axis=-1))
    assert np.abs(np.take_along_axis(raw_lp[:, s - 1:-1], res.tokens[..., None], -1)[..., 0] - want).max() > 0.1
    np.testing.assert_allclose(np.asarray(logits_from_hidden(model, hidden)), logits, atol=1e-5)
    # scoring the same completions gives the same log-probs
    sc = score_completions(model, {"input_ids": ids, "attention_mask": mask}, res.tokens,
                           np.ones_like(res.tokens), chunk_size=2)
    np.testing.assert_allclose(np.asarray(sc.token_logprobs), want, atol=1e-4)


def test_pipeline_settings_and_pair_checks_follow_the_family(tok, capped):
    _, cfg = capped
    pcfg = pipeline_config_for(cfg, PromptConfig(), batch_size=2)
    assert pcfg.family == "gemma3" and pcfg.gemma3.image.size == IMAGE_SIZE
    assert pcfg.gemma3.mm_tokens_per_image == cfg.mm_tokens_per_image
    assert pipeline_config_for(tiny_config(), PromptConfig(), batch_size=2).family == "qwen3_vl"
    sp = Gemma3SpecialTokens.from_tokenizer(tok)
    assert set(vision_special_ids(cfg)) == {sp.image, sp.boi, sp.eoi}
    check_pair(cfg, cfg)
    with pytest.raises(UserError, match=r"different model families \(teacher qwen3_vl, student gemma3\)"):
        check_pair(tiny_config(), cfg)
    other = cfg.replace(mm_tokens_per_image=1)
    with pytest.raises(UserError, match="mm_tokens_per_image: teacher 4 vs student 1"):
        check_pair(cfg, other)


def test_distill_losses_refuse_a_capped_model(capped):
    from jdelta.distill.on_policy import check_vocabularies

    model, _ = capped
    with pytest.raises(ValueError, match=r"the student soft-caps its logits \(final_logit_softcapping=0.5\)"):
        check_vocabularies(model, model)


def test_model_info_on_gemma3_configs(capsys, tmp_path):
    family, path = resolve_config("gemma3-12b")
    assert family.name == "gemma3" and path.name == "gemma3-12b.json"
    assert resolve_config("8b")[0].name == "qwen3_vl"  # a bare size is Qwen3-VL's, as before
    assert main(["model-info", "--model", "gemma3-4b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "gemma3" and out["total"] == sum(out[k] for k in ("vision", "projector", "text",
                                                                               "embeddings"))
    (tmp_path / "config.json").write_text(path.read_text())
    assert main(["model-info", "--model", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "(family gemma3)" in text and "SigLIP" in text and "projector:" in text
    assert main(["model-info", "--model", "gemma3-4b", "--cue-recovery"]) == 2
    assert "counted for Qwen3-VL only, not gemma3" in capsys.readouterr().err


def test_jit_prefill_logits_are_capped_under_jit(capped):
    """The sampler's prefill forms its first logits with the family helper inside jit."""
    model, cfg = capped
    ids, mask, _ = make_batch([[6]], seed=5)
    ids = np.minimum(ids, cfg.text.vocab_size - 1)
    graphdef, state = nnx.split(model)

    @jax.jit
    def last(state, ids, mask):
        m = nnx.merge(graphdef, state)
        out = m(ids, attention_mask=mask, return_logits=False)
        return logits_from_hidden(m, out.hidden_states[:, -1], jnp.float32)

    got = np.asarray(last(state, jnp.asarray(ids), jnp.asarray(mask)))
    want = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits[:, -1])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_gemma3_student_with_the_cue_recovery_module_exports_it_beside_the_weights(capped, tmp_path):
    """ViCuR on Gemma 3: the module is written to cue_recovery.{json,safetensors}, never into the
    main weights (which a plain Gemma 3 loader must accept), and reattached on load."""
    from jdelta.distill.vicur import with_cue_recovery
    from jdelta.models.cue_recovery import CueRecoveryConfig
    from jdelta.models.family import load_checkpoint
    from jdelta.models.gemma3.weights import save_hf_checkpoint
    from jdelta.models.safetensors_io import tensors_in

    _, cfg = capped
    model = Gemma3ForConditionalGeneration(cfg, rngs=nnx.Rngs(1))
    with_cue_recovery(model, CueRecoveryConfig(), sink_token_id=4)
    module = model.cue_recovery
    save_hf_checkpoint(model, cfg, tmp_path)
    assert {"cue_recovery.json", "cue_recovery.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    assert not [k for k in tensors_in(tmp_path / "model.safetensors") if "cue" in k]
    loaded, _ = load_checkpoint(tmp_path)
    want = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(module))}
    got = {"/".join(map(str, k)): np.asarray(v.get_value())
           for k, v in nnx.to_flat_state(nnx.state(loaded.cue_recovery))}
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    plain, _ = load_checkpoint(tmp_path, cue_recovery=False)
    assert getattr(plain, "cue_recovery", None) is None
