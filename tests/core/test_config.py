"""jdelta.config: typed configs from YAML + overrides; every error is one line naming the dotted key."""

import dataclasses
from typing import Literal

import pytest

from jdelta.config import (
    ConfigError,
    MeshConfig,
    PromptConfig,
    SamplingConfig,
    build,
    check,
    diff_keys,
    load,
    parse_override,
    read_yaml,
    set_dotted,
    to_dict,
)
from jdelta.errors import UserError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    path: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclasses.dataclass(frozen=True)
class Cfg:
    out: str
    teacher: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    lr: float = 1e-3
    tags: tuple[str, ...] = ()
    shards: int | None = None

    def __post_init__(self):
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")


def error(mapping) -> str:
    with pytest.raises(ConfigError) as e:
        build(Cfg, mapping)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, UserError) and isinstance(e.value, ValueError)
    return msg


def test_defaults_and_round_trip():
    cfg = build(Cfg, {"out": "runs/x"})
    assert cfg.sampling == SamplingConfig() and cfg.mesh.is_single_device and cfg.lr == 1e-3
    cfg = build(Cfg, {"out": "x", "sampling": {"n": 2}, "tags": ["a", "b"], "mesh": {"fsdp": 2}})
    assert cfg.sampling.n == 2 and cfg.sampling.temperature == 1.0 and cfg.tags == ("a", "b")
    assert to_dict(cfg)["tags"] == ["a", "b"] and to_dict(cfg)["sampling"]["n"] == 2
    assert build(Cfg, to_dict(cfg)) == cfg
    assert cfg.mesh.shape() == {"data": 1, "fsdp": 2, "tensor": 1}


def test_unknown_key_names_it_and_the_closest_valid_key():
    assert error({"out": "x", "sampling": {"temprature": 0.5}}) == (
        "unknown config key 'sampling.temprature'; did you mean 'sampling.temperature'?")
    assert error({"out": "x", "learning_rate": 1}) == (
        "unknown config key 'learning_rate' (known keys: out, teacher, sampling, prompt, mesh, lr, tags, shards)")
    assert "did you mean 'teacher.dtype'" in error({"out": "x", "teacher": {"dtyp": "float32"}})


def test_wrong_type_names_the_key():
    assert error({"out": "x", "sampling": {"n": "abc"}}).startswith("config key 'sampling.n': Input should be a valid "
                                                                    "integer")
    assert "got 1.5" in error({"out": "x", "sampling": {"n": 1.5}})
    assert error({"out": "x", "sampling": {"n": True}}) == "config key 'sampling.n': expected a number, got True"
    assert error({"out": "x", "teacher": {"dtype": "fp16"}}) == (
        "config key 'teacher.dtype': Input should be 'float32' or 'bfloat16', got 'fp16'")
    assert error({"out": "x", "sampling": 3}).startswith("config key 'sampling': ")
    assert error({"out": "x", "shards": "many"}).startswith("config key 'shards': ")  # union tags are not keys
    assert error({}) == "config key 'out' is required"


def test_range_errors_name_the_dotted_key():
    assert error({"out": "x", "sampling": {"top_p": 2}}) == "config key 'sampling.top_p': must be in (0, 1], got 2.0"
    assert error({"out": "x", "lr": -1}) == "config key 'lr': must be > 0, got -1.0"
    assert error({"out": "x", "prompt": {"min_pixels": 10, "max_pixels": 5}}) == (
        "config key 'prompt.min_pixels': 10 is above max_pixels 5")
    assert "at most one mesh axis may be -1" in error({"out": "x", "mesh": {"fsdp": -1, "tensor": -1}})


def test_yaml_values_are_coerced_to_the_declared_type(tmp_path):
    (tmp_path / "c.yaml").write_text("out: x\nlr: 1e-3\nsampling: {temperature: 1}\n")  # YAML reads 1e-3 as text
    cfg = load(Cfg, tmp_path / "c.yaml")
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float) and isinstance(cfg.sampling.temperature, float)


def test_base_inheritance_and_override_precedence(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "root.yaml").write_text("out: root\nsampling: {n: 4, temperature: 0.5, seed: 7}\n")
    (tmp_path / "common" / "base.yaml").write_text("base: root.yaml\nsampling: {n: 3}\nlr: 0.1\n")
    (tmp_path / "child.yaml").write_text("base: common/base.yaml\nsampling: {n: 2}\n")
    cfg = load(Cfg, tmp_path / "child.yaml")
    assert (cfg.out, cfg.sampling.n, cfg.sampling.temperature, cfg.sampling.seed, cfg.lr) == ("root", 2, 0.5, 7, 0.1)
    cfg = load(Cfg, tmp_path / "child.yaml", ["sampling.n=9", "out=runs/y"])
    assert (cfg.sampling.n, cfg.out, cfg.sampling.temperature) == (9, "runs/y", 0.5)
    # an error in a file names the file
    with pytest.raises(ConfigError, match=r"config key 'sampling.n' \(in .*child.yaml\)"):
        load(Cfg, tmp_path / "child.yaml", ["sampling.n=0"])


def test_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: x\nsampling: {n: [1, 2}\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(bad)
    assert str(e.value).startswith(f"config file {bad} line 2, column ") and "invalid YAML" in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load(Cfg, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping, got list"):
        read_yaml(tmp_path / "list.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"out: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_yaml(tmp_path / "bin.yaml")


@pytest.mark.parametrize("item, expected", [
    ("a.b=1", ("a.b", 1)),
    ("lr=1e-3", ("lr", "1e-3")),  # YAML 1.1: text; the dataclass type converts it
    ("x=hello world", ("x", "hello world")),
    ("x=[1, 2]", ("x", [1, 2])),
    ("x={a: 1}", ("x", {"a": 1})),
    ("flag=true", ("flag", True)),
    ("p=null", ("p", None)),
    ("p=", ("p", "")),
    ("top-p=0.5", ("top_p", 0.5)),
    ("s=a=b", ("s", "a=b")),
    ("s=[unclosed", ("s", "[unclosed")),  # not YAML: kept as text
])
def test_override_parsing(item, expected):
    assert parse_override(item) == expected


@pytest.mark.parametrize("item", ["novalue", "=1", "a..b=1", "1a=2", "a b=1"])
def test_malformed_override(item):
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        parse_override(item)


def test_override_into_a_value_is_an_error():
    cfg = {"sampling": 3}
    with pytest.raises(ConfigError, match="sampling is a value, not a section"):
        set_dotted(cfg, "sampling.n", 2)
    set_dotted(cfg, "teacher.path", "/x")
    assert cfg == {"sampling": 3, "teacher": {"path": "/x"}}
    with pytest.raises(ConfigError, match="'lr.x': lr is a value"):
        set_dotted({"lr": 0.1}, "lr.x", 1)


def test_path_shorthand(tmp_path):
    cfg = build(Cfg, {"out": "x", "teacher": "/ckpt/8b"})
    assert cfg.teacher == ModelSpec(path="/ckpt/8b")
    assert load(Cfg, None, ["out=x", "teacher=/ckpt/2b"]).teacher.path == "/ckpt/2b"
    # ... combined with sub-keys, in either order, from a file or overrides
    assert load(Cfg, None, ["out=x", "teacher=/c", "teacher.dtype=bfloat16"]).teacher == ModelSpec("/c", "bfloat16")
    (tmp_path / "c.yaml").write_text("out: x\nteacher: /c\n")
    assert load(Cfg, tmp_path / "c.yaml", ["teacher.dtype=bfloat16"]).teacher == ModelSpec("/c", "bfloat16")
    assert load(Cfg, None, ["out=x", "teacher.dtype=bfloat16", "teacher=/c"]).teacher == ModelSpec("/c", "float32")
    # a section without a path field takes no shorthand
    assert error({"out": "x", "sampling": "fast"}).startswith("config key 'sampling': ")


def test_diff_keys():
    assert diff_keys({"a": 1, "s": {"n": 2, "t": 1}}, {"a": 1, "s": {"n": 3, "t": 1}, "new": 0}) == [
        "new ('<unset>' -> 0)", "s.n (2 -> 3)"]
    assert diff_keys({"a": [1]}, {"a": [1]}) == []
