"""The `prompts` game: plain GRPO on a prompt set, the data-driven baseline the self-play papers compare with.

One role, `assistant`, answers each training prompt `group_size` times; the judge scores every answer; answers
to the same prompt share a baseline. A fixed held-out split is answered greedily and scored every
`run.eval_every` iterations.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from arena.config import option
from arena.games.data import data_checked, held_out_split, load_records, short_records
from arena.errors import ArenaWarning, ConfigError
from arena.hookspecs import hookimpl
from arena.interfaces import Env, Game, RoundContext
from arena.types import JudgeItem, Messages, Role, Sample, chat


TEMPERATURE_HINT = ("the sampling temperature of trained answers; greedy decoding gives every answer of a group "
                    "the same text, so there would be nothing to learn")


@dataclass
class PromptsOptions:
    dataset: str = "sharegpt"  # sharegpt | arithmetic | a JSONL file of {"prompt": ..., "answer": ...}
    prompts_per_round: int = option(4, ge=1)
    group_size: int = option(4, ge=1)  # answers per prompt; they share a baseline
    max_new_tokens: int = option(48, ge=1)
    temperature: float = option(1.0, gt=0.0, hint=TEMPERATURE_HINT)
    top_p: float = option(1.0, gt=0.0, le=1.0)
    eval_size: int = option(8, ge=0)  # held-out prompts, never trained on
    max_prompt_chars: int = option(400, ge=1)  # longer prompts are left out (ShareGPT holds whole essays)
    arithmetic_size: int = option(2000, ge=1)
    system_prompt: Optional[str] = None

    def check(self) -> None:
        if self.dataset not in ("sharegpt", "arithmetic") and not Path(self.dataset).is_file():
            raise ConfigError("dataset", f"{self.dataset}: {'a folder' if Path(self.dataset).is_dir() else 'no such file'}; expected sharegpt, arithmetic or a JSONL "
                                         "file")


class PromptsGame(Game):
    """GRPO on a fixed prompt set (ShareGPT first turns, a JSONL file, or generated arithmetic)."""

    Options = PromptsOptions
    role_names = ("assistant",)

    @classmethod
    def freezes(cls, options: Any, name: str) -> bool:
        return False  # no frozen adapters: an optimizer's reference can only be the base model

    @classmethod
    def check_options(cls, options: PromptsOptions, registry: Any, path: str) -> None:
        with data_checked(path):  # the data's contents, as play reads them
            cls.split(options, 0)

    @staticmethod
    def split(options: PromptsOptions, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(held-out, training) records: short enough, distinct, split by a shuffle fixed by `seed`."""
        records = load_records(options.dataset, seed=seed, arithmetic_size=options.arithmetic_size)
        records = short_records(records, options.max_prompt_chars, options.dataset, "game.dataset",
                                "game.max_prompt_chars")
        return held_out_split(records, options.eval_size, seed, options.dataset,
                              f"prompts of at most {options.max_prompt_chars} characters")

    def __init__(self, options: PromptsOptions, env: Env):
        super().__init__(options, env)
        if options.group_size == 1:
            warnings.warn("game.group_size=1: each answer is its own baseline, so every advantage is 0 and nothing "
                          "is learned; use 2 or more", ArenaWarning, stacklevel=2)
        self.eval_records, self.train_records = self.split(options, env.config.run.seed)
        self.cursor = 0
        self._roles = {"assistant": Role("assistant", max_new_tokens=options.max_new_tokens,
                                         temperature=options.temperature, top_p=options.top_p)}

    @property
    def roles(self) -> dict[str, Role]:
        return self._roles

    def messages(self, record: dict[str, Any]) -> Messages:
        return chat(record["prompt"], self.options.system_prompt)

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

    def held_out_answers(self, ctx: RoundContext) -> list[JudgeItem]:
        """Greedy answers to the held-out prompts; the game's held-out measure is the judge's scores of them."""
        prompts = [self.messages(r) for r in self.eval_records]
        outs = ctx.policy.generate(prompts, n=1, max_new_tokens=self.options.max_new_tokens, greedy=True)
        return [JudgeItem(prompt=p, response=g[0].text, reference=r.get("answer"))
                for p, r, g in zip(prompts, self.eval_records, outs)]

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state.get("cursor", 0))


@hookimpl
def register_games(register: Any) -> None:
    register("prompts", PromptsGame)
