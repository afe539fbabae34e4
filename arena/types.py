"""The data that flows through a round: what a model generated (Sample, Generation) and what a judge said (Verdict)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

Messages = list[dict[str, str]]  # chat messages: [{"role": "user", "content": "..."}]


def chat(user: str, system: str | None = None) -> Messages:
    """A one-turn chat: the user's message, after a system message when one is given."""
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": user}]


@dataclass
class Role:
    """A part a model plays in a game: its sampling settings and whether its samples are trained on."""

    name: str
    trained: bool = True
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Generation:
    """One sampled completion with the token ids and the per-token log-probs of the sampling policy.

    `logprobs` are log-softmax(logits / temperature) of the chosen tokens, the quantity the training forward
    computes at that temperature: equal in float32, equal up to rounding in bf16 (so an optimizer takes the
    ratio's "old" log-probs from its own first forward, and these stay a record of what the sampler saw).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    truncated: bool = False  # hit max_new_tokens before an end-of-sequence token


@dataclass
class Sample:
    """One generation inside a game, with everything the optimizer and the run store need. JSON-serialisable.

    `reward` is None when the judge's verdict was invalid: such samples are recorded but not trained on.
    `advantage` is left None for the optimizer to compute from group baselines; a game whose rules define the
    advantage itself sets it. Samples with the same (role, group) share a baseline. `trained` is set by the
    optimizer: whether this sample's loss was part of the update (samples.jsonl is written after the step, so each
    record carries the advantage it was trained with).
    """

    role: str
    prompt: Messages
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    temperature: float = 1.0
    reward: float | None = None
    advantage: float | None = None
    group: str = ""
    trained: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_generation(cls, role: Role, prompt: Messages, gen: Generation, **kw: Any) -> "Sample":
        return cls(role=role.name, prompt=prompt, completion=gen.text, prompt_ids=gen.prompt_ids,
                   completion_ids=gen.completion_ids, logprobs=gen.logprobs, temperature=role.temperature,
                   metadata={"truncated": gen.truncated, **kw.pop("metadata", {})}, **kw)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Sample":
        return cls(**data)


@dataclass
class JudgeItem:
    """What a judge scores: the prompt a response answered, the response, and the record's reference if any."""

    prompt: Messages
    response: str
    reference: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Comparison:
    """Two responses to one prompt for a pairwise judge: which is better, `first` or `second`? `reference` is the
    record's reference answer if any; `metadata` what a judge may need (a rubric)."""

    prompt: Messages
    first: str
    second: str
    reference: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """A program to run in an executor and the calls to make: `entry(*args)` for each of `inputs`, each the text of
    an argument list made of Python literals only (`3, [1, 2]`), so an input can never run code of its own."""

    program: str
    inputs: list[str]
    entry: str = "f"


@dataclass
class Execution:
    """What running a Job gave. `outputs[i]` is the canonical text of call i's return value (equal values, equal
    texts), None where the call raised (`errors[i]` says why). `status`: "ok" (the program loaded and every
    call was made), "error" (it failed to load: `detail`), "timeout" or "crashed" (killed, or no readable
    report), "lost" (the executor itself failed: nothing is known about the program). Values, never verdicts:
    the caller compares them with what it expects."""

    status: str
    outputs: list[str | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    detail: str | None = None
    stdout: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """The program loaded and every call returned a value."""
        return self.status == "ok" and all(o is not None for o in self.outputs)


@dataclass
class Verdict:
    """A judge's score with its details. `valid=False` means the judge could not produce a score (for example it
    could not parse its own output): the score is then meaningless and must not be trained on."""

    score: float
    valid: bool = True
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def invalid(cls, reason: str, **details: Any) -> "Verdict":
        return cls(score=float("nan"), valid=False, details={"error": reason, **details})


def verdict_items(verdicts: list[Verdict]) -> dict[str, list[float | None]]:
    """A judge's held-out verdicts per item: `score` (None for an invalid verdict: left out of means, never a 0,
    and item i stays item i for pairing), `valid_frac` 1.0 or 0.0 for each."""
    return {"score": [v.score if v.valid else None for v in verdicts],
            "valid_frac": [1.0 if v.valid else 0.0 for v in verdicts]}


def item_means(items: dict[str, Any]) -> dict[str, float]:
    """A game's held-out metrics from its per-item results: the mean of each list over its items with a value
    (None: no value; none at all gives no key), a plain number (a count) as it is."""
    out = {}
    for key, value in items.items():
        if isinstance(value, list):
            present = [v for v in value if v is not None]
            if present:
                out[key] = sum(present) / len(present)
        else:
            out[key] = float(value)
    return out
