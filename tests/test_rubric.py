"""Rubrics and the `rubric` judge: the score formula, the rubric checks and a model's rubric parsed from free text,
the judge on the tiny model (constrained and text), inside a `mix`, and its config errors. A rubric or a rating
the judge cannot use is an invalid verdict, never a crash or a silent 0."""

from __future__ import annotations

import math

import pytest
import torch

from arena.errors import ConfigError
from arena.plugins.judges.rubric import RUBRIC_TEMPLATE, RubricJudge, RubricJudgeOptions, parse_rating, rubric_score
from arena.rubrics import MAX_CRITERIA, Criterion, parse_rubric, rubric_problem
from arena.registry import load_registry
from arena.types import JudgeItem
from tiny import ScriptedReplies, env_with, make_backend

QUESTION = "When was the Eiffel Tower finished, and how tall is it?"
RUBRIC = [{"criterion": "Gives the year it was finished", "gold": "1889", "weight": 3},
          {"criterion": "Gives its height", "gold": "about 330 metres", "weight": 1}]


def item(response: str, rubric=RUBRIC, reference: str | None = None) -> JudgeItem:
    metadata = {} if rubric is None else {"rubric": rubric}
    return JudgeItem(prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
                     response=response, reference=reference, metadata=metadata)


# -- rubric_score ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights,ratings,expected", [
    ([3, 1], [2, 0], 0.75),  # 6 / 8
    ([1, 1, 2], [1, 2, 0], 0.375),  # 3 / 8
    ([2.5], [2], 1.0),
    ([1, 4], [0, 0], 0.0),
    ([1, 3], [1.5, 0.5], 0.375),  # expected ratings are fractional: 3 / 8
])
def test_rubric_score(weights, ratings, expected):
    assert rubric_score(weights, ratings) == pytest.approx(expected)


@pytest.mark.parametrize("weights,ratings,match", [
    ([1, 2], [2], "2 weights but 1 ratings"),
    ([], [], "no criteria"),
    ([0, 0], [1, 1], "positive"),
    ([1, -1], [2, 2], "positive"),
])
def test_rubric_score_refuses(weights, ratings, match):
    with pytest.raises(ValueError, match=match):
        rubric_score(weights, ratings)


# -- rubric_problem -------------------------------------------------------------------------------------------

def criterion(**changes):
    return {"criterion": "States the capital", "gold": "Paris", "weight": 1, **changes}


def test_good_rubrics_have_no_problem():
    assert rubric_problem(RUBRIC) is None
    assert rubric_problem([criterion(weight=0.25)] * MAX_CRITERIA) is None
    assert rubric_problem([criterion(extra="ignored")]) is None


@pytest.mark.parametrize("rubric,reason", [
    ({"criteria": RUBRIC}, "not a list"),
    ("1889", "not a list"),
    (None, "not a list"),
    ([], "no criteria"),
    ([criterion()] * 6, "6 criteria; at most 5"),
    ([criterion(), "States the year"], "criterion 2: not an object"),
    ([criterion(), criterion(gold=None)], "criterion 2: no gold fact"),
    ([{"criterion": "States the capital", "weight": 1}], "criterion 1: no gold fact"),
    ([criterion(gold="   ")], "criterion 1: no gold fact"),
    ([criterion(gold=1889)], "criterion 1: no gold fact"),
    ([criterion(criterion="")], "criterion 1: no criterion text"),
    ([criterion(), criterion(), {"gold": "x", "weight": 1}], "criterion 3: no criterion text"),
    ([criterion(weight="high")], "criterion 1: weight 'high' is not a number"),
    ([criterion(weight="3")], "criterion 1: weight '3' is not a number"),  # converted only by parse_rubric
    ([criterion(), criterion(), criterion(weight=0)], "criterion 3: weight 0 must be positive"),
    ([criterion(weight=-2.5)], "criterion 1: weight -2.5 must be positive"),
    ([criterion(weight=float("nan"))], "criterion 1: weight nan is not finite"),
    ([criterion(weight=float("inf"))], "criterion 1: weight inf is not finite"),
    ([criterion(weight=True)], "criterion 1: weight True is not a number"),
    ([criterion(weight=None)], "criterion 1: weight None is not a number"),
    ([{"criterion": "States the capital", "gold": "Paris"}], "criterion 1: no weight"),
])
def test_rubric_problems_name_the_criterion(rubric, reason):
    assert rubric_problem(rubric) == reason


def test_rubric_problem_max_criteria():
    assert rubric_problem([criterion()] * 3, max_criteria=2) == "3 criteria; at most 2"
    assert rubric_problem([criterion()] * 2, max_criteria=2) is None


# -- parse_rubric ---------------------------------------------------------------------------------------------

CAPITAL = [Criterion("States the capital", "Paris", 2.0), Criterion("Names the river", "the Seine", 1.0)]
CAPITAL_JSON = ('[{"criterion": "States the capital", "gold": "Paris", "weight": 2}, '
                '{"criterion": "Names the river", "gold": "the Seine", "weight": 1}]')


@pytest.mark.parametrize("text", [
    f"Here is the rubric:\n```json\n{CAPITAL_JSON}\n```\nThat's all.",
    f"```\n{CAPITAL_JSON}\n```",
    f"```JSON\n{CAPITAL_JSON}\n```",
    f"```json\n{CAPITAL_JSON}",  # a reply cut short before the closing fence
    CAPITAL_JSON,
    f"Rubric: {CAPITAL_JSON} Hope that helps! [1]",  # trailing text after the value
    f'{{"criteria": {CAPITAL_JSON}}}',
    f'The rubric follows. {{"criteria": {CAPITAL_JSON}, "notes": "none"}}',
    CAPITAL_JSON.replace('"weight": 2', '"weight": "2"').replace('"weight": 1', '"weight": " 1.0 "'),
    CAPITAL_JSON.replace('"criterion"', '"description"'),
    # the first fenced block that is JSON: a python block first is skipped, not read past its end
    f"```python\nprint([1])\n```\nand then\n```json\n{CAPITAL_JSON}\n```",
])
def test_parse_rubric_reads_a_model_rubric(text):
    criteria, problem = parse_rubric(text)
    assert problem is None
    assert criteria == CAPITAL
    assert [c.to_json() for c in criteria] == [
        {"criterion": "States the capital", "gold": "Paris", "weight": 2.0},
        {"criterion": "Names the river", "gold": "the Seine", "weight": 1.0}]


def test_parse_rubric_strips_text_and_takes_the_first_block():
    text = ('```json\n[{"criterion": "  Says yes ", "gold": " yes\\n", "weight": 0.5}]\n```\n'
            f"```json\n{CAPITAL_JSON}\n```")
    assert parse_rubric(text) == ([Criterion("Says yes", "yes", 0.5)], None)


def one(**changes) -> str:
    import json

    return json.dumps([criterion(**changes)])


@pytest.mark.parametrize("text,reason", [
    (one(weight="high"), "criterion 1: weight 'high' is not a number"),
    (one(weight=0), "criterion 1: weight 0 must be positive"),
    (one(weight=-1), "criterion 1: weight -1 must be positive"),
    (one(weight="NaN"), "criterion 1: weight nan is not finite"),  # a numeric string, converted, then refused
    ('[{"criterion": "c", "gold": "g", "weight": NaN}]', "criterion 1: weight nan is not finite"),
    (one(weight=True), "criterion 1: weight True is not a number"),
    ('[{"criterion": "States the capital", "weight": 1}]', "criterion 1: no gold fact"),
    (one(gold=""), "criterion 1: no gold fact"),
    (one(gold=" \n "), "criterion 1: no gold fact"),
    (one(criterion=""), "criterion 1: no criterion text"),
    ("[" + ", ".join([one()[1:-1]] * 6) + "]", "6 criteria; at most 5"),
    ("[]", "no criteria"),
    ('{"criteria": []}', "no criteria"),
    ('{"criteria": "none"}', "not a list"),
    ('{"rubric": []}', 'an object without "criteria"'),
    ('["States the capital", "Paris"]', "criterion 1: not an object"),
    ("[1, 2, 3]", "criterion 1: not an object"),
])
def test_parse_rubric_reasons(text, reason):
    assert parse_rubric(text) == (None, reason)
    assert parse_rubric(f"```json\n{text}\n```") == (None, reason)


@pytest.mark.parametrize("text,reason", [
    ("[{'criterion': 'x', 'gold': 'y', 'weight': 1}]", "not JSON"),
    ('{"criteria": [', "not JSON"),
    ("```json\nThe rubric is below: {oops}\n```", "not JSON"),
    ("[" * 100_000, "not JSON"),  # too deep for the decoder: still a reason
    ("I cannot write a rubric for this.", "no JSON rubric in the text"),
    ("", "no JSON rubric in the text"),
    ("```json\n\n```", "no JSON rubric in the text"),
])
def test_parse_rubric_without_json(text, reason):
    criteria, problem = parse_rubric(text)
    assert criteria is None and problem.startswith(reason)


def test_parse_rubric_max_criteria():
    assert parse_rubric(CAPITAL_JSON, max_criteria=1) == (None, "2 criteria; at most 1")


# -- parse_rating ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("<Rating>2</Rating>", 2),
    ("It states 1889. <rating> 1 </rating>", 1),
    ("<Rating>0</Rating>", 0),
    ("<Rating>2</Rating> on reflection <Rating>1</Rating>", 1),  # the last one counts
    ("<Rating>3</Rating>", None),
    ("<Rating>-1</Rating>", None),
    ("<Rating>two</Rating>", None),
    ("<Score>2</Score>", None),
    ("Rating: 2", None),
    ("", None),
])
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


# -- text mode with scripted replies --------------------------------------------------------------------------

def test_text_mode_with_scripted_replies():
    three = [*RUBRIC, {"criterion": "Names the architect", "gold": "Gustave Eiffel", "weight": 2}]
    replies = ["<Rating>2</Rating>", "Partly. <Rating>1</Rating>",  # item 0: RUBRIC
               "<Rating>1</Rating>", "no idea", "<Rating>2</Rating>",  # item 2: three criteria, the 2nd unreadable
               "<Rating>0</Rating>", "<Rating>2</Rating>", "<Rating>1</Rating>"]  # item 3: three criteria
    stub = ScriptedReplies(replies)
    judge = RubricJudge(RubricJudgeOptions(mode="text", max_new_tokens=7), env_with(stub))
    verdicts = judge.judge([item("1889, 330 m"), item("1889", rubric=None), item("Eiffel", three),
                            item("In 1900", three)])
    assert [v.valid for v in verdicts] == [True, False, False, True]
    assert verdicts[0].score == pytest.approx((3 * 2 + 1 * 1) / 8)
    assert verdicts[0].details == {"mode": "text", "ratings": [2.0, 1.0], "weights": [3.0, 1.0],
                                   "outputs": replies[0:2]}
    assert verdicts[1].details["error"] == 'no usable rubric: no "rubric" in the item\'s metadata'
    assert math.isnan(verdicts[2].score)
    assert verdicts[2].details["error"].startswith("criterion 2: no <Rating>k</Rating>")
    assert verdicts[2].details["outputs"] == replies[2:5]
    assert verdicts[3].score == pytest.approx((3 * 0 + 1 * 2 + 2 * 1) / 12)
    (call,) = stub.calls  # every criterion of every item in one call
    assert call["greedy"] and call["reference"] and call["n"] == 1 and call["max_new_tokens"] == 7
    rendered = [chat[0]["content"] for chat in call["prompts"]]
    assert len(rendered) == 8
    assert rendered[1] == RUBRIC_TEMPLATE.format(question=QUESTION, criterion="Gives its height",
                                                 gold="about 330 metres", response="1889, 330 m")
    assert rendered[4] == RUBRIC_TEMPLATE.format(question=QUESTION, criterion="Names the architect",
                                                 gold="Gustave Eiffel", response="Eiffel")
    assert judge.judge([]) == []
    assert len(stub.calls) == 1  # nothing to rate: no model call


def test_custom_template():
    stub = ScriptedReplies(["<Rating>1</Rating>"])
    judge = RubricJudge(RubricJudgeOptions(mode="text", template="{criterion}|{gold}|{question}|{response}"),
                        env_with(stub))
    (v,) = judge.judge([item("yes", rubric=[criterion()])])
    assert v.valid and v.score == pytest.approx(0.5)
    assert stub.calls[0]["prompts"][0][0]["content"] == f"States the capital|Paris|{QUESTION}|yes"


# -- constrained mode on the tiny model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return make_backend(tiny_model_dir, seed=11)


@pytest.fixture(scope="module")
def judge(policy):
    registry = load_registry()
    return registry.build("judge", {"name": "rubric"}, env_with(policy, registry))


def direct_ratings(model, texts: list[str]) -> list[tuple[float, list[float]]]:
    """The expected digit 0..2 after `<Rating>` under the reference model (adapter off), computed directly."""
    digits = [model.token_id(str(k)) for k in range(3)]
    out = []
    for text in texts:
        ids = model.encode_chat([{"role": "user", "content": text}]) + model.encode("<Rating>")
        with torch.no_grad(), model.model.disable_adapter():
            logits = model.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        probs = torch.softmax(logits[digits], dim=-1)
        out.append((float(probs @ torch.arange(3, dtype=torch.float32)), probs.tolist()))
    return out


def test_constrained_verdicts_on_the_tiny_model(judge, policy):
    assert isinstance(judge, RubricJudge) and judge.model is policy
    items = [item("It was finished in 1889 and is about 330 metres tall."), item("No idea.")]
    verdicts = judge.judge(items)
    for it, v in zip(items, verdicts):
        assert v.valid and 0.0 <= v.score <= 1.0
        details = v.details
        assert details["mode"] == "constrained" and details["weights"] == [3.0, 1.0]
        assert len(details["ratings"]) == 2 and all(0.0 <= r <= 2.0 for r in details["ratings"])
        assert all(len(p) == 3 and sum(p) == pytest.approx(1.0, abs=1e-3) for p in details["probs"])
        assert v.score == pytest.approx(rubric_score(details["weights"], details["ratings"]), abs=1e-4)
        r1, r2 = details["ratings"]
        assert v.score == pytest.approx((3 * r1 + 1 * r2) / 8, abs=1e-4)
        want = direct_ratings(policy, [judge.render_criterion(it, Criterion(**c)) for c in RUBRIC])
        assert details["ratings"] == pytest.approx([r for r, _ in want], abs=1e-4)
        for got, (_, probs) in zip(details["probs"], want):
            assert got == pytest.approx(probs, abs=1e-3)


def test_only_the_weights_change_the_score(judge, policy):
    """The same criteria under other weights: the same ratings, and the score moves exactly as Σ w·r / (2·Σ w)
    says (ratings at full precision, computed directly: the random model's ratings differ by about 1e-3)."""
    answer = "It was finished in 1889."
    texts = [("Names the architect", "Gustave Eiffel"), ("x", "y")]
    rubrics = [[{"criterion": c, "gold": g, "weight": w} for (c, g), w in zip(texts, weights)]
               for weights in ((9, 1), (1, 9), (2.5, 2.5))]
    verdicts = judge.judge([item(answer, rubric) for rubric in rubrics])
    rendered = [judge.render_criterion(item(answer), Criterion(c, g, 1.0)) for c, g in texts]
    r1, r2 = (r for r, _ in direct_ratings(policy, rendered))
    assert abs(r1 - r2) > 1e-3  # the weights matter only when the ratings differ
    a, b, even = verdicts
    assert a.details["ratings"] == b.details["ratings"] == even.details["ratings"]
    assert a.details["ratings"] == pytest.approx([r1, r2], abs=1e-4)
    assert [a.details["weights"], b.details["weights"]] == [[9.0, 1.0], [1.0, 9.0]]
    assert a.score == pytest.approx((9 * r1 + 1 * r2) / 20, abs=1e-6)
    assert b.score == pytest.approx((1 * r1 + 9 * r2) / 20, abs=1e-6)
    assert even.score == pytest.approx((r1 + r2) / 4, abs=1e-6)
    assert a.score - b.score == pytest.approx(8 * (r1 - r2) / 20, abs=1e-6)


def test_unusable_rubrics_are_invalid_and_order_is_kept(judge):
    good = [item("1889"), item("330 metres", [criterion(gold="330 metres", weight=2)])]
    alone = judge.judge(good)
    bad = [{"criterion": "Gives the year", "gold": "", "weight": 1}]
    verdicts = judge.judge([good[0], item("1889", rubric=None), item("1889", bad),
                            item("1889", [criterion()] * 6), good[1]])
    assert [v.valid for v in verdicts] == [True, False, False, False, True]
    assert verdicts[1].details["error"] == 'no usable rubric: no "rubric" in the item\'s metadata'
    assert verdicts[2].details["error"] == "no usable rubric: criterion 1: no gold fact"
    assert verdicts[3].details["error"] == "no usable rubric: 6 criteria; at most 5"
    assert all(math.isnan(v.score) for v in verdicts[1:4])
    for got, want in zip((verdicts[0], verdicts[4]), alone):  # each valid item got its own criteria's ratings
        assert got.details["ratings"] == pytest.approx(want.details["ratings"], abs=1e-4)
        assert got.score == pytest.approx(want.score, abs=1e-4)
    assert verdicts[4].details["weights"] == [2.0]
    only_bad = judge.judge([item("1889", rubric="none")])
    assert not only_bad[0].valid and only_bad[0].details["error"] == "no usable rubric: not a list"


def test_text_mode_on_the_random_model_is_invalid(policy):
    judge = RubricJudge(RubricJudgeOptions(mode="text", max_new_tokens=6), env_with(policy))
    verdicts = judge.judge([item("1889"), item("1889", rubric=[criterion()])])
    for v, n in zip(verdicts, (2, 1)):
        assert not v.valid and math.isnan(v.score)
        assert v.details["error"].startswith("criterion 1: no <Rating>k</Rating>")
        assert len(v.details["outputs"]) == n and all(isinstance(t, str) for t in v.details["outputs"])


def test_in_a_mix_with_exact_match(policy, judge):
    registry = load_registry()
    spec = {"name": "mix", "judges": [{"name": "rubric", "weight": 1.0}, {"name": "exact_match", "weight": 0.5}]}
    mix = registry.build("judge", spec, env_with(policy, registry))
    items = [item("It was finished in 1889.", reference="1889"), item("In 1900.", reference="1889")]
    verdicts = mix.judge(items)
    alone = judge.judge(items)
    for v, rubric_alone, exact in zip(verdicts, alone, (1.0, 0.0)):
        assert v.valid
        rubric_part, exact_part = v.details["components"]
        assert (rubric_part["name"], exact_part["name"]) == ("rubric", "exact_match")
        assert rubric_part["score"] == pytest.approx(rubric_alone.score, abs=1e-4)
        assert exact_part["score"] == exact
        assert v.score == pytest.approx(1.0 * rubric_part["score"] + 0.5 * exact, abs=1e-9)
    (broken,) = mix.judge([item("1889", rubric=None, reference="1889")])
    assert not broken.valid
    assert broken.details["components"][0]["details"]["error"].startswith("no usable rubric")


def test_a_model_of_its_own(policy, tiny_model_dir):
    """With the policy's base model as its own model, the judge rates as the policy's reference does."""
    registry = load_registry()
    env = env_with(policy, registry)
    own = registry.build("judge", {"name": "rubric", "model": str(tiny_model_dir)}, env)
    assert own.model is not policy
    items = [item("1889"), item("330 m")]
    on_reference = registry.build("judge", {"name": "rubric"}, env).judge(items)
    assert [v.score for v in own.judge(items)] == pytest.approx([v.score for v in on_reference], abs=1e-4)


# -- config ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,path", [
    ({"template": "{nope} {response}"}, "judge.template"),
    ({"template": "{question"}, "judge.template"),
    ({"model": "/no/such/judge-model"}, "judge.model"),
    ({"mode": "free"}, "judge.mode"),
    ({"max_new_tokens": 0}, "judge.max_new_tokens"),
])
def test_config_errors_name_the_key(spec, path):
    registry = load_registry()
    with pytest.raises(ConfigError) as exc:
        registry.build("judge", {"name": "rubric", **spec}, env_with(ScriptedReplies([]), registry))
    assert exc.value.path == path
    if "model" in spec:
        assert "no such file or folder" in exc.value.detail
