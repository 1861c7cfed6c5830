"""jdelta.cli: every flag derived from a stage's Config; user errors are one line and exit 2."""

import dataclasses
import importlib
import types

import pytest

from jdelta import cli
from jdelta.config import ConfigError, MeshConfig, SamplingConfig, check, leaf_fields
from jdelta.stages import STAGES


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    path: str | None = None
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class Config:
    out: str
    teacher: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    student: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    progress: bool = True
    shard_size: int = 64
    seen: tuple[str, ...] = ()

    def __post_init__(self):
        check(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")


def fake_stage(calls: list | None = None) -> types.ModuleType:
    mod = types.ModuleType("fake")
    mod.__doc__ = "A fake stage for the CLI tests.\n\nMore text."
    mod.Config = Config

    def run(cfg):
        if calls is not None:
            calls.append(cfg)
        if cfg.out == "explode":
            raise FileNotFoundError("prompts.jsonl does not exist")
        return 0

    mod.run = run
    return mod


def parsed(*args: str) -> Config:
    from jdelta.config import load

    config_file, overrides = cli.parse_command_line(Config, list(args))
    return load(Config, config_file, overrides)


def test_derived_flags():
    cfg = parsed("--out", "runs/x", "--n", "8", "--sampling.temperature", "0.5", "--top-p=0.9",
                 "--teacher.path", "/t", "student.path=/s", "--shard-size", "16")
    assert cfg.out == "runs/x" and cfg.sampling.n == 8 and cfg.sampling.temperature == 0.5
    assert cfg.sampling.top_p == 0.9 and cfg.teacher.path == "/t" and cfg.student.path == "/s"
    assert cfg.shard_size == 16
    # a section given a plain value takes the path shorthand
    assert parsed("--out", "x", "--teacher", "/ckpt").teacher.path == "/ckpt"
    assert parsed("--out", "x", "--seen", "[a, b]").seen == ("a", "b")


def test_bool_flags():
    assert parsed("--out", "x").progress is True
    assert parsed("--out", "x", "--no-progress").progress is False
    assert parsed("--out", "x", "--no-progress", "--progress").progress is True
    assert parsed("--out", "x", "--progress", "false").progress is False
    assert parsed("--progress", "--out", "x").progress is True  # a bare flag does not eat the next option


def test_section_flag():
    cfg = parsed("--out", "x", "--mesh", "fsdp=4,tensor=2")
    assert cfg.mesh == MeshConfig(data=1, fsdp=4, tensor=2)
    assert parsed("--out", "x", "--mesh.data", "2").mesh.data == 2


def test_config_file_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("out: from-file\nsampling: {n: 3, seed: 5}\n")
    cfg = parsed("--config", str(tmp_path / "c.yaml"), "--n", "4")
    assert (cfg.out, cfg.sampling.n, cfg.sampling.seed) == ("from-file", 4, 5)
    assert parsed(f"--config={tmp_path / 'c.yaml'}").sampling.n == 3


@pytest.mark.parametrize("args, message", [
    (["--temprature", "0.5"], "unknown option --temprature; did you mean --temperature?"),
    (["--shard-sise", "3"], "unknown option --shard-sise; did you mean --shard-size?"),
    (["--path", "/x"], "unknown option --path"),  # teacher.path / student.path: not unique, no short flag
    (["--zzzz", "1"], "unknown option --zzzz"),
    (["stray"], "unexpected argument 'stray': use key=value or --key value"),
    (["--n"], "--n needs a value"),
    (["--config"], "--config needs a file"),
])
def test_bad_options(args, message):
    with pytest.raises(ConfigError) as e:
        cli.parse_command_line(Config, ["--out", "x", *args])
    assert str(e.value) == message or (message == "unknown option --path" and str(e.value).startswith(message))


def test_help_lists_every_key_with_its_default(capsys):
    text = cli.stage_help("fake", fake_stage())
    assert text.splitlines()[0].startswith("usage: jdelta fake ") and "A fake stage for the CLI tests." in text
    assert "  out: str (required)" in text
    assert "  sampling.n: int = 8  [--n]" in text
    assert "  sampling.top_p: float = 1.0  [--top-p]" in text
    assert "  teacher.path: str | None = None\n" in text  # not unique: no short flag
    assert "  mesh.fsdp: int = 1" in text and "  progress: bool = True" in text
    for path in leaf_fields(Config):
        assert f"  {path}: " in text


def test_errors_are_one_line_and_exit_2(capsys):
    mod = fake_stage()
    cases = {
        ("--out", "x", "--n", "abc"): "config key 'sampling.n': Input should be a valid integer",
        ("--out", "x", "sampling.temprature=1"): "did you mean 'sampling.temperature'?",
        ("--out", "x", "--shard-size", "0"): "config key 'shard_size': must be >= 1, got 0",
        ("--out", "x", "--temprature", "1"): "unknown option --temprature; did you mean --temperature?",
        ("--out", "explode"): "prompts.jsonl does not exist",
        (): "config key 'out' is required",
    }
    for args, fragment in cases.items():
        assert cli.run_stage("fake", mod, list(args)) == 2
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("jdelta fake: error: ") and fragment in lines[0], (args, lines)
        assert captured.out == ""


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv("JDELTA_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        cli.run_stage("fake", fake_stage(), ["--out", "explode"])


def test_run_gets_the_validated_config():
    calls = []
    assert cli.run_stage("fake", fake_stage(calls), ["--out", "x", "--n", "2"]) == 0
    assert calls == [Config(out="x", sampling=SamplingConfig(n=2))]


def test_main(capsys):
    assert cli.main([]) == 0 and "stages:" in capsys.readouterr().out
    assert cli.main(["no-such-stage"]) == 2 and "unknown stage 'no-such-stage'" in capsys.readouterr().err
    assert cli.main(["model-info", "--help"]) == 0
    assert "  model: str (required)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- every stage


def placeholder(tp):
    """A valid-typed stand-in value for a required leaf field."""
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)[0]
    if args and typing.get_origin(tp) not in (tuple, list, dict):
        return placeholder(args[0])
    return {int: 1, float: 1.0, bool: True}.get(tp, "x")


def required_overrides(cls, prefix: str = "") -> list[str]:
    """``key=value`` for every field without a default (a required section: its path, or its own
    required fields), so that a stage's config fails only on the key under test."""
    import typing

    from jdelta.config import dataclass_of

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        sub = dataclass_of(hints[f.name])
        if sub is None:
            out.append(f"{prefix}{f.name}={placeholder(hints[f.name])}")
        elif "path" in {g.name for g in dataclasses.fields(sub)}:
            out.append(f"{prefix}{f.name}=x")
        else:
            out += required_overrides(sub, f"{prefix}{f.name}.") or [f"{prefix}{f.name}={{}}"]
    return out


@pytest.mark.parametrize("verb", list(STAGES))
def test_every_stage_reports_bad_keys_in_one_line(verb, capsys):
    """For each verb: an unknown key, a misspelled key and a wrong type exit 2 with one line naming the key."""
    from jdelta.config import field_type

    module = importlib.import_module(STAGES[verb][0])
    if not hasattr(module, "Config"):
        pytest.fail(f"{STAGES[verb][0]} has no Config: the stage is not ported yet")
    cls = module.Config
    fields = leaf_fields(cls)
    required = required_overrides(cls)
    typed = [p for p in fields if field_type(cls, p) in (int, float, int | None, float | None)]
    typed += [p for p in fields if field_type(cls, p) in (bool, bool | None)]
    word = next(p for p in fields if len(p.rsplit(".", 1)[-1]) >= 5)
    leaf = word.rsplit(".", 1)[-1]
    typo = word[: -len(leaf)] + leaf[:-2] + leaf[-1] + leaf[-2]  # swap the last two letters
    cases = [
        (["bogus_key_xyz=1"], "unknown config key 'bogus_key_xyz'"),
        ([f"{typo}=1"], f"unknown config key '{typo}'; did you mean '{word}'?"),
        ([f"{typed[0]}=not-a-value"], f"config key '{typed[0]}'"),
    ]
    for extra, fragment in cases:
        assert cli.main([verb, *required, *extra]) == 2, extra
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"jdelta {verb}: error: ") and fragment in err[0], (extra, err)
