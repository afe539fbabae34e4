"""LSP's rules: rewards and advantages for LSP and LSP-Zero against hand-computed values, query parsing, the
config checks, and a round on the tiny model with judges whose scores the test controls."""

from __future__ import annotations

import os
import warnings

import pytest

from arena.games.lsp import lsp_scores, parse_query


def approx(values):
    return [None if v is None else pytest.approx(v) for v in values]


# -- rewards and advantages -----------------------------------------------------------------------------------

def test_lsp_zero_rewards_and_advantages():
    # two queries, three answers each; R from the judge, no quality reward
    R = [[1.0, 2.0, 6.0], [4.0, 4.0, 7.0]]
    s = lsp_scores(R, None, [True, True], format_penalty=1.0)
    assert s.value == approx([3.0, 5.0])  # V(q) = mean R
    assert s.solver_reward == [[1.0, 2.0, 6.0], [4.0, 4.0, 7.0]]
    assert s.solver_advantage == [approx([-2.0, -1.0, 3.0]), approx([-1.0, -1.0, 2.0])]  # R - V(q)
    assert s.challenger_reward == approx([-3.0, -5.0])  # -V(q)
    assert s.value_mean == pytest.approx(4.0)  # V̄
    assert s.challenger_advantage == approx([1.0, -1.0])  # V̄ - V(q): the query the Solver did worse on wins
    assert s.quality_value == [None, None]


def test_lsp_with_quality_reward():
    R = [[1.0, 3.0], [5.0, 5.0]]
    RQ = [[2.0, 6.0], [1.0, 3.0]]
    s = lsp_scores(R, RQ, [True, True], format_penalty=1.0)
    assert s.solver_reward == [approx([3.0, 9.0]), approx([6.0, 8.0])]  # R + R_Q
    assert s.solver_advantage == [approx([-3.0, 3.0]), approx([-1.0, 1.0])]
    assert s.value == approx([2.0, 5.0]) and s.quality_value == approx([4.0, 2.0])
    assert s.challenger_reward == approx([2.0, -3.0])  # -V(q) + V_Q(q)
    assert s.challenger_advantage == approx([2.5, -2.5])
    assert s.value_mean == pytest.approx(3.5)


def test_ties_and_all_equal_groups_give_zero_advantages():
    s = lsp_scores([[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]], None, [True, True], 1.0)
    assert s.solver_advantage == [[0.0] * 3, [0.0] * 3]
    assert s.challenger_advantage == [0.0, 0.0]
    tie = lsp_scores([[0.0, 4.0], [1.0, 3.0], [5.0, 5.0]], None, [True, True, True], 1.0)
    assert tie.challenger_reward == approx([-2.0, -2.0, -5.0])
    assert tie.challenger_advantage == approx([1.0, 1.0, -2.0])


def test_invalid_verdicts_are_left_out_of_values_and_never_scored():
    # answer 1 of query 0 has an invalid R; answer 0 of query 1 an invalid R_Q; query 2 has no valid answer
    R = [[2.0, None, 4.0], [1.0, 3.0, 5.0], [None, None, None]]
    RQ = [[1.0, 1.0, 1.0], [None, 2.0, 4.0], [1.0, 1.0, 1.0]]
    s = lsp_scores(R, RQ, [True, True, True], 1.0)
    assert s.solver_reward[0] == approx([3.0, None, 5.0])
    assert s.solver_reward[1] == approx([None, 5.0, 9.0])
    assert s.solver_advantage[0] == approx([-1.0, None, 1.0])
    assert s.solver_advantage[1] == approx([None, -2.0, 2.0])
    assert s.value[:2] == approx([3.0, 4.0]) and s.quality_value[:2] == approx([1.0, 3.0])
    assert s.value[2] is None and s.challenger_reward[2] is None and s.challenger_advantage[2] is None
    assert s.challenger_reward[:2] == approx([-2.0, -1.0])
    assert s.challenger_advantage[:2] == approx([-0.5, 0.5])  # the baseline leaves the unscored query out


def test_malformed_queries_get_the_format_penalty_below_the_worst_well_formed_one():
    R = [[2.0, 4.0], [], [6.0, 6.0]]
    s = lsp_scores(R, None, [True, False, True], format_penalty=1.5)
    assert s.solver_reward[1] == [] and s.value[1] is None
    assert s.challenger_reward == approx([-3.0, -7.5, -6.0])  # min(-3, -6) - 1.5
    assert s.value_mean == pytest.approx(4.5)  # V̄ counts well-formed queries only
    # the baseline is the well-formed queries' mean (-V̄), so LSP-Zero's V̄ - V(q) holds and the malformed one loses
    assert s.challenger_advantage == approx([4.5 - 3.0, -7.5 + 4.5, 4.5 - 6.0])
    none_ok = lsp_scores([[], []], None, [False, False], format_penalty=1.0)
    assert none_ok.challenger_reward == [-1.0, -1.0] and none_ok.challenger_advantage == [-1.0, -1.0]


def test_rows_must_match():
    with pytest.raises(ValueError):
        lsp_scores([[1.0, 2.0]], [[1.0]], [True], 1.0)
    with pytest.raises(ValueError):
        lsp_scores([[1.0]], None, [True, True], 1.0)


# -- parsing the Challenger's output --------------------------------------------------------------------------

@pytest.mark.parametrize("text,query,problem", [
    ("What is the capital of Mongolia?", "What is the capital of Mongolia?", None),
    ("  Query: Explain how a heat pump works.\n", "Explain how a heat pump works.", None),
    ("Query 1: Explain how a heat pump works.", "Explain how a heat pump works.", None),
    ('"Write a haiku about rust."', "Write a haiku about rust.", None),
    ("Translate 'hello'", "Translate 'hello'", None),  # an unmatched quote stays
    ("Compare these:\n1. apples\n2. pears", "Compare these:\n1. apples\n2. pears", None),
    ("Solve it.\nExample 1:\nInput: [1,2]\nExample 2:\nInput: [3]", None, None),
    ("Task: sort a list.\nQuestion: which algorithm is fastest here?", None, None),
    ("Make this reply politer.\nResponse: go away.", None, None),
    ("Why is the answer to 2+2 four?", None, None),
    ("", "", "empty"),
    ("   \n ", "", "empty"),
    ("Query:", "", "empty"),
    ("Query 1: What is 2+2?\nQuery 2: Name a river.", None, "several queries"),
    ("Query 1: What is 2+2? Query 2: Name a river.", None, "several queries"),
    ("Question: What is 2+2?\nQuestion: Why?", None, "several queries"),
    ("What is 2+2?\nAnswer: 4", None, "adds an answer or hint"),
    ("Solve x^2=4.\nHint: factor it.", None, "adds an answer or hint"),
])
def test_parse_query(text, query, problem):
    got_query, got_problem = parse_query(text)
    assert got_problem == problem
    if query is not None:
        assert got_query == query


# -- one round with scripted outputs and verdicts -------------------------------------------------------------

class ScriptedPolicy:
    """Challenger outputs are given; the Solver's answer j to query q is the text "a<j>|<q>"."""

    generated_tokens = 0

    def __init__(self, queries):
        self.queries = queries

    def generate(self, prompts, *, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, greedy=False,
                 reference=False):
        from arena.types import Generation

        def gen(text):
            return Generation(prompt_ids=[1, 2], completion_ids=[3, 4], logprobs=[-0.5, -0.5], text=text)

        if "<task>" in prompts[0][-1]["content"]:
            assert n == len(self.queries)
            return [[gen(q) for q in self.queries]]
        return [[gen(f"a{j}|{p[-1]['content']}") for j in range(n)] for p in prompts]


class TableJudge:
    """Scores from a table keyed by response text; None in the table is an invalid verdict."""

    def __init__(self, table):
        self.table, self.seen = table, []

    def judge(self, items):
        from arena.types import Verdict

        self.seen.append([i.response for i in items])
        return [Verdict.invalid("scripted") if self.table[i.response] is None
                else Verdict(self.table[i.response], details={"scripted": i.response}) for i in items]


def test_play_routes_each_verdict_to_its_sample():
    import random

    from omegaconf import OmegaConf

    from arena.games.lsp import LSPGame, LSPOptions
    from arena.interfaces import Env, RoundContext
    from arena.registry import load_registry

    env = Env(config=OmegaConf.create({"run": {"seed": 0}}), registry=load_registry())
    game = LSPGame(LSPOptions(queries=3, answers=2, quality_reward=False, eval_size=0), env)
    R = TableJudge({"a0|What is 2+2?": 3.0, "a1|What is 2+2?": None, "a0|Name a river.": 1.0,
                    "a1|Name a river.": 5.0})
    game.quality = TableJudge({"a0|What is 2+2?": 2.0, "a1|What is 2+2?": 2.0, "a0|Name a river.": None,
                               "a1|Name a river.": 1.0})
    policy = ScriptedPolicy(["What is 2+2?", "Query 1: a? Query 2: b?", '"Name a river."'])
    ctx = RoundContext(iteration=7, policy=policy, judge=R, rng=random.Random(0), env=env)
    samples = game.play(ctx)

    assert R.seen == [["a0|What is 2+2?", "a1|What is 2+2?", "a0|Name a river.", "a1|Name a river."]]
    challengers = [s for s in samples if s.role == "challenger"]
    solvers = {s.completion: s for s in samples if s.role == "solver"}
    assert [c.metadata["format_error"] for c in challengers] == [None, "several queries", None]
    assert sorted(solvers) == sorted(R.seen[0])  # the malformed query got no answers
    # query 0: only answer 0 is scored (answer 1's R is invalid): reward 3 + 2, V = 3, V_Q = 2
    assert solvers["a0|What is 2+2?"].reward == 5.0 and solvers["a0|What is 2+2?"].advantage == 0.0
    assert solvers["a1|What is 2+2?"].reward is None and solvers["a1|What is 2+2?"].metadata["valid"] is False
    assert solvers["a1|What is 2+2?"].metadata["verdict"]["error"] == "scripted"
    # query 2: answer 0's R_Q is invalid, so only answer 1 counts: reward 5 + 1, V = 5, V_Q = 1
    assert solvers["a0|Name a river."].reward is None and solvers["a0|Name a river."].metadata["R"] == 1.0
    assert solvers["a1|Name a river."].reward == 6.0
    assert solvers["a1|Name a river."].metadata["verdict"] == {"scripted": "a1|Name a river."}
    assert [c.reward for c in challengers] == [-1.0, -5.0, -4.0]  # -V+V_Q; malformed: min(-1, -4) - 1
    assert [c.advantage for c in challengers] == [1.5, -2.5, -1.5]  # baseline: mean(-1, -4)
    assert challengers[2].metadata["query"] == "Name a river."
    assert {s.group for s in samples if s.role == "solver"} == {"7:0", "7:2"}
    assert ctx.metrics["lsp/value"] == 4.0 and ctx.metrics["lsp/malformed_queries"] == 1.0
    assert ctx.notes["query"] == "What is 2+2?"


def test_a_judge_returning_too_few_verdicts_is_a_clear_error():
    import random

    from omegaconf import OmegaConf

    from arena.errors import ArenaError
    from arena.games.lsp import LSPGame, LSPOptions
    from arena.interfaces import Env, RoundContext
    from arena.registry import load_registry

    class Short(TableJudge):
        def judge(self, items):
            return super().judge(items)[:-1]

    env = Env(config=OmegaConf.create({"run": {"seed": 0}}), registry=load_registry())
    game = LSPGame(LSPOptions(queries=1, answers=2, quality_reward=False, eval_size=0), env)
    judge = Short({"a0|Hi?": 1.0, "a1|Hi?": 2.0})
    ctx = RoundContext(iteration=1, policy=ScriptedPolicy(["Hi?"]), judge=judge, rng=random.Random(0), env=env)
    with pytest.raises(ArenaError, match="judge: the judge returned 1 verdicts for 2 answers"):
        game.play(ctx)


# -- rounds on the tiny model ---------------------------------------------------------------------------------

TINY_LSP = ["game.queries=3", "game.answers=2", "game.challenger_max_new_tokens=8", "game.solver_max_new_tokens=6",
            "game.eval_size=2", "run.eval_every=2"]
MIX = "judge={name: mix, judges: [{name: self_reward, weight: 1.0}, {name: llm_judge, weight: 0.5}]}"


def check_round_arithmetic(samples: list[dict], quality: bool, format_penalty: float = 1.0) -> None:
    """Every reward and advantage follows from the Solver samples of the same round, as read back from
    samples.jsonl: Solver R (+ R_Q) minus its query's mean, Challenger -V(q) (+ V_Q(q)) minus the well-formed
    queries' mean, a malformed query `format_penalty` below the worst well-formed one."""
    for it in sorted({s["iteration"] for s in samples}):
        round_ = [s for s in samples if s["iteration"] == it]
        challengers = [s for s in round_ if s["role"] == "challenger"]
        assert challengers
        well_formed = []
        for ch in challengers:
            answers = [s for s in round_ if s["role"] == "solver" and s["metadata"]["query_index"]
                       == ch["metadata"]["query_index"]]
            if ch["metadata"]["format_error"]:
                assert not answers
                continue
            scored = [s for s in answers if s["reward"] is not None]
            assert scored, "every verdict of these judges is valid"
            for s in scored:
                want = s["metadata"]["R"] + (s["metadata"]["R_Q"] if quality else 0.0)
                assert s["reward"] == pytest.approx(want)
                mean = sum(a["reward"] for a in scored) / len(scored)
                assert s["advantage"] == pytest.approx(s["reward"] - mean)
            v = sum(s["metadata"]["R"] for s in scored) / len(scored)
            vq = sum(s["metadata"]["R_Q"] for s in scored) / len(scored) if quality else 0.0
            assert ch["reward"] == pytest.approx(-v + vq)
            assert ch["metadata"]["value"] == pytest.approx(v)
            well_formed.append(ch["reward"])
        baseline = sum(well_formed) / len(well_formed) if well_formed else 0.0
        for ch in challengers:
            if ch["metadata"]["format_error"]:
                assert ch["reward"] == pytest.approx(min(well_formed, default=0.0) - format_penalty)
            assert ch["advantage"] == pytest.approx(ch["reward"] - baseline)


def test_lsp_round_with_a_mixed_judge_on_the_tiny_model(tiny_config, capsys):
    from arena.cli import main
    from arena.runstore import read_jsonl

    run = next(v.split("=", 1)[1] for v in tiny_config if v.startswith("run.dir="))
    assert main(["play", "lsp", *tiny_config, *TINY_LSP, MIX]) == 0
    out = capsys.readouterr().out
    assert "reward/challenger" in out and "reward/solver" in out and "lsp/value" in out and "query: " in out

    from pathlib import Path

    samples = list(read_jsonl(Path(run) / "samples.jsonl"))
    assert {s["role"] for s in samples} == {"challenger", "solver"}
    check_round_arithmetic(samples, quality=True)
    solver = [s for s in samples if s["role"] == "solver"]
    for s in solver:  # both parts of the mix reach R, and R_Q comes from the separate quality judge
        parts = s["metadata"]["verdict"]["components"]
        assert [p["name"] for p in parts] == ["self_reward", "llm_judge"]
        assert s["metadata"]["R"] == pytest.approx(1.0 * parts[0]["score"] + 0.5 * parts[1]["score"])
        assert parts[0]["score"] > 0 and parts[1]["score"] > 0
        assert s["metadata"]["quality_verdict"]["mode"] == "constrained"
    metrics = list(read_jsonl(Path(run) / "metrics.jsonl"))
    assert {"reward/challenger", "reward/solver", "lsp/value", "kl", "loss", "eval/score"} <= set(metrics[-1])


def test_lsp_zero_has_no_quality_reward_and_resumes(tiny_config, capsys):
    from pathlib import Path

    from arena.cli import main
    from arena.runstore import read_jsonl

    run = Path(next(v.split("=", 1)[1] for v in tiny_config if v.startswith("run.dir=")))
    config = [c for c in tiny_config if not c.startswith("run.iterations")]
    assert main(["play", "lsp", *config, *TINY_LSP, "run.iterations=1", "game.quality_reward=false"]) == 0
    assert main(["play", "lsp", "--resume", str(run), "run.iterations=2"]) == 0
    assert "resuming at iteration 2" in capsys.readouterr().out
    samples = list(read_jsonl(run / "samples.jsonl"))
    assert sorted({s["iteration"] for s in samples}) == [1, 2]
    assert any(s["role"] == "solver" for s in samples)
    assert all(s["metadata"]["R_Q"] is None for s in samples if s["role"] == "solver")
    assert all(s["metadata"]["quality_value"] is None for s in samples if s["role"] == "challenger")
    check_round_arithmetic(samples, quality=False)


@pytest.mark.parametrize("override,key", [
    ("game.quality_judge=nonsense", "game.quality_judge.name"),
    ("game.quality_judge={name: llm_judge, max_score: 12}", "game.quality_judge.max_score"),
    ("game.challenger_template=Write a query.", "game.challenger_template"),
    ("game.queries=0", "game.queries"),
    ("optimizer.roles.judge.weight=2", "optimizer.roles.judge"),
    ("game.eval_dataset=no/such/file.jsonl", "game.eval_dataset"),
    ("game.max_eval_prompt_chars=0", "game.max_eval_prompt_chars"),
])
def test_bad_lsp_config_is_one_line_naming_the_key(tiny_config, capsys, override, key):
    from arena.cli import main

    run = next(v.split("=", 1)[1] for v in tiny_config if v.startswith("run.dir="))
    assert main(["play", "lsp", *tiny_config, *TINY_LSP, override]) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not os.path.exists(run), "a bad config must leave no run folder behind"


@pytest.mark.slow
def test_play_lsp_on_embedded_model_then_resume(tmp_path, capsys):
    """The real model in both roles for 2 iterations, then --resume for a third."""
    import torch
    from safetensors.torch import load_file

    from arena.cli import main
    from arena.runstore import read_jsonl

    run = tmp_path / "run"
    small = ["game.queries=2", "game.answers=2", "game.challenger_max_new_tokens=24",
             "game.solver_max_new_tokens=16", "game.eval_size=2", "run.eval_every=2", "run.loggers=[plain]",
             "optimizer.lr=1e-3"]
    assert main(["play", "lsp", f"run.dir={run}", "run.iterations=2", *small]) == 0
    out = capsys.readouterr().out
    assert "it 2/2" in out and "reward/challenger" in out and "reward/solver" in out and "query: " in out

    samples = list(read_jsonl(run / "samples.jsonl"))
    assert {(s["iteration"], s["role"]) for s in samples} >= {(1, "challenger"), (1, "solver"), (2, "challenger"),
                                                              (2, "solver")}
    check_round_arithmetic(samples, quality=True)

    def adapter(it):
        return load_file(run / "checkpoints" / f"{it:06d}" / "adapter" / "adapter_model.safetensors")

    first, second = adapter(1), adapter(2)
    assert any(first[k].abs().sum() > 0 for k in first if "lora_B" in k), "LoRA B starts at zero: it must move"
    assert any(not torch.equal(first[k], second[k]) for k in first), "the second update changed nothing"

    assert main(["play", "lsp", "--resume", str(run), "run.iterations=3"]) == 0
    assert "resuming at iteration 3" in capsys.readouterr().out
    samples = list(read_jsonl(run / "samples.jsonl"))
    assert sorted({s["iteration"] for s in samples}) == [1, 2, 3]
    assert [m["iteration"] for m in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3]


def test_the_same_judge_for_r_and_r_q_is_warned_about(tiny_model_dir):
    """self_reward as both R and R_Q makes every Challenger reward 0: said when the game is built."""
    from arena.config import resolve
    from arena.errors import ArenaWarning
    from arena.interfaces import Env
    from arena.registry import load_registry

    registry = load_registry()
    for judge, warned in (("judge=self_reward", True), ("judge=llm_judge", False)):
        config = resolve(registry, "lsp", overrides=[f"model.path={tiny_model_dir}", judge, "game.eval_size=0"]).config
        env = Env(config=config, registry=registry)
        env.policy = registry.build("backend", config.backend, env)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            registry.build("game", config.game, env)
        said = [str(w.message) for w in seen if issubclass(w.category, ArenaWarning)]
        assert bool([m for m in said if "R_Q equals R" in m]) == warned, said
