"""Time one GRPO iteration of the `prompts` game on CPU or a GPU, and optionally TRL's GRPOTrainer on the same
work.

The work on CPU: the embedded model (SmolLM2-135M, `model.path` unset), 8 prompts x 4 samples x at most 64 new
tokens, LoRA r=16 alpha=32 on q,k,v,o, beta=0.05 (so a reference pass is computed), token-level loss aggregation,
temperature 1.0, lr 1e-5, one optimizer update per iteration from micro-batches of arena's default size
(`optimizer.micro_batch_size`; `--micro-batch` overrides it on both sides), no gradient checkpointing. The prompts
are the `arithmetic` set and the judge is `exact_match` (regex on the last number: microseconds, so the judge is
not what is timed); `run.eval_every=0`.

Each side runs in its own subprocess, so peak RSS is that side's alone (read with os.wait4, the child's own
rusage; a sampler thread in the child also records the largest RSS seen in each phase). Iterations: `--warmup`
untimed, then `--iterations` timed; the median of the timed ones is reported. Both sides run in the same
invocation because the machines are noisy: compare the ratios, not the raw seconds of two different runs.

On a GPU (`--device cuda`) the work is the one runs learn with: 32 prompts x 8 samples x at most 16 new tokens,
LoRA r=16, lr 2e-5, beta=0 (no reference pass), bfloat16 on both sides unless --dtype/--trl-dtype say otherwise,
arena's generation batch on auto (all 256 sequences at once) and a micro-batch of 64 on both sides unless
--micro-batch says otherwise. There the timed calls inside a phase end with a CUDA synchronize, and the
per-forward hooks are off (they would add a host sync to every decode step); the peak GPU memory is reported.

    python benchmarks/grpo_step.py                       # arena only, float32
    python benchmarks/grpo_step.py --dtype float32,bfloat16
    python benchmarks/grpo_step.py --trl                 # arena and TRL side by side, with ratios
    python benchmarks/grpo_step.py --trl --repeat 2      # each side twice, interleaved; medians pooled
    python benchmarks/grpo_step.py --profile             # + torch profiler tables (a separate, untimed run)
    python benchmarks/grpo_step.py --set backend.logits_budget_mb=64   # try an arena knob (arena side only)
    python benchmarks/grpo_step.py --device cuda --trl   # on a GPU, at the learning settings

Where the time goes: arena's phases are its own `time/generate`, `time/judge`, `time/optimize` metrics; inside
them, wrappers and forward hooks installed by this script (not by arena) time the hf backend's decode loop, the
prefill and decode forwards and the LM head inside it, the reference and policy
`sequence_logprobs` calls, every `Tensor.backward` and every `AdamW.step`. TRL's step is timed from
on_step_begin to on_step_end; its `generate` is `GRPOTrainer._generate` (tokenizing and decoding included),
its `optimize` is the rest of the step except the reward call, which includes its reference pass as arena's
does. CPU seconds (process time, all threads) are printed next to wall seconds: they move less when another
job shares the machine.

`--trl` needs the `bench` extra (`pip install -e '.[bench]'`): trl and psutil. Set ARENA_CACHE to reuse a
converted model (both sides load the folder arena.plugins.backends.hf.models.resolve_model_path(None) returns in the interpreter
that runs them, so run both under the same Python).

TRL settings that match arena's (TRL's own defaults differ: beta=0.0, gradient checkpointing on, bf16 autocast,
8 generations, lr 1e-6 with linear decay, std-scaled rewards): num_generations=4, 8 prompts per step
(generation_batch_size=32), max_completion_length=64, temperature=1.0, top_p=1.0, top_k=0, beta=0.05,
epsilon=0.2, loss_type="dapo" (the number of active tokens in the accumulated batch: arena's
aggregation=token), scale_rewards="none" (arena's normalize_std=false), per_device_train_batch_size=M with
gradient_accumulation_steps=32/M (arena's micro_batch_size=M), max_grad_norm=1.0, constant lr, no dropout,
gradient_checkpointing=False, bf16=False with float32 weights, and a reward function that calls arena's own
`exact_match` judge on the same records. On a GPU the same, at the GPU work's sizes (num_generations=8, 32 prompts,
max_completion_length=16, beta=0.0, lr 2e-5) and bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# The work per device: on CPU the comparison the CPU numbers were taken with; on a GPU the settings runs learn with.
WORK = {"cpu": {"PROMPTS": 8, "SAMPLES": 4, "NEW_TOKENS": 64, "BETA": 0.05, "LR": 1e-5},
        "cuda": {"PROMPTS": 32, "SAMPLES": 8, "NEW_TOKENS": 16, "BETA": 0.0, "LR": 2e-5}}
DEVICE = "cpu"
PROMPTS = 8
SAMPLES = 4
NEW_TOKENS = 64
LORA_R, LORA_ALPHA = 16, 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BETA = 0.05
LR = 1e-5
SEED = 0


def use_device(device: str) -> None:
    """Set the module's work constants for `device`; the parent and each child call it once, first."""
    global DEVICE, PROMPTS, SAMPLES, NEW_TOKENS, BETA, LR
    DEVICE = device
    globals().update(WORK[device])


def _sync() -> None:
    """On a GPU, wait for queued kernels, so that a timed call's wall time is its own."""
    if DEVICE == "cuda":
        import torch

        torch.cuda.synchronize()


# -- measuring inside a child ----------------------------------------------------------------------------------

class RSSSampler:
    """Largest resident set size seen per phase label, sampled every `interval` seconds by a daemon thread."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.phase = "setup"
        self.iteration = 0  # peaks are kept per phase and, for the first iteration, per "phase@1" too
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            import psutil

            return psutil.Process().memory_info().rss

    def sample(self) -> None:
        value = self.rss()
        keys = [self.phase, f"{self.phase}@{self.iteration}"] if self.iteration == 1 else [self.phase]
        for key in keys:
            if value > self.peaks.get(key, 0):
                self.peaks[key] = value

    def set_phase(self, phase: str) -> str:
        self.sample()  # the old phase's last value
        old, self.phase = self.phase, phase
        return old

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "RSSSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class Clock:
    """Seconds accumulated per key since the last `take`."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, seconds: float) -> None:
        self.acc[key] = self.acc.get(key, 0.0) + seconds
        self.counts[key] = self.counts.get(key, 0) + 1

    def take(self) -> dict[str, float]:
        out, self.acc, self.counts = self.acc, {}, {}
        return out


def _timed(clock: Clock, key: Any, fn: Any) -> Any:
    """Wrap `fn` so that each call adds its wall time to `clock` under `key` (a string or a function of the call's
    arguments returning one)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _sync()
            clock.add(key(*args, **kwargs) if callable(key) else key, time.perf_counter() - t0)

    wrapper.__wrapped__ = fn
    return wrapper


def _patch_training_clocks(clock: Clock) -> None:
    """Time every backward pass and AdamW step in this process (class-level, before the optimizers exist)."""
    import torch

    torch.Tensor.backward = _timed(clock, "backward", torch.Tensor.backward)
    torch.optim.AdamW.step = _timed(clock, "adamw_step", torch.optim.AdamW.step)
    torch.nn.utils.clip_grad_norm_ = _timed(clock, "clip_grad_norm", torch.nn.utils.clip_grad_norm_)


def _time_generate_forwards(clock: Clock, causal_lm: Any, active: Any) -> Any:
    """Forward hooks on the causal LM and its LM head that time the forwards made while `active()` (inside
    `generate`): the first forward after `reset()` is the prefill, each later one decodes one token, as does each
    call of the packed decode step. Returns
    `reset`, to call at the start of each generate call."""
    import torch

    state = {"t0": 0.0, "head_t0": 0.0, "first": True}

    def pre(module: Any, args: Any) -> None:
        state["t0"] = time.perf_counter()

    def post(module: Any, args: Any, output: Any) -> None:
        if active():
            clock.add("prefill_forward" if state["first"] else "decode_forward", time.perf_counter() - state["t0"])
            state["first"] = False

    def head_pre(module: Any, args: Any) -> None:
        state["head_t0"] = time.perf_counter()

    def head_post(module: Any, args: Any, output: Any) -> None:
        if active():
            clock.add("lm_head_in_forward", time.perf_counter() - state["head_t0"])

    causal_lm.register_forward_pre_hook(pre)
    causal_lm.register_forward_hook(post)
    head = causal_lm.get_output_embeddings()
    if isinstance(head, torch.nn.Module):
        head.register_forward_pre_hook(head_pre)
        head.register_forward_hook(head_post)

    from arena.plugins.backends.hf.decode import Decoder  # the packed decode step (backend.packed_decode)

    step = Decoder.step

    def timed_step(self: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return step(self, *args)
        finally:
            if active():
                clock.add("decode_forward", time.perf_counter() - t0)

    Decoder.step = timed_step

    def reset() -> None:
        state["first"] = True

    return reset


def _profile_tables(prof: Any, rows: int = 16) -> str:
    """Ops by self CPU time, then the matrix multiplies by input shape (which layer is which)."""
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)
    by_shape = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::addmm",
                                                                                         "aten::bmm")]
    by_shape.sort(key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    lines = ["matrix multiplies by input shapes (self CPU s, % of phase, calls):"]
    for e in by_shape[:10]:
        lines.append(f"  {e.key:12s} {str(e.input_shapes)[:70]:70s} {e.self_cpu_time_total / 1e6:8.2f}s "
                     f"{100 * e.self_cpu_time_total / max(total, 1):5.1f}% {e.count:7d}")
    return ops + "\n" + "\n".join(lines)


# -- the arena side --------------------------------------------------------------------------------------------

def arena_overrides(args: argparse.Namespace, run_dir: str, iterations: int) -> list[str]:
    return [
        "judge=exact_match",
        "game.dataset=arithmetic",
        f"game.prompts_per_round={PROMPTS}",
        f"game.group_size={SAMPLES}",
        f"game.max_new_tokens={NEW_TOKENS}",
        "game.temperature=1.0",
        "game.top_p=1.0",
        f"model.device={DEVICE}",
        f"model.dtype={args.dtype}",
        f"model.lora.r={LORA_R}",
        f"model.lora.alpha={LORA_ALPHA}",
        "model.lora.dropout=0.0",
        f"model.lora.target_modules=[{','.join(LORA_TARGETS)}]",
        f"optimizer.beta={BETA}",
        "optimizer.aggregation=token",
        f"optimizer.lr={LR}",
        f"optimizer.micro_batch_size={args.micro_batch}",
        "optimizer.normalize_std=false",
        "optimizer.epochs=1",
        "optimizer.max_grad_norm=1.0",
        f"run.iterations={iterations}",
        f"run.dir={run_dir}",
        "run.eval_every=0",
        f"run.checkpoint_every={iterations + 1}",  # only the final (always written) checkpoint
        "run.loggers=[]",
        f"run.seed={SEED}",
        f"run.threads={args.threads}",
        *args.set,  # --set: extra arena overrides, last wins
    ]


def run_arena(args: argparse.Namespace, profile: bool = False) -> dict[str, Any]:
    """Play warm-up + timed iterations of the prompts game through arena.loop.play; with `profile`, play one
    warm-up and one iteration under the torch profiler instead (its timings are not reported)."""
    import torch

    from arena.config import resolve
    from arena.hookspecs import hookimpl
    from arena.loop import play
    from arena.registry import load_registry

    sampler = RSSSampler().start()
    clock = Clock()
    _patch_training_clocks(clock)
    iterations = (max(1, args.warmup) + 1) if profile else args.warmup + args.iterations
    profile_iteration = iterations if profile else -1
    per_iteration: list[dict[str, Any]] = []
    tables: dict[str, str] = {}

    class Probe:
        phase = ""
        profiler = None
        iteration = 0
        cpu_iteration = 0.0
        cpu_phase = 0.0

        @hookimpl
        def arena_run_start(self, run: Any) -> None:
            policy = run.policy
            in_generate = lambda: self.phase == "generate"  # noqa: E731
            reset = (_time_generate_forwards(clock, policy.model.get_base_model(), in_generate)
                     if DEVICE == "cpu" else lambda: None)

            generate = policy._generate_batch  # one batch of the backend's own decode loop

            def timed_generate(*a: Any, **kw: Any) -> Any:
                reset()
                t0 = time.perf_counter()
                try:
                    return generate(*a, **kw)
                finally:
                    _sync()
                    clock.add("hf_generate", time.perf_counter() - t0)

            policy._generate_batch = timed_generate
            policy.sequence_logprobs = _timed(
                clock, lambda *a, **kw: "ref_forward" if kw.get("reference") else "policy_forward",
                policy.sequence_logprobs)
            clock.take()

        @hookimpl
        def arena_phase_start(self, run: Any, phase: str) -> None:
            self.phase = phase
            self.cpu_phase = time.process_time()
            if run.iteration != self.iteration:  # a round starts with its first phase
                self.iteration, self.cpu_iteration = run.iteration, self.cpu_phase
            sampler.set_phase(phase)
            sampler.iteration = run.iteration - run.start_iteration + 1
            if run.iteration == profile_iteration and phase in ("generate", "optimize"):
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                       record_shapes=True)
                self.profiler.__enter__()

        @hookimpl
        def arena_phase_end(self, run: Any, phase: str, seconds: float, tokens: int) -> None:
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                tables[phase] = _profile_tables(self.profiler)
                self.profiler = None
            clock.add(f"cpu/{phase}", time.process_time() - self.cpu_phase)
            self.phase = ""
            sampler.set_phase("other")

        @hookimpl
        def arena_metrics(self, run: Any, step: int, metrics: dict[str, float]) -> None:
            clock.add("cpu/iteration", time.process_time() - self.cpu_iteration)
            per_iteration.append({"iteration": step, "metrics": dict(metrics), "parts": clock.take(),
                                  "profiled": step == profile_iteration})

    registry = load_registry()
    with tempfile.TemporaryDirectory(prefix="arena-bench-") as tmp:
        resolved = resolve(registry, "prompts", overrides=arena_overrides(args, f"{tmp}/run", iterations))
        registry.pm.register(Probe(), name="grpo-step-benchmark")
        t0 = time.perf_counter()
        play(registry, resolved)
        wall = time.perf_counter() - t0
    sampler.stop()
    timed = [] if profile else per_iteration[args.warmup:]
    return {
        "side": "arena", "dtype": args.dtype, "threads": torch.get_num_threads(), "wall": wall,
        "iterations": per_iteration, "timed": [it["iteration"] for it in timed],
        "phase_rss": sampler.peaks, "profile": tables, "peak_gpu": _peak_gpu(),
    }


def _peak_gpu() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None


# -- the TRL side ----------------------------------------------------------------------------------------------

def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import trl
    from arena.config import resolve
    from arena.interfaces import Env
    from arena.plugins.backends.hf.models import resolve_model_path
    from arena.registry import load_registry
    from arena.types import JudgeItem

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sampler = RSSSampler().start()
    clock = Clock()
    _patch_training_clocks(clock)
    steps = args.warmup + args.iterations

    # the same prompts, in the same order, and the same judge as the arena side: built by arena itself
    registry = load_registry()
    plain = argparse.Namespace(**{**vars(args), "set": []})  # --set is for the arena side only
    resolved = resolve(registry, "prompts", overrides=arena_overrides(plain, "/nonexistent", steps))
    env = Env(config=resolved.config, registry=registry)
    game = registry.build("game", resolved.config.game, env)
    judge = registry.build("judge", resolved.config.judge, env)
    records = [game.train_records[i % len(game.train_records)] for i in range(steps * PROMPTS)]
    dataset = Dataset.from_list([{"prompt": game.messages(r), "answer": r["answer"]} for r in records])

    def exact_match(prompts: list, completions: list, answer: list, **kwargs: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        verdicts = judge.judge([JudgeItem(prompt=p, response=t, reference=a)
                                for p, t, a in zip(prompts, texts, answer)])
        return [v.score if v.valid else None for v in verdicts]

    model_path = str(resolve_model_path(None))
    micro = args.micro_batch
    if (PROMPTS * SAMPLES) % micro:
        raise SystemExit(f"--micro-batch {micro} must divide {PROMPTS * SAMPLES}")
    bf16 = args.trl_dtype == "bfloat16"
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        config = GRPOConfig(
            output_dir=tmp, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
            use_cpu=DEVICE == "cpu", bf16=bf16, fp16=False, model_init_kwargs={"dtype": args.trl_dtype},
            seed=SEED, data_seed=SEED, shuffle_dataset=False, dataloader_num_workers=0,
            max_steps=steps, num_train_epochs=1,
            per_device_train_batch_size=micro, gradient_accumulation_steps=PROMPTS * SAMPLES // micro,
            num_generations=SAMPLES, max_completion_length=NEW_TOKENS,
            temperature=1.0, top_p=1.0, top_k=0,
            beta=BETA, epsilon=0.2, num_iterations=1, loss_type="dapo", scale_rewards="none",
            mask_truncated_completions=False, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False, disable_dropout=True,
            log_completions=False,
        )
        lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                          task_type="CAUSAL_LM")
        trainer = GRPOTrainer(model=model_path, reward_funcs=exact_match, args=config, train_dataset=dataset,
                              peft_config=lora)
        per_step: list[dict[str, Any]] = []
        log_records: list[dict[str, Any]] = []

        def phase_wrap(name: str, fn: Any, before: Any = None) -> Any:
            def wrapper(*a: Any, **kw: Any) -> Any:
                old = sampler.set_phase(name)
                if before is not None:
                    before()
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    return fn(*a, **kw)
                finally:
                    _sync()
                    clock.add(name, time.perf_counter() - t0)
                    clock.add(f"cpu/{name}", time.process_time() - c0)
                    sampler.set_phase(old)
            return wrapper

        reset = (_time_generate_forwards(clock, trainer.model.get_base_model(), lambda: sampler.phase == "generate")
                 if DEVICE == "cpu" else None)
        trainer._generate = phase_wrap("generate", trainer._generate, before=reset)
        trainer._calculate_rewards = phase_wrap("reward", trainer._calculate_rewards)
        trainer._generate_and_score_completions = _timed(clock, "generate_and_score",
                                                         trainer._generate_and_score_completions)
        trainer._get_per_token_logps_and_entropies = _timed(
            clock, lambda *a, **kw: "policy_forward" if torch.is_grad_enabled() else "ref_forward",
            trainer._get_per_token_logps_and_entropies)

        class StepTimer(TrainerCallback):
            t0 = 0.0
            c0 = 0.0

            def on_step_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
                clock.take()
                sampler.iteration = state.global_step + 1
                sampler.set_phase("optimize")
                self.t0, self.c0 = time.perf_counter(), time.process_time()

            def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
                _sync()
                total = time.perf_counter() - self.t0
                clock.add("cpu/iteration", time.process_time() - self.c0)
                sampler.set_phase("other")
                per_step.append({"step": state.global_step, "total": total, "parts": clock.take()})

            def on_log(self, a: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
                if logs is not None:
                    log_records.append(dict(logs))

        trainer.add_callback(StepTimer())
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    sampler.stop()
    lengths = [entry["completions/mean_length"] for entry in log_records if "completions/mean_length" in entry]
    for i, step in enumerate(per_step):
        if i < len(lengths):
            step["completion_tokens"] = lengths[i]
    return {"side": "trl", "dtype": args.trl_dtype, "trl": trl.__version__, "threads": torch.get_num_threads(),
            "wall": wall, "steps": per_step, "timed": list(range(args.warmup, steps)), "phase_rss": sampler.peaks,
            "peak_gpu": _peak_gpu()}


# -- the parent: run each side in its own process, then print ---------------------------------------------------

def spawn(side: str, args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    """Run one side ("arena", "arena-profile" or "trl") in a child process; add its peak RSS from os.wait4."""
    with tempfile.TemporaryDirectory(prefix="grpo-step-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--child-out", str(out),
               "--device", DEVICE, "--dtype", dtype, "--trl-dtype", args.trl_dtype,
               "--iterations", str(args.iterations), "--warmup", str(args.warmup),
               "--micro-batch", str(args.micro_batch), "--threads", str(args.threads),
               *(f"--set={item}" for item in args.set)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error"),
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
        print(f"[grpo_step] running {side} ({args.trl_dtype if side == 'trl' else dtype}) ...", file=sys.stderr,
              flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr)  # stdout is kept for the report
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS, not the max over all
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out.is_file():
            raise SystemExit(f"[grpo_step] the {side} child failed with status {proc.returncode}")
        result = json.loads(out.read_text())
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    result["peak_rss"] = usage.ru_maxrss * scale
    result["process_wall"] = wall
    if side != "arena-profile":
        s = summarize([result])
        print(f"[grpo_step] {side} ({args.trl_dtype if side == 'trl' else dtype}): {s['total']:.2f} s/iteration "
              f"(generate {s['parts']['generate']:.2f}, optimize {s['parts']['optimize']:.2f}), peak RSS "
              f"{result['peak_rss'] / 2**30:.2f} GB", file=sys.stderr, flush=True)
    return result


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def _generate_parts(gen: float, p: Any, hf_generate: float | None) -> dict[str, float]:
    inner = gen if hf_generate is None else hf_generate
    parts = {"generate": gen}
    if hf_generate is not None:
        parts["  decode loop"] = hf_generate
    parts.update({
        "    prefill forward": p("prefill_forward"), "    decode forwards": p("decode_forward"),
        "      of which LM head": p("lm_head_in_forward"),
        "    sampling, log-probs, loop": inner - p("prefill_forward") - p("decode_forward"),
    })
    if hf_generate is not None:
        parts["  outside (template, decode)"] = gen - hf_generate
    return parts


def _timed_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per timed iteration: total, parts (seconds), cpu, completion tokens."""
    rows = []
    if result["side"] == "arena":
        for it in result["iterations"]:
            if it["iteration"] in result["timed"]:
                m, parts = it["metrics"], dict(it["parts"])
                parts.update({"generate": m.get("time/generate", 0.0), "judge": m.get("time/judge", 0.0),
                              "optimize": m.get("time/optimize", 0.0)})
                rows.append({"total": m["time/iteration"], "parts": parts,
                             "completion_tokens": m.get("completion_tokens")})
    else:
        for i, step in enumerate(result["steps"]):
            if i in result["timed"]:
                parts = dict(step["parts"])
                parts["judge"] = parts.get("reward", 0.0)
                parts["optimize"] = step["total"] - parts.get("generate", 0.0) - parts["judge"]
                parts["cpu/optimize"] = (parts.get("cpu/iteration", 0.0) - parts.get("cpu/generate", 0.0)
                                         - parts.get("cpu/reward", 0.0))
                rows.append({"total": step["total"], "parts": parts,
                             "completion_tokens": step.get("completion_tokens")})
    return rows


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the timed iterations of one side's runs (one run per --repeat)."""
    rows = [row for run in runs for row in _timed_rows(run)]
    for r in rows:
        r["parts"]["other"] = r["parts"]["optimize"] - sum(
            r["parts"].get(k, 0.0) for k in ("ref_forward", "policy_forward", "backward", "adamw_step"))
    p = lambda key: _median([r["parts"].get(key, 0.0) for r in rows])  # noqa: E731
    gen, opt = p("generate"), p("optimize")
    arena = runs[0]["side"] == "arena"
    parts = {
        **_generate_parts(gen, p, p("hf_generate") if arena else None),
        "judge / reward": p("judge"),
        "optimize": opt, "  reference forward": p("ref_forward"), "  policy forward": p("policy_forward"),
        "  backward": p("backward"), "  AdamW step": p("adamw_step"),
        "  other (loss, clip, copies)": p("other"),
    }
    cpu = {"total": p("cpu/iteration"), "generate": p("cpu/generate"), "optimize": p("cpu/optimize")}
    phase_rss: dict[str, int] = {}
    for run in runs:
        for key, value in run["phase_rss"].items():
            phase_rss[key] = max(value, phase_rss.get(key, 0))
    return {"total": _median([r["total"] for r in rows]), "parts": parts, "cpu": cpu,
            "completion_tokens": _median([r["completion_tokens"] for r in rows]),
            "per_iteration": [r["total"] for r in rows], "peak_rss": max(run["peak_rss"] for run in runs),
            "phase_rss": phase_rss, "threads": runs[0]["threads"]}


def _ratio(fn: Any, s: dict[str, Any]) -> str:
    try:
        return f"{fn(s):.2f}"
    except ZeroDivisionError:
        return "-"


def report(columns: dict[str, list[dict[str, Any]]], args: argparse.Namespace,
           profiles: list[dict[str, Any]] = (), machine: str = "") -> str:
    names = list(columns)
    sums = [summarize(runs) for runs in columns.values()]
    gb = 1024 ** 3
    width = 32
    col = max(14, *(len(n) + 2 for n in names))
    row = lambda label, cells: label.ljust(width) + "".join(c.rjust(col) for c in cells)  # noqa: E731
    repeats = f" x {args.repeat} interleaved runs" if args.repeat > 1 else ""
    lines = [
        f"GRPO step, prompts game on {DEVICE}: {PROMPTS} prompts x {SAMPLES} samples x <= {NEW_TOKENS} new tokens, "
        f"LoRA r={LORA_R} alpha={LORA_ALPHA} on {','.join(LORA_TARGETS)}, beta={BETA}, lr={LR},",
        f"token aggregation (TRL loss_type=dapo), micro-batch {args.micro_batch}, no gradient checkpointing, "
        f"temperature 1.0; judge exact_match on game.dataset=arithmetic (microseconds).",
        f"{args.warmup} warm-up + {args.iterations} timed iterations per side{repeats}, median; torch threads "
        f"{sums[0]['threads']}; each side in its own process.",
        *([f"extra arena overrides: {' '.join(args.set)}"] if args.set else []),
        *([machine] if machine else []),
        "",
        row("wall seconds per iteration", names),
        row("total", [f"{s['total']:.2f}" for s in sums]),
    ]
    for key in dict.fromkeys(k for s in sums for k in s["parts"]):
        lines.append(row(key, [f"{s['parts'][key]:.2f}" if key in s["parts"] else "-" for s in sums]))
    lines.append(row("  range over timed iterations",
                     [f"{min(s['per_iteration']):.1f}-{max(s['per_iteration']):.1f}" for s in sums]))
    lines.append(row("completion tokens / sample", [f"{s['completion_tokens']:.1f}" for s in sums]))
    lines.append(row("optimize s / 1k sampled tokens", [
        f"{1000 * s['parts']['optimize'] / (s['completion_tokens'] * PROMPTS * SAMPLES):.2f}" for s in sums]))
    lines += ["", row("CPU seconds (all threads)", names)]
    for key in ("total", "generate", "optimize"):
        lines.append(row(f"  {key}", [f"{s['cpu'][key]:.2f}" for s in sums]))
    lines += ["", row("peak RSS (GB)", [f"{s['peak_rss'] / gb:.2f}" for s in sums])]
    if DEVICE == "cuda":
        lines.append(row("peak GPU memory (GB)", [f"{max(r['peak_gpu'] for r in runs) / gb:.2f}"
                                                  for runs in columns.values()]))
    for phase, label in (("setup", "  after loading"), ("generate@1", "  1st iteration, generate"),
                         ("optimize@1", "  1st iteration, optimize"), ("generate", "  any generate"),
                         ("optimize", "  any optimize")):
        lines.append(row(label, [f"{s['phase_rss'][phase] / gb:.2f}" if phase in s["phase_rss"] else "-"
                                 for s in sums]))
    trl_names = [n for n in names if n.startswith("TRL")]
    if trl_names:
        t = sums[names.index(trl_names[0])]
        arena = [(n, s) for n, s in zip(names, sums) if not n.startswith("TRL")]
        lines += ["", row(f"arena / {trl_names[0]}", [n for n, _ in arena]) + "   (target <= 0.50)"]
        for label, fn in (("wall time per iteration", lambda s: s["total"] / t["total"]),
                          ("  generate", lambda s: s["parts"]["generate"] / t["parts"]["generate"]),
                          ("  optimize", lambda s: s["parts"]["optimize"] / t["parts"]["optimize"]),
                          ("CPU time per iteration", lambda s: s["cpu"]["total"] / t["cpu"]["total"]),
                          ("peak RSS", lambda s: s["peak_rss"] / t["peak_rss"])):
            lines.append(row(label, [_ratio(fn, s) for _, s in arena]))
    for r in profiles:
        for phase, table in r.get("profile", {}).items():
            lines += ["", f"torch profiler, arena {r['dtype']}, phase {phase} of the iteration after "
                          f"{max(1, args.warmup)} warm-up (a separate process; not in the timings above):", table]
    return "\n".join(lines)


def describe_machine(gpu: bool) -> str:
    """The CPU and its kernels (benchmarks/machine.py), and the GPU if one is used: every figure names its machine."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import describe

    line = describe()
    if gpu:
        import torch

        line += f"; gpu: {torch.cuda.get_device_name()}"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per side (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu: the CPU comparison; cuda: one GPU at the learning settings (the script's docstring)")
    parser.add_argument("--dtype", default=None,
                        help="arena model.dtype; a comma list runs the arena side once per dtype "
                             "(e.g. float32,bfloat16); default float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--trl", action="store_true", help="also run TRL's GRPOTrainer and print the ratios")
    parser.add_argument("--trl-dtype", default=None, choices=["float32", "bfloat16"],
                        help="TRL's model dtype (bfloat16 also turns on its bf16 autocast); default float32 on cpu, "
                             "bfloat16 on cuda")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per forward/backward on both sides (arena optimizer.micro_batch_size, TRL "
                             "per_device_train_batch_size); default: arena's default micro_batch_size on cpu, "
                             "64 on cuda")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every side this many times, interleaved, and pool their timed iterations "
                             "(peak RSS: the largest); default 1")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on both sides; 0 keeps torch's")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, run the arena side once more (warm-up + 1 iteration) under the torch "
                             "profiler and print its op tables; not part of the timings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra arena override for the arena side only (repeatable), e.g. "
                             "--set backend.logits_budget_mb=64; changes the comparison, so say so")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--child", choices=["arena", "arena-profile", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0 or args.repeat < 1:
        parser.error("--iterations and --repeat must be >= 1, --warmup >= 0")
    use_device(args.device)
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.trl_dtype = args.trl_dtype or ("bfloat16" if gpu else "float32")

    if args.child:
        result = run_trl(args) if args.child == "trl" else run_arena(args, profile=args.child == "arena-profile")
        Path(args.child_out).write_text(json.dumps(result))
        return 0

    if gpu:
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device cuda: CUDA is not available here (torch {torch.__version__}"
                         f"{', built without CUDA' if torch.version.cuda is None else ', no GPU visible'}); "
                         "run on a machine with a GPU, or use --device cpu")
    if args.micro_batch is None:
        from arena.plugins.optimizers.grpo import GRPOOptions

        args.micro_batch = 64 if gpu else (GRPOOptions().micro_batch_size or 8)
    if args.micro_batch < 1 or (PROMPTS * SAMPLES) % args.micro_batch:
        parser.error(f"--micro-batch {args.micro_batch}: must divide {PROMPTS * SAMPLES}")
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("float32", "bfloat16", "float16", "auto")]
    if bad:
        parser.error(f"--dtype {bad[0]!r}: expected float32, bfloat16, float16 or auto")
    if args.trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            parser.error("--trl needs trl: pip install -e '.[bench]'")
    columns: dict[str, list[dict[str, Any]]] = {}
    profiles: list[dict[str, Any]] = []

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps({"argv": sys.argv, "columns": columns, "profiles": profiles},
                                                  indent=1))

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    interrupted = False
    try:
        for _ in range(args.repeat):  # interleaved, so that a slow spell of the machine hits every side
            for dtype in dtypes:
                run = spawn("arena", args, dtype)
                columns.setdefault(f"arena {dtype}", []).append(run)
                save()
            if args.trl:
                run = spawn("trl", args, args.trl_dtype)
                columns.setdefault(f"TRL {run['trl']} {args.trl_dtype}", []).append(run)
                save()
        for dtype in dtypes if args.profile else []:
            profiles.append(spawn("arena-profile", args, dtype))
            save()
    except KeyboardInterrupt:  # stopped: report what finished
        interrupted = True
        print("[grpo_step] interrupted; reporting the runs that finished", file=sys.stderr)
    if columns:
        print(report(columns, args, profiles, machine=describe_machine(gpu)))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
