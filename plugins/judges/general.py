"""Built-in judges: self_reward, llm_judge, pairwise, reward_model, exact_match and mix.

Prompted judges score in one of two modes. `constrained` (the default) appends the assistant's opening `<Score>`
to the judge prompt, takes one forward pass and reads the probabilities of the digit tokens: the expected digit
is the score. It is graded and never unparseable, which matters because a 135M model asked to write
`<Score>k</Score>` almost never does. `text` lets the judge write freely and parses `<Score>k</Score>`; a reply
without one is an invalid verdict, never a silent 0.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from arena.config import check_template, model_path_problem, number, option
from arena.errors import ArenaError, ConfigError
from arena.hookspecs import hookimpl
from arena.interfaces import Env, Judge, Policy
from arena.types import Comparison, JudgeItem, Verdict, chat

SELF_REWARD_TEMPLATE = """Review the user's question and the response below, and score them with this additive \
7-point scale. Points accumulate for each criterion met.

About the question:
- Add 1 point if the question is clear, self-contained and answerable.
- Add 1 point if the question is a meaningful, non-trivial request that tests a capability.
About the response:
- Add 1 point if the response is relevant and provides some information related to the question.
- Add 1 point if it addresses a substantial part of the question, even if incompletely.
- Add 1 point if it answers the basic elements of the question in a useful way.
- Add 1 point if it is clearly written from an AI assistant's perspective, directly and comprehensively.
- Add 1 point if it is impeccably tailored to the question: expert, accurate, concise, with no extraneous content.

<question>{query}</question>
<response>{response}</response>

Reply with the total as <Score>k</Score>, where k is an integer from 0 to 7."""

LLM_JUDGE_TEMPLATE = """You are a strict judge. Rate how well the response answers the user's request: correct, \
helpful, relevant and clear. Use an integer from 0 (useless or wrong) to {max_score} (excellent).
{reference_block}
<request>{query}</request>
<response>{response}</response>

Reply with the rating as <Score>k</Score>."""

PAIRWISE_TEMPLATE = """You are a strict judge. Two assistants answered the same request. Decide which response \
answers it better: correct, helpful, relevant and clear. Do not prefer a response for its length or its position.
{reference_block}
<request>{query}</request>
<response_A>{first}</response_A>
<response_B>{second}</response_B>

Reply with the letter of the better response as <Better>A</Better> or <Better>B</Better>."""

SCORE_RE = re.compile(r"<Score>\s*(\d+)\s*</Score>", re.IGNORECASE)
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def _query_text(item: JudgeItem) -> str:
    users = [m["content"] for m in item.prompt if m.get("role") == "user"]
    return users[-1] if users else (item.prompt[-1]["content"] if item.prompt else "")


def parse_score(text: str, max_score: int) -> int | None:
    """The last `<Score>k</Score>` in `text` when 0 <= k <= max_score, else None."""
    found = SCORE_RE.findall(text)
    if not found:
        return None
    k = int(found[-1])
    return k if 0 <= k <= max_score else None


def constrained_scores(policy: Policy, prompts: Sequence[list[int]], max_score: int,
                       reference: bool = True) -> tuple[list[float], list[list[float]]]:
    """Expected digit after each prompt (which ends in `<Score>`), and the renormalised digit probabilities."""
    digits = [policy.token_id(str(k)) for k in range(max_score + 1)]
    logp = policy.next_token_logprobs(prompts, digits, reference=reference)
    probs = torch.softmax(logp.float(), dim=-1)
    values = torch.arange(max_score + 1, dtype=probs.dtype)
    return (probs @ values).tolist(), probs.tolist()


class PromptJudge(Judge):
    """A judge that prompts a model with a template and reads a 0..max_score score (constrained or text)."""

    max_score = 7

    def __init__(self, options: Any, env: Env, model: Policy | None = None):
        super().__init__(options, env)
        self.model = model or env.policy
        if self.model is None:
            raise ArenaError(f"{type(self).__name__} needs a model: the run's policy was not built")
        for k in range(self.max_score + 1):
            try:
                self.model.token_id(str(k))
            except ValueError:
                raise ArenaError(f"{type(self).__name__}: the judge model's tokenizer has no single token for "
                                 f"the digit {k}; use mode=text") from None

    def render(self, item: JudgeItem) -> str:
        raise NotImplementedError

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        if not items:
            return []
        chats = [[{"role": "user", "content": self.render(item)}] for item in items]
        if self.options.mode == "constrained":
            opening = self.model.encode("<Score>")
            prompts = [self.model.encode_chat(chat) + opening for chat in chats]
            scores, probs = constrained_scores(self.model, prompts, self.max_score)
            return [Verdict(s, valid=math.isfinite(s), details={"mode": "constrained",
                                                                 "probs": [round(p, 4) for p in ps]})
                    for s, ps in zip(scores, probs)]
        outs = self.model.generate(chats, n=1, max_new_tokens=self.options.max_new_tokens, greedy=True,
                                   reference=True)
        verdicts = []
        for out in outs:
            text = out[0].text
            k = parse_score(text, self.max_score)
            verdicts.append(Verdict(float(k), details={"mode": "text", "output": text}) if k is not None
                            else Verdict.invalid("no <Score>k</Score> in the judge's reply", output=text))
        return verdicts


MODES = ("constrained", "text")


def check_model_option(model: str | None) -> None:
    """A judge's own `model` option must name a loadable model, so a typo fails when the config resolves."""
    problem = model and model_path_problem(model)
    if problem:
        raise ConfigError("model", f"{model}: {problem}")


def own_model(path: str, env: Env) -> Policy:
    """A judge model of its own: an hf backend on `path` with the run's other model settings. Judges score with
    its reference (adapter off), which is then exactly that model."""
    config = copy.copy(env.config)
    config.model = copy.copy(env.config.model)
    config.model.path = path
    child = Env(config=config, registry=env.registry)
    return env.registry.build("backend", {"name": "hf"}, child, "judge.model")


@dataclass
class SelfRewardOptions:
    mode: str = option("constrained", choices=MODES)
    max_new_tokens: int = option(32, ge=1)  # text mode: the judge's reply length
    template: Optional[str] = None  # custom prompt with {query} and {response}; default: LSP's 7-point rubric

    def check(self) -> None:
        check_template("template", self.template, ("query", "response"), ("response",))


class SelfReward(PromptJudge):
    """LSP's 7-point additive quality score (0..7) from the reference policy (adapter disabled)."""

    Options = SelfRewardOptions

    def render(self, item: JudgeItem) -> str:
        return (self.options.template or SELF_REWARD_TEMPLATE).format(query=_query_text(item),
                                                                      response=item.response)


@dataclass
class LLMJudgeOptions:
    mode: str = option("constrained", choices=MODES)
    max_new_tokens: int = option(32, ge=1)
    max_score: int = option(9, ge=1, le=9, hint="each score must be a single digit token")
    template: Optional[str] = None  # {query}, {response}, {reference_block}, {max_score}
    model: Optional[str] = None  # a judge model (folder, .gguf, cached name); None: the policy's reference

    def check(self) -> None:
        check_template("template", self.template, ("query", "response", "reference_block", "max_score"),
                       ("response",))
        check_model_option(self.model)


class LLMJudge(PromptJudge):
    """A general 0..max_score rating prompt for any model: the policy's reference or a model of its own."""

    Options = LLMJudgeOptions

    def __init__(self, options: LLMJudgeOptions, env: Env):
        self.max_score = options.max_score
        super().__init__(options, env, own_model(options.model, env) if options.model is not None else None)

    def render(self, item: JudgeItem) -> str:
        block = f"<reference_answer>{item.reference}</reference_answer>\n" if item.reference else ""
        return (self.options.template or LLM_JUDGE_TEMPLATE).format(
            query=_query_text(item), response=item.response, reference_block=block, max_score=self.max_score)


@dataclass
class PairwiseOptions:
    template: Optional[str] = None  # {query}, {first}, {second}, {reference_block}
    model: Optional[str] = None  # a judge model (folder, .gguf, cached name); None: the policy's reference

    def check(self) -> None:
        check_template("template", self.template, ("query", "first", "second", "reference_block"),
                       ("first", "second"))
        check_model_option(self.model)


class Pairwise(Judge):
    """Which of two responses is better, AlpacaEval-style, from one forward pass per pair; eval's win rates.

    The score is the judge model's probability of `A` against `B` after `<Better>` (never unparseable). `arena
    eval`'s default for win rates; as a judge in play it scores a response against the record's reference answer,
    in both orders."""

    Options = PairwiseOptions

    def __init__(self, options: PairwiseOptions, env: Env):
        super().__init__(options, env)
        self.model = own_model(options.model, env) if options.model is not None else env.policy
        if self.model is None:
            raise ArenaError("pairwise needs a model: the run's policy was not built")
        try:
            self.letters = [self.model.token_id("A"), self.model.token_id("B")]
        except ValueError:
            raise ArenaError("pairwise: the judge model's tokenizer has no single token for A or B") from None

    def render(self, item: Comparison) -> str:
        block = f"<reference_answer>{item.reference}</reference_answer>\n" if item.reference else ""
        query = _query_text(JudgeItem(prompt=item.prompt, response=""))
        return (self.options.template or PAIRWISE_TEMPLATE).format(query=query, first=item.first,
                                                                   second=item.second, reference_block=block)

    def compare(self, items: Sequence[Comparison]) -> list[Verdict]:
        if not items:
            return []
        opening = self.model.encode("<Better>")
        prompts = [self.model.encode_chat(chat(self.render(item))) + opening for item in items]
        probs = torch.softmax(self.model.next_token_logprobs(prompts, self.letters, reference=True).float(), -1)
        return [Verdict(p, details={"p_first": round(p, 4)}) if math.isfinite(p)
                else Verdict.invalid("the judge model gave no finite probability") for p in probs[:, 0].tolist()]

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """P(the response beats the reference answer), the mean of both orders so position bias cancels."""
        scored = [i for i, item in enumerate(items) if item.reference is not None]
        pairs = [Comparison(items[i].prompt, items[i].response, items[i].reference) for i in scored]
        swapped = [Comparison(c.prompt, c.second, c.first) for c in pairs]
        verdicts = self.compare(pairs + swapped)
        out = [Verdict.invalid("the record has no reference answer to compare with")] * len(items)
        for k, i in enumerate(scored):
            ahead, behind = verdicts[k], verdicts[k + len(pairs)]
            out[i] = (Verdict(0.5 + (ahead.score - behind.score) / 2, details={
                "p_first": ahead.score, "p_second": 1.0 - behind.score}) if ahead.valid and behind.valid
                else Verdict.invalid("the judge model gave no finite probability"))
        return out


@dataclass
class RewardModelOptions:
    path: Optional[str] = None  # an AutoModelForSequenceClassification folder or cached hub name (required)
    batch_size: int = option(8, ge=1)
    max_length: int = option(1024, ge=1)
    device: str = "auto"

    def check(self) -> None:
        if not self.path:
            raise ConfigError("path", "required: a reward model folder, e.g. judge: {name: reward_model, "
                                      "path: ./rm}")
        problem = model_path_problem(self.path, "classifier")
        if problem:
            raise ConfigError("path", f"{self.path}: {problem}")


class RewardModel(Judge):
    """Any sequence-classification reward model (e.g. Skywork-Reward-V2); the score is its first logit."""

    Options = RewardModelOptions

    def __init__(self, options: RewardModelOptions, env: Env):
        super().__init__(options, env)
        from arena.plugins.backends.hf.models import load_sequence_classifier

        # float32: a reward model's score differences can be finer than bf16 resolves
        self.model, self.tokenizer, self.device = load_sequence_classifier(options.path, "judge.path",
                                                                           options.device, "float32")

    def _text(self, item: JudgeItem) -> str:
        chat = [*item.prompt, {"role": "assistant", "content": item.response}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(chat, tokenize=False)
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in chat)

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        texts = [self._text(item) for item in items]
        scores: list[float] = []
        self.tokenizer.padding_side = "right"
        with torch.inference_mode():
            for start in range(0, len(texts), self.options.batch_size):
                enc = self.tokenizer(texts[start:start + self.options.batch_size], return_tensors="pt",
                                     padding=True, truncation=True, max_length=self.options.max_length,
                                     add_special_tokens=not self.tokenizer.chat_template).to(self.device)
                scores += self.model(**enc).logits[:, 0].float().tolist()
        return [Verdict(s, details={"reward_model": s}) if math.isfinite(s)
                else Verdict.invalid("the reward model returned a non-finite score") for s in scores]


@dataclass
class ExactMatchOptions:
    # number: last number; string: normalised text; regex: `pattern` extracts the answer
    mode: str = option("number", choices=("number", "string", "regex"))
    pattern: Optional[str] = None  # regex mode: group 1 (or the whole match) of the last match is the answer

    def check(self) -> None:
        if self.mode != "regex":
            return
        if not self.pattern:
            raise ConfigError("pattern", "required with mode=regex, e.g. 'answer: (\\S+)'")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ConfigError("pattern", f"not a valid regular expression ({exc})") from None


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _last_number(text: str) -> float | None:
    found = NUMBER_RE.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


class ExactMatch(Judge):
    """1.0 when the response's answer equals the record's reference answer, else 0.0."""

    Options = ExactMatchOptions

    def __init__(self, options: ExactMatchOptions, env: Env):
        super().__init__(options, env)
        self.regex = re.compile(options.pattern) if options.mode == "regex" else None

    def _extract(self, text: str) -> Any:
        if self.options.mode == "number":
            return _last_number(text)
        if self.options.mode == "string":
            return _normalise(text)
        matches = list(self.regex.finditer(text))
        if not matches:
            return None
        m = matches[-1]
        return _normalise(m.group(1) if m.groups() else m.group(0))

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        verdicts = []
        for item in items:
            if item.reference is None:
                verdicts.append(Verdict.invalid("the record has no reference answer to match"))
                continue
            want = _last_number(item.reference) if self.options.mode == "number" else _normalise(item.reference)
            if want is None:  # the record cannot be matched: the judge's failure, not a 0 for every response
                verdicts.append(Verdict.invalid("the reference answer has no number", reference=item.reference))
                continue
            got = self._extract(item.response)
            hit = got is not None and want is not None and (
                abs(got - want) < 1e-9 if self.options.mode == "number" else got == want)
            verdicts.append(Verdict(1.0 if hit else 0.0, details={"extracted": got, "reference": item.reference}))
        return verdicts


@dataclass
class MixOptions:
    judges: list[Any] = field(default_factory=list)  # [{name: X, weight: w, ...X's options}, ...]


MIX_EXAMPLE = ("judge: {name: mix, judges: [{name: reward_model, path: ./rm, weight: 1.0}, "
               "{name: self_reward, weight: 0.5}]}")


class Mix(Judge):
    """A weighted sum of judges. Valid only when every part is; each part's score and validity is kept."""

    Options = MixOptions

    @staticmethod
    def _parts(options: MixOptions) -> list[tuple[int, dict[str, Any], float]]:
        if not options.judges:
            raise ConfigError("judges", f"a mix needs at least one judge, in the form {MIX_EXAMPLE}")
        parts = []
        for i, spec in enumerate(options.judges):
            spec = {"name": spec} if isinstance(spec, str) else dict(spec) if isinstance(spec, dict) else spec
            if not isinstance(spec, dict):
                raise ConfigError(f"judges.{i}", f"expected a judge name or {{name: ..., weight: ...}}, got {spec!r}")
            # a negative weight subtracts a judge's score: a penalty (length, format)
            parts.append((i, spec, number(f"judges.{i}.weight", spec.pop("weight", 1.0), nonzero=True)))
        return parts

    @classmethod
    def check_options(cls, options: MixOptions, registry: Any, path: str) -> None:
        """Validate every part at config time, so `arena config` and start-up catch a bad part."""
        from arena.config import validate_component

        try:
            parts = cls._parts(options)
        except ConfigError as exc:
            raise ConfigError(f"{path}.{exc.path}", exc.detail) from None
        for i, spec, _ in parts:
            validate_component(registry, "judge", spec, f"{path}.judges.{i}")

    def __init__(self, options: MixOptions, env: Env):
        super().__init__(options, env)
        self.parts: list[tuple[str, float, Judge]] = [
            (str(spec["name"]), weight, env.registry.build("judge", spec, env, f"judges.{i}"))
            for i, spec, weight in self._parts(options)]

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        results = [(name, weight, judge.judge(items)) for name, weight, judge in self.parts]
        verdicts = []
        for i in range(len(items)):
            parts = [{"name": name, "weight": weight, "score": vs[i].score, "valid": vs[i].valid,
                      "details": vs[i].details} for name, weight, vs in results]
            valid = all(p["valid"] for p in parts)
            score = sum(p["weight"] * p["score"] for p in parts) if valid else float("nan")
            verdicts.append(Verdict(score, valid=valid, details={"components": parts}) if valid else
                            Verdict(score, valid=False, details={"components": parts,
                                                                 "error": "a component verdict is invalid"}))
        return verdicts


@hookimpl
def register_judges(register: Any) -> None:
    register("self_reward", SelfReward)
    register("llm_judge", LLMJudge)
    register("pairwise", Pairwise)
    register("reward_model", RewardModel)
    register("exact_match", ExactMatch)
    register("mix", Mix)
