"""Test-wide setup: 8 host CPU devices (for mesh tests), fp32 matmuls, and the order in which
pytest-xdist hands test modules to its workers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# A persistent compilation cache for this test run (a fresh directory, removed at exit), shared by
# the run's pytest processes (xdist's controller makes it and its workers inherit the path): the same
# programs are compiled again and again across tests and workers (new jitted closures, and every
# module's programs dropped below), and a hit loads the compiled program instead of running XLA's
# compiler again (a smoke experiment: 12-27% less time in two alternated pairs). Two workers writing
# one entry at once is harmless (jax checks for the file first; a partly written entry read back fails
# with a warning and is compiled). Not shared with the multi-process runs the tests start: with it,
# the resumed 2-process run of the SIGTERM test hung until its 300 s timeout (tried 2026-11-29; cause
# not investigated; jax lets only process 0 of a multi-process run write entries).
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_XLA_CACHE = os.environ.get("JDELTA_TEST_XLA_CACHE")
if not _XLA_CACHE:  # the run's first pytest process
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


# ----------------------------------------------------------------------------- module order (xdist)
# With ``-n 2 --dist loadfile`` each worker takes whole test modules from a queue. pytest-xdist orders
# that queue by the number of tests per module, which puts the few-test, multi-process modules (the
# slowest ones) last, where one of them ran alone for the suite's final ~2.5 minutes. Longest first
# instead (LPT scheduling): modules are queued by their measured seconds (tests/module_seconds.json,
# refreshed with ``python tests/module_seconds.py LOG`` from a ``-v --durations=0`` run's output), the
# unlisted ones after them in collection order. Only the order changes, never which tests run.
_MODULE_SECONDS = Path(__file__).with_name("module_seconds.json")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the collection order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    import json

    seconds = json.loads(_MODULE_SECONDS.read_text()) if _MODULE_SECONDS.is_file() else {}
    first_seen: dict[str, int] = {}
    for i, item in enumerate(items):
        first_seen.setdefault(item.nodeid.split("::")[0], i)

    def key(item):
        module = item.nodeid.split("::")[0]
        return (-float(seconds.get(module, 0.0)), first_seen[module])

    items.sort(key=key)  # stable: the tests of one module keep their order
