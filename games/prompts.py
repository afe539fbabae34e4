"""The `prompts` game: plain GRPO on a prompt set, the data-driven baseline the self-play papers compare with.

One role, `assistant`, answers each training prompt `group_size` times; the judge scores every answer; answers
to the same prompt share a baseline. A fixed held-out split is answered greedily and scored every
`run.eval_every` iterations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

from arena.data import load_records
from arena.errors import ConfigError
from arena.hookspecs import hookimpl
from arena.interfaces import Env, Game, RoundContext
from arena.types import JudgeItem, Messages, Role, Sample, score_summary


@dataclass
class PromptsOptions:
    dataset: str = "sharegpt"  # sharegpt | arithmetic | a JSONL file of {"prompt": ..., "answer": ...}
    prompts_per_round: int = 4
    group_size: int = 4  # answers per prompt; they share a baseline
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    eval_size: int = 8  # held-out prompts, never trained on
    max_prompt_chars: int = 400  # longer prompts are left out (ShareGPT holds whole essays)
    arithmetic_size: int = 2000
    system_prompt: Optional[str] = None


class PromptsGame(Game):
    """GRPO on a fixed prompt set (ShareGPT first turns, a JSONL file, or generated arithmetic)."""

    Options = PromptsOptions

    def __init__(self, options: PromptsOptions, env: Env):
        super().__init__(options, env)
        for key in ("prompts_per_round", "group_size", "max_new_tokens"):
            if getattr(options, key) < 1:
                raise ConfigError(key, "must be at least 1")
        records = load_records(options.dataset, seed=env.config.run.seed, arithmetic_size=options.arithmetic_size)
        records = [r for r in records if len(r["prompt"]) <= options.max_prompt_chars]
        if len(records) <= options.eval_size:
            raise ConfigError("dataset", f"{options.dataset}: {len(records)} prompts of at most "
                                         f"{options.max_prompt_chars} characters, but eval_size is "
                                         f"{options.eval_size}; need more prompts than that")
        random.Random(env.config.run.seed).shuffle(records)
        self.eval_records = records[:options.eval_size]
        self.train_records = records[options.eval_size:]
        self.cursor = 0
        self._roles = {"assistant": Role("assistant", max_new_tokens=options.max_new_tokens,
                                         temperature=options.temperature, top_p=options.top_p)}

    @property
    def roles(self) -> dict[str, Role]:
        return self._roles

    def messages(self, record: dict[str, Any]) -> Messages:
        system = [{"role": "system", "content": self.options.system_prompt}] if self.options.system_prompt else []
        return [*system, {"role": "user", "content": record["prompt"]}]

    def play(self, ctx: RoundContext) -> list[Sample]:
        o, role = self.options, self._roles["assistant"]
        batch = [self.train_records[(self.cursor + i) % len(self.train_records)] for i in range(o.prompts_per_round)]
        self.cursor = (self.cursor + o.prompts_per_round) % len(self.train_records)
        prompts = [self.messages(r) for r in batch]
        with ctx.phase("generate"):
            outs = ctx.policy.generate(prompts, n=o.group_size, max_new_tokens=role.max_new_tokens,
                                       temperature=role.temperature, top_p=role.top_p)
        items = [JudgeItem(prompt=p, response=g.text, reference=r.get("answer"))
                 for p, r, gens in zip(prompts, batch, outs) for g in gens]
        with ctx.phase("judge"):
            verdicts = ctx.judge.judge(items)
        samples = []
        k = 0
        for i, (prompt, record, gens) in enumerate(zip(prompts, batch, outs)):
            for gen in gens:
                v = verdicts[k]
                k += 1
                samples.append(Sample.from_generation(
                    role, prompt, gen, reward=v.score if v.valid else None, group=f"{ctx.iteration}:{i}",
                    metadata={"valid": v.valid, "verdict": v.details, "reference": record.get("answer")}))
        return samples

    def evaluate(self, ctx: RoundContext) -> dict[str, float]:
        prompts = [self.messages(r) for r in self.eval_records]
        outs = ctx.policy.generate(prompts, n=1, max_new_tokens=self.options.max_new_tokens, greedy=True)
        verdicts = ctx.judge.judge([JudgeItem(prompt=p, response=g[0].text, reference=r.get("answer"))
                                    for p, r, g in zip(prompts, self.eval_records, outs)])
        return score_summary(verdicts)

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state.get("cursor", 0))


@hookimpl
def register_games(register: Any) -> None:
    register("prompts", PromptsGame)
