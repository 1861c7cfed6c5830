"""``jdelta <stage> [--config FILE] [--flag VALUE ...] [key.sub=value ...]``: one entry point for every stage.

Each stage is a module in :mod:`jdelta.stages` with a ``Config`` dataclass and ``run(cfg) -> int``.
The command line is derived from ``Config``; nothing is listed by hand:

* ``--config FILE``: a YAML file of the config (``base: other.yaml`` inherits);
* ``key.sub=value``: an override (the value is read as YAML);
* ``--key.sub VALUE`` / ``--key-sub=VALUE``: the same as an override; a leaf field whose name is
  unique in the config also answers to its bare name (``--n 8`` for ``sampling.n``);
  ``--flag`` alone sets a boolean to true, ``--no-flag`` to false; a section given ``a=1,b=2``
  sets its fields (``--mesh fsdp=4,tensor=2``).

A user error (bad config, file, record or run directory) prints one line on stderr and exits 2;
``JDELTA_TRACEBACK=1`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import typing
from typing import Any

from jdelta.stages import STAGES

BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def usage() -> str:
    width = max(len(n) for n in STAGES)
    lines = ["usage: jdelta <stage> [--config FILE] [--flag VALUE ...] [key.sub=value ...]", "", "stages:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in STAGES.items()]
    lines += ["", "jdelta <stage> --help lists a stage's config keys with their types and defaults."]
    return "\n".join(lines)


def stage_help(name: str, module) -> str:
    from jdelta.config import field_type, leaf_fields

    cls = module.Config
    doc = (module.__doc__ or "").strip()
    lines = [f"usage: jdelta {name} [--config FILE] [--flag VALUE ...] [key.sub=value ...]", "", doc, "",
             "config keys (flag: --key or --dotted.key; override: key=value):"]
    short = short_flags(cls)
    inv = {v: k for k, v in short.items()}
    defaults = _defaults(cls)
    for path in leaf_fields(cls):
        tp = _type_name(field_type(cls, path))
        default = defaults.get(path, "(required)")
        alias = f"  [--{inv[path].replace('_', '-')}]" if path in inv and inv[path] != path else ""
        lines.append(f"  {path}: {tp} = {default!r}{alias}" if default != "(required)"
                     else f"  {path}: {tp} (required){alias}")
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    s = str(tp).replace("typing.", "")
    return tp.__name__ if isinstance(tp, type) else s


def _defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> default value (only fields that have one; a section without a default
    shows its class's own defaults)."""
    from jdelta.config import dataclass_of, field_default, flatten, to_dict

    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = field_default(f)
        sub = dataclass_of(hints[f.name])
        if value is dataclasses.MISSING or (value is None and sub is not None):
            if sub is not None:  # a section with no default instance: its class's own defaults
                out.update(_defaults(sub, f"{prefix}{f.name}."))
            continue
        if dataclasses.is_dataclass(value):
            out.update({f"{prefix}{f.name}.{k}": v for k, v in flatten(to_dict(value)).items()})
        else:
            out[f"{prefix}{f.name}"] = to_dict(value) if isinstance(value, (tuple, list, dict)) else value
    return out


def short_flags(cls: type) -> dict[str, str]:
    """Bare leaf name -> dotted path, for the leaf names that occur once in the config tree."""
    from jdelta.config import leaf_fields

    paths = list(leaf_fields(cls))
    names: dict[str, list[str]] = {}
    for p in paths:
        names.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    return {n: ps[0] for n, ps in names.items() if len(ps) == 1}


def _sections(cls: type) -> set[str]:
    from jdelta.config import dataclass_of

    out: set[str] = set()

    def walk(c: type, prefix: str) -> None:
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            sub = dataclass_of(hints[f.name])
            if sub is not None:
                out.add(prefix + f.name)
                walk(sub, prefix + f.name + ".")

    walk(cls, "")
    return out


def parse_command_line(cls: type, args: list[str]) -> tuple[str | None, list[str]]:
    """``(config file or None, overrides)`` from a stage's arguments; see the module docstring."""
    from jdelta.config import ConfigError, field_type, leaf_fields

    leaves = set(leaf_fields(cls))
    sections = _sections(cls)
    short = short_flags(cls)
    config_file: str | None = None
    overrides: list[str] = []

    def resolve(flag: str) -> str:
        name = flag.replace("-", "_")
        if name in leaves or name in sections:
            return name
        if name in short:
            return short[name]
        import difflib

        options = sorted(leaves | sections | set(short))
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        hint = f"; did you mean --{close[0].replace('_', '-')}?" if close else ""
        raise ConfigError(f"unknown option --{flag}{hint}")

    def is_bool(path: str) -> bool:
        return path in leaves and field_type(cls, path) in (bool, bool | None)

    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config" or a.startswith("--config="):
            if "=" in a:
                config_file = a.split("=", 1)[1]
            else:
                if i + 1 >= len(args):
                    raise ConfigError("--config needs a file")
                config_file = args[i + 1]
                i += 1
        elif a.startswith("--"):
            body = a[2:]
            name, eq, value = body.partition("=")
            negated = False
            if not eq and name.startswith("no-"):
                try:
                    path = resolve(name[3:])
                    negated = is_bool(path)
                except ConfigError:
                    negated = False
            if negated:
                overrides.append(f"{path}=false")
            else:
                path = resolve(name)
                if not eq:
                    nxt = args[i + 1] if i + 1 < len(args) else None
                    if is_bool(path) and (nxt is None or nxt.lower() not in BOOL_WORDS):
                        value = "true"
                    elif nxt is None:
                        raise ConfigError(f"--{name} needs a value")
                    else:
                        value = nxt
                        i += 1
                if path in sections and "=" in value:
                    for part in value.split(","):
                        k, _, v = part.partition("=")
                        overrides.append(f"{path}.{k.strip()}={v.strip()}")
                else:
                    overrides.append(f"{path}={value}")
        elif "=" in a:
            overrides.append(a)
        else:
            raise ConfigError(f"unexpected argument {a!r}: use key=value or --key value")
        i += 1
    return config_file, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name = argv[0]
    if name not in STAGES:
        print(usage(), file=sys.stderr)
        print(f"\njdelta: unknown stage {name!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[name][0])
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(stage_help(name, module))
        return 0
    return run_stage(name, module, argv[1:])


def run_stage(name: str, module, args: list[str]) -> int:
    """Parse, validate and run one stage; user errors become one line on stderr and exit 2."""
    from jdelta.config import load
    from jdelta.errors import UserError

    positional = getattr(module, "POSITIONAL", None)  # e.g. ``jdelta experiment NAME``: NAME is name=NAME
    if positional and args and not args[0].startswith("-") and "=" not in args[0]:
        args = [f"{positional}={args[0]}", *args[1:]]
    try:
        config_file, overrides = parse_command_line(module.Config, args)
        cfg = load(module.Config, config_file, overrides)
        if os.environ.get("JDELTA_DISTRIBUTED") == "1":
            # Multi-host (TPU pod slice / multi-node GPU): every process runs the same program.
            from jdelta import distributed
            from jdelta.config import to_dict

            distributed.initialize_from_env()
            distributed.check_same_program(to_dict(cfg), stage=name)
        return int(module.run(cfg) or 0)
    except (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError) as e:
        if os.environ.get("JDELTA_TRACEBACK") == "1":
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"jdelta {name}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
