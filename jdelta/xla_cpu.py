"""XLA:CPU flags jdelta sets by default: XNNPACK/YNNPACK fusions off.

On the 2-core x86 dev VM with jax/jaxlib 0.10.2, XLA:CPU's XNNPACK and YNNPACK fusions made the
toy models' training step (forward + backward, ~2,500 small kernels) about twice as slow as XLA's
own kernels: 120.6 ms vs 59.6 ms per step for the toy teacher at batch 32, forward 19.3 vs 12.7 ms
(``benchmarks/xla_cpu_flags.py``, ``benchmarks/RESULTS.md``). :func:`apply_cpu_defaults` appends
:data:`CPU_FLAGS` to ``XLA_FLAGS`` before jax starts its CPU client: the ``jdelta`` command does it
first thing, and so does the test suite. It never overrides a flag the user set, does nothing
when ``JDELTA_XLA_CPU_DEFAULTS=0``, and does nothing for a jaxlib other than the versions these
flags were measured on (an XLA that does not know a flag aborts at start-up).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

CPU_FLAGS: tuple[str, ...] = (
    "--xla_cpu_experimental_xnn_fusion_type=",
    "--xla_cpu_experimental_ynn_fusion_type=",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_DISABLED",
)
MEASURED_JAXLIB: tuple[str, ...] = ("0.10.",)  # version prefixes the flags exist in and were measured on


def _jaxlib_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("jaxlib")
    except Exception:  # noqa: BLE001 - not installed / unreadable: do nothing
        return None


def apply_cpu_defaults(environ: MutableMapping[str, str] | None = None, *, jaxlib_version: str | None = None
                       ) -> list[str]:
    """Append the :data:`CPU_FLAGS` not already named in ``environ["XLA_FLAGS"]``; returns those
    added (none when disabled, for an unmeasured jaxlib, or when all are set). Must run before jax
    creates its CPU backend (the first computation) to take effect."""
    env = os.environ if environ is None else environ
    if env.get("JDELTA_XLA_CPU_DEFAULTS", "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    ver = jaxlib_version if jaxlib_version is not None else _jaxlib_version()
    if ver is None or not ver.startswith(MEASURED_JAXLIB):
        return []
    current = env.get("XLA_FLAGS", "")
    names = {f.split("=", 1)[0] for f in current.split()}
    added = [f for f in CPU_FLAGS if f.split("=", 1)[0] not in names]
    if added:
        env["XLA_FLAGS"] = " ".join([*current.split(), *added])
    return added


__all__ = ["CPU_FLAGS", "MEASURED_JAXLIB", "apply_cpu_defaults"]
