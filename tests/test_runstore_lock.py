"""The run folder lock: one arena process per run folder, freed when the process ends however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from arena.errors import ArenaError
from arena.runstore import RunStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def store(tmp_path) -> RunStore:
    s = RunStore(tmp_path / "run")
    s.create("game: {name: prompts}\n")
    assert s._lock_fd is not None  # a new run holds its folder from the moment it exists
    s.unlock()
    yield s
    s.unlock()


def python(code: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment to run `code` in a fresh interpreter that imports this checkout's arena."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return [sys.executable, "-c", textwrap.dedent(code)], env


def try_lock(root: Path) -> subprocess.CompletedProcess:
    """Lock `root` in a fresh process: exit 0 if it got the lock, 3 with the error line if not."""
    args, env = python(f"""
        import sys
        from arena.errors import ArenaError
        from arena.runstore import RunStore
        try:
            RunStore({str(root)!r}).lock()
        except ArenaError as exc:
            print(exc)
            sys.exit(3)
    """)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)


def test_a_second_lock_on_the_same_folder_is_refused(store):
    store.lock()
    assert store.lock_path.read_text().strip() == str(os.getpid())
    other = RunStore(store.root)
    with pytest.raises(ArenaError) as exc:
        other.lock()
    message = str(exc.value)
    assert message == (f"run.dir {store.root}: another arena process is using this run folder "
                       f"(pid {os.getpid()}); wait for it to finish or stop it")
    store.unlock()
    other.lock()
    other.unlock()


def test_lock_and_unlock_are_idempotent(store):
    store.unlock()  # never locked: nothing to do
    store.lock()
    store.lock()  # already held by this store: still held once
    store.unlock()
    store.unlock()
    RunStore(store.root).lock().unlock()


def test_lock_as_a_context_manager(store):
    with store.lock():
        with pytest.raises(ArenaError, match="another arena process"):
            RunStore(store.root).lock()
    RunStore(store.root).lock().unlock()


def test_lock_needs_the_folder(tmp_path):
    with pytest.raises(ArenaError, match=f"run.dir {tmp_path / 'missing'}"):
        RunStore(tmp_path / "missing").lock()
    assert not (tmp_path / "missing").exists()


def test_another_process_is_refused_until_unlock(store):
    store.lock()
    refused = try_lock(store.root)
    assert refused.returncode == 3, refused.stderr
    assert refused.stdout.strip() == (f"run.dir {store.root}: another arena process is using this run folder "
                                      f"(pid {os.getpid()}); wait for it to finish or stop it")
    store.unlock()
    allowed = try_lock(store.root)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr


def test_kill_9_frees_the_lock(store):
    args, env = python(f"""
        import time
        from arena.runstore import RunStore
        RunStore({str(store.root)!r}).lock()
        time.sleep(120)
    """)
    holder = subprocess.Popen(args, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (store.lock_path.is_file() and store.lock_path.read_text().strip() == str(holder.pid)):
            assert holder.poll() is None and time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.05)
        with pytest.raises(ArenaError, match=f"pid {holder.pid}"):
            store.lock()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    store.lock()
    assert store.lock_path.read_text().strip() == str(os.getpid())


def test_the_lock_file_does_not_disturb_resume(store):
    store.lock()
    store.append_metrics({"iteration": 1})
    store.rewind(None)
    assert store.lock_path.is_file() and store.metrics_path.stat().st_size == 0
    with pytest.raises(ArenaError, match="already holds a run"):
        store.check_new()


def test_a_folder_with_unrelated_files_is_not_called_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ArenaError, match=r"not empty \(holds notes.txt\) and no run; choose a new or empty folder"):
        RunStore(tmp_path).check_new()
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_creating_a_run_takes_the_lock_before_anything_is_written(tmp_path):
    """Two new runs given one run.dir: the second is refused by the lock or by the emptiness check made under it,
    and the first run's config is never overwritten."""
    first = RunStore(tmp_path / "run")
    first.create("first\n")
    with pytest.raises(ArenaError, match="another arena process|already holds a run"):
        RunStore(tmp_path / "run").create("second\n")
    assert first.config_path.read_text() == "first\n"
    first.unlock()
