"""Building blocks for tests on the tiny random model (tests/ is on sys.path: `from tiny import make_backend`)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from arena.config import resolve
from arena.interfaces import Env, Policy
from arena.registry import load_registry
from arena.types import Generation


def save_tiny_llama(path: Path, hidden_size: int, max_positions: int = 2048) -> Path:
    """A 2-layer random Llama of two heads (one for keys and values) with the embedded model's tokenizer and chat
    template, saved in `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from arena.plugins.backends.hf.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(None))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_env(model_dir, **lora) -> Env:
    """float32 for exact comparisons (bf16 has its own tests); LoRA r 4 unless `lora` says otherwise."""
    registry = load_registry()
    overrides = [f"model.path={model_dir}", "model.dtype=float32",
                 *(f"model.lora.{k}={v}" for k, v in {"r": 4, **lora}.items())]
    return Env(config=resolve(registry, "prompts", overrides=overrides).config, registry=registry)


def gradients(params):
    """A copy of each parameter's gradient (zeros where it has none)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]


def assert_same_grads(got, want, tol=1e-4):
    """Equal up to float32 reduction order: the difference is tiny relative to the whole gradient."""
    assert len(got) == len(want)
    g, w = torch.cat([x.flatten() for x in got]), torch.cat([x.flatten() for x in want])
    norm = float(w.norm())
    assert norm > 1e-6  # not a vacuous comparison
    error = float((g - w).norm()) / norm
    assert error < tol, f"gradients differ: |got - want| / |want| = {error:.2e}"


def applied_gradient(opt, samples, roles, undo: bool = True):
    """Run `opt.step` and return (the gradient it applied, captured just before AdamW's step, and its metrics),
    then (`undo`) undo the update so that every call starts from the same weights."""
    captured = {}
    original = opt.torch_optimizer.step

    def spy(*args, **kwargs):
        captured["grads"] = gradients(opt.params)
        return original(*args, **kwargs)

    opt.torch_optimizer.step = spy
    snapshot = [p.detach().clone() for p in opt.params]
    metrics = opt.step(samples, roles)
    if undo:
        with torch.no_grad():
            for p, saved in zip(opt.params, snapshot):
                p.copy_(saved)
    return captured.get("grads"), metrics


def make_backend(model_dir, perturb: bool = True, seed: int = 3, **options):
    from arena.plugins.backends.hf.backend import HFBackend, HFOptions

    backend = HFBackend(HFOptions(**options), make_env(model_dir))
    if perturb:  # LoRA B starts at zero (policy == reference); make them differ
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in backend.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    return backend


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (its children, theirs, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting to be reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_after_checkpoint(args: list[str], run: Path, iteration: int = 1, timeout: float = 900,
                          linger: float = 0.0) -> list[int]:
    """Run `python -m arena ARGS` and kill -9 it once checkpoint `iteration` is complete in `run` (after `linger`
    more seconds, so that the next round is under way): the crash a resume must survive. Returns the processes
    it had started, which were left running."""
    proc = subprocess.Popen([sys.executable, "-m", "arena", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + timeout
    while not (run / "checkpoints" / f"{iteration:06d}" / "meta.json").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"no checkpoint {iteration} after {timeout} s"
        time.sleep(0.1)
    time.sleep(linger)
    below = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    return below


# a prompts run of seconds on the tiny model, checkpointed at every iteration, every checkpoint kept
FAST_PROMPTS = ["game.dataset=arithmetic", "judge=exact_match", "game.prompts_per_round=2", "game.group_size=2",
                "game.max_new_tokens=4", "game.eval_size=2", "run.eval_every=1", "run.keep_checkpoints=0",
                "run.loggers=[plain]", "model.lora.r=4"]


def play_prompts(model_dir: Path, run: Path, iterations: int) -> Path:
    """A finished `arena play prompts` run of `iterations` on the tiny model in `run` (FAST_PROMPTS)."""
    from arena.cli import main

    assert main(["play", "prompts", f"model.path={model_dir}", f"run.dir={run}", f"run.iterations={iterations}",
                 *FAST_PROMPTS]) == 0
    return run


def env_with(policy=None, registry=None, model_path=None) -> Env:
    registry = registry or load_registry()
    overrides = ["model.dtype=float32", "model.lora.r=4"]  # exact comparisons
    if model_path is not None:
        overrides.append(f"model.path={model_path}")
    return Env(config=resolve(registry, "prompts", overrides=overrides).config, registry=registry, policy=policy)


class ScriptedReplies(Policy):
    """A policy whose generations are fixed texts (the i-th prompt of a call gets reply i, cycling), with one-character
    tokens and single-token digits unless `digits=False`: for judges' text modes."""

    def __init__(self, replies: Sequence[str], digits: bool = True):
        self.replies = list(replies)
        self.digits = digits
        self.calls: list[dict] = []

    def encode_chat(self, messages, add_generation_prompt=True):
        return [ord(c) for m in messages for c in m["content"]]

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def token_id(self, text):
        if self.digits and len(text) == 1 and text.isdigit():
            return 1000 + int(text)
        raise ValueError(text)

    def generate(self, prompts, *, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, greedy=False,
                 reference=False):
        self.calls.append({"prompts": prompts, "n": n, "max_new_tokens": max_new_tokens, "greedy": greedy,
                           "reference": reference})
        return [[Generation([], [1], [0.0], text=self.replies[i % len(self.replies)])] for i in range(len(prompts))]

    def next_token_logprobs(self, prompts, candidates, *, reference=False):
        raise AssertionError("text mode must not score constrained")

    def sequence_logprobs(self, prompt_ids, completion_ids, *, temperature=1.0, reference=False):
        raise NotImplementedError

    def trainable_parameters(self):
        return []

    def save(self, path):
        raise NotImplementedError

    def load(self, path):
        raise NotImplementedError


# -- one tiny run of each built-in game ---------------------------------------------------------------------

def pairs_file(folder: Path) -> Path:
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Name a colour number {i}.",
                                        "response": f"Colour {i} is blue, like the sky at noon."}) + "\n"
                            for i in range(12)))
    return path


def corpus_file(folder: Path) -> Path:
    from test_pop import DOC

    words = DOC.split()
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"title": f"doc {i}", "text": " ".join(random.Random(i).sample(words, len(words)))})
                            + "\n" for i in range(6)))
    return path


def game_args(game: str, folder: Path) -> list[str]:
    """Options for a run of seconds of `game` on the tiny model, its data files written in `folder`."""
    from test_azr import TINY_AZR
    from test_lsp import TINY_LSP

    if game == "prompts":
        return ["game.dataset=arithmetic", "judge=exact_match", "game.prompts_per_round=4", "game.group_size=2",
                "game.max_new_tokens=4", "game.eval_size=4", "run.eval_every=1"]
    if game == "lsp":
        return TINY_LSP
    if game == "spin":
        return [f"game.dataset={pairs_file(folder)}", "game.prompts_per_round=2", "game.max_new_tokens=6",
                "game.eval_size=2", "game.rounds_per_iteration=2", "run.eval_every=2", "optimizer.lr=0.01"]
    if game == "azr":
        return TINY_AZR
    return [f"game.corpus={corpus_file(folder)}", "game.min_document_words=10", "game.eval_size=2",
            "game.min_question_overlap=0", "game.documents_per_round=2", "game.answers=2",
            "game.field_max_new_tokens=6", "game.solver_max_new_tokens=6", "run.eval_every=2"]
