"""Every shipped config builds into the typed config of the stage that reads it (a typo in a key fails here)."""

from pathlib import Path

import pytest

from jdelta.config import ConfigError, MeshConfig, build, load, load_mapping
from jdelta.stages.distill import Config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPE = CONFIGS / "va_opd_qwen3vl_8b_to_2b.yaml"
# the recipe leaves the checkpoint and data paths to the command line (see its header)
RECIPE_PATHS = ["student.path=/ckpt/Qwen3-VL-2B-Instruct", "teacher.path=/ckpt/Qwen3-VL-8B-Instruct",
                "data.path=/data/records.jsonl", "data.tokenizer=/ckpt/Qwen3-VL-2B-Instruct"]


def test_distill_demo_config_builds():
    cfg = load(Config, CONFIGS / "distill_demo.yaml")
    assert cfg.method == "on_policy" and cfg.data.source == "synthetic" and cfg.mesh.is_single_device
    assert cfg.student.random.hidden == 32 and cfg.teacher.random.logit_scale == 10.0
    assert cfg.distill.mode == "va_opd" and cfg.distill.chunk_size == 8
    assert cfg.optimizer.total_steps is None  # the stage spans train.steps


def test_recipe_config_matches_methods():
    with pytest.raises(ConfigError, match="config key 'student.path'.*not neither"):
        load(Config, RECIPE)  # paths are required
    cfg = load(Config, RECIPE, RECIPE_PATHS)
    d, o = cfg.distill, cfg.optimizer
    assert (d.mode, d.rollouts_per_prompt, d.temperature, d.top_p, d.max_new_tokens) == ("va_opd", 4, 0.7, 0.95, 4096)
    assert (d.va_high_fraction, d.va_lambda, d.va_tau) == (0.2, 0.5, 1.0)
    assert (o.learning_rate, o.b1, o.b2, o.weight_decay, o.warmup_fraction, o.clip_norm) == (
        1e-6, 0.9, 0.95, 0.1, 0.05, 1.0)
    assert cfg.data.batch_size == 16 and cfg.student.remat_policy == "dots" and cfg.checkpoint.async_save
    assert cfg.mesh.shape() == {"data": 1, "fsdp": 8, "tensor": 4}


@pytest.mark.parametrize("path", sorted((CONFIGS / "meshes").glob("*.yaml")), ids=lambda p: p.stem)
def test_mesh_configs(path):
    mesh = build(MeshConfig, load_mapping(path)["mesh"])
    assert all(v >= 1 for v in mesh.shape().values())


def test_overrides_parse_yaml_values():
    cfg = load(Config, CONFIGS / "distill_demo.yaml", ["train.steps=7", "mesh={fsdp: 2}", "distill.mode=gkd",
                                                       "optimizer.learning_rate=1e-3", "checkpoint.async_save=false"])
    assert cfg.train.steps == 7 and cfg.mesh.fsdp == 2 and cfg.distill.mode == "gkd"
    assert cfg.optimizer.learning_rate == 1e-3  # YAML reads "1e-3" as a string: validated to a float
    assert cfg.checkpoint.async_save is False
    old = build(Config, {"student": {"random": {}}, "teacher": {"random": {}}, "checkpoint": {"async": False}})
    assert old.checkpoint.async_save is False  # `async` (a Python keyword) is kept as a YAML alias of async_save
    with pytest.raises(ValueError, match="key.sub=value"):
        load_mapping(None, ["nonsense"])
