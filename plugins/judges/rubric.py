"""Rubrics and the `rubric` judge, for any game whose items carry a rubric.

A rubric is 1 to MAX_CRITERIA weighted criteria, each with a `gold` fact a good answer states. The judge rates an
answer 0, 1 or 2 on each criterion against its gold fact, and the answer's score is Σ w·rating / (2·Σ w) in
[0, 1]. A game hands the rubric in `JudgeItem.metadata["rubric"]` as a list of {"criterion", "gold", "weight"}
dicts; `parse_rubric` reads one that a model wrote. Rubrics come from models, so every check here returns a
reason instead of raising: a bad rubric is an invalid verdict, never a crash or a silent 0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from arena.config import check_template, option
from arena.hookspecs import hookimpl
from arena.interfaces import Env
from arena.plugins.judges.general import (
    MODES,
    PromptJudge,
    _query_text,
    check_model_option,
    constrained_scores,
    own_model,
)
from arena.types import JudgeItem, Verdict

MAX_CRITERIA = 5
MAX_RATING = 2

RUBRIC_TEMPLATE = """You are a strict grader. Check the answer below against one criterion and its gold fact.

<question>{question}</question>
<criterion>{criterion}</criterion>
<gold_fact>{gold}</gold_fact>
<answer>{response}</answer>

Rate the answer: 0 = it does not meet the criterion or contradicts the gold fact; 1 = it partly meets it; \
2 = it fully meets it and states the gold fact.
Reply with the rating as <Rating>k</Rating>."""

RATING_RE = re.compile(r"<Rating>\s*(\d+)\s*</Rating>", re.IGNORECASE)
FENCE_RE = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", re.DOTALL)  # an unclosed block: a reply cut short


@dataclass
class Criterion:
    """One rubric line: what a good answer does, the fact it states, and how much it counts."""

    criterion: str
    gold: str
    weight: float

    def to_json(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "gold": self.gold, "weight": self.weight}


def rubric_score(weights: Sequence[float], ratings: Sequence[float]) -> float:
    """Σ w·rating / (2·Σ w): 1.0 when every criterion is fully met, 0.0 when none is."""
    if len(weights) != len(ratings):
        raise ValueError(f"{len(weights)} weights but {len(ratings)} ratings")
    if not weights:
        raise ValueError("no criteria")
    total = sum(weights)
    if not total > 0:
        raise ValueError(f"the weights sum to {total}; expected a positive total")
    return sum(w * r for w, r in zip(weights, ratings)) / (MAX_RATING * total)


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


def _criteria(rubric: list[dict[str, Any]]) -> list[Criterion]:
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
    return _criteria(rubric), None


def parse_rating(text: str) -> int | None:
    """The last `<Rating>k</Rating>` in `text` when k is 0, 1 or 2, else None."""
    found = RATING_RE.findall(text)
    if not found:
        return None
    k = int(found[-1])
    return k if 0 <= k <= MAX_RATING else None


@dataclass
class RubricJudgeOptions:
    mode: str = option("constrained", choices=MODES)
    max_new_tokens: int = option(16, ge=1)  # text mode: the judge's reply length per criterion
    template: Optional[str] = None  # {question}, {criterion}, {gold}, {response}; default: RUBRIC_TEMPLATE
    model: Optional[str] = None  # a judge model (folder, .gguf, cached name); None: the policy's reference

    def check(self) -> None:
        check_template("template", self.template, ("question", "criterion", "gold", "response"),
                       ("criterion", "response"))
        check_model_option(self.model)


class RubricJudge(PromptJudge):
    """Rates the answer 0/1/2 on each rubric criterion against its gold fact; score Σ w·rating / (2·Σ w)."""

    Options = RubricJudgeOptions
    max_score = MAX_RATING

    def __init__(self, options: RubricJudgeOptions, env: Env):
        super().__init__(options, env, own_model(options.model, env) if options.model is not None else None)

    def render_criterion(self, item: JudgeItem, criterion: Criterion) -> str:
        return (self.options.template or RUBRIC_TEMPLATE).format(
            question=_query_text(item), criterion=criterion.criterion, gold=criterion.gold, response=item.response)

    def _rate(self, chats: list[list[dict[str, str]]]) -> tuple[list[float | None], list[Any]]:
        """One rating per chat (None where a text reply has none) and what backs it: the digit probabilities or
        the reply. Every prompt of a judge call goes to the model at once."""
        if not chats:
            return [], []
        if self.options.mode == "constrained":
            opening = self.model.encode("<Rating>")
            prompts = [self.model.encode_chat(chat) + opening for chat in chats]
            ratings, probs = constrained_scores(self.model, prompts, MAX_RATING)
            return ([r if math.isfinite(r) else None for r in ratings],
                    [[round(p, 4) for p in ps] for ps in probs])
        outs = self.model.generate(chats, n=1, max_new_tokens=self.options.max_new_tokens, greedy=True,
                                   reference=True)
        texts = [out[0].text for out in outs]
        return [None if (k := parse_rating(t)) is None else float(k) for t in texts], texts

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        rubrics: list[list[Criterion] | str] = []  # an item's criteria, or why it has none
        chats = []
        for item in items:
            rubric = item.metadata.get("rubric")
            problem = 'no "rubric" in the item\'s metadata' if rubric is None else rubric_problem(rubric)
            if problem:
                rubrics.append(problem)
                continue
            criteria = _criteria(rubric)
            rubrics.append(criteria)
            chats += [[{"role": "user", "content": self.render_criterion(item, c)}] for c in criteria]
        ratings, backing = self._rate(chats)
        key = "probs" if self.options.mode == "constrained" else "outputs"
        verdicts, at = [], 0
        for criteria in rubrics:
            if isinstance(criteria, str):
                verdicts.append(Verdict.invalid(f"no usable rubric: {criteria}"))
                continue
            mine, evidence = ratings[at:at + len(criteria)], backing[at:at + len(criteria)]
            at += len(criteria)
            missing = [n for n, r in enumerate(mine, 1) if r is None]
            if missing:
                what = ("no <Rating>k</Rating> with k 0, 1 or 2 in the judge's reply" if key == "outputs"
                        else "the judge's rating is not finite")
                verdicts.append(Verdict.invalid(f"criterion {missing[0]}: {what}",
                                                mode=self.options.mode, **{key: evidence}))
                continue
            weights = [c.weight for c in criteria]
            verdicts.append(Verdict(rubric_score(weights, mine), details={
                "mode": self.options.mode, "ratings": [round(r, 4) for r in mine], "weights": weights,
                key: evidence}))
        return verdicts


@hookimpl
def register_judges(register: Any) -> None:
    register("rubric", RubricJudge)
