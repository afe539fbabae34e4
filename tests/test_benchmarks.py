"""benchmarks/learning.py: the clock that leaves out evaluations, the series read from metrics.jsonl, the time to
reach TRL's final accuracy, the table and the written files; the end-to-end run on the real model is slow."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def learning():
    spec = importlib.util.spec_from_file_location("benchmarks_learning", ROOT / "benchmarks" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class FakeTime:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_training_clock_leaves_out_paused_time(learning):
    now = FakeTime()
    clock = learning.TrainingClock(now)
    assert clock.seconds() == 0.0  # not started
    clock.start()
    now.t += 5
    assert clock.seconds() == 5
    clock.pause()
    now.t += 100  # an evaluation
    assert clock.seconds() == 5  # frozen while paused
    clock.pause()  # a second pause changes nothing
    clock.resume()
    now.t += 2
    assert clock.seconds() == 7
    clock.resume()  # resuming a running clock changes nothing
    clock.pause()
    now.t += 50
    clock.resume()
    now.t += 1
    assert clock.seconds() == 8


def test_eval_due_matches_arena_eval_every(learning):
    assert [s for s in range(1, 26) if learning.eval_due(s, 10, 25)] == [10, 20, 25]
    assert [s for s in range(1, 4) if learning.eval_due(s, 1, 3)] == [1, 2, 3]
    assert not learning.eval_due(5, 0, 10)


def test_series_from_metrics_sums_training_time_without_eval(learning):
    records = [
        {"iteration": 2, "time/iteration": 4.0, "eval/score": 0.5, "time/eval": 1.5},
        {"iteration": 0, "eval/score": 0.25, "time/eval": 3.0},
        {"iteration": 1, "time/iteration": 2.0},
        {"iteration": 3, "time/iteration": 3.0},
        {"iteration": 4, "time/iteration": 6.0, "eval/score": 0.75, "time/eval": 2.0},
    ]
    assert learning.series_from_metrics(records) == [
        {"step": 0, "seconds": 0.0, "accuracy": 0.25},
        {"step": 2, "seconds": 4.5, "accuracy": 0.5},
        {"step": 4, "seconds": 11.5, "accuracy": 0.75},
    ]


def _series(points):
    return [{"step": s, "seconds": t, "cpu_seconds": 2 * t, "accuracy": a} for s, t, a in points]


def test_time_to_reach_is_the_first_evaluated_point_at_or_above(learning):
    series = _series([(0, 0.0, 0.18), (10, 100.0, 0.26), (20, 200.0, 0.28), (30, 300.0, 0.24)])
    assert learning.time_to_reach(series, 0.28)["step"] == 20
    assert learning.time_to_reach(series, 0.1)["step"] == 0
    assert learning.time_to_reach(series, 0.3) is None
    assert learning.time_to_reach(series, 14 / 50)["step"] == 20  # 0.28 as a mean of 50 scores


def test_summarize_ratios(learning):
    arena = {"series": _series([(0, 0.0, 0.18), (10, 50.0, 0.28), (20, 110.0, 0.30)]), "peak_rss": 2 * 2**30}
    trl = {"series": _series([(0, 0.0, 0.18), (10, 300.0, 0.22), (20, 600.0, 0.28)]), "peak_rss": 8 * 2**30}
    s = learning.summarize({"arena": arena, "trl": trl})
    assert s["target_accuracy"] == 0.28
    assert s["arena_reaches"]["step"] == 10 and s["trl_reaches"]["step"] == 20
    assert math.isclose(s["time_ratio"], 50 / 600) and math.isclose(s["cpu_time_ratio"], 100 / 1200)
    assert math.isclose(s["peak_rss_ratio"], 0.25)
    assert math.isclose(s["total_time_ratio"], 110 / 600)
    lines = "\n".join(learning.summary_lines({"arena": arena, "trl": trl}, s))
    assert "arena / TRL: 0.08 wall" in lines and "peak RSS, arena / TRL: 0.25" in lines

    # arena never reaches TRL's final accuracy: its whole training time is a lower bound on the ratio
    slow = {"series": _series([(0, 0.0, 0.18), (20, 900.0, 0.20)]), "peak_rss": 2**30}
    s = learning.summarize({"arena": slow, "trl": trl})
    assert "time_ratio" not in s and math.isclose(s["time_ratio_at_least"], 1.5)
    assert "> 1.50" in "\n".join(learning.summary_lines({"arena": slow, "trl": trl}, s))

    # TRL ends where it started: nothing to time (the step-0 point's clock is not a time to divide by)
    flat = {"series": _series([(0, 1e-6, 0.25), (2, 40.0, 0.25)]), "peak_rss": 2**30}
    s = learning.summarize({"arena": arena, "trl": flat})
    assert s["trl_no_gain"] and "time_ratio" not in s

    # one side alone
    s = learning.summarize({"arena": arena})
    assert s["arena_final"]["accuracy"] == 0.30 and "target_accuracy" not in s


def test_markdown_table_has_a_row_per_evaluated_step_of_either_side(learning):
    sides = {"arena": {"series": _series([(0, 0.0, 0.18), (5, 20.0, 0.2), (10, 41.04, 0.3)])},
             "trl": {"series": _series([(0, 0.0, 0.18), (10, 300.0, 0.22)])}}
    lines = learning.markdown_table(sides).splitlines()
    assert lines[0] == "| step | arena s | arena acc | trl s | trl acc |"
    assert lines[2:] == ["| 0 | 0.0 | 18.0% | 0.0 | 18.0% |",
                         "| 5 | 20.0 | 20.0% | - | - |",
                         "| 10 | 41.0 | 30.0% | 300.0 | 22.0% |"]


def test_write_outputs(learning, tmp_path):
    args = argparse.Namespace(prompts=8, answers=8, max_new_tokens=16, steps=10, eval_every=10, eval_size=50,
                              micro_batch=8, threads=0, set=[])
    sides = {"arena": {"series": _series([(0, 0.0, 0.2), (10, 30.0, 0.3)]), "peak_rss": 2**30,
                       "metrics": [{"iteration": 0, "eval/score": 0.2}]},
             "trl": {"series": _series([(0, 0.0, 0.2), (10, 90.0, 0.3)]), "peak_rss": 4 * 2**30, "trl": "1.16.0"}}
    summary = learning.write_outputs(tmp_path, args, sides)
    assert math.isclose(summary["time_ratio"], 1 / 3)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["sides"]["trl"]["series"][1]["seconds"] == 90.0 and "metrics" not in results["sides"]["arena"]
    assert results["settings"]["eval_size"] == 50
    assert json.loads((tmp_path / "arena-metrics.jsonl").read_text()) == {"iteration": 0, "eval/score": 0.2}
    assert "| 10 | 30.0 | 30.0% | 90.0 | 30.0% |" in (tmp_path / "table.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_arena_overrides_resolve(learning):
    """Every override the arena side passes is a key arena knows (no model is loaded)."""
    from arena.config import resolve
    from arena.registry import load_registry

    args = argparse.Namespace(prompts=8, answers=8, max_new_tokens=16, steps=60, eval_every=10, eval_size=50,
                              micro_batch=8, threads=0, set=[])
    cfg = resolve(load_registry(), "prompts", overrides=learning.arena_overrides(args, "/tmp/x")).config
    assert (cfg.game.options.eval_size, cfg.game.options.max_new_tokens, cfg.run.eval_every) == (50, 16, 10)
    assert cfg.optimizer.options.beta == 0.0 and cfg.optimizer.options.lr == 2e-5
    settings = learning.trl_settings(args)
    assert settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"] == 64
    assert settings["generation_batch_size"] == 64 and settings["num_generations"] == 8


@pytest.mark.slow
def test_learning_benchmark_end_to_end(tmp_path):
    """Both sides (TRL if installed) for one step on the embedded model, in subprocesses (a few minutes on CPU)."""
    import subprocess

    side = "both" if importlib.util.find_spec("trl") else "arena"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--steps", "1", "--eval-every", "1",
                    "--eval-size", "2", "--prompts", "2", "--answers", "2", "--side", side, "--out", str(tmp_path)],
                   check=True, capture_output=True)
    results = json.loads((tmp_path / "results.json").read_text())
    for name, s in results["sides"].items():
        assert [p["step"] for p in s["series"]] == [0, 1], name
        assert s["peak_rss"] > 0 and s["series"][1]["seconds"] > 0
    if side == "both":  # the same held-out questions, prompt and greedy decoding before training
        assert results["sides"]["arena"]["series"][0]["accuracy"] == results["sides"]["trl"]["series"][0]["accuracy"]


# -- benchmarks/round_throughput.py ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("benchmarks_throughput", ROOT / "benchmarks" / "round_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_layouts_and_the_median_round(throughput):
    assert throughput.layout("2x1") == (2, 1) and throughput.layout("1X2") == (1, 2)
    with pytest.raises(argparse.ArgumentTypeError):
        throughput.layout("0x2")
    records = [{"iteration": 1, "time/iteration": 30.0, "time/generate": 20.0},  # warm-up, left out
               {"iteration": 2, "time/iteration": 8.0, "time/generate": 4.0, "time/optimize": 3.0},
               {"iteration": 3, "time/iteration": 12.0, "time/generate": 6.0, "time/optimize": 5.0}]
    got = throughput.summarise(records, samples=32)
    assert got["seconds"] == 10.0 and got["samples_per_second"] == 3.2
    assert got["generate"] == 5.0 and got["optimize"] == 4.0 and got["judge"] == 0.0


def test_throughput_memory_counts_the_processes_below_and_the_growth_per_round(throughput):
    """A child that holds 200 MiB adds them to its parent's tree; the growth is the slope over the second half."""
    before = throughput.tree_rss(os.getpid())
    assert before >= 50 * 2**20  # this process alone holds torch
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; b = bytearray(200 << 20); b[::4096] = "
                              "b'x' * len(b[::4096]); print('ready', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert throughput.tree_rss(os.getpid()) - before >= 190 * 2**20
    finally:
        child.kill()
        child.wait()
    peaks = {1: 900, 2: 100, 3: 50, 4: 10, 5: 12, 6: 14, 7: 16}  # the early rounds are left out
    assert throughput.growth_per_round(peaks, 7) == pytest.approx(2.0)
    assert throughput.growth_per_round({1: 5, 2: 5, 3: 5, 4: 5}, 4) == pytest.approx(0.0)
    assert math.isnan(throughput.growth_per_round({1: 5}, 1))


def test_generation_throughput_counts_new_tokens_of_the_best_call():
    spec = importlib.util.spec_from_file_location("benchmarks_generation", ROOT / "benchmarks" / "generation_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Gen:
        def __init__(self, n):
            self.completion_ids = [0] * n

    calls = []

    def generate(prompts, n, max_new_tokens, temperature):
        calls.append((len(prompts), n, max_new_tokens, temperature))
        return [[Gen(3), Gen(5)] for _ in prompts]

    args = argparse.Namespace(samples=2, tokens=8, repeat=2)
    speed, tokens = module.tokens_per_second(generate, ["a", "b"], args)
    assert tokens == 16 and speed > 0 and calls == [(2, 2, 8, 1.0)] * 3  # a warm-up, then the repeats


def test_eval_agreement_shares_by_hand():
    spec = importlib.util.spec_from_file_location("benchmarks_agreement", ROOT / "benchmarks" / "eval_agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    hf = {"models": {"base": {"items": {"score": [1.0, 2.0, 3.0, 4.0], "empty": 0}},
                     "run/5": {"items": {"score": [1.0, 1.0]}}},
          "answers": [{"base": "a", "run/5": "x"}, {"base": "b", "run/5": "y"}]}
    vllm = {"models": {"base": {"items": {"score": [1.0, 2.5, 3.0, 4.0], "empty": 0}},
                       "run/5": {"items": {"score": [1.0, 1.0]}}},
            "answers": [{"base": "a", "run/5": "x"}, {"base": "c", "run/5": "y"}]}
    assert module.agreement(hf, vllm) == {"base score": 0.75, "base answers": 0.5, "run/5 score": 1.0,
                                          "run/5 answers": 1.0}


def test_machine_reads_the_cpu_and_the_kernels_torch_dispatches_to():
    spec = importlib.util.spec_from_file_location("benchmarks_machine", ROOT / "benchmarks" / "machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = "\n".join([  # as oneDNN 3.12 and oneMKL 2024 print them on an AMD EPYC
        "onednn_verbose,v1,info,cpu,isa:Intel AVX-512 with Intel DL Boost and bfloat16 support",
        "onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core_bf16,undef,src:bf16::blocked:ab::f0,,"
        "32x576:576x1536,1.625",
        "probe: float32",
        "MKL_VERBOSE oneMKL 2024.0 Update 2 Product build 20240605 for Intel(R) 64 architecture",
        "MKL_VERBOSE SGEMM(T,N,1536,32,576,0x1,0x2,576,0x3,576,0x4,0x5,1536) 12.90ms CNR:OFF Dyn:1 NThr:2",
        "probe: capability AVX512"])
    assert module.parse_dispatch(output) == {
        "onednn_isa": "Intel AVX-512 with Intel DL Boost and bfloat16 support",
        "bfloat16": "oneDNN matmul brg_matmul:avx512_core_bf16", "float32": "MKL SGEMM", "capability": "AVX512"}
    # on this machine: what /proc/cpuinfo lists, and a real probe names a kernel for each dtype
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    assert ("AVX2" in module.cpu_features()) == (" avx2" in flags)
    line = module.describe()
    assert line.startswith(f"cpu: {module.cpu_name()}, {os.cpu_count()} cores; ")
    assert "bfloat16 linear: oneDNN " in line or "bfloat16 linear: MKL " in line, line
    assert "float32 linear: ?" not in line, line
