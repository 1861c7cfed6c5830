"""Multi-host runtime: one jdelta program over several processes (JAX's multi-controller model).

Every process (one per host, or several on one machine in the tests) runs the same stage with
the same config. JAX joins them into one set of global devices; a stage's mesh spans all of them.
This module holds the runtime pieces every stage shares:

* :func:`initialize` / :func:`initialize_from_env`: ``jax.distributed.initialize`` with a timeout;
  a process other than the coordinator first waits for the coordinator's port and fails with one
  line when it cannot reach it (instead of JAX aborting, or hanging). CPU processes get Gloo
  collectives (``jax_cpu_collectives_implementation``).
* :func:`check_same_program`: a hash of jdelta's code and the resolved config, exchanged at start;
  processes running other code or another config are refused (naming which processes differ).
* :func:`check_shared_directory`: process 0 writes a nonce file in the run directory, every other
  process must read it back; a directory only some hosts can see is refused.
* :func:`allgather_objects`, :func:`host_array`, :func:`global_array`, :func:`any_process`,
  :func:`barrier`: exchanging host values, fetching a global array to every host, building a global
  array from process-local rows, the coordinated-preemption flag.
* :class:`GlobalPromptBatches`: the prompt pipeline's batches as one program sees them. Each process
  reads and processes only its slice of every global batch (records ``start + p, start + p + P, ...``
  of the next ``batch_size`` positions of the one global record stream), the processed examples are
  exchanged, and every process collates the same global batch -- the batch a one-process run makes
  (same records, same order, same skips), which is then placed on the global mesh.
* :func:`run_dir`: the run directory as several processes share it: process 0 holds the
  :class:`~jdelta.runs.RunDir` (lock, manifest, every result file); the others get a
  :class:`FollowerRun` that reads the same directory and writes nothing, so outputs never collide.
  :func:`private_mirror` does the same for a stage that writes its directory itself (the synthesis
  pipeline): the other processes run in a private copy that is discarded.

Environment (read by :func:`initialize_from_env`, which ``jdelta`` calls when
``JDELTA_DISTRIBUTED=1``): ``JDELTA_COORDINATOR`` (``host:port``), ``JDELTA_NUM_PROCESSES``,
``JDELTA_PROCESS_ID``, ``JDELTA_INIT_TIMEOUT`` (seconds, default 300). Without the first three JAX
detects the cluster itself (TPU pod slices, SLURM, Open MPI).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jdelta.errors import UserError

DEFAULT_INIT_TIMEOUT_S = 300.0
NONCE_FILE = ".jdelta-shared-check"


class DistributedError(UserError):
    """A multi-process run that cannot start: coordinator unreachable, processes that disagree, a
    run directory some processes cannot see, a batch that does not divide across them."""


# ----------------------------------------------------------------------------- start


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once ``host:port`` accepts a TCP connection; :class:`DistributedError` after ``timeout_s``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator address {address!r} is not host:port")
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, max(timeout_s, 0.1))):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise DistributedError(f"coordinator {address} not reachable within {timeout_s:g} s ({last}); start "
                                   "process 0 first, check the address and that its port is open to this host")
        time.sleep(0.2)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: float = DEFAULT_INIT_TIMEOUT_S) -> None:
    """Join this process to the others (``jax.distributed.initialize``); a no-op when already joined.

    With an explicit ``coordinator`` (``host:port``), processes other than 0 wait for it at most
    ``timeout_s`` and fail with a :class:`DistributedError` line when it cannot be reached.
    """
    import jax

    if jax.distributed.is_initialized():
        return
    if (num_processes is None) != (process_id is None) or (coordinator is None and num_processes is not None):
        raise DistributedError("give the coordinator address, the number of processes and this process's id "
                               "together (JDELTA_COORDINATOR, JDELTA_NUM_PROCESSES, JDELTA_PROCESS_ID), or none")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"process id {process_id} not in [0, {num_processes})")
    if coordinator is not None and process_id not in (None, 0):
        wait_for_coordinator(coordinator, timeout_s)
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):  # CPU devices of several processes talk
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # through Gloo (GPU/TPU: unaffected)
    # JAX aborts (SIGABRT, DEADLINE_EXCEEDED) when some process never joins; say so in one line first.
    watchdog = threading.Timer(timeout_s, _never_joined, (coordinator, num_processes, timeout_s))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   initialization_timeout=max(1, int(timeout_s)) + 10)
    finally:
        watchdog.cancel()


def _never_joined(coordinator: str | None, num_processes: int | None, timeout_s: float) -> None:
    print(f"jdelta: error: not every process joined within {timeout_s:g} s (coordinator {coordinator or 'auto'}, "
          f"{num_processes or '?'} processes expected); start all of them with the same coordinator address",
          file=sys.stderr, flush=True)
    os._exit(2)


def initialize_from_env(environ: Mapping[str, str] | None = None) -> None:
    """:func:`initialize` from ``JDELTA_COORDINATOR`` / ``JDELTA_NUM_PROCESSES`` / ``JDELTA_PROCESS_ID`` /
    ``JDELTA_INIT_TIMEOUT`` (see the module docstring)."""
    env = os.environ if environ is None else environ

    def number(key: str, kind=int):
        value = env.get(key)
        if value in (None, ""):
            return None
        try:
            return kind(value)
        except ValueError:
            raise DistributedError(f"{key}={value!r} is not a number") from None

    timeout = number("JDELTA_INIT_TIMEOUT", float)
    initialize(env.get("JDELTA_COORDINATOR") or None, number("JDELTA_NUM_PROCESSES"), number("JDELTA_PROCESS_ID"),
               timeout_s=DEFAULT_INIT_TIMEOUT_S if timeout is None else timeout)


def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def is_multiprocess() -> bool:
    return process_count() > 1


def is_primary() -> bool:
    """Whether this is process 0 (the one that writes run directories)."""
    return process_index() == 0


# ----------------------------------------------------------------------------- exchange


def barrier(name: str) -> None:
    """Wait until every process reached ``name`` (nothing when there is one process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's ``data``, in process order (one collective for the sizes, one for the bytes)."""
    if not is_multiprocess():
        return [data]
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int64))).reshape(-1)
    buf = np.zeros((max(int(sizes.max()), 1),), np.uint8)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [rows[i, : int(n)].tobytes() for i, n in enumerate(sizes)]


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (pickled; the processes run the same code, see :func:`check_same_program`)."""
    return [pickle.loads(b) for b in allgather_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))]


def broadcast_object(obj: Any) -> Any:
    """Process 0's ``obj`` on every process."""
    return allgather_objects(obj if is_primary() else None)[0]


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (the coordinated-preemption decision)."""
    if not is_multiprocess():
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.array([int(bool(flag))], np.int32))).any())


def host_array(x: Any) -> np.ndarray:
    """``x`` as a NumPy array on this host; a global array spanning other processes is gathered."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gathered_model(model):
    """``model`` with every array as a host copy when its arrays span several processes (for export);
    every process must call it. One process: ``model`` unchanged."""
    if not is_multiprocess():
        return model
    import jax
    from flax import nnx

    cpu = jax.local_devices(backend="cpu")[0]  # host memory: a whole model may not fit one accelerator
    nnx.update(model, jax.tree.map(lambda x: jax.device_put(host_array(x), cpu), nnx.state(model)))
    return model


def global_array(local: np.ndarray, sharding, global_shape: tuple[int, ...] | None = None):
    """A global array from this process's rows (``jax.make_array_from_process_local_data``): the
    processes' ``local`` blocks, in process order along the sharded leading axis."""
    import jax

    return jax.make_array_from_process_local_data(sharding, np.asarray(local), global_shape)


def local_rows(n: int, index: int | None = None, count: int | None = None) -> range:
    """This process's contiguous block of ``n`` rows (``n`` must divide by the process count)."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    check_divides(n, count, "rows", "processes")
    k = n // count
    return range(index * k, (index + 1) * k)


def check_divides(total: int, parts: int, what: str, among: str) -> None:
    if parts > 0 and total % parts:
        raise DistributedError(f"{what} {total} does not divide across {parts} {among}")


def check_batch(batch_size: int, *, key: str = "batch_size", mesh=None) -> None:
    """Refuse a global batch that does not divide across the processes (and the mesh's batch axes)."""
    check_divides(batch_size, process_count(), key, "processes")
    if mesh is not None:
        from jdelta.sharding import logical_to_spec

        spec = logical_to_spec(("batch",), None, mesh)
        axes = spec[0] if len(spec) else None
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if batch_size % size and is_multiprocess():
            raise DistributedError(f"{key} {batch_size} does not divide across the {size} devices of the mesh's "
                                   f"batch axes {axes}")


# ----------------------------------------------------------------------------- agreement


def code_fingerprint() -> str:
    """BLAKE2b of every jdelta source file (path and bytes) and the versions of its runtime packages."""
    import importlib.metadata as md

    root = Path(__file__).resolve().parent
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"):
        try:
            h.update(f"{pkg}={md.version(pkg)}".encode())
        except md.PackageNotFoundError:
            pass
    return h.hexdigest()


def config_fingerprint(config: Any) -> str:
    return hashlib.blake2b(json.dumps(config, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def check_same_program(config: Any, *, stage: str = "") -> None:
    """Refuse to start unless every process runs the same jdelta code with the same resolved ``config``."""
    if not is_multiprocess():
        return
    mine = {"stage": stage, "code": code_fingerprint(), "config": config_fingerprint(config)}
    everyone = allgather_objects(mine)
    for what, label in (("stage", "stage"), ("code", "jdelta code (or package versions)"),
                        ("config", "resolved config")):
        values = [e[what] for e in everyone]
        if len(set(values)) > 1:
            groups: dict[str, list[int]] = {}
            for i, v in enumerate(values):
                groups.setdefault(v, []).append(i)
            shown = "; ".join(f"processes {ids} have {v[:12]}" for v, ids in groups.items())
            raise DistributedError(f"the processes run different {label} ({shown}): start every process with the "
                                   "same code and the same config")


def check_shared_directory(path: str | os.PathLike) -> None:
    """Refuse a directory that not every process sees: process 0 writes a nonce, the others read it."""
    if not is_multiprocess():
        return
    directory = Path(path)
    nonce = secrets.token_hex(16) if is_primary() else None
    error = None
    if is_primary():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / NONCE_FILE).write_text(nonce, encoding="utf-8")
        except OSError as e:
            error = f"process 0 cannot write {directory}: {e}"
    nonce, error = broadcast_object((nonce, error))
    if error:
        raise DistributedError(error)
    seen = True
    if not is_primary():
        try:
            seen = (directory / NONCE_FILE).read_text(encoding="utf-8") == nonce
        except OSError:
            seen = False
    everyone = allgather_objects((seen, socket.gethostname()))
    if is_primary():
        with contextlib.suppress(OSError):
            (directory / NONCE_FILE).unlink()
    blind = [f"{i} ({host})" for i, (ok, host) in enumerate(everyone) if not ok]
    if blind:
        raise DistributedError(f"run directory {directory} is not shared: process(es) {', '.join(blind)} cannot see "
                               "the file process 0 wrote there; use a directory on a filesystem every host mounts")


# ----------------------------------------------------------------------------- run directories


class FollowerRun:
    """A run directory as a process other than 0 sees it: same path, reads allowed, writes skipped.

    ``resumed`` / ``previous`` / ``manifest`` are process 0's (sent when the directory was opened).
    """

    writes = False

    def __init__(self, path: Path, state: Mapping[str, Any]):
        self.path = path
        self.resumed = bool(state["resumed"])
        self.previous = state["previous"]
        self.manifest = dict(state["manifest"])

    def file(self, rel: str | os.PathLike) -> Path:
        return self.path / rel

    def commit(self) -> None:
        pass

    def update(self, **fields: Any) -> dict[str, Any]:
        self.manifest.update(fields)
        return self.manifest

    def write_atomic(self, rel: str | os.PathLike, data: str | bytes) -> Path:  # noqa: ARG002
        return self.file(rel)

    @contextlib.contextmanager
    def open_atomic(self, rel: str | os.PathLike, mode: str = "w"):  # noqa: ARG002
        with open(os.devnull, mode) as f:
            yield f


@contextlib.contextmanager
def run_dir(path: str | os.PathLike, stage: str, **kwargs: Any) -> Iterator[Any]:
    """``RunDir(path, stage, **kwargs)`` on process 0, a :class:`FollowerRun` elsewhere (one process:
    exactly ``RunDir``). The directory must be visible to every process (:func:`check_shared_directory`);
    an error opening it on process 0 is raised on every process."""
    from jdelta.runs import RunDir, RunDirError

    if not is_multiprocess():
        with RunDir(path, stage, **kwargs) as run:
            run.writes = True
            yield run
        return
    check_shared_directory(path)
    if is_primary():
        try:
            run = RunDir(path, stage, **kwargs).__enter__()
        except Exception as e:
            broadcast_object({"error": f"{type(e).__name__}: {e}", "kind": isinstance(e, UserError)})
            raise
        state = {"resumed": run.resumed, "previous": run.previous, "manifest": run.manifest}
        broadcast_object(state)
        run.writes = True
        try:
            yield run
        finally:
            run.__exit__(None, None, None)
        return
    state = broadcast_object(None)
    if "error" in state:
        raise (RunDirError if state["kind"] else RuntimeError)(f"process 0 could not open {path}: {state['error']}")
    yield FollowerRun(Path(path).absolute(), state)


@contextlib.contextmanager
def private_mirror(path: str | os.PathLike) -> Iterator[Path]:
    """The directory this process should run a file-driven stage in (the synthesis pipeline).

    Process 0 gets ``path``; every other process a private copy of it as it was at the start (so all
    make the same resume decisions and run the same model computations in step) that is deleted at
    the end: the results are written once, by process 0. One process: ``path`` itself.
    """
    import shutil
    import tempfile

    path = Path(path)
    if not is_multiprocess():
        yield path
        return
    check_shared_directory(path)
    barrier("jdelta mirror: process 0 waits")
    if is_primary():
        barrier("jdelta mirror: copied")
        yield path
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"jdelta-process-{process_index()}-"))
    try:
        mirror = scratch / path.name
        if path.is_dir():
            shutil.copytree(path, mirror, ignore=shutil.ignore_patterns(".lock*", NONCE_FILE))
        barrier("jdelta mirror: copied")
        yield mirror
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------- prompt batches


def _grain_iterator_base():
    import grain

    return grain.DatasetIterator


class GlobalPromptBatches(_grain_iterator_base()):
    """The prompt pipeline's batches for one program over all processes (see the module docstring).

    The global record stream is :func:`jdelta.data.pipeline.prompt_dataset` of one process (seeded
    shuffle, ``select``, epochs); of each next ``batch_size`` positions process ``p`` processes
    ``p, p + P, ...``. Processed examples are exchanged, skip markers counted (and listed with
    ``keep_skipped``), and whole batches collated exactly as one process would. The state
    (``get_state`` / ``set_state``) is the same on every process: the next stream position, the
    positions of examples read but not yet batched, the skip counts.
    """

    def __init__(self, source, *, tokenizer, config, seed: int = 0, shuffle: bool = True,
                 select: slice | None = None, keep_skipped: bool = False):
        from jdelta.data.pipeline import SkipReport, as_source, prompt_dataset
        from jdelta.data.prompt_format import prompt_format

        super().__init__()
        check_batch(config.batch_size, key="batch size")
        if isinstance(tokenizer, (str, os.PathLike)):
            from jdelta.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self._config = config
        self._ds = prompt_dataset(as_source(source), tokenizer=tokenizer, seed=seed, shuffle=shuffle, config=config,
                                  process_index=0, process_count=1, select=select)
        self._len = len(self._ds)
        self._format = prompt_format(tokenizer, config)
        self._pad_id = self._format.special.pad
        self._collate_format = prompt_format(None, config)  # as jdelta.data.pipeline's iterator collates
        self._pos = 0
        self._buffer: list[tuple[int, dict]] = []
        self.skip_report = SkipReport()
        self.skipped: list[dict] | None = [] if keep_skipped else None
        self.batches = 0

    def __iter__(self) -> GlobalPromptBatches:
        return self

    def _read_round(self) -> None:
        from jdelta.data.pipeline import SKIP_KEY

        b, p, count = self._config.batch_size, process_index(), process_count()
        stop = min(self._pos + b, self._len)
        mine = [self._ds[i] for i in range(self._pos + p, stop, count)]
        everyone = allgather_objects(mine)
        found = [(self._pos + q + count * j, ex) for q, lst in enumerate(everyone) for j, ex in enumerate(lst)]
        for pos, ex in sorted(found, key=lambda t: t[0]):
            if SKIP_KEY in ex:
                self.skip_report.add(ex[SKIP_KEY], ex["message"])
                if self.skipped is not None:
                    self.skipped.append({"record_index": int(ex.get("record_index", -1)), "id": ex.get("id"),
                                         "reason": ex[SKIP_KEY], "message": ex["message"]})
            else:
                self._buffer.append((pos, ex))
        self._pos = stop

    def __next__(self) -> dict[str, np.ndarray]:
        from jdelta.data.pipeline import collate

        b = self._config.batch_size
        while len(self._buffer) < b and self._pos < self._len:
            self._read_round()
        if not self._buffer or (self._config.drop_remainder and len(self._buffer) < b):
            raise StopIteration
        examples = [ex for _, ex in self._buffer[:b]]
        del self._buffer[:b]
        self.batches += 1
        return collate(examples, self._config, self._pad_id, self._collate_format)

    def get_state(self) -> dict:
        return {"position": self._pos, "buffered": [pos for pos, _ in self._buffer],
                "skips": self.skip_report.as_dict(), "batches": self.batches}

    def set_state(self, state: dict) -> None:
        from jdelta.data.pipeline import SkipReport

        self._pos = int(state["position"])
        self._buffer = [(int(i), self._ds[int(i)]) for i in state["buffered"]]
        self.skip_report = SkipReport.from_dict(state["skips"])
        self.batches = int(state["batches"])


def prompt_batches(source, *, tokenizer, config, seed: int = 0, shuffle: bool = True, select: slice | None = None,
                   keep_skipped: bool = False):
    """The prompt batches of one program: :func:`jdelta.data.pipeline.make_prompt_batches` in one
    process, :class:`GlobalPromptBatches` (the same batches, records read once across processes) in
    several."""
    if is_multiprocess():
        return GlobalPromptBatches(source, tokenizer=tokenizer, config=config, seed=seed, shuffle=shuffle,
                                   select=select, keep_skipped=keep_skipped)
    from jdelta.data.pipeline import make_prompt_batches

    return make_prompt_batches(source, tokenizer=tokenizer, seed=seed, shuffle=shuffle, config=config,
                               process_index=0, process_count=1, select=select, keep_skipped=keep_skipped)


__all__ = [
    "DistributedError",
    "FollowerRun",
    "GlobalPromptBatches",
    "allgather_bytes",
    "allgather_objects",
    "any_process",
    "barrier",
    "broadcast_object",
    "check_batch",
    "check_same_program",
    "check_shared_directory",
    "code_fingerprint",
    "gathered_model",
    "global_array",
    "host_array",
    "initialize",
    "initialize_from_env",
    "is_multiprocess",
    "is_primary",
    "local_rows",
    "process_count",
    "process_index",
    "private_mirror",
    "prompt_batches",
    "run_dir",
]
