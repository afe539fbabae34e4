"""What a rubric is, how one that a model wrote is read, and when one is usable: shared by games that write rubrics
(pop) and judges that grade by them (rubric).

A rubric is 1 to MAX_CRITERIA weighted criteria, each with a `gold` fact a good answer states, handed to a judge in
`JudgeItem.metadata["rubric"]` as a list of {"criterion", "gold", "weight"} dicts. Rubrics come from models, so
every check here returns a reason instead of raising: a bad rubric is an invalid verdict, never a crash.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

MAX_CRITERIA = 5
FENCE_RE = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", re.DOTALL)  # an unclosed block: a reply cut short


@dataclass
class Criterion:
    """One rubric line: what a good answer does, the fact it states, and how much it counts."""

    criterion: str
    gold: str
    weight: float

    def to_json(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "gold": self.gold, "weight": self.weight}


def _weight_problem(weight: Any) -> str | None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        return f"weight {weight!r} is not a number"
    if not math.isfinite(weight):
        return f"weight {weight!r} is not finite"
    if weight <= 0:
        return f"weight {weight!r} must be positive"
    return None


def rubric_problem(rubric: Any, max_criteria: int = MAX_CRITERIA) -> str | None:
    """Why `rubric` (a list of {"criterion", "gold", "weight"} dicts) cannot be used, or None when it can."""
    if not isinstance(rubric, list):
        return "not a list"
    if not rubric:
        return "no criteria"
    if len(rubric) > max_criteria:
        return f"{len(rubric)} criteria; at most {max_criteria}"
    for number, entry in enumerate(rubric, 1):
        if not isinstance(entry, dict):
            return f"criterion {number}: not an object"
        text, gold = entry.get("criterion"), entry.get("gold")
        if not isinstance(text, str) or not text.strip():
            return f"criterion {number}: no criterion text"
        if not isinstance(gold, str) or not gold.strip():
            return f"criterion {number}: no gold fact"
        if "weight" not in entry:
            return f"criterion {number}: no weight"
        problem = _weight_problem(entry["weight"])
        if problem:
            return f"criterion {number}: {problem}"
    return None


def criteria_of(rubric: list[dict[str, Any]]) -> list[Criterion]:
    """The criteria of a rubric that `rubric_problem` accepted."""
    return [Criterion(e["criterion"].strip(), e["gold"].strip(), float(e["weight"])) for e in rubric]


def _json_text(text: str) -> str:
    """Where a model's rubric is: the first ```json (or bare ```) block, else the whole text."""
    for match in FENCE_RE.finditer(text):
        if match.group(1).strip().lower() in ("", "json"):
            return match.group(2)
    return text


def _as_written(entry: Any) -> Any:
    """A model's criterion in the rubric's own keys: "description" for "criterion", a numeric string weight as a
    number. Anything else is left for `rubric_problem` to name."""
    if not isinstance(entry, dict):
        return entry
    out = dict(entry)
    if "criterion" not in out and "description" in out:
        out["criterion"] = out["description"]
    weight = out.get("weight")
    if isinstance(weight, str):
        try:
            out["weight"] = float(weight.strip())
        except ValueError:
            pass
    return out


def first_json(text: str) -> tuple[Any, str | None]:
    """The first JSON value a model wrote: in the first ```json (or bare ```) block if there is one, starting at
    its first `[` or `{`, trailing text allowed. (value, None), or (None, why not); never raises on model text."""
    body = _json_text(text)
    starts = [i for i in (body.find("["), body.find("{")) if i >= 0]
    if not starts:
        return None, "no JSON in the text"
    try:
        value, _ = json.JSONDecoder().raw_decode(body, min(starts))
    except (ValueError, RecursionError) as exc:
        return None, f"not JSON ({getattr(exc, 'msg', type(exc).__name__)})"
    return value, None


def parse_rubric(text: str, max_criteria: int = MAX_CRITERIA) -> tuple[list[Criterion] | None, str | None]:
    """A rubric a model wrote in free text: (criteria, None), or (None, why not). Never raises on model text."""
    if not isinstance(text, str):
        return None, "not text"
    value, problem = first_json(text)
    if problem:
        return None, "no JSON rubric in the text" if problem == "no JSON in the text" else problem
    if isinstance(value, dict):
        if "criteria" not in value:
            return None, 'an object without "criteria"'
        value = value["criteria"]
    rubric = [_as_written(e) for e in value] if isinstance(value, list) else value
    problem = rubric_problem(rubric, max_criteria)
    if problem:
        return None, problem
    return criteria_of(rubric), None
