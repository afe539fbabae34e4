"""The `lsp` game: Language Self-Play (Kuba et al. 2025, arXiv 2509.07414).

One model plays two roles. The Challenger, given a task description, writes N queries meant to be hard; the
Solver answers each query G times; the judge scores every answer (R). With V(q) the mean of a query's answer
rewards, the Solver's advantage is R - V(q) and the Challenger's reward is -V(q): it wins when the Solver does
badly (LSP-Zero, zero-sum). LSP adds a quality self-reward R_Q (the reference model's 7-point rubric on the query
and the answer) to both sides, so the Challenger cannot win with nonsense: Solver reward R + R_Q, Challenger
reward -V(q) + V_Q(q). Both roles learn in one update, the Challenger's loss weighted by α
(`optimizer.roles.challenger.weight`), both held to the reference by the optimizer's KL β.

The Challenger's advantage is its reward minus the mean reward of the round's well-formed, scored queries (for
LSP-Zero: V̄ - V(q)). A Challenger output that is empty, holds several queries, or adds an answer gets no Solver
answers and the round's lowest well-formed Challenger reward minus `format_penalty`, whatever the judge's scale,
so its advantage is always negative.
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from arena.config import check_template, option
from arena.games.data import data_checked, distinct, load_records, short_records
from arena.errors import ArenaError, ArenaWarning, ConfigError
from arena.games.prompts import TEMPERATURE_HINT
from arena.hookspecs import hookimpl
from arena.interfaces import Env, Game, Judge, RoundContext
from arena.types import JudgeItem, Messages, Role, Sample, Verdict, chat

TASK = ("Answer a user's request helpfully, correctly and clearly: questions of fact, reasoning, math, coding, "
        "writing and advice.")

CHALLENGER_TEMPLATE = """<task>{task}</task>

You are stress-testing an AI assistant on the task above. Write one new request that a user could send and that \
the assistant will find hard to answer well. Write ONLY the request: a single example, with no answer and no \
hints."""


@dataclass
class LSPOptions:
    queries: int = option(4, ge=1)  # N: Challenger queries per round
    answers: int = option(4, ge=1)  # G: Solver answers per query; they share the baseline V(q)
    quality_reward: bool = True  # LSP; false: LSP-Zero (no R_Q)
    quality_judge: Any = field(default_factory=lambda: {"name": "self_reward"})  # the judge that gives R_Q
    task: str = TASK  # what the Solver should be good at; the Challenger prompt's {task}
    challenger_template: str = CHALLENGER_TEMPLATE  # must contain {task}
    challenger_max_new_tokens: int = option(48, ge=1)
    solver_max_new_tokens: int = option(64, ge=1)
    temperature: float = option(1.0, gt=0.0, hint=TEMPERATURE_HINT)
    top_p: float = option(1.0, gt=0.0, le=1.0)
    format_penalty: float = option(1.0, ge=0.0)  # a malformed query scores this much below the worst well-formed one
    system_prompt: Optional[str] = None  # the Solver's system message, if any
    eval_dataset: str = "sharegpt"  # held-out prompts the Solver answers greedily: sharegpt or a JSONL file
    eval_size: int = option(8, ge=0)  # 0: no evaluation
    max_eval_prompt_chars: int = option(400, ge=1)

    def check(self) -> None:
        check_template("challenger_template", self.challenger_template, ("task",), ("task",))
        if self.eval_size and self.eval_dataset != "sharegpt" and not Path(self.eval_dataset).is_file():
            raise ConfigError("eval_dataset", f"{self.eval_dataset}: {'a folder' if Path(self.eval_dataset).is_dir() else 'no such file'}; expected sharegpt or a JSONL "
                                              "file of {\"prompt\": ...} records")


def same_judge(judge: Judge, chosen: Any, registry: Any) -> bool:
    """Whether a built judge is the run's judge (`env.config.judge`, a resolved Component): the same registered
    class with the same options."""
    return registry.get("judge", chosen.name).obj is judge.__class__ and judge.options == chosen.options


# -- the rules, as plain arithmetic ---------------------------------------------------------------------------

@dataclass
class LSPScores:
    """Rewards and advantages of one round. Per query i: `solver_reward[i][j]` for its answer j (None where a
    verdict was invalid), `value[i]` = V(q_i) and `quality_value[i]` = V_Q(q_i) over its scored answers (None when
    none was scored, or the query was malformed)."""

    solver_reward: list[list[float | None]]
    solver_advantage: list[list[float | None]]
    value: list[float | None]
    quality_value: list[float | None]
    challenger_reward: list[float | None]
    challenger_advantage: list[float | None]
    value_mean: float | None  # V̄ over the queries that have a value


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def lsp_scores(rewards: Sequence[Sequence[float | None]], quality: Sequence[Sequence[float | None]] | None,
               well_formed: Sequence[bool], format_penalty: float) -> LSPScores:
    """LSP's rewards and advantages (docs/lsp.md) from the judge's R per answer and, for LSP, R_Q per
    answer; `quality=None` is LSP-Zero. An answer is scored only when all its verdicts are valid; a query with no
    scored answer has no value and its Challenger sample no reward (recorded, not trained on)."""
    if len(rewards) != len(well_formed) or (quality is not None and (
            len(quality) != len(rewards) or any(len(q) != len(r) for q, r, ok in zip(quality, rewards, well_formed)
                                                if ok))):
        raise ValueError("lsp_scores: one row of rewards (and of quality rewards) per query, one entry per answer")
    solver_reward, solver_adv, values, qvalues, ch_reward = [], [], [], [], []
    for i, ok in enumerate(well_formed):
        rs = rewards[i] if ok else []
        qs = quality[i] if (ok and quality is not None) else [0.0] * len(rs)
        scored = [j for j, (r, q) in enumerate(zip(rs, qs)) if r is not None and q is not None]
        total = [rs[j] + qs[j] if j in scored else None for j in range(len(rs))]
        baseline = _mean([total[j] for j in scored])
        solver_reward.append(total)
        solver_adv.append([None if t is None else t - baseline for t in total])
        value = _mean([rs[j] for j in scored])
        qvalue = _mean([qs[j] for j in scored]) if quality is not None else None
        values.append(value)
        qvalues.append(qvalue)
        ch_reward.append(None if value is None else -value + (qvalue or 0.0))
    well_formed_rewards = [r for r, ok in zip(ch_reward, well_formed) if ok and r is not None]
    ch_baseline = _mean(well_formed_rewards)  # malformed queries stay out of it: for LSP-Zero this is -V̄
    floor = min(well_formed_rewards, default=0.0) - format_penalty
    ch_reward = [r if ok else floor for r, ok in zip(ch_reward, well_formed)]
    ch_adv = [None if r is None else r - (ch_baseline if ch_baseline is not None else 0.0) for r in ch_reward]
    return LSPScores(solver_reward, solver_adv, values, qvalues, ch_reward, ch_adv,
                     _mean([v for v in values if v is not None]))


_LABEL = r"(?:query|question|request)"
_LABEL_LINE = re.compile(rf"^\W*{_LABEL}\s*#?\s*\d*\s*[:.)]", re.IGNORECASE | re.MULTILINE)
_NUMBERED = re.compile(rf"\b{_LABEL}\s*#?\s*(\d+)\s*[:.)]", re.IGNORECASE)
_ANSWER_LINE = re.compile(r"^\W*(?:answer|solution|hint)s?\s*:", re.IGNORECASE | re.MULTILINE)
_LEADING_LABEL = re.compile(rf"^\W*{_LABEL}\s*#?\s*\d*\s*:\s*", re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’"}


def parse_query(text: str) -> tuple[str, str | None]:
    """The query in a Challenger output and what is wrong with it (None when it is a single, bare query).

    Several queries: two lines that open with a query label (`Query:`, `Question 2.`), or two differently
    numbered labels anywhere (`Query 1: ... Query 2: ...`). An answer: a line that opens with `Answer:`,
    `Solution:` or `Hint:`. Material a query works on (`Example 1:`, `Response:`, a numbered list) is fine. One
    leading label and a matching pair of surrounding quotes are dropped."""
    body = text.strip()
    if not body:
        return "", "empty"
    if len(_LABEL_LINE.findall(body)) >= 2 or len(set(_NUMBERED.findall(body))) >= 2:
        return body, "several queries"
    if _ANSWER_LINE.search(body):
        return body, "adds an answer or hint"
    body = _LEADING_LABEL.sub("", body, count=1).strip()
    if len(body) >= 2 and _QUOTES.get(body[0]) == body[-1]:
        body = body[1:-1].strip()
    if not body:
        return "", "empty"
    return body, None


# -- the game -------------------------------------------------------------------------------------------------

def _checked(verdicts: list[Verdict], items: list[JudgeItem], key: str) -> list[Verdict]:
    if len(verdicts) != len(items):
        raise ArenaError(f"{key}: the judge returned {len(verdicts)} verdicts for {len(items)} answers; a judge "
                         "must return one verdict per item, in order")
    return verdicts


class LSPGame(Game):
    """Language Self-Play: a Challenger writes queries, a Solver answers them, one model plays both."""

    Options = LSPOptions
    defaults = {"judge": {"name": "llm_judge"}, "run": {"iterations": 10, "eval_every": 5},
                "optimizer": {"name": "grpo", "roles": {"challenger": {"weight": 1.0}}}}
    headline_metrics = ("lsp/value",)
    role_names = ("challenger", "solver")

    @classmethod
    def freezes(cls, options: Any, name: str) -> bool:
        return False  # no frozen adapters: an optimizer's reference can only be the base model

    @classmethod
    def check_options(cls, options: LSPOptions, registry: Any, path: str) -> None:
        """The quality judge is a component too: validate it before any model loads."""
        from arena.config import validate_component

        if options.quality_reward:
            validate_component(registry, "judge", options.quality_judge, f"{path}.quality_judge")
        with data_checked(path):
            cls.held_out(options, 0)

    @staticmethod
    def held_out(options: LSPOptions, seed: int) -> list[dict[str, Any]]:
        """The `eval_size` held-out prompts the Solver answers: distinct, short enough, a shuffle fixed by seed."""
        if not options.eval_size:
            return []
        records = short_records(load_records(options.eval_dataset, "game.eval_dataset"),
                                options.max_eval_prompt_chars, options.eval_dataset, "game.eval_dataset",
                                "game.max_eval_prompt_chars")
        if not records:
            raise ConfigError("eval_dataset", f"{options.eval_dataset}: no prompt of at most "
                                              f"{options.max_eval_prompt_chars} characters "
                                              "(max_eval_prompt_chars); raise it or set eval_size=0")
        records = distinct(records, "prompt")
        if len(records) < options.eval_size:
            raise ConfigError("eval_size", f"{options.eval_size}, but {options.eval_dataset} holds "
                                           f"{len(records)} distinct prompts of at most "
                                           f"{options.max_eval_prompt_chars} characters; lower it")
        random.Random(seed).shuffle(records)
        return records[:options.eval_size]

    def __init__(self, options: LSPOptions, env: Env):
        super().__init__(options, env)
        if options.answers == 1:
            warnings.warn("game.answers=1: each answer is its own baseline, so every Solver advantage is 0 and the "
                          "Solver learns nothing; use 2 or more", ArenaWarning, stacklevel=2)
        self.quality: Judge | None = (env.registry.build("judge", options.quality_judge, env, "quality_judge")
                                      if options.quality_reward else None)
        if self.quality is not None and same_judge(self.quality, env.config.judge, env.registry):
            warnings.warn(f"judge={env.config.judge.name} is also game.quality_judge: R_Q equals R, so V_Q(q) = V(q) "
                          "and every Challenger reward is 0 (the Challenger learns nothing); choose another judge "
                          "for one of them, or game.quality_reward=false for LSP-Zero", ArenaWarning, stacklevel=2)
        self.eval_records = self.held_out(options, env.config.run.seed)
        self._roles = {
            "challenger": Role("challenger", max_new_tokens=options.challenger_max_new_tokens,
                               temperature=options.temperature, top_p=options.top_p),
            "solver": Role("solver", max_new_tokens=options.solver_max_new_tokens,
                           temperature=options.temperature, top_p=options.top_p),
        }

    @property
    def roles(self) -> dict[str, Role]:
        return self._roles

    def challenger_prompt(self) -> Messages:
        return [{"role": "user", "content": self.options.challenger_template.format(task=self.options.task)}]

    def solver_prompt(self, query: str) -> Messages:
        return chat(query, self.options.system_prompt)

    def play(self, ctx: RoundContext) -> list[Sample]:
        o, challenger, solver = self.options, self._roles["challenger"], self._roles["solver"]
        ch_prompt = self.challenger_prompt()
        with ctx.phase("generate"):
            (queries,) = ctx.policy.generate([ch_prompt], n=o.queries, max_new_tokens=challenger.max_new_tokens,
                                             temperature=challenger.temperature, top_p=challenger.top_p)
        parsed = [parse_query(g.text) for g in queries]
        asked = [i for i, (_, problem) in enumerate(parsed) if problem is None]
        prompts = {i: self.solver_prompt(parsed[i][0]) for i in asked}
        answers: dict[int, list[Any]] = {}
        if asked:
            with ctx.phase("generate"):
                outs = ctx.policy.generate([prompts[i] for i in asked], n=o.answers,
                                           max_new_tokens=solver.max_new_tokens, temperature=solver.temperature,
                                           top_p=solver.top_p)
            answers = dict(zip(asked, outs))
        items = [JudgeItem(prompt=prompts[i], response=g.text) for i in asked for g in answers[i]]
        with ctx.phase("judge"):
            verdicts = _checked(ctx.judge.judge(items) if items else [], items, "judge")
            qverdicts = (_checked(self.quality.judge(items) if items else [], items, "game.quality_judge")
                         if self.quality is not None else None)
        pairs = iter(zip(verdicts, qverdicts if qverdicts is not None else [None] * len(verdicts)))
        by_query: dict[int, list[tuple[Verdict, Verdict | None]]] = {i: [next(pairs) for _ in answers[i]]
                                                                     for i in asked}
        well_formed = [problem is None for _, problem in parsed]
        R = [[v.score if v.valid else None for v, _ in by_query.get(i, [])] for i in range(len(parsed))]
        RQ = ([[q.score if q.valid else None for _, q in by_query.get(i, [])] for i in range(len(parsed))]
              if self.quality is not None else None)
        scores = lsp_scores(R, RQ, well_formed, o.format_penalty)

        samples = []
        for i, (gen, (query, problem)) in enumerate(zip(queries, parsed)):
            samples.append(Sample.from_generation(
                challenger, ch_prompt, gen, reward=scores.challenger_reward[i],
                advantage=scores.challenger_advantage[i], group=f"{ctx.iteration}:challenger",
                metadata={"query_index": i, "query": query, "format_error": problem, "value": scores.value[i],
                          "quality_value": scores.quality_value[i],
                          "scored_answers": sum(r is not None for r in scores.solver_reward[i])}))
        for i in asked:
            for j, gen in enumerate(answers[i]):
                verdict, qverdict = by_query[i][j]
                samples.append(Sample.from_generation(
                    solver, prompts[i], gen, reward=scores.solver_reward[i][j],
                    advantage=scores.solver_advantage[i][j], group=f"{ctx.iteration}:{i}",
                    metadata={"query_index": i, "R": R[i][j], "R_Q": None if RQ is None else RQ[i][j],
                              "valid": scores.solver_reward[i][j] is not None, "verdict": verdict.details,
                              "quality_verdict": None if qverdict is None else qverdict.details}))

        if scores.value_mean is not None:
            ctx.metrics["lsp/value"] = scores.value_mean
        ctx.metrics["lsp/malformed_queries"] = float(len(parsed) - len(asked))
        shown = next((q for q, problem in parsed if problem is None), None)
        ctx.notes["query"] = shown if shown is not None else f"(no well-formed query: {parsed[0][1]})"
        return samples

    def held_out_answers(self, ctx: RoundContext) -> list[JudgeItem]:
        """The Solver's greedy answers to held-out prompts; the held-out measure is the judge's scores of them
        (R, without R_Q)."""
        if not self.eval_records:
            return []
        prompts = [self.solver_prompt(r["prompt"]) for r in self.eval_records]
        outs = ctx.policy.generate(prompts, n=1, max_new_tokens=self.options.solver_max_new_tokens, greedy=True)
        return [JudgeItem(prompt=p, response=g[0].text) for p, g in zip(prompts, outs)]


@hookimpl
def register_games(register: Any) -> None:
    register("lsp", LSPGame)
