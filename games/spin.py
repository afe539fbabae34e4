"""The `spin` game: Self-Play fIne-tuNing (Chen et al., ICML 2024).

Prompts x come with real (human) responses y. In SPIN iteration t the opponent, the model as it was when
iteration t-1 ended (the starting model for t = 0), answers each prompt with y'; the player is trained to tell y
from y' with the pairwise loss -log σ(β[(log π(y|x) - log π_t(y|x)) - (log π(y'|x) - log π_t(y'|x))]), where
π_t is the opponent. When iteration t ends, the trained adapter is frozen as the next opponent.

A SPIN iteration spans `rounds_per_iteration` rounds. The opponent is a frozen copy of the LoRA adapter beside
the trained one (`policy.freeze_adapter`), never a second model; the starting opponent is the base model (the
adapter starts at zero). Each round hands the optimizer pairs: two samples of one group, `metadata["pair"]`
chosen (the real response) and rejected (the opponent's), with the opponent named in `metadata["reference"]`.
Both responses are cut to `max_new_tokens` and compared without an end token, so the player cannot learn to
tell them apart by whether they stop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from arena.config import option
from arena.errors import ConfigError
from arena.games.data import data_checked, held_out_split, load_records, short_records
from arena.hookspecs import hookimpl
from arena.interfaces import Env, Game, RoundContext
from arena.types import JudgeItem, Messages, Role, Sample, chat


@dataclass
class SpinOptions:
    dataset: str = "sharegpt"  # sharegpt (first human turn, the answer that followed) or a JSONL of prompt/response
    rounds_per_iteration: int = option(4, ge=1)  # rounds before the trained adapter becomes the next opponent
    prompts_per_round: int = option(8, ge=1)  # pairs per round
    max_new_tokens: int = option(48, ge=1)  # the opponent's response length; real responses are cut to it too
    temperature: float = option(1.0, gt=0.0)  # the opponent's sampling temperature
    top_p: float = option(1.0, gt=0.0, le=1.0)
    eval_size: int = option(64, ge=0)  # held-out pairs, never trained on (16 were too few to read a change)
    max_prompt_chars: int = option(400, ge=1)
    system_prompt: Optional[str] = None

    def check(self) -> None:
        if self.dataset != "sharegpt" and not Path(self.dataset).is_file():
            raise ConfigError("dataset", f"{self.dataset}: {'a folder' if Path(self.dataset).is_dir() else 'no such file'}; expected sharegpt or a JSONL file of "
                                         "{\"prompt\": ..., \"response\": ...} records")


def spin_iteration(iteration: int, rounds_per_iteration: int) -> int:
    """The SPIN iteration t a round (1-based) belongs to."""
    return (iteration - 1) // rounds_per_iteration


def opponent_name(t: int) -> str | None:
    """The frozen adapter that plays the opponent in SPIN iteration t; None: the starting model (the base)."""
    return None if t == 0 else f"spin-opponent-{t}"


def held_out_preferences(chosen: torch.Tensor, rejected: torch.Tensor, chosen_ref: torch.Tensor,
                         rejected_ref: torch.Tensor) -> list[float]:
    """Per pair: 1.0 when its implicit reward log π - log π_ref prefers the real response, 0.5 for a tie, else 0.0
    (their mean is the held-out preference accuracy)."""
    margin = (chosen - chosen_ref) - (rejected - rejected_ref)
    return [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margin.tolist()]


class SpinGame(Game):
    """SPIN: the player learns to tell real responses from those of its previous iteration."""

    Options = SpinOptions
    produces = frozenset({"pairs"})
    role_names = ("player",)

    @classmethod
    def freezes(cls, options: SpinOptions, name: str) -> bool:
        return re.fullmatch(r"spin-opponent-[1-9]\d*", name) is not None  # opponent_name(t), t >= 1
    defaults = {"optimizer": {"name": "dpo", "beta": 0.1, "lr": 2e-4},  # a LoRA on a 135M model on CPU
                "run": {"iterations": 12, "eval_every": 4}}
    headline_metrics = ("margin", "accuracy", "spin/iteration")

    @classmethod
    def check_options(cls, options: SpinOptions, registry: Any, path: str) -> None:
        with data_checked(path):  # the data's contents, as play reads them
            cls.split(options, 0)

    @staticmethod
    def split(options: SpinOptions, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(held-out, training) records with a response: short enough, distinct, split by a shuffle fixed by
        `seed`."""
        records = [r for r in load_records(options.dataset, "game.dataset") if r.get("answer")]
        records = short_records(records, options.max_prompt_chars, options.dataset, "game.dataset",
                                "game.max_prompt_chars")
        return held_out_split(records, options.eval_size, seed, options.dataset,
                              f"prompts with a response and at most {options.max_prompt_chars} characters")

    def __init__(self, options: SpinOptions, env: Env):
        super().__init__(options, env)
        self.eval_records, self.train_records = self.split(options, env.config.run.seed)
        self.cursor = 0
        self.opponents: dict[str, str] = {}  # SPIN iteration -> its opponent ("base" or a frozen adapter)
        self._roles = {"player": Role("player", max_new_tokens=options.max_new_tokens,
                                      temperature=options.temperature, top_p=options.top_p)}

    @property
    def roles(self) -> dict[str, Role]:
        return self._roles

    def messages(self, record: dict[str, Any]) -> Messages:
        return chat(record["prompt"], self.options.system_prompt)

    def opponent(self, policy: Any, t: int) -> bool | str:
        """The opponent of SPIN iteration t as a `reference=` value, freezing the trained adapter the first time
        t is reached (the round before ended iteration t-1). Older opponents are dropped: one frozen copy at a
        time. A resumed run finds the opponent in its checkpoint and does not freeze again."""
        name = opponent_name(t)
        if name is None:
            self.opponents[str(t)] = "base"
            return True
        if name not in policy.frozen_adapters():
            policy.freeze_adapter(name)
            for old in policy.frozen_adapters():
                if old != name and old.startswith("spin-opponent-"):
                    policy.drop_adapter(old)
        self.opponents[str(t)] = name
        return name

    def _real(self, policy: Any, text: str) -> list[int]:
        return policy.encode(text)[:self.options.max_new_tokens]

    def _opponent_ids(self, gen: Any) -> list[int]:
        """The opponent's tokens without its end token (real responses are cut and have none)."""
        ids = list(gen.completion_ids)
        return ids if gen.truncated else ids[:-1]

    def play(self, ctx: RoundContext) -> list[Sample]:
        o, role = self.options, self._roles["player"]
        t = spin_iteration(ctx.iteration, o.rounds_per_iteration)
        reference = self.opponent(ctx.policy, t)
        batch = [self.train_records[(self.cursor + i) % len(self.train_records)] for i in range(o.prompts_per_round)]
        self.cursor = (self.cursor + o.prompts_per_round) % len(self.train_records)
        prompts = [self.messages(r) for r in batch]
        with ctx.phase("generate"):
            outs = ctx.policy.generate(prompts, n=1, max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                                       top_p=o.top_p, reference=reference)
        samples = []
        meta = {} if reference is True else {"reference": reference}
        for i, (prompt, record, (gen,)) in enumerate(zip(prompts, batch, outs)):
            group = f"{ctx.iteration}:{i}"
            real = self._real(ctx.policy, record["answer"])
            fake = self._opponent_ids(gen)
            samples.append(Sample(role="player", prompt=prompt, completion=ctx.policy.decode(real),
                                  prompt_ids=gen.prompt_ids, completion_ids=real, logprobs=[],
                                  temperature=1.0, reward=1.0 if real else None, group=group,
                                  metadata={"pair": "chosen", "spin_iteration": t, **meta}))
            samples.append(Sample(role="player", prompt=prompt, completion=ctx.policy.decode(fake),
                                  prompt_ids=gen.prompt_ids, completion_ids=fake, logprobs=gen.logprobs[:len(fake)],
                                  temperature=role.temperature, reward=0.0 if fake else None, group=group,
                                  metadata={"pair": "rejected", "spin_iteration": t, **meta}))
        ctx.metrics["spin/iteration"] = float(t)
        ctx.notes["opponent"] = "the starting model (base)" if reference is True else str(reference)
        return samples

    def evaluate_items(self, ctx: RoundContext) -> dict[str, list[float]]:
        """On held-out prompts: the share of (real response, current opponent's greedy response) pairs whose
        implicit reward against the current opponent, log π - log π_t (what SPIN trains), prefers the real one,
        and the mean per-token log-prob of the real responses. Before training the player equals its opponent:
        every margin is 0 and the share is 0.5. Against the base model instead,
        the opponent's own greedy answers would look preferred merely for being modes of a policy close to the
        player's. A pair whose opponent answer is empty is left out (None, counted in `empty_pairs`), as training
        leaves it out."""
        if not self.eval_records:
            return {}
        policy = ctx.policy
        t = spin_iteration(max(ctx.iteration, 1), self.options.rounds_per_iteration)
        name = opponent_name(t)
        reference = name if name in policy.frozen_adapters() else True
        prompts = [self.messages(r) for r in self.eval_records]
        outs = policy.generate(prompts, n=1, max_new_tokens=self.options.max_new_tokens, greedy=True,
                               reference=reference)
        real = [self._real(policy, r["answer"]) for r in self.eval_records]
        fake = [self._opponent_ids(g[0]) for g in outs]
        # as in training, a pair with an empty side (an opponent that ended at once) is left out, never scored
        kept = [i for i in range(len(outs)) if real[i] and fake[i]]
        step = policy.suggested_micro_batch()  # in training-sized pieces: the eval must not set the peak memory

        def summed(ids: list[list[int]], against: bool | str) -> list[float]:
            with torch.no_grad():
                return [x for j in range(0, len(kept), step) for x in policy.sequence_logprobs(
                    [outs[i][0].prompt_ids for i in kept[j:j + step]], [ids[i] for i in kept[j:j + step]],
                    reference=against).sum(1).tolist()]

        chosen, rejected = summed(real, False), summed(fake, False)
        preferred = held_out_preferences(torch.tensor(chosen), torch.tensor(rejected),
                                         torch.tensor(summed(real, reference)), torch.tensor(summed(fake, reference)))
        accuracy: list[float | None] = [None] * len(outs)
        logprob: list[float | None] = [None] * len(outs)
        for j, i in enumerate(kept):
            accuracy[i], logprob[i] = preferred[j], chosen[j] / len(real[i])
        return {"pair_accuracy": accuracy, "real_logprob": logprob, "empty_pairs": float(len(outs) - len(kept))}

    def held_out_answers(self, ctx: RoundContext) -> list[JudgeItem]:
        """The player's greedy answers to the held-out prompts, with the human response as the reference."""
        if not self.eval_records:
            return []
        prompts = [self.messages(r) for r in self.eval_records]
        outs = ctx.policy.generate(prompts, n=1, max_new_tokens=self.options.max_new_tokens, greedy=True)
        return [JudgeItem(prompt=p, response=g[0].text, reference=r["answer"])
                for p, r, g in zip(prompts, self.eval_records, outs)]

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "opponents": dict(self.opponents)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state.get("cursor", 0))
        self.opponents = dict(state.get("opponents", {}))


@hookimpl
def register_games(register: Any) -> None:
    register("spin", SpinGame)
