"""How often `arena eval RUN backend=vllm` gives the same held-out answers and scores as `arena eval RUN` on the hf
backend, item by item, for the base and the trained model. Run it where vllm is installed:

    python benchmarks/eval_agreement.py RUN [key=value ...]      # e.g. model.dtype=float32

Both evaluations run in processes of their own, one after the other, with the same overrides; the JSON files they
write are compared: for each model and measure the share of items with equal scores, and the share of equal
greedy answers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def agreement(hf: dict, vllm: dict) -> dict[str, float]:
    """Per model and measure (and `answers`), the share of held-out items on which the two results are equal."""
    out = {}
    for label, model in hf["models"].items():
        for measure, values in model["items"].items():
            other = vllm["models"][label]["items"].get(measure)
            if isinstance(values, list) and isinstance(other, list) and len(values) == len(other) and values:
                out[f"{label} {measure}"] = sum(a == b for a, b in zip(values, other)) / len(values)
        pairs = [(a[label], b[label]) for a, b in zip(hf["answers"], vllm["answers"])]
        if pairs:
            out[f"{label} answers"] = sum(a == b for a, b in pairs) / len(pairs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished run folder")
    parser.add_argument("overrides", nargs="*", help="eval overrides for both sides (model.dtype=float32, ...)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for backend in ("hf", "vllm"):
            out = Path(folder) / f"{backend}.json"
            done = subprocess.run([sys.executable, "-m", "arena", "eval", args.run, f"backend={backend}",
                                   *args.overrides, "--out", str(out)], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"arena eval backend={backend} failed:\n{done.stderr[-3000:]}")
            results[backend] = json.loads(out.read_text())
    print(f"{args.run} {' '.join(args.overrides)}: the same on vllm as on hf")
    for key, share in agreement(results["hf"], results["vllm"]).items():
        print(f"  {key:<40} {share:6.1%}")


if __name__ == "__main__":
    main()
