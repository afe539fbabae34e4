"""The `mirror` game: its rules on a scripted policy (exact rewards and groups), then real rounds on a tiny model."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
from omegaconf import OmegaConf

from arena import Env, Generation, Judge, Policy, RoundContext, Verdict
from arena.config import resolve
from arena.errors import ConfigError
from arena.loop import play
from arena.plugins.optimizers.grpo import group_advantages
from arena.runstore import read_jsonl
from arena_example_game import EVAL_LISTS, SEED_LISTS, MirrorGame, words


class ScriptedPolicy(Policy):
    """Answers setter prompts from a script, in order, and copier prompts with `copies(list_words)`."""

    def __init__(self, setter_outputs, copies):
        self.setter_outputs = list(setter_outputs)
        self.copies = copies
        self.calls = []

    def encode_chat(self, messages, add_generation_prompt=True):
        return [len(m["content"]) for m in messages]

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))

    def token_id(self, text):
        return ord(text)

    def _gen(self, text):
        return Generation(prompt_ids=[1, 2], completion_ids=[3, 4], logprobs=[-0.5, -0.5], text=text)

    def generate(self, prompts, *, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, greedy=False,
                 reference=False):
        self.calls.append((len(prompts), n, greedy))
        out = []
        for p in prompts:
            content = p[-1]["content"]
            if content.startswith("Write a list"):
                out.append([self._gen(self.setter_outputs.pop(0)) for _ in range(n)])
            else:
                shown = words(content.split("\n\n", 1)[1])
                out.append([self._gen(t) for t in self.copies(shown, n)])
        return out

    def next_token_logprobs(self, prompts, candidates, *, reference=False):
        raise NotImplementedError

    def sequence_logprobs(self, prompt_ids, completion_ids, *, temperature=1.0, reference=False):
        raise NotImplementedError

    def trainable_parameters(self):
        return []

    def save(self, path):
        pass

    def load(self, path):
        pass


SCRIPT = {("apple", "pear", "plum"): ["apple, pear, plum", "apple, pear"],  # F1 1.0 and 0.8
          ("red", "green", "blue", "gold"): ["nothing alike", "red green blue gold"]}  # F1 0.0 and 1.0


def scripted_copies(shown, n):
    return SCRIPT.get(tuple(shown), ["", "zzz"])[:n]


def make(registry, judge="overlap", **options):
    env = Env(config=None, registry=registry)
    game = registry.build("game", {"name": "mirror", "lists_per_round": 3, "copies_per_list": 2, **options}, env)
    return game, registry.build("judge", judge, env), env


def play_scripted(registry, setter_outputs, judge="overlap", seed=0, game=None, **options):
    if game is None:
        game, judge_obj, env = make(registry, judge, **options)
    else:
        env = game.env
        judge_obj = registry.build("judge", judge, env)
    policy = ScriptedPolicy(setter_outputs, scripted_copies)
    ctx = RoundContext(iteration=1, policy=policy, judge=judge_obj, rng=random.Random(seed), env=env)
    return game, ctx, game.play(ctx), policy


SETTER = ["Sure! Three fruits: Apple, pear, plum", "one two", "1. Red 2. green 3. blue 4. gold"]


def test_plugin_is_registered_through_its_entry_point(registry):
    assert registry.entries["game"]["mirror"].plugin == "arena_example_game"
    assert registry.entries["judge"]["overlap"].plugin == "arena_example_game"
    assert "arena_example_game" not in registry.failed


def test_config_defaults_to_the_overlap_judge_and_validates_options(registry):
    tree = resolve(registry, "mirror", overrides=["game.copies_per_list=3"]).tree
    assert tree["judge"] == {"name": "overlap", "mode": "f1"}
    assert tree["game"]["copies_per_list"] == 3 and tree["game"]["lists_per_round"] == 4
    assert resolve(registry, "mirror", overrides=["judge.mode=exact"]).tree["judge"]["mode"] == "exact"
    with pytest.raises(ConfigError, match=r"^game\.copies_per_list: bad value"):
        resolve(registry, "mirror", overrides=["game.copies_per_list=many"])
    with pytest.raises(ConfigError, match=r"^game\.max_words: 2 is below min_words 3"):
        make(registry, max_words=2)
    with pytest.raises(ConfigError, match=r"^game\.lists_per_round: must be at least 1"):
        make(registry, lists_per_round=0)


def test_rewards_groups_and_format_penalty_follow_the_rules(registry):
    game, ctx, samples, policy = play_scripted(registry, SETTER)
    assert policy.calls == [(1, 3, False), (3, 2, False)]  # one batched call per role
    setters = [s for s in samples if s.role == "setter"]
    copiers = [s for s in samples if s.role == "copier"]
    assert len(setters) == 3 and len(copiers) == 6
    assert {s.group for s in setters} == {"1:setter"}
    assert Counter(s.group for s in copiers) == {"1:list0": 2, "1:list1": 2, "1:list2": 2}

    by_list = {i: [s for s in copiers if s.metadata["list"] == i] for i in range(3)}
    assert [s.reward for s in by_list[0]] == pytest.approx([1.0, 0.8])
    assert [s.reward for s in by_list[2]] == pytest.approx([0.0, 1.0])
    assert [s.reward for s in by_list[1]] == [0.0, 0.0]
    # the malformed list is replaced by a buffer list, which the copiers copy
    fallback = by_list[1][0].metadata
    assert fallback["source"] == "buffer" and fallback["words"] in SEED_LISTS
    assert by_list[0][0].metadata["source"] == "setter" and by_list[0][0].metadata["words"] == ["apple", "pear", "plum"]

    assert [s.reward for s in setters] == pytest.approx([1 - 0.9, -1.0, 1 - 0.5])
    assert [s.metadata["format_ok"] for s in setters] == [True, False, True]
    assert "2 words" in setters[1].metadata["penalty"]
    assert ctx.metrics["mirror/setter_format_ok"] == pytest.approx(2 / 3)

    # GRPO baselines: the copies of one list against each other, the round's setter lists against each other
    adv = dict(zip(map(id, samples), group_advantages(samples)))
    assert [adv[id(s)] for s in by_list[0]] == pytest.approx([0.1, -0.1])
    mean_setter = (0.1 - 1.0 + 0.5) / 3
    assert [adv[id(s)] for s in setters] == pytest.approx([0.1 - mean_setter, -1.0 - mean_setter,
                                                           0.5 - mean_setter])

    # valid lists join the buffer, which is game state
    state = json.loads(json.dumps(game.state_dict()))
    assert state["buffer"][-2:] == [["apple", "pear", "plum"], ["red", "green", "blue", "gold"]]
    assert state["lists_accepted"] == 2


def test_state_round_trip_replays_the_same_round(registry):
    game, _, _, _ = play_scripted(registry, SETTER)
    state = json.loads(json.dumps(game.state_dict()))
    bad = ["x", "y", "z"]  # no valid list: every copy goes to the buffer
    _, _, first, _ = play_scripted(registry, bad, seed=7, game=game)
    restored, _, _ = make(registry)
    assert restored.state_dict() != state
    restored.load_state_dict(state)
    _, _, again, _ = play_scripted(registry, bad, seed=7, game=restored)
    assert [s.metadata["words"] for s in again] == [s.metadata["words"] for s in first]


def test_judge_choice_and_scale(registry):
    class Always(Judge):
        def __init__(self, score, valid):
            self.score, self.valid = score, valid

        def judge(self, items):
            return [Verdict(self.score) if self.valid else Verdict.invalid("cannot tell") for _ in items]

    game, _, env = make(registry, judge_max_score=7.0)
    ctx = RoundContext(iteration=2, policy=ScriptedPolicy(SETTER, scripted_copies), judge=Always(3.5, True),
                       rng=random.Random(0), env=env)
    setters = [s for s in game.play(ctx) if s.role == "setter"]
    assert [s.reward for s in setters] == pytest.approx([0.5, -1.0, 0.5])  # 1 - 3.5/7

    game, _, env = make(registry)
    ctx = RoundContext(iteration=3, policy=ScriptedPolicy(SETTER, scripted_copies), judge=Always(0, False),
                       rng=random.Random(0), env=env)
    samples = game.play(ctx)
    assert all(s.reward is None for s in samples if s.role == "copier")
    # no valid verdict: a well-formed list earns nothing to learn from; a malformed one is still penalised
    assert [s.reward for s in samples if s.role == "setter"] == [None, -1.0, None]


def test_two_iterations_on_a_tiny_model(registry, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    resolved = resolve(registry, "mirror", overrides=[
        f"model.path={tiny_model_dir}", f"run.dir={run_dir}", "run.iterations=2", "run.loggers=[plain]",
        "model.lora.r=4", "game.lists_per_round=2", "game.copies_per_list=3", "game.max_new_tokens=8"])
    assert play(registry, resolved) == run_dir
    samples = list(read_jsonl(run_dir / "samples.jsonl"))
    metrics = list(read_jsonl(run_dir / "metrics.jsonl"))
    assert [m["iteration"] for m in metrics] == [0, 1, 2]  # 0: the held-out score before training
    for it in (1, 2):
        rows = [s for s in samples if s["iteration"] == it]
        assert Counter(s["role"] for s in rows) == {"setter": 2, "copier": 6}
        assert {s["group"] for s in rows if s["role"] == "setter"} == {f"{it}:setter"}
        for s in rows:
            assert s["completion_ids"] and len(s["logprobs"]) == len(s["completion_ids"])
            if s["role"] == "copier":
                assert 0.0 <= s["reward"] <= 1.0 and s["metadata"]["verdict"]["mode"] == "f1"
            elif not s["metadata"]["format_ok"]:
                assert s["reward"] == -1.0
            else:
                copies = [c["reward"] for c in rows if c["group"] == s["metadata"]["copier_group"]]
                assert s["reward"] == pytest.approx(1 - sum(copies) / len(copies))
    assert "reward/setter" in metrics[2] and "reward/copier" in metrics[2] and metrics[2]["train/samples"] >= 0
    for key in ("eval/f1", "eval/exact", "eval/score", "eval/setter_format_ok"):
        assert 0.0 <= metrics[0][key] <= 1.0 and 0.0 <= metrics[2][key] <= 1.0  # before training, and at the end
    assert math.isclose(metrics[2]["eval/valid_frac"], 1.0)
    state = json.loads((run_dir / "checkpoints" / "000002" / "game_state.json").read_text())
    assert state["buffer"][:len(SEED_LISTS)] == SEED_LISTS and all(ws not in state["buffer"] for ws in EVAL_LISTS)
    assert OmegaConf.load(run_dir / "config.yaml").judge.name == "overlap"
