"""Held-out accuracy against wall-clock training time: arena and TRL's GRPOTrainer learning the same task with
matched settings, on CPU, each side in its own subprocess.

The task: arena's `prompts` game on the `arithmetic` set (two-digit additions, "What is a + b? Answer with the
number only.") with the `exact_match` judge, on the embedded model (SmolLM2-135M-Instruct, `model.path` unset;
TRL loads the same converted folder, `arena.plugins.backends.hf.models.resolve_model_path(None)`).

Matched settings (both sides): 8 prompts x 8 answers per step x at most 16 new tokens, temperature 1.0, top_p 1.0,
no top-k; LoRA r=16 alpha=32 dropout 0 on q,k,v,o; AdamW lr 2e-5 constant (no warm-up, no decay), betas
(0.9, 0.999), eps 1e-8, no weight decay, gradients clipped at norm 1.0; beta=0 (no KL, no reference pass);
clip epsilon 0.2; one optimizer update per step over all 64 completions, accumulated from micro-batches of 8
(arena's CPU default `optimizer.micro_batch_size`; `--micro-batch`); token-level loss aggregation (arena
`optimizer.aggregation=token` = TRL `loss_type="dapo"`, the mean over every completion token of the step);
advantages = reward - group mean (arena `normalize_std=false` = TRL `scale_rewards="none"`); float32 weights, no
autocast, no gradient checkpointing; the same training prompts in the same order (arena's own training split,
taken in sequence); seed 0. TRL: num_generations=8, generation_batch_size=64, per_device_train_batch_size=8 with
gradient_accumulation_steps=8, max_completion_length=16, beta=0.0, num_iterations=1, learning_rate=2e-5,
lr_scheduler_type="constant", warmup_steps=0, bf16=False, gradient_checkpointing=False, disable_dropout=True,
mask_truncated_completions=False, shuffle_dataset=False, peft LoraConfig(r=16, lora_alpha=32, lora_dropout=0,
q,k,v,o), and a reward function that calls arena's own exact_match judge.

Held-out evaluation, the same on both sides: arena's held-out split of the arithmetic set (`game.eval_size`
questions, `--eval-size`, default 50, shuffled away from the training prompts with run.seed=0), the prompt as
arena sends it (one user message, no system prompt, through the tokenizer's chat template with the generation
prompt), greedy, at most 16 new tokens, cut at the end-of-turn token, scored by arena's exact_match judge
(1 when the last number in the answer equals the sum). Evaluated before training (step 0), every `--eval-every`
steps and after the last step. Arena evaluates through its own loop (`run.eval_every`, the `eval/score`
metric); TRL in a TrainerCallback (on_train_begin, on_step_end) that generates with the model being trained, in
batches of 64 with left padding like arena's CPU generation batch.

The clock: wall seconds since training started (after the model is loaded: arena's `arena_run_start` hook, TRL's
`on_train_begin`), EXCLUDING the evaluations: the clock is paused while held-out answers are generated and
scored, and each point is (step, training seconds up to that step, accuracy). Everything else the training loop
does counts: sampling, judging, the update, data loading, logging. Arena's series is also rebuilt from its
metrics.jsonl (the sum of time/iteration - time/eval, `seconds_from_metrics`), which leaves out the few
milliseconds between iterations, as a cross-check. CPU seconds (process time, all threads) are recorded next to
the wall seconds: they move less when another job shares the machine. Peak RSS is each child's own (os.wait4),
so it includes loading and the evaluations. The sides run one after the other in one invocation (machines are
noisy: compare the ratios, not the raw seconds of two invocations).

Differences that remain:
- sampling randomness: the two sides draw their answers from different random streams (arena re-seeds torch
  from (run.seed, step) every step; TRL seeds once), so the sampled answers, and with them the learning curves,
  differ by chance even though the prompts, the model and the update rule are the same. One run per side is a
  single draw: with 50 held-out questions, one question is 2 points of accuracy.
- arena skips the forward and backward of completions whose advantage is 0 (a group that is all right or all
  wrong: with beta=0 their gradient is exactly 0); TRL runs them. The gradient is the same (they stay in the
  token count that normalises the loss on both sides); arena just does less work. Early on, when few answers
  are right, that is most of them.
- a step in which every advantage is 0 (no group with both a right and a wrong answer): arena makes no
  optimizer step at all; TRL makes an AdamW step with a zero gradient, which still moves the weights by the
  decaying first moment of earlier steps and advances Adam's step count. It happens while few sampled answers
  are right (at temperature 1.0 the model starts near 2% right; every step whose recorded training reward is 0
  is one such step; in the smoke test the first step was).
- numerics: arena decodes with its own loop (shared prompt prefill, its grouped-query SDPA on CPU); TRL with
  transformers' `generate`. In float32 these agree to rounding; greedy answers at step 0 can differ in rare
  near-ties (the step-0 accuracies should match or nearly so: a check).
- TRL evaluates through `model.generate` on the peft model in eval mode; arena through its backend's `generate`;
  neither evaluation is timed.

Reference (TRL 1.16 with its defaults on a 2-core CPU machine, 60 steps): held-out accuracy from 18% to 28% in
3,151 s, 9.1 GB peak RSS. Target: arena reaches TRL's final accuracy in at most half TRL's time and with at most
half its peak memory. The reference ran TRL's defaults (longer completions among them); at the matched settings
TRL needs much less memory (2.5 GB in a 2-step smoke test), so the ratios this script prints are against the
matched TRL run it makes, not against the reference's 9.1 GB.

    python benchmarks/learning.py                                   # both sides, 60 steps, eval every 10
    python benchmarks/learning.py --side arena --steps 20 --eval-every 5
    python benchmarks/learning.py --steps 2 --eval-every 1 --eval-size 4 --prompts 2 --answers 2   # smoke test

Writes to `--out` (default benchmarks/results/learning-<UTC time>): results.json (per side: the series of
(step, seconds, cpu_seconds, accuracy), seconds per step, training reward per step, peak RSS, total wall time,
settings), table.md (step, arena s, arena acc, trl s, trl acc, and the summary), accuracy.png (accuracy against
training seconds, both sides; skipped with a message without matplotlib), arena-metrics.jsonl. Prints at the end
how long each side took to reach TRL's final accuracy, and the ratios of those times and of the peak memories.
Needs the `bench` extra for the TRL side (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PROMPTS = 8
ANSWERS = 8
NEW_TOKENS = 16
LORA_R, LORA_ALPHA = 16, 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LR = 2e-5
BETA = 0.0
EPSILON = 0.2
MAX_GRAD_NORM = 1.0
SEED = 0
EVAL_BATCH = 64  # the hf backend's CPU_GENERATION_BATCH: the TRL side's eval batch
REFERENCE = "TRL 1.16 defaults, 2-core CPU, 60 steps: 18% -> 28% held-out accuracy in 3,151 s, 9.1 GB peak RSS"
SIDES = ("arena", "trl")


# -- pure pieces (tested in tests/test_benchmarks.py) ------------------------------------------------------------

class TrainingClock:
    """Seconds since `start()` minus the time spent paused (the evaluations). `now` is the time source:
    time.perf_counter for wall seconds, time.process_time for CPU seconds."""

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self.now = now
        self.t0: float | None = None
        self.paused_at: float | None = None
        self.paused_total = 0.0

    def start(self) -> None:
        self.t0, self.paused_at, self.paused_total = self.now(), None, 0.0

    def pause(self) -> None:
        if self.paused_at is None:
            self.paused_at = self.now()

    def resume(self) -> None:
        if self.paused_at is not None:
            self.paused_total += self.now() - self.paused_at
            self.paused_at = None

    def seconds(self) -> float:
        if self.t0 is None:
            return 0.0
        end = self.paused_at if self.paused_at is not None else self.now()
        return end - self.t0 - self.paused_total


class Clocks:
    """A wall clock and a CPU clock paused and resumed together."""

    def __init__(self) -> None:
        self.wall = TrainingClock(time.perf_counter)
        self.cpu = TrainingClock(time.process_time)

    def start(self) -> None:
        self.wall.start()
        self.cpu.start()

    def pause(self) -> None:
        self.wall.pause()
        self.cpu.pause()

    def resume(self) -> None:
        self.wall.resume()
        self.cpu.resume()

    def point(self, step: int, accuracy: float) -> dict[str, float]:
        return {"step": step, "seconds": self.wall.seconds(), "cpu_seconds": self.cpu.seconds(),
                "accuracy": accuracy}


def eval_due(step: int, every: int, last: int) -> bool:
    """Whether step `step` (1-based) is evaluated: every `every` steps and the last one (arena's run.eval_every)."""
    return every > 0 and (step % every == 0 or step == last)


def series_from_metrics(records: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """(step, training seconds, accuracy) from arena's metrics.jsonl records: the training clock is the running sum
    of time/iteration minus time/eval (the evaluation inside that iteration); a record with eval/score is a point.
    The baseline record (iteration 0) has no time/iteration: 0 seconds."""
    total = 0.0
    out = []
    for record in sorted(records, key=lambda r: r["iteration"]):
        if record["iteration"] > 0:
            total += (record.get("time/iteration") or 0.0) - (record.get("time/eval") or 0.0)
        if record.get("eval/score") is not None:
            out.append({"step": record["iteration"], "seconds": total, "accuracy": record["eval/score"]})
    return out


def time_to_reach(series: Sequence[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first evaluated point whose accuracy is at least `target` (a tolerance of 1e-9 for the float means), or
    None when no point reaches it. Only evaluated steps count: the resolution is --eval-every."""
    for point in sorted(series, key=lambda p: p["step"]):
        if point["accuracy"] >= target - 1e-9:
            return point
    return None


def summarize(sides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The comparison: TRL's final accuracy, the point where each side first reaches it, the ratios arena/TRL of
    those times and of the peak RSS. Works with either side alone (fewer keys)."""
    out: dict[str, Any] = {}
    for name, side in sides.items():
        if side.get("series"):
            final = side["series"][-1]
            out[f"{name}_final"] = final
    trl, arena = sides.get("trl"), sides.get("arena")
    if trl and trl.get("series"):
        target = trl["series"][-1]["accuracy"]
        out["target_accuracy"] = target
        for name, side in sides.items():
            if side.get("series"):
                out[f"{name}_reaches"] = time_to_reach(side["series"], target)
        a, t = out.get("arena_reaches"), out.get("trl_reaches")
        if t and t["step"] == 0:
            out["trl_no_gain"] = True  # TRL ended where it started: no time to reach it, no ratio
        elif a and t and t["seconds"] > 0:
            out["time_ratio"] = a["seconds"] / t["seconds"]
            if t.get("cpu_seconds") and a.get("cpu_seconds") is not None:
                out["cpu_time_ratio"] = a["cpu_seconds"] / t["cpu_seconds"]
        elif t and t["seconds"] > 0 and arena and arena.get("series") and not a:
            # arena never got there: its whole training time is a lower bound
            out["time_ratio_at_least"] = arena["series"][-1]["seconds"] / t["seconds"]
    if arena and trl and arena.get("peak_rss") and trl.get("peak_rss"):
        out["peak_rss_ratio"] = arena["peak_rss"] / trl["peak_rss"]
    if arena and trl and arena.get("series") and trl.get("series") and trl["series"][-1]["seconds"] > 0:
        out["total_time_ratio"] = arena["series"][-1]["seconds"] / trl["series"][-1]["seconds"]
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def markdown_table(sides: dict[str, dict[str, Any]]) -> str:
    """One row per evaluated step of either side: step | arena s | arena acc | trl s | trl acc."""
    by_step: dict[int, dict[str, dict[str, float]]] = {}
    for name in SIDES:
        for point in (sides.get(name) or {}).get("series", []):
            by_step.setdefault(point["step"], {})[name] = point
    lines = ["| step | arena s | arena acc | trl s | trl acc |", "|---:|---:|---:|---:|---:|"]
    for step in sorted(by_step):
        row = by_step[step]
        cells = [str(step)]
        for name in SIDES:
            point = row.get(name)
            cells += [_secs(point and point["seconds"]), _pct(point and point["accuracy"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(sides: dict[str, dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    gb = 1024 ** 3
    lines = []
    for name in SIDES:
        side = sides.get(name)
        if not side:
            continue
        if side.get("error"):
            lines.append(f"{name}: FAILED ({side['error']})")
        series = side.get("series") or []
        if series:
            first, last = series[0], series[-1]
            steps = side.get("step_seconds") or []
            per_step = f", {sum(steps) / len(steps):.1f} s/step" if steps else ""
            lines.append(f"{name}: accuracy {_pct(first['accuracy'])} -> {_pct(last['accuracy'])} at step "
                         f"{last['step']} in {last['seconds']:.1f} s of training ({last['cpu_seconds']:.0f} CPU s"
                         f"{per_step}), peak RSS {side.get('peak_rss', 0) / gb:.2f} GB, process wall "
                         f"{side.get('process_wall', 0):.0f} s")
    if "target_accuracy" in summary:
        lines.append(f"TRL's final accuracy: {_pct(summary['target_accuracy'])}")
        for name in SIDES:
            if f"{name}_final" not in summary:
                continue
            hit = summary.get(f"{name}_reaches")
            lines.append(f"  {name} reaches it: " + (f"at step {hit['step']} after {hit['seconds']:.1f} s"
                                                      if hit else "never (within the steps run)"))
    if summary.get("trl_no_gain"):
        lines.append("time to TRL's final accuracy: - (TRL's final accuracy is no better than its step-0 accuracy, "
                     "so there is nothing to time)")
    elif "time_ratio" in summary:
        lines.append(f"time to TRL's final accuracy, arena / TRL: {summary['time_ratio']:.2f} wall"
                     + (f", {summary['cpu_time_ratio']:.2f} CPU" if "cpu_time_ratio" in summary else "")
                     + "   (target <= 0.50)")
    elif "time_ratio_at_least" in summary:
        lines.append(f"time to TRL's final accuracy, arena / TRL: > {summary['time_ratio_at_least']:.2f} (arena "
                     "did not reach it; its whole training time over TRL's)   (target <= 0.50)")
    if "total_time_ratio" in summary:
        lines.append(f"training time for all steps, arena / TRL: {summary['total_time_ratio']:.2f}")
    if "peak_rss_ratio" in summary:
        lines.append(f"peak RSS, arena / TRL: {summary['peak_rss_ratio']:.2f}   (target <= 0.50)")
    return lines


def plot(sides: dict[str, dict[str, Any]], summary: dict[str, Any], path: Path, title: str) -> str | None:
    """accuracy.png: held-out accuracy against training seconds per side. Returns a message when matplotlib is
    missing (the plot is skipped), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"arena": "tab:blue", "trl": "tab:orange"}
    for name in SIDES:
        series = (sides.get(name) or {}).get("series") or []
        if series:
            ax.plot([p["seconds"] for p in series], [100 * p["accuracy"] for p in series], marker="o",
                    color=colors[name], label="arena" if name == "arena" else f"TRL {sides[name].get('trl', '')}")
            for p in series[1:]:
                ax.annotate(str(p["step"]), (p["seconds"], 100 * p["accuracy"]), textcoords="offset points",
                            xytext=(3, 4), fontsize=7, color=colors[name])
    if "target_accuracy" in summary:
        ax.axhline(100 * summary["target_accuracy"], color="gray", linestyle=":", linewidth=1,
                   label="TRL's final accuracy")
    ax.set_xlabel("training wall-clock seconds (evaluation excluded)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# -- settings --------------------------------------------------------------------------------------------------

def arena_overrides(args: argparse.Namespace, run_dir: str) -> list[str]:
    return [
        "judge=exact_match",
        "game.dataset=arithmetic",
        f"game.prompts_per_round={args.prompts}",
        f"game.group_size={args.answers}",
        f"game.max_new_tokens={args.max_new_tokens}",
        "game.temperature=1.0",
        "game.top_p=1.0",
        f"game.eval_size={args.eval_size}",
        "model.device=cpu",
        "model.dtype=float32",
        f"model.lora.r={LORA_R}",
        f"model.lora.alpha={LORA_ALPHA}",
        "model.lora.dropout=0.0",
        f"model.lora.target_modules=[{','.join(LORA_TARGETS)}]",
        "optimizer=grpo",
        f"optimizer.beta={BETA}",
        f"optimizer.epsilon={EPSILON}",
        "optimizer.aggregation=token",
        f"optimizer.lr={LR}",
        f"optimizer.micro_batch_size={args.micro_batch}",
        "optimizer.normalize_std=false",
        "optimizer.epochs=1",
        f"optimizer.max_grad_norm={MAX_GRAD_NORM}",
        "optimizer.weight_decay=0.0",
        f"run.iterations={args.steps}",
        f"run.dir={run_dir}",
        f"run.eval_every={args.eval_every}",
        f"run.checkpoint_every={args.steps + 1}",  # only the final checkpoint (after the last evaluation)
        "run.loggers=[]",
        f"run.seed={SEED}",
        f"run.threads={args.threads}",
        *args.set,  # --set: extra arena overrides (arena side only), last wins
    ]


def trl_settings(args: argparse.Namespace) -> dict[str, Any]:
    """GRPOConfig keyword arguments matched to arena's (output_dir and the like added by the caller)."""
    return dict(
        use_cpu=True, bf16=False, fp16=False, model_init_kwargs={"dtype": "float32"},
        seed=SEED, data_seed=SEED, shuffle_dataset=False, dataloader_num_workers=0,
        max_steps=args.steps, num_train_epochs=1,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.prompts * args.answers // args.micro_batch,
        generation_batch_size=args.prompts * args.answers,
        num_generations=args.answers, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0,
        beta=BETA, epsilon=EPSILON, num_iterations=1, loss_type="dapo", scale_rewards="none",
        mask_truncated_completions=False, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=MAX_GRAD_NORM,
        gradient_checkpointing=False, disable_dropout=True, log_completions=False,
    )


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "trl", "arena-selfplay"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _maxrss() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _write(path: str | Path, data: Any) -> None:
    """Atomically: a child rewrites its partial result after every evaluation, which a killed run leaves behind."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _log(side: str, message: str) -> None:
    print(f"[learning:{side}] {message}", file=sys.stderr, flush=True)


# -- the arena side (in its child) -----------------------------------------------------------------------------

def run_arena(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from arena.config import resolve
    from arena.hookspecs import hookimpl
    from arena.loop import play
    from arena.registry import load_registry
    from arena.runstore import read_jsonl

    clocks = Clocks()
    result: dict[str, Any] = {"side": "arena", "series": [], "step_seconds": [], "train_reward": [],
                              "completion_tokens": [], "eval_seconds": 0.0}

    class Probe:
        eval_t0 = 0.0
        pending: dict[str, float] | None = None

        @hookimpl
        def arena_run_start(self, run: Any) -> None:
            result["threads"] = torch.get_num_threads()
            result["rss_after_loading"] = _maxrss()
            clocks.start()

        @hookimpl
        def arena_phase_start(self, run: Any, phase: str) -> None:
            if phase == "eval":
                clocks.pause()
                self.pending = clocks.point(run.iteration, float("nan"))
                self.eval_t0 = time.perf_counter()

        @hookimpl
        def arena_phase_end(self, run: Any, phase: str, seconds: float, tokens: int) -> None:
            if phase == "eval":
                result["eval_seconds"] += time.perf_counter() - self.eval_t0
                clocks.resume()

        @hookimpl
        def arena_metrics(self, run: Any, step: int, metrics: dict[str, float]) -> None:
            if step > 0:
                result["step_seconds"].append(metrics.get("time/iteration", 0.0) - metrics.get("time/eval", 0.0))
                result["train_reward"].append(metrics.get("reward/assistant"))
                result["completion_tokens"].append(metrics.get("completion_tokens"))
            if self.pending is not None and metrics.get("eval/score") is not None:
                point = {**self.pending, "step": step, "accuracy": metrics["eval/score"]}
                result["series"].append(point)
                _log("arena", f"step {step}: accuracy {_pct(point['accuracy'])} after {point['seconds']:.1f} s "
                              f"of training")
                _write(args.child_out, result)
            self.pending = None

    registry = load_registry()
    with tempfile.TemporaryDirectory(prefix="arena-learning-") as tmp:
        overrides = arena_overrides(args, f"{tmp}/run")
        resolved = resolve(registry, "prompts", overrides=overrides)
        result["settings"] = {"overrides": overrides[:-len(args.set)] if args.set else overrides,
                              "extra_overrides": list(args.set), "config": resolved.to_yaml()}
        registry.pm.register(Probe(), name="learning-benchmark")
        t0 = time.perf_counter()
        root = play(registry, resolved)
        result["wall"] = time.perf_counter() - t0
        records = list(read_jsonl(Path(root) / "metrics.jsonl"))
    result["metrics"] = records
    result["seconds_from_metrics"] = series_from_metrics(records)
    result["versions"] = _versions()
    return result


# -- the TRL side (in its child) -------------------------------------------------------------------------------

def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import GenerationConfig, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import trl
    from arena.config import resolve
    from arena.interfaces import Env
    from arena.plugins.backends.hf.models import resolve_model_path
    from arena.registry import load_registry
    from arena.types import JudgeItem, item_means, verdict_items

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    clocks = Clocks()
    result: dict[str, Any] = {"side": "trl", "trl": trl.__version__, "series": [], "step_seconds": [],
                              "train_reward": [], "completion_tokens": [], "eval_seconds": 0.0}

    # the training prompts (in arena's order), the held-out questions and the judge: built by arena itself
    registry = load_registry()
    plain = argparse.Namespace(**{**vars(args), "set": []})  # --set is for the arena side only
    resolved = resolve(registry, "prompts", overrides=arena_overrides(plain, "/nonexistent"))
    env = Env(config=resolved.config, registry=registry)
    game = registry.build("game", resolved.config.game, env)
    judge = registry.build("judge", resolved.config.judge, env)
    records = [game.train_records[i % len(game.train_records)] for i in range(args.steps * args.prompts)]
    dataset = Dataset.from_list([{"prompt": game.messages(r), "answer": r["answer"]} for r in records])
    held_out = [(game.messages(r), r["answer"]) for r in game.eval_records]

    def exact_match(prompts: list, completions: list, answer: list, **kwargs: Any) -> list[float | None]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        verdicts = judge.judge([JudgeItem(prompt=p, response=t, reference=a)
                                for p, t, a in zip(prompts, texts, answer)])
        return [v.score if v.valid else None for v in verdicts]

    model_path = str(resolve_model_path(None))
    with tempfile.TemporaryDirectory(prefix="trl-learning-") as tmp:
        settings = trl_settings(args)
        config = GRPOConfig(output_dir=tmp, report_to="none", save_strategy="no", logging_steps=1,
                            disable_tqdm=True, **settings)
        lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                          task_type="CAUSAL_LM")
        trainer = GRPOTrainer(model=model_path, reward_funcs=exact_match, args=config, train_dataset=dataset,
                              peft_config=lora)
        result["settings"] = {"grpo_config": settings, "lora": {"r": LORA_R, "lora_alpha": LORA_ALPHA,
                                                                "lora_dropout": 0.0, "target_modules": LORA_TARGETS},
                              "optim": str(config.optim), "model": model_path}
        tokenizer = trainer.processing_class
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos_ids = list(trainer.eos_token_ids)
        greedy = GenerationConfig(do_sample=False, max_new_tokens=args.max_new_tokens, eos_token_id=eos_ids,
                                  pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id, use_cache=True)
        # the prompt ids arena's backend would send (HFBackend.encode_chat): the chat template with the
        # generation prompt
        prompt_ids = [list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)["input_ids"]) for m, _ in held_out]

        @torch.no_grad()
        def accuracy() -> float:
            model = trainer.accelerator.unwrap_model(trainer.model)
            was_training = model.training
            model.eval()
            texts: list[str] = []
            try:
                for i in range(0, len(prompt_ids), EVAL_BATCH):
                    batch = prompt_ids[i:i + EVAL_BATCH]
                    width = max(len(p) for p in batch)
                    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
                    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
                    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=greedy)
                    for row in out[:, width:].tolist():
                        cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
                        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
            finally:
                model.train(was_training)
            verdicts = judge.judge([JudgeItem(prompt=m, response=t, reference=a)
                                    for (m, a), t in zip(held_out, texts)])
            return item_means(verdict_items(verdicts))["score"]

        def evaluate(step: int) -> None:
            clocks.pause()
            t0 = time.perf_counter()
            point = clocks.point(step, accuracy())
            result["eval_seconds"] += time.perf_counter() - t0
            result["series"].append(point)
            _log("trl", f"step {step}: accuracy {_pct(point['accuracy'])} after {point['seconds']:.1f} s of "
                        f"training")
            _write(args.child_out, result)
            clocks.resume()

        class HeldOut(TrainerCallback):
            step_t0 = 0.0

            def on_train_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
                result["threads"] = torch.get_num_threads()
                result["rss_after_loading"] = _maxrss()
                clocks.start()
                if args.eval_every > 0:
                    evaluate(0)

            def on_step_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
                self.step_t0 = time.perf_counter()

            def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
                result["step_seconds"].append(time.perf_counter() - self.step_t0)
                if eval_due(state.global_step, args.eval_every, args.steps):
                    evaluate(state.global_step)

            def on_log(self, a: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
                if logs and "reward" in logs:
                    result["train_reward"].append(logs["reward"])
                    result["completion_tokens"].append(logs.get("completions/mean_length"))

        trainer.remove_callback(PrinterCallback)  # its per-step dicts on stdout; the series is what counts
        trainer.add_callback(HeldOut())
        t0 = time.perf_counter()
        trainer.train()
        result["wall"] = time.perf_counter() - t0
    result["versions"] = _versions()
    return result


# -- the parent: each side in its own process --------------------------------------------------------------------

def spawn(side: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Run one side in a child process; add its peak RSS (os.wait4: the child's own) and its process wall time.
    A child that fails keeps the points it had written, with `error` set."""
    out = out_dir / f".{side}-child.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--child-out", str(out),
           "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--eval-size", str(args.eval_size),
           "--prompts", str(args.prompts), "--answers", str(args.answers),
           "--max-new-tokens", str(args.max_new_tokens), "--micro-batch", str(args.micro_batch),
           "--threads", str(args.threads), *(f"--set={item}" for item in args.set)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    _log(side, f"running {args.steps} steps, evaluating every {args.eval_every} ...")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    code = os.waitstatus_to_exitcode(status)
    result = json.loads(out.read_text()) if out.is_file() else {"side": side, "series": []}
    out.unlink(missing_ok=True)
    if code != 0:
        result["error"] = f"the child exited with status {code}"
    result["peak_rss"] = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    result["process_wall"] = time.perf_counter() - t0
    if result.get("series"):
        last = result["series"][-1]
        _log(side, f"done: {_pct(last['accuracy'])} at step {last['step']} after {last['seconds']:.1f} s of "
                   f"training; peak RSS {result['peak_rss'] / 1024 ** 3:.2f} GB")
    return result


def write_outputs(out_dir: Path, args: argparse.Namespace, sides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    summary = summarize(sides)
    shared = {"task": "prompts game, game.dataset=arithmetic, judge=exact_match, embedded SmolLM2-135M-Instruct",
              "prompts_per_step": args.prompts, "answers_per_prompt": args.answers,
              "max_new_tokens": args.max_new_tokens, "steps": args.steps, "eval_every": args.eval_every,
              "eval_size": args.eval_size, "micro_batch": args.micro_batch, "lora": {"r": LORA_R,
              "alpha": LORA_ALPHA, "targets": LORA_TARGETS}, "lr": LR, "beta": BETA, "epsilon": EPSILON,
              "max_grad_norm": MAX_GRAD_NORM, "dtype": "float32", "seed": SEED, "threads": args.threads,
              "arena_extra_overrides": list(args.set),
              "clock": "wall seconds since training started, evaluations excluded"}
    arena = sides.get("arena") or {}
    metrics = arena.pop("metrics", None)
    if metrics is not None:
        with open(out_dir / "arena-metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in metrics)
    _write(out_dir / "results.json", {
        "argv": sys.argv, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor()},
        "settings": shared, "reference": REFERENCE, "sides": sides, "summary": summary})
    lines = summary_lines(sides, summary)
    title = (f"prompts/arithmetic, {args.prompts}x{args.answers}x<={args.max_new_tokens} tokens, LoRA r{LORA_R}, "
             f"lr {LR:g}, {args.eval_size} held-out, CPU")
    (out_dir / "table.md").write_text(
        f"# Held-out accuracy against training time\n\n{title}; seconds: training wall clock, evaluations "
        f"excluded.\n\n{markdown_table(sides)}\n\n" + "\n".join(f"  - {line.strip()}" if line.startswith("  ") else f"- {line}" for line in lines) + "\n")
    if any(side.get("series") for side in sides.values()):
        message = plot(sides, summary, out_dir / "accuracy.png", title)
        if message:
            print(f"[learning] {message}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="training steps per side (default 60)")
    parser.add_argument("--eval-every", type=int, default=10,
                        help="evaluate at step 0, every K steps and the last (default 10)")
    parser.add_argument("--eval-size", type=int, default=50, help="held-out questions (game.eval_size; default 50)")
    parser.add_argument("--side", default="both", choices=["arena", "trl", "both"])
    parser.add_argument("--out", help="output folder (default benchmarks/results/learning-<UTC time>)")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help=f"prompts per step (default {PROMPTS})")
    parser.add_argument("--answers", type=int, default=ANSWERS, help=f"answers per prompt (default {ANSWERS})")
    parser.add_argument("--max-new-tokens", type=int, default=NEW_TOKENS,
                        help=f"new tokens per answer, training and evaluation (default {NEW_TOKENS})")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per forward/backward on both sides (arena optimizer.micro_batch_size, TRL "
                             "per_device_train_batch_size); default arena's CPU default (8), or all of a step's "
                             "answers when fewer")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on both sides; 0 keeps torch's")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra arena override for the arena side only (repeatable); changes the "
                             "comparison, so say so")
    parser.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.micro_batch is None:
        args.micro_batch = min(8, args.prompts * args.answers)
    if min(args.steps, args.eval_size, args.prompts, args.answers, args.max_new_tokens, args.micro_batch) < 1:
        parser.error("--steps, --eval-size, --prompts, --answers, --max-new-tokens and --micro-batch must be >= 1")
    if args.eval_every < 1:
        parser.error("--eval-every must be >= 1")
    if args.answers < 2:
        parser.error("--answers must be >= 2 (a group of one has nothing to compare)")
    if (args.prompts * args.answers) % args.micro_batch:
        parser.error(f"--micro-batch {args.micro_batch} must divide prompts x answers = {args.prompts * args.answers}")

    if args.child:
        result = run_trl(args) if args.child == "trl" else run_arena(args)
        _write(args.child_out, result)
        return 0

    sides_to_run = list(SIDES) if args.side == "both" else [args.side]
    if "trl" in sides_to_run:
        try:
            import trl  # noqa: F401
        except ImportError:
            parser.error("the TRL side needs trl: pip install -e '.[bench]'")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"learning-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    sides: dict[str, dict[str, Any]] = {}
    interrupted = False
    try:
        for side in sides_to_run:  # one after the other, in this one invocation
            sides[side] = spawn(side, args, out_dir)
            write_outputs(out_dir, args, sides)
    except KeyboardInterrupt:
        interrupted = True
        print("[learning] interrupted; reporting the sides that finished", file=sys.stderr)
    summary = write_outputs(out_dir, args, sides)
    print(f"\n{markdown_table(sides)}\n")
    print("\n".join(summary_lines(sides, summary)))
    print(f"reference: {REFERENCE}")
    print(f"results: {out_dir}")
    if interrupted:
        return 130
    return 1 if any(side.get("error") for side in sides.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
