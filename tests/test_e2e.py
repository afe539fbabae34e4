"""End to end through the CLI: a real run, its files, and a SIGKILL followed by --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arena.cli import main
from arena.runstore import read_jsonl

REAL_TINY = ["game.prompts_per_round=2", "game.group_size=2", "game.max_new_tokens=12", "game.eval_size=2",
             "run.eval_every=2", "run.loggers=[plain]", "optimizer.lr=1e-3"]


def _adapter(run: Path, iteration: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"{iteration:06d}" / "adapter" / "adapter_model.safetensors")


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "arena", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_play_prompts_on_embedded_model(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["play", "prompts", f"run.dir={run}", "run.iterations=2", *REAL_TINY]) == 0
    out = capsys.readouterr().out
    assert "it 2/2" in out and "reward/assistant" in out and "kl" in out and "loss" in out

    samples = list(read_jsonl(run / "samples.jsonl"))
    metrics = list(read_jsonl(run / "metrics.jsonl"))
    assert [s["iteration"] for s in samples] == [1] * 4 + [2] * 4
    assert all(s["completion_ids"] and len(s["logprobs"]) == len(s["completion_ids"]) for s in samples)
    assert all(isinstance(s["reward"], float) and 0 <= s["reward"] <= 7 for s in samples)  # self_reward 0..7
    assert [m["iteration"] for m in metrics] == [0, 1, 2]  # 0: the held-out score before training
    assert set(metrics[0]) >= {"eval/score"} and "loss" not in metrics[0]
    assert {"loss", "kl", "reward/assistant", "eval/score"} <= set(metrics[2])

    first, second = _adapter(run, 1), _adapter(run, 2)
    lora_b = [k for k in first if "lora_B" in k]
    assert lora_b and any(first[k].abs().sum() > 0 for k in lora_b), "LoRA B starts at zero: a step must move it"
    assert any(not torch.equal(first[k], second[k]) for k in first), "the second update changed nothing"
    assert (run / "config.yaml").read_text().count("name: prompts") == 1


@pytest.mark.slow
def test_sigkill_after_first_checkpoint_then_resume(tmp_path):
    run = tmp_path / "run"
    args = ["play", "prompts", f"run.dir={run}", "run.iterations=3", *REAL_TINY]
    proc = _cli(*args)
    deadline = time.time() + 600
    while not (run / "checkpoints" / "000001" / "meta.json").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.2)
    time.sleep(1.0)  # let round 2 get under way: its partial output must be cut back on resume
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = (run / "samples.jsonl").read_bytes()
    meta = json.loads((run / "checkpoints" / "000001" / "meta.json").read_text())

    done = _cli("play", "prompts", "--resume", str(run))
    out, err = done.communicate(timeout=900)
    assert done.returncode == 0, err
    assert "resuming at iteration 2" in out

    after = (run / "samples.jsonl").read_bytes()
    assert after[:meta["samples_bytes"]] == before[:meta["samples_bytes"]], "round 1 was rewritten or lost"
    iterations = [s["iteration"] for s in read_jsonl(run / "samples.jsonl")]
    assert iterations == [1] * 4 + [2] * 4 + [3] * 4, "a round was lost or duplicated"
    assert [m["iteration"] for m in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3]


def test_resumed_run_replays_exactly(tiny_model_dir, tmp_path):
    """An uninterrupted run and one stopped after iteration 1 and resumed produce the same samples."""
    common = [f"model.path={tiny_model_dir}", "model.lora.r=4", "run.loggers=[plain]", "game.dataset=arithmetic",
              "game.max_new_tokens=6", "optimizer.lr=1e-2", "run.eval_every=0", "run.keep_checkpoints=0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["play", "prompts", f"run.dir={whole}", "run.iterations=3", *common]) == 0
    assert main(["play", "prompts", f"run.dir={split}", "run.iterations=1", *common]) == 0
    assert main(["play", "prompts", "--resume", str(split), "run.iterations=3"]) == 0

    def texts(run):
        return [(s["iteration"], s["completion"]) for s in read_jsonl(run / "samples.jsonl")]

    assert texts(whole) == texts(split)
    assert len(texts(whole)) == 3 * 16
    metrics = list(read_jsonl(whole / "metrics.jsonl"))
    assert metrics[-1]["kl"] > 0, "the policy never moved: the replay check would prove nothing"


def test_existing_run_dir_is_never_overwritten(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "samples.jsonl").write_text('{"keep": 1}\n')
    assert main(["play", "prompts", *tiny_config, "game.dataset=arithmetic", "judge=exact_match"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.dir" in err[0] and "not empty (holds samples.jsonl) and no run" in err[0]
    assert (run / "samples.jsonl").read_text() == '{"keep": 1}\n'


def test_missing_prompts_file_is_one_line(tiny_config, tmp_path, capsys):
    assert main(["play", "prompts", *tiny_config, f"game.dataset={tmp_path / 'nope.jsonl'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "game.dataset" in err[0] and "nope.jsonl" in err[0]


def test_bad_component_option_leaves_no_run_folder(tiny_config, tmp_path, capsys):
    """A nested judge's bad key is found while building, before the run folder exists."""
    spec = "judge={name: mix, judges: [{name: exact_match, mode: nope}]}"
    assert main(["play", "prompts", *tiny_config, "game.dataset=arithmetic", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "judge.judges.0.mode" in err[0], err
    assert not (tmp_path / "run").exists()


def test_item_means_by_hand():
    from arena.types import Verdict, item_means, verdict_items

    items = verdict_items([Verdict(2.0), Verdict.invalid("x"), Verdict(4.0), Verdict(0.0)])
    # an invalid verdict keeps its place as None (item i stays item i) and is left out of the mean, never a 0
    assert items == {"score": [2.0, None, 4.0, 0.0], "valid_frac": [1.0, 0.0, 1.0, 1.0]}
    assert item_means({**items, "problems": 4, "empty": [], "none": [None]}) == {
        "score": 2.0, "valid_frac": 0.75, "problems": 4.0}


def test_the_optimizer_step_runs_inside_updating_and_every_command_closes_the_policy(tiny_model_dir, tmp_path,
                                                                                      monkeypatch):
    """`Policy.updating()` wraps each optimizer step (and nothing else), and `close()` is called once when a run,
    an eval or an export is done with the policy: where the vllm backend sleeps and stops its engine."""
    import contextlib

    from arena.cli import main
    from arena.plugins.backends.hf.backend import HFBackend
    from arena.plugins.optimizers.grpo import GRPO
    from tiny import play_prompts

    log: list[str] = []

    @contextlib.contextmanager
    def updating(self):
        log.append("sleep")
        yield
        log.append("wake")

    step = GRPO.step
    monkeypatch.setattr(HFBackend, "updating", updating)
    monkeypatch.setattr(HFBackend, "close", lambda self: log.append("close"))
    monkeypatch.setattr(GRPO, "step", lambda self, *a, **k: (log.append("step"), step(self, *a, **k))[1])
    run = play_prompts(tiny_model_dir, tmp_path / "run", iterations=2)
    assert log == ["sleep", "step", "wake"] * 2 + ["close"]
    del log[:]
    assert main(["eval", str(run), "--out", str(tmp_path / "eval.json")]) == 0
    assert log == ["close"]
    del log[:]
    assert main(["export", str(run), str(tmp_path / "merged")]) == 0
    assert log == ["close"]
