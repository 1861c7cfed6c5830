"""Every shipped config parses into the objects that consume it (a typo in a key fails here)."""

from pathlib import Path

import pytest

from jdelta.config import load_config
from jdelta.distill.on_policy import DistillConfig
from jdelta.distill.stage import SECTIONS
from jdelta.distill.train_state import OptimizerConfig
from jdelta.sharding import MESH_AXES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DISTILL = ["distill_demo.yaml", "va_opd_qwen3vl_8b_to_2b.yaml"]


@pytest.mark.parametrize("name", DISTILL)
def test_distill_configs_build(name):
    cfg = load_config(CONFIGS / name)
    assert set(cfg) <= set(SECTIONS), f"unknown sections {set(cfg) - set(SECTIONS)}"
    DistillConfig(**cfg["distill"])
    OptimizerConfig.from_dict({"total_steps": cfg["train"]["steps"], **cfg["optimizer"]})
    if cfg.get("mesh"):
        assert set(cfg["mesh"]) <= set(MESH_AXES)


def test_recipe_config_matches_methods():
    cfg = load_config(CONFIGS / "va_opd_qwen3vl_8b_to_2b.yaml")
    d, o = cfg["distill"], cfg["optimizer"]
    assert (d["mode"], d["rollouts_per_prompt"], d["temperature"], d["top_p"], d["max_new_tokens"]) == (
        "va_opd", 4, 0.7, 0.95, 4096)
    assert (d["va_high_fraction"], d["va_lambda"], d["va_tau"]) == (0.2, 0.5, 1.0)
    assert (o["learning_rate"], o["b1"], o["b2"], o["weight_decay"], o["warmup_fraction"], o["clip_norm"]) == (
        1e-6, 0.9, 0.95, 0.1, 0.05, 1.0)
    assert cfg["data"]["batch_size"] == 16


@pytest.mark.parametrize("path", sorted((CONFIGS / "meshes").glob("*.yaml")), ids=lambda p: p.stem)
def test_mesh_configs(path):
    mesh = load_config(path)["mesh"]
    assert set(mesh) == set(MESH_AXES) and all(isinstance(v, int) and v >= 1 for v in mesh.values())


def test_overrides_parse_yaml_values():
    cfg = load_config(CONFIGS / "distill_demo.yaml", ["train.steps=7", "mesh={fsdp: 2}", "distill.mode=gkd"])
    assert cfg["train"]["steps"] == 7 and cfg["mesh"] == {"fsdp": 2} and cfg["distill"]["mode"] == "gkd"
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(None, ["nonsense"])
