"""jdelta.runs: the run-directory protocol (lock, reuse checks, atomic files, content fingerprints)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jdelta.errors import RunDirError, UserError
from jdelta.runs import (
    MANIFEST,
    RunDir,
    content_hash,
    input_fingerprint,
    open_atomic,
    read_json,
    read_jsonl,
    write_atomic,
)

CFG = {"sampling": {"n": 4, "seed": 0}, "out": "x", "progress": True}


def start(path, config=CFG, **kw) -> RunDir:
    run = RunDir(path, "score", config=config, **kw)
    run.open()
    return run


def committed_run(path, config=CFG, **kw):
    with RunDir(path, "score", config=config, **kw) as run:
        run.write_atomic("shards/shard-00000.jsonl", '{"id": 1}\n')
        run.commit()
        run.update(counts={"scored": 1}, complete=True)


def python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_manifest_lifecycle(tmp_path):
    with RunDir(tmp_path / "r", "score", config=CFG, inputs={"prompts": {"content": "h"}}) as run:
        m = read_json(run.path / MANIFEST)
        assert m["stage"] == "score" and m["config"] == CFG and not m["committed"] and not m["complete"]
        run.commit()
        assert read_json(run.path / MANIFEST)["committed"]
        run.update(counts={"scored": 3}, complete=True)
    m = read_json(tmp_path / "r" / MANIFEST)
    assert m["complete"] and m["counts"] == {"scored": 3} and "finished" in m


def test_lock_refuses_a_second_holder(tmp_path):
    run = start(tmp_path / "r")
    try:
        with pytest.raises(RunDirError, match=rf"is in use by another jdelta process \(pid {os.getpid()}\)"):
            start(tmp_path / "r")
        # ... and a second process
        p = python(f"""
            from jdelta.runs import RunDir
            RunDir({str(tmp_path / "r")!r}, "score", config={CFG!r}).open()
        """)
        _, err = p.communicate(timeout=120)
        assert p.returncode != 0 and "is in use by another jdelta process" in err
    finally:
        run.close()
    start(tmp_path / "r").close()  # released on close


def test_lock_of_a_killed_holder_is_released(tmp_path):
    p = python(f"""
        import sys, time
        from jdelta.runs import RunDir
        RunDir({str(tmp_path / "r")!r}, "score", config={CFG!r}).open()
        print("locked", flush=True)
        time.sleep(600)
    """)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"pid {p.pid}"):
            start(tmp_path / "r")
    finally:
        p.kill()
        p.wait()
    start(tmp_path / "r").close()


def test_other_settings_are_refused_naming_each_key(tmp_path):
    committed_run(tmp_path / "r", inputs={"prompts": {"content": "blake2b:aa"}})
    other = {**CFG, "sampling": {"n": 8, "seed": 1}}
    with pytest.raises(RunDirError) as e:
        start(tmp_path / "r", config=other, inputs={"prompts": {"content": "blake2b:bb"}})
    msg = str(e.value)
    assert "holds a score run with other settings" in msg and isinstance(e.value, UserError)
    for key in ("config.sampling.n (4 -> 8)", "config.sampling.seed (0 -> 1)",
                "inputs.prompts.content ('blake2b:aa' -> 'blake2b:bb')"):
        assert key in msg
    assert (tmp_path / "r" / "shards" / "shard-00000.jsonl").is_file()  # nothing was touched
    # another stage's run is refused too
    with pytest.raises(RunDirError, match="holds a 'score' run, not 'sample'"):
        RunDir(tmp_path / "r", "sample", config=CFG).open()


def test_same_settings_resume(tmp_path):
    committed_run(tmp_path / "r")
    run = start(tmp_path / "r")
    try:
        assert run.resumed and run.previous["complete"] and run.previous["counts"] == {"scored": 1}
        assert (run.path / "shards" / "shard-00000.jsonl").read_text() == '{"id": 1}\n'
        assert read_json(run.path / MANIFEST)["committed"]  # still bound to its settings
    finally:
        run.close()


def test_uncommitted_previous_run_is_reusable(tmp_path):
    run = start(tmp_path / "r")
    run.write_atomic("partial.txt", "x")  # a failed start: no commit
    run.close()
    run = start(tmp_path / "r", config={**CFG, "sampling": {"n": 8, "seed": 0}})
    try:
        assert not run.resumed and run.previous == {} and not (run.path / "partial.txt").exists()
    finally:
        run.close()


def test_overwrite_clears(tmp_path):
    committed_run(tmp_path / "r")
    run = start(tmp_path / "r", config={**CFG, "out": "y"}, overwrite=True)
    try:
        assert not run.resumed and sorted(p.name for p in run.path.iterdir()) == [".lock", MANIFEST]
        assert read_json(run.path / MANIFEST)["config"]["out"] == "y"
    finally:
        run.close()


def test_ignored_keys_may_change(tmp_path):
    committed_run(tmp_path / "r", ignore=("progress",))
    run = start(tmp_path / "r", config={**CFG, "progress": False}, ignore=("progress",))
    try:
        assert run.resumed
    finally:
        run.close()
    # the manifest now holds the resumed run's value; without ``ignore`` a change is refused
    with pytest.raises(RunDirError, match=r"config.progress \(False -> True\)"):
        start(tmp_path / "r", config=CFG)


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="is not empty and holds no jdelta manifest"):
        start(tmp_path / "r")
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"
    (tmp_path / "f").write_text("")
    with pytest.raises(RunDirError, match="exists and is not a directory"):
        start(tmp_path / "f")


def test_open_atomic_keeps_the_old_file_on_exception(tmp_path):
    target = tmp_path / "out.jsonl"
    write_atomic(target, "old complete\n")
    with pytest.raises(KeyError):
        with open_atomic(target) as f:
            f.write("new partial")
            raise KeyError("boom")
    assert target.read_text() == "old complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # the temporary file is gone
    with open_atomic(target) as f:
        f.write("new complete\n")
    assert target.read_text() == "new complete\n"


def test_open_atomic_keeps_the_old_file_when_the_writer_is_killed(tmp_path):
    target = tmp_path / "out.jsonl"
    write_atomic(target, "old complete\n")
    p = python(f"""
        import time
        from jdelta.runs import open_atomic
        with open_atomic({str(target)!r}) as f:
            f.write("new partial" * 1000)
            f.flush()
            print("writing", flush=True)
            time.sleep(600)
    """)
    try:
        assert p.stdout.readline().strip() == "writing"
        assert any(x.name.endswith(".tmp") for x in tmp_path.iterdir())  # the new data is on disk, aside
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert target.read_text() == "old complete\n"


def test_content_hash_sees_a_same_size_edit(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"id": "a"}\n')
    before = content_hash(f)
    stat = f.stat()
    f.write_text('{"id": "b"}\n')
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert f.stat().st_size == stat.st_size and content_hash(f) != before
    assert content_hash(f) == content_hash(f)
    # directories: names and bytes of their files (hidden files such as .lock are skipped)
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "w.bin").write_bytes(b"\0" * 10)
    h = content_hash(d)
    (d / ".lock").write_text("123")
    assert content_hash(d) == h
    (d / "w.bin").write_bytes(b"\0" * 9 + b"\1")
    assert content_hash(d) != h
    fp = input_fingerprint(f)
    assert fp == {"path": str(f.resolve()), "content": content_hash(f)}
    with pytest.raises(FileNotFoundError):
        content_hash(tmp_path / "missing")


def test_read_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(RunDirError, match=rf"{f} line 3: invalid JSON"):
        read_jsonl(f)
    f.write_bytes(b'{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(f) == [{"a": 1}, {"a": 2}]
    f.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(RunDirError, match="line 1: not UTF-8"):
        read_jsonl(f)
    (tmp_path / "m.json").write_text("{")
    with pytest.raises(RunDirError, match="not valid JSON"):
        read_json(tmp_path / "m.json")


def test_manifest_is_never_truncated_by_a_kill(tmp_path):
    """Every manifest rewrite is atomic: a reader always sees complete JSON."""
    p = python(f"""
        from jdelta.runs import RunDir
        with RunDir({str(tmp_path / "r")!r}, "score", config={CFG!r}) as run:
            run.commit()
            print("ready", flush=True)
            i = 0
            while True:
                i += 1
                run.update(counts={{"scored": i, "pad": "x" * 5000}})
    """)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    m = json.loads((tmp_path / "r" / MANIFEST).read_text())
    assert m["committed"] and m["counts"]["scored"] >= 1
