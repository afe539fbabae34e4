"""The `rubric` judge, for any game whose items carry a rubric (what a rubric is: arena/rubrics.py).

The judge rates an answer 0, 1 or 2 on each criterion against its gold fact, and the answer's score is
Σ w·rating / (2·Σ w) in [0, 1]. A missing or unusable rubric, or an unreadable rating, is an invalid verdict that
names why, never a crash or a silent 0.
"""

from __future__ import annotations

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
from arena.rubrics import Criterion, criteria_of, rubric_problem
from arena.types import JudgeItem, Verdict

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
            criteria = criteria_of(rubric)
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
