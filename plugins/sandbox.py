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
import select
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

from arena.config import option
from arena.errors import ArenaError, ConfigError
from arena.hookspecs import hookimpl
from arena.interfaces import Env, Executor
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
            [sys.executable, "-S", "-s", "-B", "-P", str(WORKER), json.dumps({**limits, "scratch": self.scratch})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
            env={"PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}, cwd=self.scratch, start_new_session=True)
        hello = self._read(deadline=time.monotonic() + 30)
        if not hello or not hello.get("ready"):
            self.kill()
            raise ArenaError(f"the sandbox worker ({WORKER}) did not start; run it by hand to see why")
        self.protections: dict[str, str] = hello["protections"]

    def request(self, job: Job, limits: dict[str, Any]) -> Execution:
        data = json.dumps({"program": job.program, "inputs": list(job.inputs), "entry": job.entry,
                           "max_value_chars": limits["max_value_chars"]}).encode()
        self.proc.stdin.write(struct.pack(">I", len(data)) + data)
        self.proc.stdin.flush()
        answer = self._read(deadline=time.monotonic() + limits["timeout"] + 10)
        if answer is None:
            raise ArenaError("the sandbox worker stopped answering")
        return _execution(answer, job, limits)

    def _read(self, deadline: float) -> dict | None:
        """One message, or None when the worker closed its end or passed the deadline."""
        head = self._read_exactly(4, deadline)
        if head is None:
            return None
        body = self._read_exactly(struct.unpack(">I", head)[0], deadline)
        return None if body is None else json.loads(body)

    def _read_exactly(self, n: int, deadline: float) -> bytes | None:
        fd, chunks, got = self.proc.stdout.fileno(), [], 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, n - got)
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def kill(self) -> None:
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
        shutil.rmtree(self.scratch, ignore_errors=True)


def _execution(answer: dict, job: Job, limits: dict[str, Any]) -> Execution:
    """The worker's answer as an Execution, checked for shape: a job's report is the job's own text, so nothing in
    it is trusted beyond being a list of short strings, one per input."""
    outputs, errors = answer.get("outputs") or [], answer.get("errors") or []
    status = answer.get("status")
    if status == "ok" and not (
            isinstance(outputs, list) and isinstance(errors, list) and len(outputs) == len(job.inputs) == len(errors)
            and all(o is None or (isinstance(o, str) and len(o) <= limits["max_value_chars"]) for o in outputs)
            and all(e is None or isinstance(e, str) for e in errors)):
        return Execution("crashed", detail="its report does not have one value per input",
                         seconds=float(answer.get("seconds", 0.0)))
    if status != "ok":
        outputs, errors = [], []
    return Execution(str(status), outputs=outputs, errors=[None if e is None else e[:300] for e in errors],
                     detail=None if answer.get("detail") is None else str(answer["detail"])[:300],
                     stdout=str(answer.get("stdout", ""))[:limits["max_stdout_bytes"]],
                     seconds=float(answer.get("seconds", 0.0)))


class SandboxExecutor(Executor):
    """Runs model-written Python in confined, forked worker processes (no network, no files but a scratch folder)."""

    Options = SandboxOptions

    def __init__(self, options: SandboxOptions, env: Env | None = None):
        super().__init__(options, env)
        self.limits = {"timeout": options.timeout, "memory_mb": options.memory_mb,
                       "file_size_mb": options.file_size_mb, "scratch_mb": options.scratch_mb, "open_files": options.open_files,
                       "max_value_chars": options.max_value_chars, "max_stdout_bytes": options.max_stdout_bytes,
                       "max_report_bytes": 2 * options.max_value_chars * 1024 + 65536}
        self.size = options.workers or os.cpu_count() or 1
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._protections: dict[str, str] | None = None
        self.executions = 0
        atexit.register(self.close)

    def protections(self) -> dict[str, str]:
        if self._protections is None:
            self._release(self._acquire())
        return dict(self._protections or {})

    def run(self, jobs: Sequence[Job]) -> list[Execution]:
        if not jobs:
            return []
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.size, thread_name_prefix="sandbox")
        results = list(self._pool.map(self._run_one, jobs))
        self.executions += len(jobs)
        return results

    def _run_one(self, job: Job) -> Execution:
        worker = self._acquire()
        try:
            result = worker.request(job, self.limits)
        except (ArenaError, OSError, ValueError) as exc:  # the worker died, hung or garbled its answer
            worker.kill()
            return Execution("lost", detail=f"the worker failed ({exc}); it was replaced")
        self._release(worker)
        return result

    def _acquire(self) -> _Worker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        worker = _Worker(self.limits)
        with self._lock:
            if self._protections is None:
                self._protections = worker.protections
                missing = [a for a in self.options.require if not _in_force(a, worker.protections.get(a, "no"))]
                if missing:
                    worker.kill()
                    raise ArenaError(f"executor.require: {missing[0]} isolation is required but not in force "
                                     f"here ({worker.protections.get(missing[0], 'unknown')}); remove it from "
                                     "require to run without it")
        return worker

    def _release(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)

    def close(self) -> None:
        with self._lock:
            workers, self._idle = self._idle, []
        for worker in workers:
            worker.kill()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


@hookimpl
def register_executors(register: Any) -> None:
    register("sandbox", SandboxExecutor)
