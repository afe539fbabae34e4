"""The `overlap` judge and the word helpers it shares with the game."""

from __future__ import annotations

import math

import pytest

from arena import Env, JudgeItem
from arena.errors import ConfigError
from arena_example_game import overlap_f1, setter_list, words


def test_words_are_lowercased_letter_runs_in_order():
    assert words("1. Apple, 2. pear!\n- PLUM") == ["apple", "pear", "plum"]
    assert words("well-known, don't 42 🙂") == ["well-known", "don't"]
    assert words("") == []


def test_setter_list_drops_a_preamble_ending_in_a_colon():
    assert setter_list("Sure! Here are words about food: bread, cheese, olive.") == ["bread", "cheese", "olive"]
    assert setter_list("Travel words:\n\n1. Beach\n2. Hotel\n3. Map") == ["beach", "hotel", "map"]
    assert setter_list("apple, pear, plum") == ["apple", "pear", "plum"]
    assert setter_list("Here they are, apple pear plum") == ["here", "they", "are", "apple", "pear", "plum"]
    assert setter_list("apple, pear, plum:") == ["apple", "pear", "plum"]  # nothing after the colon: all words


def test_overlap_f1_is_multiset_f1():
    assert overlap_f1(["a", "b", "c"], ["a", "b", "c"]) == (1.0, 1.0, 1.0)
    p, r, f = overlap_f1(["a", "b"], ["a", "b", "c"])
    assert (p, r) == (1.0, 2 / 3) and math.isclose(f, 0.8)
    p, r, f = overlap_f1(["a", "a", "a", "x"], ["a", "b"])  # a repeated word counts once per occurrence
    assert (p, r) == (0.25, 0.5) and math.isclose(f, 1 / 3)
    assert overlap_f1([], ["a"]) == (0.0, 0.0, 0.0)
    assert overlap_f1(["z"], ["a"]) == (0.0, 0.0, 0.0)


def build_judge(registry, spec):
    return registry.build("judge", spec, Env(config=None, registry=registry))


def test_f1_mode_scores_overlap_and_keeps_details(registry):
    judge = build_judge(registry, "overlap")
    items = [JudgeItem(prompt=[], response="Apple, pear, plum.", reference="apple, pear, plum"),
             JudgeItem(prompt=[], response="pear apple", reference="apple, pear, plum"),
             JudgeItem(prompt=[], response="", reference="apple, pear, plum")]
    v = judge.judge(items)
    assert [x.valid for x in v] == [True, True, True]
    assert v[0].score == 1.0 and v[0].details["exact"] is True
    assert math.isclose(v[1].score, 0.8) and v[1].details["exact"] is False and v[1].details["recall"] == 2 / 3
    assert v[2].score == 0.0


def test_exact_mode_needs_the_same_words_in_the_same_order(registry):
    judge = build_judge(registry, {"name": "overlap", "mode": "exact"})
    v = judge.judge([JudgeItem(prompt=[], response="APPLE pear, plum!", reference="apple, pear, plum"),
                     JudgeItem(prompt=[], response="pear, apple, plum", reference="apple, pear, plum")])
    assert [x.score for x in v] == [1.0, 0.0]
    assert math.isclose(v[1].details["f1"], 1.0)  # same words, wrong order: F1 1, exact 0


def test_no_reference_is_an_invalid_verdict_not_a_zero(registry):
    judge = build_judge(registry, "overlap")
    v = judge.judge([JudgeItem(prompt=[], response="apple", reference=None),
                     JudgeItem(prompt=[], response="apple", reference="42, !!")])
    assert [x.valid for x in v] == [False, False]
    assert all(math.isnan(x.score) for x in v)
    assert "reference" in v[0].details["error"]


def test_bad_options_fail_naming_the_key(registry):
    with pytest.raises(ConfigError, match=r"^judge\.mode: 'fuzzy'; expected f1 or exact"):
        build_judge(registry, {"name": "overlap", "mode": "fuzzy"})
    with pytest.raises(ConfigError, match=r"^judge\.mdoe: unknown key"):
        build_judge(registry, {"name": "overlap", "mdoe": "exact"})
