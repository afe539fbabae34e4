"""Executions per second of small programs: the `sandbox` executor (a clean worker per core that forks a
confined child per job) against a new interpreter per job (`python -S` started for each, no confinement at all:
the cheapest form of that design). AZR validates every proposed task twice and checks most answers by running
them, so this is on its hot path.

    python benchmarks/executor.py [--jobs 400] [--workers 0]

Prints both rates and their ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from arena.plugins.executors.sandbox import SandboxExecutor, SandboxOptions
from arena.types import Job

PROGRAMS = [
    ("def f(x):\n    return x * 2", "21"),
    ("def f(s):\n    return ''.join(sorted(s))", "'hello world'"),
    ("def f(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a", "30"),
    ("import collections\ndef f(xs):\n    return dict(collections.Counter(xs))", "[1, 2, 2, 3, 3, 3]"),
]

ONE_SHOT = """
import json, sys
request = json.loads(sys.stdin.read())
namespace = {}
exec(request["program"], namespace)
print(json.dumps([repr(namespace["f"](*eval("(" + i + ",)"))) for i in request["inputs"]]))
"""


def fresh_interpreter(job: Job) -> str:
    done = subprocess.run([sys.executable, "-S", "-c", ONE_SHOT], input=json.dumps(
        {"program": job.program, "inputs": job.inputs}), capture_output=True, text=True, env={}, timeout=10)
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--workers", type=int, default=0, help="0: one per CPU core")
    args = parser.parse_args()
    workers = args.workers or os.cpu_count() or 1
    jobs = [Job(p, [i]) for p, i in PROGRAMS] * (args.jobs // len(PROGRAMS))

    executor = SandboxExecutor(SandboxOptions(workers=workers))
    executor.run(jobs[:workers * 4])  # start the workers
    t0 = time.perf_counter()
    results = executor.run(jobs)
    sandbox = time.perf_counter() - t0
    assert all(r.ok for r in results), [r for r in results if not r.ok][:1]
    executor.close()

    with ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        outputs = list(pool.map(fresh_interpreter, jobs))
        fresh = time.perf_counter() - t0
    assert all(outputs)

    print(f"{len(jobs)} small programs on {workers} workers ({os.cpu_count()} cores)")
    print(f"sandbox (fork per job, confined):     {len(jobs) / sandbox:8.0f} executions/s")
    print(f"new interpreter per job (unconfined): {len(jobs) / fresh:8.0f} executions/s")
    print(f"sandbox time / new-interpreter time:  {sandbox / fresh:8.2f}x")


if __name__ == "__main__":
    main()
