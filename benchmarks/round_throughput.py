"""Samples per second of a self-play round played by one process and by several, side by side in one run.

    python benchmarks/round_throughput.py [--layouts 1x2,2x1] [--iterations 3] [--device cpu]

Each layout PxT plays the same `arena play prompts` run (the embedded model, ShareGPT prompts, the self_reward
judge, grpo) with P processes of T threads each: P=1 as a plain process, P>1 under torchrun (gloo on a CPU, one
device per process with NCCL on GPUs). A round's time is `time/iteration` from metrics.jsonl; the first round is
left out (warm-up) and the others' median is reported, with its generate, judge and optimize parts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = ["game.prompts_per_round=8", "game.group_size=4", "game.max_new_tokens=64", "run.eval_every=0",
            "run.loggers=[plain]", "run.keep_checkpoints=1"]
PARTS = ("generate", "judge", "optimize")


def layout(text: str) -> tuple[int, int]:
    processes, threads = (int(x) for x in text.lower().split("x"))
    if processes < 1 or threads < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected PROCESSESxTHREADS, e.g. 2x1")
    return processes, threads


def play(processes: int, threads: int, iterations: int, device: str, extra: list[str]) -> list[dict]:
    """Run one layout in a fresh folder; its metrics records per iteration."""
    run = Path(tempfile.mkdtemp(prefix="arena-throughput-")) / "run"
    args = ["-m", "arena", "play", "prompts", f"run.dir={run}", f"run.iterations={iterations}",
            f"run.threads={threads}", f"model.device={device}", *SETTINGS, *extra]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{processes}x{threads} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarise(records: list[dict], samples: int) -> dict[str, float]:
    rounds = [r for r in records if r.get("iteration", 0) > 1] or [r for r in records if r.get("iteration", 0) > 0]
    seconds = statistics.median(r["time/iteration"] for r in rounds)
    out = {"seconds": seconds, "samples_per_second": samples / seconds}
    for part in PARTS:
        values = [r.get(f"time/{part}", 0.0) for r in rounds]
        out[part] = statistics.median(values)
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="1x2,2x1", help="PROCESSESxTHREADS, comma-separated (default 1x2,2x1)")
    parser.add_argument("--iterations", type=int, default=3, help="rounds per layout; the first is warm-up")
    parser.add_argument("--device", default="cpu", help="model.device (cuda: one GPU per process)")
    parser.add_argument("extra", nargs="*", help="more key=value overrides for every layout")
    args = parser.parse_args()
    layouts = [layout(x) for x in args.layouts.split(",")]
    samples = 8 * 4
    print(f"cpu: {cpu_name()}, {os.cpu_count()} cores; round: 8 prompts x 4 "
          f"samples x 64 tokens, embedded model, self_reward, grpo")
    results = {}
    for processes, threads in layouts:
        results[(processes, threads)] = summarise(play(processes, threads, args.iterations, args.device,
                                                       args.extra), samples)
    base = results[layouts[0]]["samples_per_second"]
    print(f"{'layout':>8} {'s/round':>8} {'samples/s':>10} {'vs first':>9} " + " ".join(f"{p:>9}" for p in PARTS))
    for (processes, threads), r in results.items():
        print(f"{processes}x{threads:<6} {r['seconds']:8.2f} {r['samples_per_second']:10.2f} "
              f"{r['samples_per_second'] / base:8.2f}x " + " ".join(f"{r[p]:9.2f}" for p in PARTS))


if __name__ == "__main__":
    main()
