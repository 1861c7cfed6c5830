"""Test-wide setup: 8 host CPU devices (for mesh tests) and fp32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# A persistent compilation cache for this test run (a fresh directory, removed at exit), shared by
# the run's pytest processes (xdist's controller makes it, its workers inherit the path): the same
# programs are compiled again and again across tests and workers (new jitted closures, and programs
# dropped below), and a hit loads the compiled program instead of running XLA's compiler again
# (compilation is ~60% of the suite's CPU time). Two workers writing one entry at once is harmless (jax
# checks for the file first; a partly written entry read back fails with a warning and is compiled).
# The multi-process runs the tests start keep their own compilations (jax lets only process 0 of such
# a run write entries). What else was tried for the suite's time and why it is not here:
# benchmarks/RESULTS.md, "Test suite time".
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_XLA_CACHE = os.environ.get("JDELTA_TEST_XLA_CACHE")
if not _XLA_CACHE:  # the run's first pytest process (xdist's controller); its workers inherit the path
    _XLA_CACHE = tempfile.mkdtemp(prefix="jdelta-test-xla-cache-")
    os.environ["JDELTA_TEST_XLA_CACHE"] = _XLA_CACHE
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

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
