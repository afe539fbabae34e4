"""`arena eval`: held-out scores of trained runs and of the base model with bootstrap intervals, and win rates
against the base from a judge that compares answers in both orders."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from arena.cli import main
from arena.evaluate import (ModelView, bootstrap, compare_answers, outcome, paired_differences, preference, summarise,
                            table_rows, win_rate)
from arena.interfaces import Judge
from arena.registry import load_registry
from arena.types import Comparison, JudgeItem, Verdict, chat

from tiny import env_with, make_backend

# -- the arithmetic, by hand ----------------------------------------------------------------------------------


def test_bootstrap_interval_holds_the_mean_and_narrows_with_agreement():
    rng = random.Random(1)
    for n in (1, 2, 5, 40):
        values = [rng.random() for _ in range(n)]
        e = bootstrap(values)
        assert e.n == n and e.mean == pytest.approx(sum(values) / n)
        assert e.low <= e.mean <= e.high
        assert bootstrap(values) == e  # a fixed seed: a rerun prints the same interval
    assert bootstrap([0.7]).low == bootstrap([0.7]).high == 0.7
    assert bootstrap([1.0] * 9).high - bootstrap([1.0] * 9).low == 0
    wide, narrow = bootstrap([0.0, 1.0] * 5), bootstrap([0.0, 1.0] * 50)
    assert 0 <= wide.low < 0.5 < wide.high <= 1 and narrow.high - narrow.low < wide.high - wide.low
    # a 95% interval of a 0/1 mean over 100 items is about +-0.1 (normal approximation: 1.96 * 0.05)
    assert narrow.high - narrow.low == pytest.approx(0.196, abs=0.03)


def test_preference_cancels_a_position_bias_and_ties_count_half():
    # a judge that says "the first is better" with 0.8 whatever the order thinks both are alike
    assert preference(Verdict(0.8), Verdict(0.8)) == pytest.approx(0.5)
    assert preference(Verdict(0.9), Verdict(0.3)) == pytest.approx(0.8)  # trained ahead in both orders
    assert preference(Verdict(0.4), Verdict(0.8)) == pytest.approx(0.3)
    assert preference(Verdict(0.9), Verdict.invalid("x")) is None
    assert [outcome(p) for p in (0.8, 0.5, 0.3)] == [1.0, 0.5, 0.0]
    w = win_rate([0.8, 0.5, 0.3, None, 0.9])
    assert (w["wins"], w["ties"], w["losses"], w["invalid"]) == (2, 1, 1, 1)
    assert w["win_rate"]["mean"] == pytest.approx((2 + 0.5) / 4)
    assert w["preference"]["mean"] == pytest.approx((0.8 + 0.5 + 0.3 + 0.9) / 4)
    assert w["win_rate"]["low"] <= w["win_rate"]["mean"] <= w["win_rate"]["high"]
    assert "win_rate" not in win_rate([None])
    for k in range(1001):  # equal verdicts in both orders are a tie, never a loss by rounding
        assert preference(Verdict(k / 1000), Verdict(k / 1000)) == 0.5


def test_a_paired_difference_tells_a_small_steady_gain_from_zero():
    """Items that differ a lot from each other, each 0.05 better after training: the two models' own intervals
    overlap, the paired difference is 0.05 with no spread; a change that goes both ways straddles zero."""
    rng = random.Random(3)
    base = [rng.uniform(0, 2) for _ in range(40)]
    trained = [b + 0.05 for b in base]
    b, t = bootstrap(base), bootstrap(trained)
    assert t.low < b.high  # each model's own interval cannot tell them apart
    d = paired_differences({"score": trained, "n": 40}, {"score": base, "n": 40})
    assert list(d) == ["score"] and d["score"].n == 40  # counts are not measures
    assert d["score"].mean == pytest.approx(0.05) and d["score"].low == pytest.approx(0.05)
    assert d["score"].high == pytest.approx(0.05)
    mixed = paired_differences({"score": [x + (0.3 if i % 2 else -0.3) for i, x in enumerate(base)]},
                               {"score": base})["score"]
    assert mixed.low < 0 < mixed.high and mixed.mean == pytest.approx(0.0, abs=1e-9)
    assert paired_differences({"score": [1.0, 2.0]}, {"score": [1.0]}) == {}  # not the same items: no pairing
    # an invalid verdict (None) on either side leaves that item out; the others stay paired with their own item
    d = paired_differences({"score": [1.0, None, 5.0, 2.0]}, {"score": [0.5, 3.0, None, 1.0]})["score"]
    assert (d.n, d.mean) == (2, pytest.approx(0.75))
    assert summarise({"score": [1.0, None, 5.0]})[0]["score"].mean == pytest.approx(3.0)


class ScriptedCompare(Judge):
    """P(first) = 0.7 when the first response is longer, 0.6 when shorter (a judge that likes length and the
    first position), 0.5 when as long. Records what it was asked."""

    def __init__(self):
        self.asked: list[Comparison] = []

    def judge(self, items):
        raise AssertionError("compare only")

    def compare(self, items):
        self.asked += items
        return [Verdict(0.5 if len(c.first) == len(c.second) else 0.7 if len(c.first) > len(c.second) else 0.6)
                for c in items]


def test_win_rate_of_a_scripted_judge_by_hand():
    prompts = [chat(f"q{i}") for i in range(4)]
    trained = [JudgeItem(p, r) for p, r in zip(prompts, ["long answer", "a", "same", "xy"])]
    base = [JudgeItem(p, r) for p, r in zip(prompts, ["short", "longer", "same", "ab"])]
    judge = ScriptedCompare()
    prefs = compare_answers(judge, trained, base)
    # q0: trained longer: first order 0.7, second order (base first, shorter) 0.6 -> (0.7 + 0.4) / 2 = 0.55
    # q1: trained shorter: 0.6 and 0.7 -> (0.6 + 0.3) / 2 = 0.45; q2 identical: 0.5 unasked; q3 as long: 0.5
    assert prefs == pytest.approx([0.55, 0.45, 0.5, 0.5])
    assert len(judge.asked) == 6 and all(c.first != c.second for c in judge.asked)
    assert [(c.first, c.second) for c in judge.asked[:3]] == [("long answer", "short"), ("a", "longer"), ("xy", "ab")]
    assert [(c.first, c.second) for c in judge.asked[3:]] == [("short", "long answer"), ("longer", "a"), ("ab", "xy")]
    w = win_rate(prefs)
    assert (w["wins"], w["ties"], w["losses"]) == (1, 2, 1) and w["win_rate"]["mean"] == 0.5
    with pytest.raises(Exception, match="different held-out prompts"):
        compare_answers(judge, trained, base[::-1])


def test_every_judge_compares_by_its_own_scores(tiny_model_dir):
    """Judge.compare's default: each response scored alone, the higher wins, equal scores tie, invalid stays so."""
    registry = load_registry()
    judge = registry.build("judge", {"name": "exact_match"}, env_with(registry=registry))
    items = [Comparison(chat("2+2?"), "4", "5", reference="4"), Comparison(chat("2+2?"), "5", "4", reference="4"),
             Comparison(chat("2+2?"), "3", "5", reference="4"), Comparison(chat("?"), "4", "5")]
    verdicts = judge.compare(items)
    assert [v.score for v in verdicts[:3]] == [1.0, 0.0, 0.5]
    assert not verdicts[3].valid and "first response" in verdicts[3].details["error"]


# -- the pairwise judge and the evaluated model, on the tiny model ---------------------------------------------


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return make_backend(tiny_model_dir)  # LoRA B perturbed: the trained model differs from the base


def test_pairwise_reads_p_a_against_p_b_and_its_pointwise_score_takes_both_orders(policy):
    registry = load_registry()
    judge = registry.build("judge", {"name": "pairwise"}, env_with(policy, registry))
    items = [Comparison(chat("Name a colour."), "Blue.", "I like trains.", reference="Red"),
             Comparison(chat("Add 2 and 2."), "5", "4")]
    got = [v.score for v in judge.compare(items)]
    a, b = policy.token_id("A"), policy.token_id("B")
    prompts = [policy.encode_chat(chat(judge.render(c))) + policy.encode("<Better>") for c in items]
    logp = policy.next_token_logprobs(prompts, [a, b], reference=True)
    want = torch.softmax(logp.float(), -1)[:, 0].tolist()
    assert got == pytest.approx(want, abs=1e-6) and all(0 < p < 1 for p in got)
    assert "<reference_answer>Red</reference_answer>" in judge.render(items[0])

    forward = judge.judge([JudgeItem(chat("Name a colour."), "Blue.", reference="I like trains.")])[0]
    backward = judge.judge([JudgeItem(chat("Name a colour."), "I like trains.", reference="Blue.")])[0]
    assert forward.score + backward.score == pytest.approx(1.0, abs=1e-6)  # both orders: the bias cancels
    assert not judge.judge([JudgeItem(chat("x"), "y")])[0].valid


def test_the_base_view_is_the_reference_model_and_remembers_greedy_answers(policy):
    prompts = [chat("What is 2 + 3?"), chat("Say hi.")]
    base, trained = ModelView(policy, base=True), ModelView(policy, base=False)
    want = policy.generate(prompts, max_new_tokens=6, greedy=True, reference=True)
    first = base.generate(prompts, max_new_tokens=6, greedy=True)
    assert [g[0].completion_ids for g in first] == [g[0].completion_ids for g in want]
    assert [g[0].completion_ids for g in trained.generate(prompts, max_new_tokens=6, greedy=True)] == \
        [g[0].completion_ids for g in policy.generate(prompts, max_new_tokens=6, greedy=True)]
    tokens = policy.generated_tokens
    again = base.generate(prompts, max_new_tokens=6, greedy=True)
    assert policy.generated_tokens == tokens  # remembered, not generated again
    assert [g[0].text for g in again] == [g[0].text for g in first] and again is not first
    ids = [policy.encode_chat(p) for p in prompts]
    torch.testing.assert_close(base.next_token_logprobs(ids, [5, 6]),
                               policy.next_token_logprobs(ids, [5, 6], reference=True))
    torch.testing.assert_close(base.sequence_logprobs(ids, [[5, 6], [7]]),
                               policy.sequence_logprobs(ids, [[5, 6], [7]], reference=True))
    assert not torch.allclose(trained.next_token_logprobs(ids, [5, 6]), base.next_token_logprobs(ids, [5, 6]))


# -- the command on real tiny runs ------------------------------------------------------------------------------


def play(args: list[str], run: Path) -> Path:
    assert main(["play", *args, f"run.dir={run}", "run.loggers=[plain]", "model.dtype=float32"]) == 0
    return run


@pytest.fixture(scope="module")
def arithmetic_run(tiny_model_dir, tmp_path_factory) -> Path:
    """Three rounds at a large learning rate, with held-out scores logged at iterations 0 and 3 (a graded judge:
    the random tiny model never gets a sum right)."""
    return play(["prompts", f"model.path={tiny_model_dir}", "run.iterations=3", "run.eval_every=3",
                 "model.lora.r=4", "optimizer.lr=0.05", "game.dataset=arithmetic", "judge=llm_judge",
                 "game.group_size=4", "game.max_new_tokens=4", "game.eval_size=12"],
                tmp_path_factory.mktemp("eval") / "run")


def results_of(run: Path) -> dict:
    files = sorted((run / "evals").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    assert files, "no results written"
    return json.loads(files[-1].read_text())


def test_eval_scores_base_and_run_as_the_run_logged_them(arithmetic_run, capsys):
    assert main(["eval", str(arithmetic_run), "compare=llm_judge"]) == 0
    out = capsys.readouterr().out
    assert "base" in out and "run@3" in out and "win rate vs base" in out
    results = results_of(arithmetic_run)
    logged = {r["iteration"]: r for r in map(json.loads, (arithmetic_run / "metrics.jsonl").read_text().splitlines())}
    base, trained = results["models"]["base"], results["models"]["run@3"]
    # the base is the model before training, the run's own iteration-0 measure; the trained its last one
    assert base["metrics"]["score"]["mean"] == pytest.approx(logged[0]["eval/score"])
    assert trained["metrics"]["score"]["mean"] == pytest.approx(logged[3]["eval/score"])
    for model in (base, trained):
        for e in model["metrics"].values():
            assert e["low"] <= e["mean"] <= e["high"] and e["n"] == 12
    # the paired difference: item by item, so its mean is the difference of the means
    diff = trained["differences"]["score"]
    assert diff["mean"] == pytest.approx(trained["metrics"]["score"]["mean"] - base["metrics"]["score"]["mean"])
    assert diff["low"] <= diff["mean"] <= diff["high"] and "differences" not in base
    row = next(r for r in table_rows(results)[1] if r[0] == "score - base, paired")
    assert row[1:] == ["12", "-", f"{diff['mean']:.3f} [{diff['low']:.3f}, {diff['high']:.3f}]"]
    # the win rate by hand: the pointwise judge scores each answer; the higher wins, equal ties
    answers = results["answers"]
    assert len(answers) == 12 and sum(a["run@3"] != a["base"] for a in answers) >= 6
    mine = [1.0 if t > b else 0.0 if t < b else 0.5
            for t, b in zip(trained["items"]["score"], base["items"]["score"])]
    win = trained["win_rate"]
    assert win["win_rate"]["mean"] == pytest.approx(sum(mine) / len(mine))
    assert (win["wins"], win["ties"], win["losses"]) == (mine.count(1.0), mine.count(0.5), mine.count(0.0))
    assert win["ties"] < 12  # decided comparisons: the rule is tested, not only ties
    assert results["compare"] == {"name": "llm_judge"} and results["checkpoints"][0]["iteration"] == 3


def test_several_runs_each_scored_as_it_logged_itself(arithmetic_run, tiny_model_dir, tmp_path, capsys):
    """A second run with another learning rate (same game, seed and model), in a folder of the same name: its
    adapter is loaded in turn, its row is its own last logged score, and the rows get distinct labels."""
    other = play(["prompts", f"model.path={tiny_model_dir}", "run.iterations=3", "run.eval_every=3",
                  "model.lora.r=4", "optimizer.lr=0.03", "game.dataset=arithmetic", "judge=llm_judge",
                  "game.group_size=4", "game.max_new_tokens=4", "game.eval_size=12"], tmp_path / "b" / "run")
    assert main(["eval", str(arithmetic_run), str(other), "compare=llm_judge"]) == 0
    results = results_of(other)
    assert results == results_of(arithmetic_run)  # the same results beside each run
    first, second = f"{arithmetic_run.parent.name}/run@3", "b/run@3"
    assert list(results["models"]) == ["base", first, second]
    for label, run, it in ((first, arithmetic_run, 3), (second, other, 3), ("base", other, 0)):
        logged = {r["iteration"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
        assert results["models"][label]["metrics"]["score"]["mean"] == pytest.approx(logged[it]["eval/score"])
    assert results["models"][first]["items"] != results["models"][second]["items"]  # two adapters, not one


def test_a_checkpoint_or_adapter_folder_names_that_checkpoint(arithmetic_run, capsys):
    checkpoint = arithmetic_run / "checkpoints" / "000003"
    assert main(["eval", str(checkpoint / "adapter"), "compare=exact_match"]) == 0
    assert "run@3" in capsys.readouterr().out
    assert main(["eval", str(arithmetic_run), "--checkpoint", "2", "compare=exact_match"]) == 0
    assert results_of(arithmetic_run)["checkpoints"][0]["iteration"] == 2


def test_a_prompt_file_and_a_judge_given_by_config(arithmetic_run, tmp_path, capsys):
    prompts = tmp_path / "held.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n"
                               for a in range(5)))
    assert main(["eval", str(arithmetic_run), f"--prompts={prompts}", "--max-new-tokens=3",
                 "judge=llm_judge", "judge.max_score=5"]) == 0
    results = results_of(arithmetic_run)
    assert results["held_out"] == str(prompts) and len(results["answers"]) == 5
    assert results["judge"]["name"] == "llm_judge" and results["compare"] == {"name": "pairwise"}
    for label in ("base", "run@3"):
        score = results["models"][label]["metrics"]["score"]
        assert 0 <= score["low"] <= score["mean"] <= score["high"] <= 5
    win = results["models"]["run@3"]["win_rate"]
    assert win["wins"] + win["ties"] + win["losses"] + win["invalid"] == 5
    header, rows = table_rows(results)
    assert header[:4] == ["measure", "n", "base", "run@3"] and rows[-1][0].startswith("win rate")


@pytest.fixture(scope="module")
def lsp_run(tiny_model_dir, tmp_path_factory) -> Path:
    return play(["lsp", f"model.path={tiny_model_dir}", "run.iterations=2", "model.lora.r=4", "optimizer.lr=0.02",
                 "game.queries=2", "game.answers=2", "game.challenger_max_new_tokens=4",
                 "game.solver_max_new_tokens=5", "game.eval_size=3", "run.eval_every=2"],
                tmp_path_factory.mktemp("lsp") / "run")


def test_a_damaged_adapter_is_one_line(arithmetic_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(arithmetic_run, copy)
    for f in (copy / "checkpoints" / "000003" / "adapter").iterdir():
        if f.suffix == ".safetensors":
            f.write_bytes(b"not a tensor file")
    assert main(["eval", str(copy), "compare=exact_match"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "adapter: cannot load it" in err, err


def test_bad_input_is_one_line(arithmetic_run, lsp_run, tmp_path, capsys):
    cases = [
        (["eval", str(tmp_path / "nothing")], "expected a run folder"),
        (["eval", str(arithmetic_run), str(lsp_run)], "plays 'lsp'"),
        (["eval", str(arithmetic_run), "compare=nonesuch"], "compare.name"),
        (["eval", str(arithmetic_run), "judge.nonesuch=1"], "judge.nonesuch"),
        (["eval", str(arithmetic_run), "--prompts", str(tmp_path / "none.jsonl")], "--prompts"),
        (["eval", str(arithmetic_run), "--checkpoint", "9"], "--checkpoint 9"),
        (["eval", "compare=exact_match"], "at least one run"),
        (["eval", str(arithmetic_run), "game.eval_size=20"], "game.eval_size: arena eval may override only"),
        (["eval", str(arithmetic_run / "checkpoints" / "000003"), "--checkpoint", "2"], "is checkpoint 3 already"),
        (["eval", str(arithmetic_run), str(arithmetic_run)], "named twice"),
    ]
    for args, expected in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err


@pytest.mark.parametrize("game", ["lsp", "spin"])
def test_open_ended_games_get_a_pairwise_win_rate(game, lsp_run, tiny_model_dir, tmp_path, capsys):
    if game == "lsp":
        run = lsp_run
    else:
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text("".join(json.dumps({"prompt": f"Tell me about {w}.", "answer": f"{w} is a word."}) + "\n"
                                 for w in ("cats", "rain", "tea", "maps", "salt", "wind")))
        run = play(["spin", f"model.path={tiny_model_dir}", "run.iterations=2", "model.lora.r=4",
                    "optimizer.lr=0.02", f"game.dataset={pairs}", "game.prompts_per_round=2",
                    "game.max_new_tokens=5", "game.eval_size=3", "game.rounds_per_iteration=1",
                    "run.eval_every=2"], tmp_path / "run")
    assert main(["eval", str(run)]) == 0
    results = results_of(run)
    win = results["models"]["run@2"]["win_rate"]
    assert len(results["answers"]) == 3 and win["wins"] + win["ties"] + win["losses"] + win["invalid"] == 3
    assert all(p is None or 0 <= p <= 1 for p in win["preferences"])
    logged = {r["iteration"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    key = "score" if game == "lsp" else "pair_accuracy"
    assert results["models"]["run@2"]["metrics"][key]["mean"] == pytest.approx(logged[2][f"eval/{key}"], abs=1e-6)
    assert results["models"]["base"]["metrics"][key]["mean"] == pytest.approx(logged[0][f"eval/{key}"], abs=1e-6)
    if game == "spin":  # before training the player is its own opponent: every margin 0, every pair a tie
        assert results["models"]["base"]["items"]["pair_accuracy"] == [0.5, 0.5, 0.5]
