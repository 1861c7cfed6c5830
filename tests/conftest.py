"""Test-wide setup: 8 host CPU devices (for mesh tests) and fp32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Tests are grouped by package (tests/core, tests/data, ...); the shared harness modules
# (qwen3_vl_tiny, gemma3_tiny, distill_pair, ...) stay in tests/ and are imported by name.
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Drop every compiled XLA program after each test module.

    Each program compiled by XLA:CPU holds about three memory mappings (its machine code) for as
    long as a cache keeps it; the suite compiles thousands, and past the kernel's
    ``vm.max_map_count`` (65,530) the next ``mmap`` inside XLA's compiler fails and the process
    dies with a segmentation fault (CI, 2026-11-28: at test 815 of 873, with ~60k mappings).
    """
    yield
    jax.clear_caches()
    gc.collect()
