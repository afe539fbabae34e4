"""Built-in judges: score parsing, constrained scoring on the tiny model, text mode, exact_match, mix, a tiny
reward model and llm_judge. A verdict a judge cannot produce is invalid (never a silent 0)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from arena.errors import ArenaError, ConfigError
from arena.interfaces import Judge
from arena.plugins.judges.general import (
    SELF_REWARD_TEMPLATE,
    ExactMatch,
    ExactMatchOptions,
    LLMJudge,
    LLMJudgeOptions,
    Mix,
    MixOptions,
    RewardModel,
    RewardModelOptions,
    SelfReward,
    SelfRewardOptions,
    constrained_scores,
    parse_score,
)
from arena.registry import Entry, load_registry
from arena.types import JudgeItem, Verdict
from tiny import ScriptedReplies, env_with, make_backend


def item(response: str, reference: str | None = None, question: str = "What is 40 + 2?") -> JudgeItem:
    return JudgeItem(prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}],
                     response=response, reference=reference)


# -- parse_score ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,max_score,expected", [
    ("<Score>5</Score>", 7, 5),
    ("Reasoning... <score> 3 </score>", 7, 3),
    ("<Score>2</Score> no wait <Score>6</Score>", 7, 6),  # the last one counts
    ("<Score>0</Score>", 7, 0),
    ("<Score>8</Score>", 7, None),  # out of range
    ("<Score>9</Score>", 9, 9),
    ("<Score>10</Score>", 9, None),
    ("Score: 5", 7, None),
    ("<Score>five</Score>", 7, None),
    ("<Score>-1</Score>", 7, None),
    ("", 7, None),
])
def test_parse_score(text, max_score, expected):
    assert parse_score(text, max_score) == expected


def test_text_mode_without_a_score_is_invalid_not_zero():
    replies = ["It is a fine answer, I would say.", "<Score>5</Score>", "<Score>9</Score>",
               "<score> 3 </score> then <Score>6</Score>"]
    stub = ScriptedReplies(replies)
    judge = SelfReward(SelfRewardOptions(mode="text", max_new_tokens=12), env_with(stub))
    verdicts = judge.judge([item(f"answer {i}") for i in range(4)])
    assert [v.valid for v in verdicts] == [False, True, False, True]
    assert math.isnan(verdicts[0].score) and math.isnan(verdicts[2].score)
    assert "Score" in verdicts[0].details["error"]
    assert verdicts[0].details["output"] == replies[0]
    assert [verdicts[1].score, verdicts[3].score] == [5.0, 6.0]
    assert verdicts[1].details == {"mode": "text", "output": replies[1]}
    (call,) = stub.calls
    assert call["greedy"] and call["reference"] and call["max_new_tokens"] == 12 and call["n"] == 1
    rendered = call["prompts"][0][0]["content"]
    assert rendered == SELF_REWARD_TEMPLATE.format(query="What is 40 + 2?", response="answer 0")
    assert judge.judge([]) == []


def test_custom_template_and_bad_mode():
    stub = ScriptedReplies(["<Score>4</Score>"])
    judge = SelfReward(SelfRewardOptions(mode="text", template="Q={query} R={response}"), env_with(stub))
    assert judge.judge([item("yes")])[0].score == 4.0
    assert stub.calls[0]["prompts"][0][0]["content"] == "Q=What is 40 + 2? R=yes"
    registry = load_registry()
    with pytest.raises(ConfigError) as exc:
        registry.build("judge", {"name": "self_reward", "mode": "free"}, env_with(stub, registry))
    assert exc.value.path == "judge.mode"


def test_prompted_judge_needs_single_token_digits():
    with pytest.raises(ArenaError, match="mode=text"):
        SelfReward(SelfRewardOptions(), env_with(ScriptedReplies(["x"], digits=False)))


# -- constrained scoring on the tiny model --------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return make_backend(tiny_model_dir, seed=11)


def expected_scores(model, texts: list[str], max_score: int, reference: bool = True):
    """Probabilities of the digits after `<Score>`, renormalised, and their expected value: computed directly."""
    digits = [model.token_id(str(k)) for k in range(max_score + 1)]
    out = []
    for text in texts:
        ids = model.encode_chat([{"role": "user", "content": text}]) + model.encode("<Score>")
        with torch.no_grad(), (model.model.disable_adapter() if reference else torch.no_grad()):
            logits = model.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        probs = torch.softmax(logits[digits], dim=-1)
        out.append((float(probs @ torch.arange(max_score + 1, dtype=torch.float32)), probs.tolist()))
    return out


def test_constrained_self_reward_on_the_tiny_model(policy):
    judge = SelfReward(SelfRewardOptions(), env_with(policy))
    items = [item("42"), item("The capital of France is Paris."), item("", question="Tell me a story.")]
    verdicts = judge.judge(items)
    want = expected_scores(policy, [judge.render(i) for i in items], 7)
    for v, (score, probs) in zip(verdicts, want):
        assert v.valid and math.isfinite(v.score) and 0.0 <= v.score <= 7.0
        assert v.score == pytest.approx(score, abs=1e-4)
        assert v.details["mode"] == "constrained"
        assert len(v.details["probs"]) == 8
        assert sum(v.details["probs"]) == pytest.approx(1.0, abs=1e-3)
        assert v.details["probs"] == pytest.approx(probs, abs=1e-4)
    assert len({round(v.score, 6) for v in verdicts}) == 3  # graded: different items, different scores


def test_constrained_scores_come_from_the_reference(policy):
    judge = SelfReward(SelfRewardOptions(), env_with(policy))
    items = [item("42"), item("forty-two")]
    before = [v.score for v in judge.judge(items)]
    saved = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_B" in n}
    try:
        with torch.no_grad():
            for n, p in policy.model.named_parameters():
                if n in saved:
                    p.add_(torch.randn_like(p))
        assert [v.score for v in judge.judge(items)] == pytest.approx(before, abs=1e-5)
        prompts = [policy.encode_chat([{"role": "user", "content": judge.render(i)}]) + policy.encode("<Score>")
                   for i in items]
        on_policy, _ = constrained_scores(policy, prompts, 7, reference=False)
        assert on_policy != pytest.approx(before, abs=1e-4)  # the adapter would have changed them
    finally:
        with torch.no_grad():
            for n, p in policy.model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


# -- exact_match ----------------------------------------------------------------------------------------------

def exact(**options) -> ExactMatch:
    return ExactMatch(ExactMatchOptions(**options), env_with())


@pytest.mark.parametrize("response,reference,score", [
    ("42", "42", 1.0),
    ("The answer is 42.", "42", 1.0),
    ("I think 41, no, 42", "42", 1.0),  # the last number
    ("42, or maybe 41", "42", 0.0),
    ("1,234", "1234", 1.0),
    ("-3.50", "-3.5", 1.0),
    ("42.0", "42", 1.0),
    ("no idea", "42", 0.0),  # the response's failure: a valid 0
    ("12 + 30 = 42", "The sum is 42.", 1.0),
])
def test_exact_match_number(response, reference, score):
    (v,) = exact().judge([item(response, reference)])
    assert v.valid and v.score == score


@pytest.mark.parametrize("response,reference,score", [
    ("Paris!", "paris", 1.0),
    ("  The   PARIS ", "the paris", 1.0),
    ("Paris, France", "Paris", 0.0),
])
def test_exact_match_string(response, reference, score):
    (v,) = exact(mode="string").judge([item(response, reference)])
    assert v.valid and v.score == score


def test_exact_match_regex():
    judge = exact(mode="regex", pattern=r"answer:\s*(\S+)")
    verdicts = judge.judge([item("answer: 12. Final answer: Forty-Two", "forty two"),
                            item("answer: 12", "forty two"),
                            item("nothing here", "forty two")])
    assert [v.score for v in verdicts] == [1.0, 0.0, 0.0]
    assert all(v.valid for v in verdicts)
    assert verdicts[0].details["extracted"] == "forty two"
    no_group = exact(mode="regex", pattern=r"\d+ apples")
    assert no_group.judge([item("I have 3 apples", "3 apples")])[0].score == 1.0


def test_exact_match_without_a_reference_is_invalid():
    for mode, options in (("number", {}), ("string", {}), ("regex", {"pattern": "(x)"})):
        (v,) = exact(mode=mode, **options).judge([item("42", None)])
        assert not v.valid and math.isnan(v.score) and "reference" in v.details["error"]


def test_exact_match_reference_without_a_number_is_invalid():
    """A record whose reference has no number cannot be matched in number mode: that is the judge's failure
    (invalid), not a 0 for every response."""
    (v,) = exact().judge([item("42", "forty-two")])
    assert not v.valid and math.isnan(v.score)


def test_exact_match_options_name_their_key():
    registry = load_registry()
    env = env_with(registry=registry)
    for spec, path in (({"mode": "fuzzy"}, "judge.mode"), ({"mode": "regex"}, "judge.pattern"),
                       ({"mode": "regex", "pattern": "(unclosed"}, "judge.pattern")):
        with pytest.raises(ConfigError) as exc:
            registry.build("judge", {"name": "exact_match", **spec}, env)
        assert exc.value.path == path


# -- mix ------------------------------------------------------------------------------------------------------

@dataclass
class LengthOptions:
    bad: str = "bad"


class LengthJudge(Judge):
    """Scores the response's length; invalid when it is the `bad` word."""

    Options = LengthOptions

    def judge(self, items):
        return [Verdict.invalid("cannot judge this") if i.response == self.options.bad
                else Verdict(float(len(i.response)), details={"length": len(i.response)}) for i in items]


@pytest.fixture()
def mix_registry():
    registry = load_registry()
    registry.entries["judge"]["length"] = Entry("length", LengthJudge, "test")
    return registry


def test_mix_weights_validity_and_details(mix_registry):
    spec = {"name": "mix", "judges": [{"name": "exact_match", "weight": 2.0},
                                      {"name": "exact_match", "mode": "string", "weight": 0.5},
                                      {"name": "length", "weight": -1}]}
    judge = mix_registry.build("judge", spec, env_with(registry=mix_registry))
    assert isinstance(judge, Mix)
    verdicts = judge.judge([item("42", "42"), item("The answer is 42", "42"), item("bad", "42")])
    assert verdicts[0].valid and verdicts[0].score == pytest.approx(2 * 1 + 0.5 * 1 - 1 * 2)
    assert verdicts[1].valid and verdicts[1].score == pytest.approx(2 * 1 + 0.5 * 0 - 1 * 16)
    assert not verdicts[2].valid and math.isnan(verdicts[2].score)
    assert "invalid" in verdicts[2].details["error"]
    parts = verdicts[2].details["components"]
    assert [(p["name"], p["weight"], p["valid"]) for p in parts] == \
        [("exact_match", 2.0, True), ("exact_match", 0.5, True), ("length", -1.0, False)]
    assert [p["score"] for p in parts[:2]] == [0.0, 0.0]
    assert parts[2]["details"]["error"] == "cannot judge this"
    first = verdicts[0].details["components"]
    assert [p["score"] for p in first] == [1.0, 1.0, 2.0]
    assert first[2]["details"] == {"length": 2}
    assert first[0]["details"]["reference"] == "42"


def test_mix_parts_in_shorthand_and_their_options(mix_registry):
    judge = Mix(MixOptions(judges=["exact_match", {"name": "length", "bad": "42"}]), env_with(registry=mix_registry))
    (v,) = judge.judge([item("42", "42")])
    assert not v.valid  # the length judge was told "42" is bad: its option reached it
    (v,) = judge.judge([item("7", "7")])
    assert v.valid and v.score == 1.0 + 1.0
    with pytest.raises(ConfigError, match="{name: mix, judges: "):
        Mix(MixOptions(), env_with(registry=mix_registry))


# -- reward_model ---------------------------------------------------------------------------------------------

def test_reward_model_scores_are_its_first_logit(reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    items = [item("42"), item("It is forty-two, because forty plus two is forty-two."), item("Hmm.")]
    judge = RewardModel(RewardModelOptions(path=str(reward_model_dir), batch_size=2, device="cpu"), env_with())
    verdicts = judge.judge(items)
    tokenizer = AutoTokenizer.from_pretrained(str(reward_model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(reward_model_dir)).eval()
    for it, v in zip(items, verdicts):
        text = tokenizer.apply_chat_template([*it.prompt, {"role": "assistant", "content": it.response}],
                                             tokenize=False)
        assert it.response in text
        with torch.no_grad():
            want = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
        assert v.valid and v.score == pytest.approx(want, abs=1e-4)
        assert v.details == {"reward_model": v.score}
    assert len({round(v.score, 4) for v in verdicts}) == 3
    one_by_one = RewardModel(RewardModelOptions(path=str(reward_model_dir), batch_size=1), env_with())
    assert [v.score for v in one_by_one.judge(items)] == pytest.approx([v.score for v in verdicts], abs=1e-4)


def test_reward_model_errors_name_the_key(tmp_path):
    registry = load_registry()
    env = env_with(registry=registry)
    with pytest.raises(ConfigError) as exc:
        registry.build("judge", {"name": "reward_model"}, env)
    assert exc.value.path == "judge.path"
    with pytest.raises(ArenaError, match="config.json"):
        registry.build("judge", {"name": "reward_model", "path": str(tmp_path)}, env)


# -- llm_judge ------------------------------------------------------------------------------------------------

def test_llm_judge_on_the_policy_reference(policy):
    judge = LLMJudge(LLMJudgeOptions(max_score=5), env_with(policy))
    items = [item("42", reference="42"), item("7")]
    verdicts = judge.judge(items)
    rendered = [judge.render(i) for i in items]
    assert "<reference_answer>42</reference_answer>" in rendered[0]
    assert "<reference_answer>" not in rendered[1]
    assert "from 0 (useless or wrong) to 5" in rendered[0]
    for v, (score, probs) in zip(verdicts, expected_scores(policy, rendered, 5)):
        assert v.valid and 0.0 <= v.score <= 5.0 and len(v.details["probs"]) == 6
        assert v.score == pytest.approx(score, abs=1e-4)
    with pytest.raises(ConfigError) as exc:
        load_registry().build("judge", {"name": "llm_judge", "max_score": 10}, env_with(policy))
    assert exc.value.path == "judge.max_score"


def test_llm_judge_text_mode():
    stub = ScriptedReplies(["<Score>9</Score>", "<Score>3</Score>", "nine"])
    judge = LLMJudge(LLMJudgeOptions(mode="text", max_score=9), env_with(stub))
    assert [(v.valid, v.score if v.valid else None) for v in judge.judge([item("a"), item("b"), item("c")])] == \
        [(True, 9.0), (True, 3.0), (False, None)]


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory):
    """Another random tiny Llama with the same tokenizer: a judge model that is not the policy."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(123)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(str(tiny_model_dir)))
    path = tmp_path_factory.mktemp("tiny-judge")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(path)
    return path


def test_llm_judge_with_a_model_of_its_own(policy, other_model_dir):
    registry = load_registry()
    env = env_with(policy, registry)
    judge = registry.build("judge", {"name": "llm_judge", "model": str(other_model_dir)}, env)
    assert judge.model is not policy
    items = [item("42"), item("I do not know.")]
    verdicts = judge.judge(items)
    rendered = [judge.render(i) for i in items]
    own = expected_scores(judge.model, rendered, 9)
    assert [v.score for v in verdicts] == pytest.approx([s for s, _ in own], abs=1e-4)
    on_policy = expected_scores(policy, rendered, 9)
    assert [v.score for v in verdicts] != pytest.approx([s for s, _ in on_policy], abs=1e-3)
