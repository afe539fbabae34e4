"""Whether float32 matrix products on this CPU give the same bits for the same numbers stored at other addresses.
Two processes of one run place their tensors differently; where the product depends on the placement, sampling
can turn a last-bit difference into another token and the processes drift apart. MKL's conditional numerical
reproducibility (`MKL_CBWR=AUTO,STRICT`, read when MKL starts) removes that dependence.

    python benchmarks/cpu_reproducibility.py [--threads 2]

Runs itself once as it is and once with MKL_CBWR=AUTO,STRICT (unless already set) and prints, for each, how many
shifted copies of the model's matrix products (SmolLM2-135M's shapes) changed a result.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

# (rows, inputs, outputs): the projections, the MLP and a slice of the LM head
SHAPES = [(120, 576, 1536), (7, 576, 576), (64, 576, 192), (117, 576, 6144), (8, 1536, 576)]
OFFSETS = range(1, 16)  # floats by which each copy is shifted from torch's 64-byte aligned start


def count_changed(threads: int) -> tuple[int, int]:
    """(copies whose product differs from the aligned one's, copies tried)."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    changed = tried = 0
    for rows, inputs, outputs in SHAPES:
        x, w = torch.randn(rows, inputs), torch.randn(outputs, inputs)
        aligned = torch.nn.functional.linear(x, w)
        for offset in OFFSETS:
            shifted = torch.empty(rows * inputs + offset)[offset:].view(rows, inputs)
            shifted.copy_(x)
            tried += 1
            changed += not torch.equal(torch.nn.functional.linear(shifted, w), aligned)
    return changed, tried


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        changed, tried = count_changed(args.threads)
        print(f"MKL_CBWR={os.environ.get('MKL_CBWR', '(unset)')}, {args.threads} threads: {changed} of {tried} "
              "shifted copies changed the product")
        return
    for extra in ({}, {"MKL_CBWR": os.environ.get("MKL_CBWR") or "AUTO,STRICT"}):
        env = {**os.environ, **extra}
        if not extra:
            env.pop("MKL_CBWR", None)
        subprocess.run([sys.executable, __file__, "--child", "--threads", str(args.threads)], env=env, check=True)


if __name__ == "__main__":
    main()
