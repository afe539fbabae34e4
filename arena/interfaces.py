"""The abstract parts a game is built from. A game written against these does not know which backend, judge or
optimizer it runs with; each of those is chosen in the config and built by the registry.

Every component class declares `Options`, a dataclass: its config schema. The registry validates the user's
options against it (unknown keys and wrong types fail naming the full key) and passes the validated object to
the constructor as `cls(options, env)`.
"""

from __future__ import annotations

import contextlib
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from arena.types import Comparison, Execution, Generation, Job, JudgeItem, Messages, Role, Sample, Verdict

if TYPE_CHECKING:
    import torch

    from arena.registry import Registry


@dataclass
class NoOptions:
    """For components that take no options."""


@dataclass
class Env:
    """What components share in one run: the resolved config (arena.config.Config: `config.model`, `config.run`,
    `config.game.name`...), the registry, the policy and the run's hooks."""

    config: Any
    registry: "Registry"
    policy: "Policy | None" = None
    run: Any = None  # arena.loop.Run while playing: hooks see it
    group: Any = None  # arena.distributed.Group: the processes of the run (None: this one alone)


class Policy(ABC):
    """The model being trained, as games, judges and optimizers see it.

    `reference=True` anywhere means the frozen reference model (for LoRA: the base with the adapter disabled);
    `reference="name"` a frozen copy of the trained weights made by `freeze_adapter` (an opponent that costs no
    second model). Calls with a reference are never differentiable.
    """

    generated_tokens: int = 0  # running count, for tokens/s in progress displays

    @abstractmethod
    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of chat messages rendered with the model's chat template."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of plain text, no special tokens added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens dropped."""

    @abstractmethod
    def token_id(self, text: str) -> int:
        """The single token that spells `text` (raises if it takes more than one)."""

    @abstractmethod
    def generate(self, prompts: Sequence[Messages | list[int]], *, n: int = 1, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 reference: bool | str = False, stop: Sequence[str] = ()) -> list[list[Generation]]:
        """Sample `n` completions per prompt, all prompts in as few batched calls as memory allows.
        Returns one list of n Generations per prompt, in prompt order. A completion also ends at the first token
        whose text holds one of the `stop` strings (a line end, for a field that fills one line) once it has
        begun: blank tokens before its first text do not stop it. That token is kept, as an end token is; the
        text after the stop string is the caller's to drop."""

    @abstractmethod
    def next_token_logprobs(self, prompts: Sequence[list[int]], candidates: Sequence[int], *,
                            reference: bool | str = False) -> "torch.Tensor":
        """Log-probs of each candidate token right after each prompt: a [len(prompts), len(candidates)] tensor.
        One batched forward pass; constrained-scoring judges read their scores from it."""

    @abstractmethod
    def sequence_logprobs(self, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], *,
                          temperature: float = 1.0, reference: bool | str = False) -> "torch.Tensor":
        """Per-token log-probs of each completion given its prompt, at `temperature`, as a right-padded
        [batch, max_completion_len] tensor (padding is 0). Differentiable unless `reference`."""

    def suggested_micro_batch(self) -> int:
        """Sequences per training forward/backward that suit this device (an optimizer's default when its
        micro-batch option is unset): 8 unless the backend knows better, e.g. from a GPU's free memory."""
        return 8

    @contextlib.contextmanager
    def updating(self) -> Iterator[None]:
        """The optimizer step runs inside this. A backend that holds memory only generation needs (vLLM's
        weights and KV cache beside the trained model on one GPU) may free it here and take it back at the next
        `generate`. By default nothing happens."""
        yield

    def close(self) -> None:
        """Release what the backend holds outside this process's objects (an engine's processes, temporary
        files); called once a run, an evaluation or an export is done with it. By default nothing."""

    @abstractmethod
    def trainable_parameters(self) -> list["torch.nn.Parameter"]:
        """The parameters an optimizer updates."""

    def freeze_adapter(self, name: str) -> None:
        """Keep a frozen copy of the trained weights as they are now under `name` (letters, digits, `-_.`),
        replacing one of that name: `reference=name` then runs on it, while training moves on. Not abstract:
        backends without frozen adapters keep working until a game asks for one."""
        raise NotImplementedError("this backend has no frozen adapters")

    def frozen_adapters(self) -> list[str]:
        """Names of the frozen adapters held."""
        return []

    def drop_adapter(self, name: str) -> None:
        """Free a frozen adapter (KeyError if there is none of that name)."""
        raise NotImplementedError("this backend has no frozen adapters")

    @abstractmethod
    def save(self, path: str) -> None:
        """Write the trained weights (the adapter) and any frozen adapters to a folder."""

    @abstractmethod
    def load(self, path: str) -> None:
        """Read weights written by `save`; its frozen adapters replace the current ones (none saved: none)."""

    def export_merged(self, path: str) -> None:
        """Write the model with the trained weights merged in, as a plain model folder other tools load without
        arena (for transformers: config, tokenizer, safetensors). It may spend the policy: call it last. Not
        abstract: a backend without it keeps working until someone exports."""
        raise NotImplementedError("this backend cannot export a merged model")


class Backend(Policy, ABC):
    """A registered provider of a Policy: `backend: {name: hf, ...}` in the config. Built once per run after the
    model config is known; constructor `cls(options, env)` reads `env.config.model`."""

    Options: ClassVar[type] = NoOptions

    @classmethod
    def context_length(cls, model: Any) -> int | None:
        """The context length in tokens of the model `model` (arena.config.ModelOptions) names, if it can be told
        without loading it: the config then refuses a `*max_new_tokens` option past it. None: unknown."""
        return None

    @classmethod
    def check_model(cls, model: Any) -> None:
        """Raise ConfigError (full key) for model settings (arena.config.ModelOptions) this backend would refuse
        once the model loads, where they can be told without its weights. By default nothing is checked."""


class Judge(ABC):
    """Scores responses in batches. Never raises on a response it cannot score: returns an invalid Verdict."""

    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any, env: Env):
        self.options = options
        self.env = env

    @abstractmethod
    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """One Verdict per item, in order."""

    def compare(self, items: Sequence[Comparison]) -> list[Verdict]:
        """One Verdict per pair, in order, whose score is the probability that `first` is the better response
        (0.5: neither). A pairwise judge reads it from the judge model; by default each response is scored on
        its own and the higher score wins (equal scores: 0.5), so every judge can give a win rate."""
        import json

        unique: dict[str, int] = {}  # each response scored once: a win rate asks both orders of every pair
        flat: list[JudgeItem] = []
        where = []
        for c in items:
            for response in (c.first, c.second):
                key = json.dumps([c.prompt, response, c.reference, c.metadata], sort_keys=True, default=str)
                if key not in unique:
                    unique[key] = len(flat)
                    flat.append(JudgeItem(prompt=c.prompt, response=response, reference=c.reference,
                                          metadata=c.metadata))
                where.append(unique[key])
        scored = self.judge(flat)
        scores = [scored[i] for i in where]
        verdicts = []
        for a, b in zip(scores[0::2], scores[1::2]):
            if not (a.valid and b.valid):
                bad = a if not a.valid else b
                verdicts.append(Verdict.invalid(f"{'first' if bad is a else 'second'} response: "
                                                f"{bad.details.get('error', 'no score')}"))
            else:
                verdicts.append(Verdict(1.0 if a.score > b.score else 0.0 if a.score < b.score else 0.5,
                                        details={"first": a.score, "second": b.score}))
        return verdicts


class Executor(ABC):
    """Runs untrusted Python (a model's programs) where it cannot harm the run or the machine, and reports the
    values its calls returned. Built by a game or judge from its own config section (`game.executor`); closed
    by its owner, or at exit."""

    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any, env: Env):
        self.options = options
        self.env = env

    @abstractmethod
    def run(self, jobs: Sequence[Job]) -> list[Execution]:
        """One Execution per job, in order; jobs may run in parallel. Never raises for what a program does."""

    def protections(self) -> dict[str, str]:
        """What confines a job, by aspect (network, filesystem, ...), in words: reported once per run."""
        return {}

    def close(self) -> None:
        """Stop any worker processes."""


class Optimizer(ABC):
    """Turns a round's Samples into one parameter update and returns metrics.

    `consumes` names the kind of samples it can learn from; a game lists what it `produces`, and a pairing
    that cannot work fails at start-up, before any model is loaded.
    """

    Options: ClassVar[type] = NoOptions
    consumes: ClassVar[str] = "rewards"

    def __init__(self, options: Any, env: Env):
        self.options = options
        self.env = env

    @abstractmethod
    def step(self, samples: Sequence[Sample], roles: dict[str, Role]) -> dict[str, float]:
        """Compute advantages where missing, the loss, step, and return metrics. Roles with `trained=False`
        contribute no loss."""

    @classmethod
    def consumed(cls, options: Any) -> frozenset[str]:
        """The kinds of samples an optimizer with these options learns from (a `mix`: all its parts')."""
        return frozenset({cls.consumes})

    @classmethod
    def check_role_names(cls, options: Any, names: Sequence[str], trained: Sequence[str] | None = None) -> None:
        """Raise ConfigError (key relative to the optimizer's section) for options that name a role not in
        `names`; `trained` (default: all of `names`) are the roles the game trains, for an optimizer that assigns
        roles (a mix). Runs when the config resolves for a game that declares `role_names`, and at start-up with
        the built game's roles. The default checks the keys of an `options.roles` mapping."""
        from arena.errors import ConfigError

        unknown = sorted(set(getattr(options, "roles", None) or {}) - set(names))
        if unknown:
            raise ConfigError(f"roles.{unknown[0]}", f"no such role; the game's roles are: {', '.join(names)}")

    @classmethod
    def check_produced(cls, options: Any, produced: dict[str, frozenset[str]], name: str) -> None:
        """Raise ConfigError (key relative to the optimizer's section) unless every kind of sample each trained
        role produces (`Game.produced_by_role`; an empty set: not trained) is one this optimizer learns from, so
        that nothing is played and silently never trained, nor trained by the wrong objective. `name` is the
        optimizer's registered name, for the message."""
        from arena.errors import ConfigError

        consumed = cls.consumed(options)
        for role, kinds in produced.items():
            if kinds - consumed:
                raise ConfigError("name", f"role {role!r} produces {' and '.join(sorted(kinds))} with these "
                                          f"settings but {name!r} learns only from {', '.join(sorted(consumed))}; "
                                          "use an optimizer that learns from it, or a mix with a part per kind")

    def check_roles(self, roles: dict[str, Role]) -> None:
        """Called once at start-up with the built game's roles, before anything is played: `check_role_names`
        (the roles with `trained=False` need no training), its errors under `optimizer.`."""
        from arena.errors import ConfigError

        try:
            self.check_role_names(self.options, list(roles), [n for n, r in roles.items() if r.trained])
        except ConfigError as exc:
            raise ConfigError(f"optimizer.{exc.path}", exc.detail) from None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Game(ABC):
    """Owns the rules: asks the policy for generations role by role, asks the judge for verdicts, and turns them
    into rewards. State that must survive a restart goes through `state_dict`/`load_state_dict`.

    `defaults` is the game's config layer, merged over the core defaults: for example
    `{"judge": "exact_match", "run": {"iterations": 5}}`.
    """

    Options: ClassVar[type] = NoOptions
    produces: ClassVar[frozenset[str]] = frozenset({"rewards"})
    defaults: ClassVar[dict[str, Any]] = {}
    headline_metrics: ClassVar[tuple[str, ...]] = ()  # round metrics the progress line shows after the rewards
    # the names `roles` will have, when known before the game is built: the config then checks an optimizer's
    # role settings when it resolves, before any model loads
    role_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any, env: Env):
        self.options = options
        self.env = env

    @classmethod
    def freezes(cls, options: Any, name: str) -> bool | None:
        """Whether a game with these options makes a frozen adapter called `name` (`policy.freeze_adapter`), so
        that an optimizer's `reference: name` can score against it; None: not known before it plays (the default),
        and the optimizer finds out at its first step."""
        return None

    @classmethod
    def produced_by_role(cls, options: Any) -> dict[str, frozenset[str]]:
        """The kinds of samples each of `role_names` hands the optimizer with these options: by default
        `produces` for every role. Override it where an option changes what a role produces (a pairwise variant)
        or whether it is trained: a role played but never trained (a frozen opponent) maps to an empty set and
        needs no optimizer part; its built Role must then say `trained=False`. The config checks the optimizer
        against it, role by role, before any model loads. Empty for a game that does not declare `role_names`."""
        return {name: frozenset(cls.produces) for name in cls.role_names}

    @classmethod
    def produced(cls, options: Any) -> frozenset[str]:
        """Every kind of sample a game with these options hands the optimizer, all roles together."""
        by_role = cls.produced_by_role(options)
        return frozenset().union(*by_role.values()) if by_role else frozenset(cls.produces)

    def check_built_roles(self) -> None:
        """At start-up: the built roles are the declared `role_names`, and a role is `trained` exactly when
        `produced_by_role` gives it something to train on (a plugin game whose declarations disagree with what
        it builds would otherwise pass the config's checks and train something else)."""
        from arena.errors import ArenaError

        declared = type(self).produced_by_role(self.options)
        if not declared:
            return
        if set(declared) != set(self.roles):
            raise ArenaError(f"game {self.env.config.game.name!r}: builds roles {', '.join(self.roles)} but "
                             f"declares role_names {', '.join(declared)}; a plugin game must declare the roles "
                             "it builds")
        for name, role in self.roles.items():
            if role.trained != bool(declared[name]):
                said = "trained" if role.trained else "not trained"
                raise ArenaError(f"game {self.env.config.game.name!r}: role {name!r} is built {said} but "
                                 f"produced_by_role gives it {sorted(declared[name]) or 'nothing'}; make them agree")

    @property
    @abstractmethod
    def roles(self) -> dict[str, Role]:
        """The roles of this game by name."""

    @abstractmethod
    def play(self, ctx: "RoundContext") -> list[Sample]:
        """Run one round and return its Samples with rewards filled in (None for invalid verdicts)."""

    def evaluate(self, ctx: "RoundContext") -> dict[str, float]:
        """Score held-out work (greedy); keys are logged under `eval/`. Optional; by default the means of
        `evaluate_items`."""
        from arena.types import item_means

        return item_means(self.evaluate_items(ctx))

    def evaluate_items(self, ctx: "RoundContext") -> dict[str, Any]:
        """Held-out results per item, the source of `evaluate`'s means and of confidence intervals: for each key
        a list with one number per held-out prompt or task in a fixed order (1.0/0.0 for a success, None for
        an item without a value), or a plain number for a count. A game that overrides `evaluate` instead gives
        means only. By default the judge's scores of `held_out_answers`."""
        from arena.types import verdict_items

        answers = self.held_out_answers(ctx)
        return verdict_items(ctx.judge.judge(answers)) if answers else {}

    def held_out_answers(self, ctx: "RoundContext") -> list[JudgeItem]:
        """`ctx.policy`'s greedy answers to the game's open-ended held-out prompts, one JudgeItem per prompt in a
        fixed order, with what a judge needs (reference, rubric): what `arena eval` compares, trained against
        base, for a win rate. Empty for a game without open-ended answers (verifiable tasks)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Logger:
    """A run observer. Loggers named in `run.loggers` are registered with the plugin manager for the run, so
    they receive the lifecycle hooks of arena.hookspecs by defining methods with those names, each decorated
    with `@arena.hookimpl`."""

    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any, env: Env):
        self.options = options
        self.env = env


@dataclass
class RoundContext:
    """What a game gets for one round."""

    iteration: int
    policy: Policy
    judge: Judge
    rng: random.Random
    env: Env
    metrics: dict[str, float] = field(default_factory=dict)  # a game may add round metrics here
    notes: dict[str, str] = field(default_factory=dict)  # short texts for the progress display (a sample query)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Mark a phase (generate, judge, ...) for progress displays: calls the phase hooks with tokens/s."""
        hook = self.env.registry.hooks
        run = self.env.run
        hook.arena_phase_start(run=run, phase=name)
        tokens0, t0 = self.policy.generated_tokens, time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            tokens = self.policy.generated_tokens - tokens0
            self.metrics[f"time/{name}"] = self.metrics.get(f"time/{name}", 0.0) + seconds
            hook.arena_phase_end(run=run, phase=name, seconds=seconds, tokens=tokens)
