"""Samples per second of a self-play round played by one process and by several, and on each backend, side by
side in one run; with the memory of every process of the run, round by round.

    python benchmarks/round_throughput.py [--layouts 1x2,2x1] [--backends hf] [--iterations 3] [--device cpu]
    python benchmarks/round_throughput.py --layouts 1x2 --backends hf,vllm --iterations 30   # where vllm is installed

Each layout PxT plays the same `arena play prompts` run (the embedded model, ShareGPT prompts, the self_reward
judge, grpo) with P processes of T threads each: P=1 as a plain process, P>1 under torchrun (gloo on a CPU, one
device per process with NCCL on GPUs), once per backend. A round's time is `time/iteration` from metrics.jsonl;
the first round is left out (warm-up) and the others' median is reported, with its generate, judge and optimize
parts. Memory is the resident set of the launched process and all below it (vLLM's engine runs in processes of
its own), sampled twice a second: the peak during the second round and during the last, and the growth per round
over the second half of the run (a flat run: about 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = ["game.prompts_per_round=8", "game.group_size=4", "game.max_new_tokens=64", "run.eval_every=0",
            "run.loggers=[plain]", "run.keep_checkpoints=1"]
PARTS = ("generate", "judge", "optimize")


def layout(text: str) -> tuple[int, int]:
    processes, threads = (int(x) for x in text.lower().split("x"))
    if processes < 1 or threads < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected PROCESSESxTHREADS, e.g. 2x1")
    return processes, threads


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def play(processes: int, threads: int, backend: str, iterations: int, device: str,
         extra: list[str]) -> tuple[list[dict], dict[int, int]]:
    """Run one layout in a fresh folder: its metrics records per iteration, and the peak resident bytes of the
    run's processes while each iteration played."""
    run = Path(tempfile.mkdtemp(prefix="arena-throughput-")) / "run"
    args = ["-m", "arena", "play", "prompts", f"run.dir={run}", f"run.iterations={iterations}",
            f"run.threads={threads}", f"model.device={device}", f"backend={backend}", *SETTINGS, *extra]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    metrics = run / "metrics.jsonl"
    peaks: dict[int, int] = {}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            playing = 1 + (len(metrics.read_text().splitlines()) if metrics.exists() else 0)  # no eval: a line a round
            peaks[playing] = max(peaks.get(playing, 0), tree_rss(proc.pid))
            time.sleep(0.5)
        if proc.returncode != 0:
            log.seek(0)
            sys.exit(f"{processes}x{threads} {backend} failed:\n{log.read()[-3000:]}")
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()], peaks


def growth_per_round(peaks: dict[int, int], iterations: int) -> float:
    """Least-squares slope of the peak resident bytes over the second half of the rounds."""
    points = [(i, peaks[i]) for i in range(max(2, iterations // 2 + 1), iterations + 1) if i in peaks]
    if len(points) < 2:
        return float("nan")
    mx = statistics.mean(i for i, _ in points)
    my = statistics.mean(b for _, b in points)
    return sum((i - mx) * (b - my) for i, b in points) / sum((i - mx) ** 2 for i, _ in points)


def summarise(records: list[dict], samples: int) -> dict[str, float]:
    rounds = [r for r in records if r.get("iteration", 0) > 1] or [r for r in records if r.get("iteration", 0) > 0]
    seconds = statistics.median(r["time/iteration"] for r in rounds)
    out = {"seconds": seconds, "samples_per_second": samples / seconds}
    for part in PARTS:
        values = [r.get(f"time/{part}", 0.0) for r in rounds]
        out[part] = statistics.median(values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="1x2,2x1", help="PROCESSESxTHREADS, comma-separated (default 1x2,2x1)")
    parser.add_argument("--backends", default="hf", help="backends, comma-separated (default hf; vllm: one process)")
    parser.add_argument("--iterations", type=int, default=3, help="rounds per layout; the first is warm-up")
    parser.add_argument("--device", default="cpu", help="model.device (cuda: one GPU per process)")
    parser.add_argument("extra", nargs="*", help="more key=value overrides for every layout")
    args = parser.parse_args()
    runs = [(layout(x), backend) for backend in args.backends.split(",") for x in args.layouts.split(",")]
    settings = dict(item.split("=", 1) for item in [*SETTINGS, *args.extra] if "=" in item)
    prompts, group = int(settings["game.prompts_per_round"]), int(settings["game.group_size"])
    samples = prompts * group
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import describe

    print(describe())
    print(f"round: {prompts} prompts x {group} samples x "
          f"{settings['game.max_new_tokens']} tokens, embedded model, self_reward, grpo; {args.iterations} rounds each")
    results = {}
    for (processes, threads), backend in runs:
        records, peaks = play(processes, threads, backend, args.iterations, args.device, args.extra)
        results[(processes, threads, backend)] = {
            **summarise(records, samples), "rss_second": peaks.get(2, 0) / 2**30,
            "rss_last": peaks.get(args.iterations, 0) / 2**30,
            "growth": growth_per_round(peaks, args.iterations) / 2**20}
    base = next(iter(results.values()))["samples_per_second"]
    print(f"{'layout':>8} {'backend':>8} {'s/round':>8} {'samples/s':>10} {'vs first':>9} "
          + " ".join(f"{p:>9}" for p in PARTS) + f" {'GiB r2':>7} {'GiB last':>8} {'MiB/round':>9}")
    for (processes, threads, backend), r in results.items():
        print(f"{processes}x{threads:<6} {backend:>8} {r['seconds']:8.2f} {r['samples_per_second']:10.2f} "
              f"{r['samples_per_second'] / base:8.2f}x " + " ".join(f"{r[p]:9.2f}" for p in PARTS)
              + f" {r['rss_second']:7.2f} {r['rss_last']:8.2f} {r['growth']:9.1f}")


if __name__ == "__main__":
    main()
