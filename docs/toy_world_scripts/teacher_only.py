"""Diagnostic: train only the teacher of PairConfig with a given answer style / hint fraction; evaluate."""
import json
import sys
import time
from pathlib import Path

from jdelta.config import to_dict
from jdelta.data.tokenizer import build_demo_tokenizer, load_tokenizer
from jdelta.toy.build import PairConfig, encode_split, evaluate_pair, hinted_rows
from jdelta.toy.train import TrainSettings, model_config, train_model
from jdelta.toy.world import WorldConfig, answer_corpus

style, frac, out = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
cfg = PairConfig(world=WorldConfig(answer_style=style), teacher_hint_fraction=frac)
out.mkdir(parents=True, exist_ok=True)
if not (out / "tok" / "tokenizer.json").is_file():
    build_demo_tokenizer(out / "tok", answer_corpus(cfg.world), vocab_size=cfg.vocab_size)
tok = load_tokenizer(out / "tok")
hint = hinted_rows(cfg.train_records, frac, cfg.seed)
train = encode_split(cfg, tok, "train", cfg.train_records, hinted=hint, with_pixelated=True)
held = encode_split(cfg, tok, "heldout", 400, with_pixelated=True)
held_h = encode_split(cfg, tok, "heldout", 400, with_pixelated=False, hinted=True)
settings = TrainSettings(**{**to_dict(cfg.teacher_train), "seed": cfg.seed})
t0, c0 = time.perf_counter(), time.process_time()
model, losses = train_model(model_config(tok, cfg.teacher), train, settings,
                            family_weights={f.family: f.weight for f in cfg.world.families},
                            log=lambda s, loss, sec: print(f"step {s} loss {loss:.3f} ({sec:.0f}s)", flush=True), log_every=700)
print("time", time.perf_counter() - t0, time.process_time() - c0)
m = evaluate_pair(model, model, held, cfg.world, held_h)["teacher"]
print(json.dumps({k: {f: round(100 * v["accuracy"], 1) for f, v in m[k].items()} for k in ("accuracy", "pixelated_accuracy", "hint_accuracy")}))
print(json.dumps({k: round(v, 3) for k, v in m["visual_advantage"].items()}))
