"""SPIN: its rules as arithmetic, its pairs, the opponent changing hands at each SPIN iteration, and a run that
is killed at an opponent change and resumed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arena.cli import main
from arena.games.spin import held_out_preferences, opponent_name, spin_iteration
from arena.runstore import read_jsonl
from tiny import kill_after_checkpoint


def test_iterations_and_opponents():
    assert [spin_iteration(i, 3) for i in range(1, 8)] == [0, 0, 0, 1, 1, 1, 2]
    assert opponent_name(0) is None and opponent_name(2) == "spin-opponent-2"


def test_held_out_preference_by_hand():
    # margins: (2-1)-(1-1)=1 > 0; (0-0)-(1-0)=-1 < 0; (1-1)-(1-1)=0 (a tie counts half)
    got = held_out_preferences(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]),
                               torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 1.0]))
    assert got == [1.0, 0.0, 0.5]


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    rows = [{"prompt": f"Name a colour number {i}.", "response": f"Colour {i} is blue, like the sky at noon."}
            for i in range(12)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spin_args(tiny_config, pairs_file, *more):
    return ["play", "spin", *tiny_config, f"game.dataset={pairs_file}", "game.prompts_per_round=2",
            "game.max_new_tokens=6", "game.eval_size=2", "game.rounds_per_iteration=2", "run.eval_every=2",
            "optimizer.lr=0.01", *more]


def test_pairs_opponents_and_a_resume_that_replays_exactly(tiny_config, pairs_file, tmp_path, capsys):
    run = Path(next(a.split("=", 1)[1] for a in tiny_config if a.startswith("run.dir=")))
    assert main(spin_args(tiny_config, pairs_file, "run.iterations=5")) == 0
    out = capsys.readouterr().out
    assert "opponent: the starting model (base)" in out and "opponent: spin-opponent-2" in out
    samples = list(read_jsonl(run / "samples.jsonl"))
    assert [s["iteration"] for s in samples] == [i for i in range(1, 6) for _ in range(4)]
    for s in samples:
        t = (s["iteration"] - 1) // 2
        assert s["metadata"]["spin_iteration"] == t and s["role"] == "player"
        assert s["metadata"].get("reference") == opponent_name(t)  # absent for the base: dpo uses the base
    for it in range(1, 6):
        rows = [s for s in samples if s["iteration"] == it]
        for group in {s["group"] for s in rows}:
            pair = {s["metadata"]["pair"]: s for s in rows if s["group"] == group}
            assert set(pair) == {"chosen", "rejected"}
            assert pair["chosen"]["completion"].startswith("Colour") and pair["chosen"]["reward"] == 1.0
            assert pair["chosen"]["prompt_ids"] == pair["rejected"]["prompt_ids"]
            assert len(pair["chosen"]["completion_ids"]) <= 6 and len(pair["rejected"]["completion_ids"]) <= 6
    metrics = list(read_jsonl(run / "metrics.jsonl"))
    assert [m["iteration"] for m in metrics] == [0, 1, 2, 3, 4, 5]
    assert metrics[0]["eval/pair_accuracy"] == 0.5  # the player is the base model: every margin is 0
    assert {"margin", "accuracy", "logps/chosen", "logps/rejected", "eval/real_logprob"} <= set(metrics[2])
    state = json.loads((run / "checkpoints" / "000005" / "game_state.json").read_text())
    assert state["opponents"] == {"0": "base", "1": "spin-opponent-1", "2": "spin-opponent-2"}
    frozen = run / "checkpoints" / "000005" / "adapter" / "frozen"
    assert sorted(p.name for p in frozen.iterdir()) == ["spin-opponent-2.safetensors"]  # one copy at a time
    # the opponent of SPIN iteration 2 is the adapter as it was when iteration 1 ended (after round 4)
    opponent = load_file(frozen / "spin-opponent-2.safetensors")
    end_of_1 = load_file(run / "checkpoints" / "000004" / "adapter" / "adapter_model.safetensors")
    assert len(opponent) == len(end_of_1) > 0
    assert all(torch.equal(a, b) for a, b in zip(opponent.values(), end_of_1.values()))

    # killed at the opponent change (after round 4, before 5 froze the next opponent) and resumed: the same run
    cut = tmp_path / "cut"
    args = [a if not a.startswith("run.dir=") else f"run.dir={cut}" for a in tiny_config]
    assert main(spin_args(args, pairs_file, "run.iterations=4")) == 0
    assert main(["play", "spin", "--resume", str(cut), "run.iterations=5"]) == 0
    capsys.readouterr()
    final = load_file(run / "checkpoints" / "000005" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(cut / "checkpoints" / "000005" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    assert [s["completion"] for s in read_jsonl(cut / "samples.jsonl")] == [s["completion"] for s in samples]


def test_a_pair_game_needs_a_pair_optimizer(capsys):
    assert main(["config", "spin", "optimizer=grpo"]) == 2
    assert "role 'player' produces pairs with these settings but 'grpo' learns only from rewards" in capsys.readouterr().err

@pytest.mark.slow
def test_spin_on_the_embedded_model_killed_at_an_opponent_change(tmp_path):
    """The real model, one round per SPIN iteration: kill -9 right after the checkpoint that ends iteration 0,
    resume, and the run crosses two opponent changes with the right opponents and the held-out measures."""
    run = tmp_path / "run"
    kill_after_checkpoint(["play", "spin", f"run.dir={run}", "run.iterations=3", "run.loggers=[plain]",
                           "game.rounds_per_iteration=1", "game.prompts_per_round=2", "game.max_new_tokens=12",
                           "game.eval_size=2", "run.eval_every=3"], run, timeout=600)
    done = subprocess.run([sys.executable, "-m", "arena", "play", "spin", "--resume", str(run)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "opponent: spin-opponent-2" in done.stdout
    samples = list(read_jsonl(run / "samples.jsonl"))
    assert [s["iteration"] for s in samples] == [1] * 4 + [2] * 4 + [3] * 4
    assert [s["metadata"].get("reference") for s in samples[::4]] == [None, "spin-opponent-1", "spin-opponent-2"]
    metrics = list(read_jsonl(run / "metrics.jsonl"))
    assert [m["iteration"] for m in metrics] == [0, 1, 2, 3]
    assert {"eval/pair_accuracy", "eval/real_logprob"} <= set(metrics[-1])


def test_an_empty_opponent_answer_is_left_out_of_the_eval_as_of_training(tiny_model_dir, pairs_file):
    """An opponent that ends at once gives an empty rejected response: training leaves the pair out (reward None),
    and so does the held-out measure, instead of scoring the end token as if it were the answer."""
    from arena.config import resolve
    from arena.interfaces import Env, RoundContext
    from arena.registry import load_registry
    import dataclasses
    import random

    registry = load_registry()
    config = resolve(registry, "spin", overrides=[f"model.path={tiny_model_dir}", "model.dtype=float32",
                                                  f"game.dataset={pairs_file}", "game.eval_size=4",
                                                  "game.prompts_per_round=4", "game.max_new_tokens=6"]).config
    env = Env(config=config, registry=registry)
    env.policy = policy = registry.build("backend", config.backend, env)
    game = registry.build("game", config.game, env)
    real_generate = policy.generate

    def ends_at_once_on_the_first_prompt(prompts, **kw):
        """The real generations, but the first prompt's answer is the end token alone (not truncated)."""
        outs = real_generate(prompts, **kw)
        g = outs[0][0]
        outs[0][0] = dataclasses.replace(g, completion_ids=[policy.tokenizer.eos_token_id], logprobs=[-1.0], text="",
                                         truncated=False)
        return outs

    policy.generate = ends_at_once_on_the_first_prompt
    empty = [True] + [False] * 3
    ctx = RoundContext(iteration=0, policy=policy, judge=None, rng=random.Random(0), env=env)
    items = game.evaluate_items(ctx)
    assert [a is None for a in items["pair_accuracy"]] == empty == [v is None for v in items["real_logprob"]]
    assert all(a == 0.5 for a in items["pair_accuracy"] if a is not None)  # the player is its opponent: ties
    assert items["empty_pairs"] == sum(empty)
    game.train_records = game.eval_records  # the same prompts in a training round: those pairs are not trained
    rejected = [s for s in game.play(RoundContext(iteration=1, policy=policy, judge=None, rng=random.Random(0),
                                                  env=env)) if s.metadata["pair"] == "rejected"]
    assert [s.reward is None for s in rejected] == empty


def test_a_reference_the_game_never_freezes_is_refused_by_arena_config(capsys):
    assert main(["config", "spin", "optimizer.reference=zzz"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "optimizer.reference: 'zzz': game 'spin' makes no frozen adapter" in err
    for fine in ("base", "spin-opponent-2"):
        assert main(["config", "spin", f"optimizer.reference={fine}"]) == 0
    capsys.readouterr()
    assert main(["config", "pop", "game.variant=pairs", "optimizer=dpo", "optimizer.reference=spin-opponent-2"]) == 2
    assert "game 'pop' makes no frozen adapter" in capsys.readouterr().err
