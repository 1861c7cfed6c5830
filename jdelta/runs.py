"""The run-directory protocol every stage uses.

A run directory holds ``manifest.json`` (stage, config, input fingerprints, counts, ``complete``),
the stage's outputs, and a ``.lock`` file. :class:`RunDir` gives a stage:

* **a lock**: a second process on a live run directory is refused (``fcntl.flock``, released by
  the kernel when the holder dies, so a killed run never leaves a stale lock);
* **reuse checks**: the manifest remembers the config and the inputs' content fingerprints; a
  rerun with other settings is refused naming each differing key (``overwrite`` discards the old
  run instead). Until the stage calls :meth:`RunDir.commit` (its first unit of work is on disk)
  the directory is not bound to its settings, so a failed start (a model that did not load)
  leaves it reusable;
* **atomic files**: every file is written to a temporary name and renamed into place, so a kill
  leaves either the old complete file or the new complete one, never a truncated one.

Inputs are fingerprinted by content (streamed BLAKE2b), so a file edited in place at the same size
is a different input.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from jdelta.config import diff_keys
from jdelta.errors import RunDirError

MANIFEST = "manifest.json"
LOCK = ".lock"
HASH_CHUNK = 8 << 20


# ----------------------------------------------------------------------------- files


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` via a unique temporary file, fsync and an atomic rename."""
    with open_atomic(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file object whose contents replace ``path`` only when the block exits without error.

    The previous file (if any) stays intact until then; on an exception the temporary file is
    removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    kwargs = {} if "b" in mode else {"encoding": "utf-8"}
    f = open(tmp, mode, **kwargs)  # noqa: SIM115 (closed below on both paths)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunDirError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from None


def dumps_jsonl(rows: Iterable[Mapping[str, Any]], sort_keys: bool = True) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=sort_keys) + "\n" for r in rows)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file; a bad line raises naming the file and line."""
    p = Path(path)
    rows = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rows.append(json.loads(raw.decode("utf-8")))
            except UnicodeDecodeError as e:
                raise RunDirError(f"{p} line {lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise RunDirError(f"{p} line {lineno}: invalid JSON ({e.msg})") from None
    return rows


# ----------------------------------------------------------------------------- fingerprints


def content_hash(path: str | os.PathLike) -> str:
    """``blake2b:<hex>`` of a file's bytes, or of a directory's files (relative names + bytes), streamed."""
    p = Path(path)
    h = hashlib.blake2b(digest_size=20)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    for f in files:
        if f is not p:
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                h.update(chunk)
        h.update(b"\0")
    return "blake2b:" + h.hexdigest()


def input_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Path and content hash of an input file or directory (what a manifest records per input)."""
    p = Path(path)
    return {"path": str(p.resolve()), "content": content_hash(p)}


# ----------------------------------------------------------------------------- the run directory


class RunDir:
    """A stage's run directory: lock, manifest, reuse check, atomic files. Use as a context manager::

        with RunDir(out, "score", config=to_dict(cfg), inputs={"prompts": input_fingerprint(p)}) as run:
            ...                       # run.path / "shards" ...
            run.write_atomic("shards/shard-00000.jsonl", text)
            run.commit()              # first unit of work is on disk: the settings are now binding
            run.update(counts={...}, complete=True)

    ``config`` and ``inputs`` are compared with a previous manifest's (same stage required);
    ``ignore``: dotted config keys that may change between runs (progress bars, step limits).

    Several processes may share one run directory (``num_processes > 1``, process
    ``process_index``): each takes a *shared* lock on ``.lock`` (so a single-process run and a
    shared one refuse each other) and an exclusive one on ``.lock-process-<i>`` (two processes with
    one index are refused). Then nothing is cleared (siblings may be writing): ``overwrite`` is
    refused, a previous run with other settings is refused once it committed or left files, and
    ``committed`` stays true once any process set it.
    """

    def __init__(self, path: str | os.PathLike, stage: str, *, config: Mapping[str, Any],
                 inputs: Mapping[str, Any] | None = None, overwrite: bool = False, ignore: Iterable[str] = (),
                 process_index: int = 0, num_processes: int = 1):
        if not 0 <= process_index < num_processes:
            raise RunDirError(f"process index {process_index} not in [0, {num_processes})")
        if overwrite and num_processes > 1:
            raise RunDirError("overwrite needs num_processes=1: it discards files that the other processes are writing")
        self.process_index, self.num_processes = int(process_index), int(num_processes)
        self.path = Path(path)
        self.stage = stage
        self.config = dict(config)
        self.inputs = dict(inputs or {})
        self.overwrite = overwrite
        self.ignore = tuple(ignore)
        self.manifest: dict[str, Any] = {}
        self.previous: dict[str, Any] = {}  # the manifest of the run this one resumes ({} when fresh)
        self.resumed = False
        self._lock_fds: list[int] = []

    # -- lifecycle

    def __enter__(self) -> RunDir:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._lock()
            self._check_previous()
            self.manifest = {
                "stage": self.stage,
                "config": self.config,
                "inputs": self.inputs,
                "committed": self.resumed,
                "complete": False,
                "started": _now(),
                **({"resumed_at": _now()} if self.resumed else {}),
                **({"num_processes": self.num_processes} if self.shared else {}),
            }
            write_json(self.path / MANIFEST, self.manifest)
        except BaseException:
            self.close()
            raise

    @property
    def shared(self) -> bool:
        return self.num_processes > 1

    def close(self) -> None:
        while self._lock_fds:
            fd = self._lock_fds.pop()
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _lock(self) -> None:
        if not self.shared:
            self._flock(LOCK, fcntl.LOCK_EX, "another jdelta process")
            return
        self._flock(LOCK, fcntl.LOCK_SH, "a single-process jdelta run (num_processes=1)")
        self._flock(f"{LOCK}-process-{self.process_index}", fcntl.LOCK_EX,
                    f"another jdelta process with process_index={self.process_index}")

    def _flock(self, name: str, mode: int, holder: str) -> None:
        fd = os.open(self.path / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except OSError as e:
            pid = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                who = f"{holder} (pid {pid})" if pid and mode == fcntl.LOCK_EX else holder
                raise RunDirError(f"{self.path} is in use by {who}; wait for it to finish or use another "
                                  "output directory") from None
            raise
        if mode == fcntl.LOCK_EX:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fds.append(fd)

    def _check_previous(self) -> None:
        if self.shared:
            return self._check_previous_shared()
        mp = self.path / MANIFEST
        if not mp.is_file():
            if any(not p.name.startswith(LOCK) for p in self.path.iterdir()):
                if not self.overwrite:
                    raise RunDirError(f"{self.path} is not empty and holds no jdelta manifest; use another output "
                                      "directory or overwrite=true to clear it")
                self.clear()
            return
        old = read_json(mp)
        if old.get("stage") != self.stage:
            if not self.overwrite:
                raise RunDirError(f"{self.path} holds a {old.get('stage')!r} run, not {self.stage!r}; use another "
                                  "output directory or overwrite=true to discard it")
            self.clear()
            return
        if not old.get("committed"):
            self.clear()  # a start that did no work binds nothing
            return
        diffs = self.differences(old)
        if diffs and not self.overwrite:
            raise RunDirError(f"{self.path} holds a {self.stage} run with other settings: {_shown(diffs)}; rerun with the "
                              "same settings to resume, or use another output directory or overwrite=true")
        if diffs:
            self.clear()
            return
        self.resumed = True
        self.previous = old

    def _check_previous_shared(self) -> None:
        others = [p.name for p in self.path.iterdir() if not p.name.startswith(LOCK) and p.name != MANIFEST]
        mp = self.path / MANIFEST
        if not mp.is_file():
            if others:
                raise RunDirError(f"{self.path} is not empty and holds no jdelta manifest; use another output directory")
            return
        old = read_json(mp)
        if old.get("stage") != self.stage:
            raise RunDirError(f"{self.path} holds a {old.get('stage')!r} run, not {self.stage!r}; use another "
                              "output directory")
        diffs = self.differences(old)
        if diffs and (old.get("committed") or others):
            raise RunDirError(f"{self.path} holds a {self.stage} run with other settings: {_shown(diffs)}; rerun with "
                              "the same settings to resume, or use another output directory (or one process with "
                              "overwrite=true)")
        self.resumed = bool(old.get("committed")) and not diffs
        self.previous = old if self.resumed else {}

    def differences(self, old: Mapping[str, Any]) -> list[str]:
        """Dotted keys of config and inputs that differ from a previous manifest's."""
        def strip(cfg: Mapping[str, Any]) -> dict[str, Any]:
            out = json.loads(json.dumps(cfg, default=str))
            for key in self.ignore:
                node = out
                parts = key.split(".")
                for p in parts[:-1]:
                    node = node.get(p, {}) if isinstance(node, dict) else {}
                if isinstance(node, dict):
                    node.pop(parts[-1], None)
            return out

        new = json.loads(json.dumps({"config": self.config, "inputs": self.inputs}, default=str))
        return diff_keys({"config": strip(old.get("config", {})), "inputs": old.get("inputs", {})},
                         {"config": strip(new["config"]), "inputs": new["inputs"]})

    def clear(self) -> None:
        """Remove everything in the directory but the lock files."""
        for p in self.path.iterdir():
            if p.name.startswith(LOCK):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    # -- writing

    def commit(self) -> None:
        """Mark the settings binding: called once the first unit of work is durably on disk."""
        if not self.manifest.get("committed"):
            self.update(committed=True)

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the manifest and rewrite it atomically."""
        self.manifest.update(fields)
        if fields.get("complete"):
            self.manifest.setdefault("finished", _now())
            self.manifest["committed"] = True
        mp = self.path / MANIFEST
        if self.shared and not self.manifest.get("committed") and mp.is_file() and read_json(mp).get("committed"):
            self.manifest["committed"] = True  # a sibling committed: never unbind the directory
        write_json(mp, self.manifest)
        return self.manifest

    def file(self, rel: str | os.PathLike) -> Path:
        return self.path / rel

    def write_atomic(self, rel: str | os.PathLike, data: str | bytes) -> Path:
        p = self.path / rel
        write_atomic(p, data)
        return p

    def open_atomic(self, rel: str | os.PathLike, mode: str = "w"):
        return open_atomic(self.path / rel, mode)


def _shown(diffs: list[str]) -> str:
    return "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


__all__ = [
    "RunDir",
    "content_hash",
    "dumps_jsonl",
    "input_fingerprint",
    "open_atomic",
    "read_json",
    "read_jsonl",
    "write_atomic",
    "write_json",
]
