"""jdelta.xla_cpu: default XLA:CPU flags appended, never overriding the user's, opt-out, version gate."""

from jdelta.xla_cpu import CPU_FLAGS, apply_cpu_defaults


def test_appends_missing_flags_and_keeps_existing():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    added = apply_cpu_defaults(env, jaxlib_version="0.10.2")
    assert added == list(CPU_FLAGS)
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", *CPU_FLAGS]
    assert apply_cpu_defaults(env, jaxlib_version="0.10.2") == []  # idempotent
    assert env["XLA_FLAGS"].split().count(CPU_FLAGS[0]) == 1


def test_user_value_wins():
    env = {"XLA_FLAGS": "--xla_cpu_experimental_xnn_fusion_type=dot"}
    added = apply_cpu_defaults(env, jaxlib_version="0.10.2")
    assert "--xla_cpu_experimental_xnn_fusion_type=dot" in env["XLA_FLAGS"].split()
    assert CPU_FLAGS[0] not in added and len(added) == len(CPU_FLAGS) - 1


def test_opt_out_and_unmeasured_jaxlib():
    env = {"JDELTA_XLA_CPU_DEFAULTS": "0"}
    assert apply_cpu_defaults(env, jaxlib_version="0.10.2") == [] and "XLA_FLAGS" not in env
    env = {}
    assert apply_cpu_defaults(env, jaxlib_version="0.11.2") == [] and "XLA_FLAGS" not in env
    assert apply_cpu_defaults({}, jaxlib_version="0.10.2") == list(CPU_FLAGS)


def test_suite_runs_with_the_flags():
    import os

    flags = os.environ.get("XLA_FLAGS", "").split()
    assert all(f in flags for f in CPU_FLAGS)
