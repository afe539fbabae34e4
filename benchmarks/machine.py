"""Which machine a benchmark figure belongs to: the CPU, the instruction sets its speed depends on, and the
kernels torch dispatches a decode step's matrix products to there (read from oneDNN's and MKL's verbose output in
a child process). The benchmarks print `describe()` above their numbers.

    python benchmarks/machine.py
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

# the instruction sets that decide CPU matmul speed, by their /proc/cpuinfo flag
FEATURES = {"avx2": "AVX2", "avx512f": "AVX512", "avx512_vnni": "AVX512-VNNI", "avx512_bf16": "AVX512-BF16",
            "amx_bf16": "AMX-BF16", "amx_tile": "AMX-TILE"}

# one bfloat16 and one float32 product of a decode step's shape (32 rows, SmolLM2-135M's MLP width)
PROBE = """
import torch
torch.nn.functional.linear(torch.randn(32, 576, dtype=torch.bfloat16), torch.randn(1536, 576, dtype=torch.bfloat16))
print("probe: float32", flush=True)
torch.nn.functional.linear(torch.randn(32, 576), torch.randn(1536, 576))
print("probe: capability", torch.backends.cpu.get_cpu_capability(), flush=True)
"""


def cpu_name() -> str:
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The instruction sets of FEATURES this CPU has, in FEATURES' order."""
    flags = next((set(line.split(":", 1)[1].split()) for line in _cpuinfo() if line.startswith("flags")), set())
    return [name for flag, name in FEATURES.items() if flag in flags]


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def parse_dispatch(output: str) -> dict[str, str]:
    """What the probe's verbose output says: torch's CPU capability, oneDNN's ISA, and the kernel of each dtype's
    product (oneDNN's implementation name, or MKL's SGEMM)."""
    out: dict[str, str] = {}
    dtype = "bfloat16"
    for line in output.splitlines():
        fields = line.split(",")
        if line.startswith("probe: float32"):
            dtype = "float32"
        elif line.startswith("probe: capability"):
            out["capability"] = line.split()[-1]
        elif line.startswith("onednn_verbose") and ",info,cpu,isa:" in line:
            out["onednn_isa"] = line.split("isa:", 1)[1].strip()
        elif line.startswith("onednn_verbose") and "exec" in fields and "cpu" in fields and dtype not in out:
            at = fields.index("exec")
            out[dtype] = f"oneDNN {fields[at + 2]} {fields[at + 3]}"
        elif line.startswith("MKL_VERBOSE") and "GEMM(" in line and dtype not in out:
            out[dtype] = f"MKL {line.split()[1].split('(')[0]}"
    return out


def torch_dispatch() -> dict[str, str]:
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    return parse_dispatch(done.stdout + done.stderr)


def describe() -> str:
    """One line: the CPU, its instruction sets, and where torch sends a decode step's products."""
    import torch

    features = cpu_features()
    amx = "" if any(f.startswith("AMX") for f in features) else " (no AMX)"
    kernels = torch_dispatch()
    return (f"cpu: {cpu_name()}, {os.cpu_count()} cores; {' '.join(features) or 'none of ' + ', '.join(FEATURES.values())}"
            f"{amx}; torch {torch.__version__} capability {kernels.get('capability', '?')}; "
            f"bfloat16 linear: {kernels.get('bfloat16', '?')}; float32 linear: {kernels.get('float32', '?')}")


if __name__ == "__main__":
    print(describe())
