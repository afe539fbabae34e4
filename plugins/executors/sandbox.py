"""The `sandbox` executor: runs model-written Python in confined worker processes (see sandbox_worker.py for what
confines a job, docs/azr.md for the limits).

Each worker is a clean interpreter (`python -S -s -B -P`, an empty environment) that forks one child per job, so
a job starts in about a millisecond with nothing of arena's in it. `workers` of them run jobs in parallel. A
worker that dies or stops answering is killed and replaced; the job it held is reported as crashed.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arena import values
from arena.config import option
from arena.errors import ArenaError, ConfigError
from arena.hookspecs import hookimpl
from arena.interfaces import Env, Executor
from arena.plugins.executors.sandbox_worker import PIPE_BYTES, read_exactly
from arena.types import Execution, Job

WORKER = Path(__file__).with_name("sandbox_worker.py")
ASPECTS = ("network", "filesystem", "processes")


@dataclass
class SandboxOptions:
    workers: int = option(0, ge=0)  # parallel worker processes; 0: one per CPU core
    timeout: float = option(2.0, gt=0.0)  # wall-clock seconds per job (program load and every call)
    memory_mb: int = option(512, ge=64)  # address space per job
    file_size_mb: int = option(1, ge=0)  # largest file a job may write (its printed output included)
    scratch_mb: int = option(16, ge=1)  # all a job's files together, where the scratch folder can be a tmpfs
    open_files: int = option(32, ge=8)
    max_value_chars: int = option(10_000, ge=1)  # a returned value with a longer text counts as a failed call
    max_stdout_bytes: int = option(4096, ge=0)  # printed output kept per job
    # protections that must be in force, else the executor refuses to start: network, filesystem, processes
    require: list[str] = field(default_factory=list)

    def check(self) -> None:
        for i, aspect in enumerate(self.require):
            if aspect not in ASPECTS:
                raise ConfigError(f"require.{i}", f"{aspect!r}; expected one of: {', '.join(ASPECTS)}")


def _in_force(aspect: str, text: str) -> bool:
    """Whether a protection report says the protection holds (the worker words failures as 'not ...'/'no ...')."""
    return not text.startswith(("not ", "no "))


class _Worker:
    """One worker process and the scratch folder it owns."""

    def __init__(self, limits: dict[str, Any]):
        self.scratch = tempfile.mkdtemp(prefix="arena-sandbox-")
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-s", "-B", "-P", str(WORKER), json.dumps({**limits, "scratch": self.scratch, "values": values.__file__})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
            env={"PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}, cwd=self.scratch, start_new_session=True)
        try:
            hello = self._read(deadline=time.monotonic() + 30)
            self.protections: dict[str, str] = dict(hello["protections"])
        except Exception:  # noqa: BLE001 - no answer, or not the expected one
            self.kill()
            raise ArenaError(f"the sandbox worker ({WORKER}) did not start; run it by hand to see why") from None

    def request(self, job: Job, limits: dict[str, Any]) -> Execution:
        data = json.dumps({"program": job.program, "inputs": list(job.inputs), "entry": job.entry,
                           "max_value_chars": limits["max_value_chars"]}).encode()
        self.proc.stdin.write(struct.pack(">I", len(data)) + data)
        self.proc.stdin.flush()
        deadline = time.monotonic() + limits["timeout"] + 10
        header = self._read(deadline)
        if header is None:
            raise ArenaError("the sandbox worker stopped answering")
        sizes = (header.get("report_bytes"), header.get("stdout_bytes"))
        if not all(isinstance(n, int) and 0 <= n <= cap for n, cap in zip(
                sizes, (PIPE_BYTES, limits["max_stdout_bytes"]))):
            raise ArenaError(f"the sandbox worker announced {sizes} bytes of report and output")
        report, stdout = (self._read_exactly(n, deadline) for n in sizes)
        if report is None or stdout is None:
            raise ArenaError("the sandbox worker stopped answering")
        return _execution(header, report, stdout.decode("utf-8", "replace"), job, limits)

    def _read(self, deadline: float) -> dict | None:
        """One message, or None when the worker closed its end or passed the deadline."""
        head = self._read_exactly(4, deadline)
        if head is None:
            return None
        body = self._read_exactly(struct.unpack(">I", head)[0], deadline)
        return None if body is None else json.loads(body)

    def _read_exactly(self, n: int, deadline: float) -> bytes | None:
        return read_exactly(self.proc.stdout.fileno(), n, deadline)

    def kill(self) -> None:
        """Stop the worker and remove its folder; never raises (it runs while handling a failure)."""
        try:
            os.killpg(self.proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            shutil.rmtree(self.scratch, ignore_errors=True)
        except Exception:  # noqa: BLE001 - e.g. a folder tree deeper than the recursion limit
            pass


def _execution(header: dict, report: bytes, stdout: str, job: Job, limits: dict[str, Any]) -> Execution:
    """An Execution from the worker's header (how the job ended) and the job's own report. The report is the
    job's text: nothing in it is trusted beyond being one short string or None per input."""
    seconds, status, detail = float(header.get("seconds", 0.0)), header.get("status"), header.get("detail")
    if status != "exited":
        return Execution(str(status), detail=None if detail is None else str(detail)[:300], stdout=stdout,
                         seconds=seconds)
    try:
        data = json.loads(report)
        outputs, errors, load_error = data["outputs"], data["errors"], data["load_error"]
    except Exception:  # noqa: BLE001 - any report that is not the expected JSON (too deep, wrong types, none)
        return Execution("crashed", detail="it exited without a readable report", stdout=stdout, seconds=seconds)
    if load_error is not None:
        return Execution("error", detail=str(load_error)[:300], stdout=stdout, seconds=seconds)
    if not (isinstance(outputs, list) and isinstance(errors, list) and len(outputs) == len(job.inputs) == len(errors)
            and all(o is None or (isinstance(o, str) and len(o) <= limits["max_value_chars"]) for o in outputs)
            and all(e is None or isinstance(e, str) for e in errors)):
        return Execution("crashed", detail="its report does not have one value per input", stdout=stdout,
                         seconds=seconds)
    return Execution("ok", outputs=outputs, errors=[None if e is None else e[:300] for e in errors],
                     stdout=stdout, seconds=seconds)


class SandboxExecutor(Executor):
    """Runs model-written Python in confined, forked worker processes (no network, no files but a scratch folder)."""

    Options = SandboxOptions

    def __init__(self, options: SandboxOptions, env: Env | None = None):
        super().__init__(options, env)
        self.limits = {"timeout": options.timeout, "memory_mb": options.memory_mb,
                       "file_size_mb": options.file_size_mb, "scratch_mb": options.scratch_mb,
                       "open_files": options.open_files, "max_value_chars": options.max_value_chars,
                       "max_stdout_bytes": options.max_stdout_bytes}
        self.size = options.workers or os.cpu_count() or 1
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._protections: dict[str, str] | None = None
        atexit.register(self.close)
        if options.require:  # refuse at start-up, with the key, rather than at the first job
            try:
                self._release(self._acquire())
            except ArenaError as exc:
                raise ConfigError("require", str(exc)) from None

    def protections(self) -> dict[str, str]:
        if self._protections is None:
            self._release(self._acquire())
        return dict(self._protections or {})

    def run(self, jobs: Sequence[Job]) -> list[Execution]:
        if not jobs:
            return []
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.size, thread_name_prefix="sandbox")
        return list(self._pool.map(self._run_one, jobs))

    def _run_one(self, job: Job) -> Execution:
        worker = self._acquire()
        try:
            result = worker.request(job, self.limits)
        except (ArenaError, OSError, ValueError) as exc:  # the worker died, hung or garbled its answer
            self._discard(worker)
            return Execution("lost", detail=f"the worker failed ({exc}); it was replaced")
        self._release(worker)
        return result

    def _acquire(self) -> _Worker:
        """An idle worker, or a new one whose protections are checked against `require` (every new one: a
        replacement may start where namespaces have since run out)."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        worker = _Worker(self.limits)
        missing = [a for a in self.options.require if not _in_force(a, worker.protections.get(a, "no"))]
        if missing:
            worker.kill()
            raise ArenaError(f"{missing[0]} isolation is required but not in force here "
                             f"({worker.protections.get(missing[0], 'unknown')}); remove it from require to run "
                             "without it")
        with self._lock:
            self._all.add(worker)
            if self._protections is None:
                self._protections = worker.protections
        return worker

    def _release(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)

    def _discard(self, worker: _Worker) -> None:
        with self._lock:
            self._all.discard(worker)
        worker.kill()

    def close(self) -> None:
        """Stop every worker, busy ones included."""
        with self._lock:
            workers, self._idle, self._all = list(self._all), [], set()
        for worker in workers:
            worker.kill()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


@hookimpl
def register_executors(register: Any) -> None:
    register("sandbox", SandboxExecutor)
