"""The `pop` game: its rules by hand, its corpus and config errors, the laid-out structure on the tiny model, a
round with a scripted judge, and both variants end to end (with a kill -9 and --resume on the real model)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arena.cli import main
from arena.config import resolve
from arena.errors import ArenaError, ConfigError
from arena.games.data import load_documents
from arena.games.pop import (PopGame, choose_pair, document_sentences, excerpt, grounded_rubric_problem, grounding,
                             parse_task_json, released_word_count, spread_by_length, task_problem, writer_rewards)
from arena.interfaces import Env, RoundContext
from arena.registry import load_registry
from arena.runstore import read_jsonl
from arena.types import Verdict
from tiny import kill_after_checkpoint

DOC = ("The for statement iterates over the elements of a sequence such as a string, tuple or list. The "
       "starred list expression is evaluated once and should yield an iterable object. An iterator is created "
       "for that iterable, and the suite runs once for each item the iterator provides.")


# -- the rules by hand ----------------------------------------------------------------------------------------

def test_excerpt_keeps_the_opening_words_and_line_breaks():
    assert excerpt("one two\nthree  four five", 3) == "one two\nthree"
    assert excerpt("one two", 10) == "one two"
    assert excerpt("   ", 5) == ""


def test_grounding_counts_content_words_found_in_the_document():
    # content words of the fact: iterator, created, iterable, bananas (the, for, an, is: stop words or short)
    assert grounding("An iterator is created for the iterable bananas", DOC) == pytest.approx(3 / 4)
    assert grounding("the of a", DOC) == 0.0  # no content word: nothing grounds it
    assert grounding("ITERATOR Suite", DOC) == 1.0  # case does not matter


def test_task_problem():
    def problem(question, answer="The elements of a sequence.", overlap=0.25):
        return task_problem(question, answer, DOC, overlap)

    assert problem("What does a for statement iterate over?") is None
    assert problem("  ") == "no question"
    assert problem("Why?") == "the question has fewer than 3 words"
    assert problem("What does the passage say about loops?") == "the question mentions the document"
    assert problem("According to these facts, what is a suite?") == "the question mentions the document"
    # content words: colour, bananas, iterable -> 1 of 3 in the document
    assert problem("What colour are bananas when iterable?") is None
    assert problem("What colour are bananas when iterable?", overlap=0.5) == (
        "the question is not about the document (33% of its words are in it)")
    assert problem("What does a for statement do?", " ") == "no reference answer"


def test_document_sentences():
    text = "One two three four. Five six seven eight!\n\nA heading\n\nNine ten eleven twelve? Short one.  " \
           "One two three four."
    assert document_sentences(text) == ["One two three four.", "Five six seven eight!", "Nine ten eleven twelve?"]
    assert document_sentences(text, min_words=2) == ["One two three four.", "Five six seven eight!", "A heading",
                                                     "Nine ten eleven twelve?", "Short one."]
    assert document_sentences("a b c d e f", max_words=5) == []
    assert document_sentences("It is what it is. The for loop runs once per item.") == [
        "The for loop runs once per item."]  # a sentence of stop words alone states no fact


def test_grounded_rubric_problem():
    good = [{"criterion": "Names the iterable", "gold": "an iterator is created for the iterable", "weight": 2}]
    assert grounded_rubric_problem(good, DOC, 0.5) is None
    made_up = [{"criterion": "Says colours", "gold": "bananas are yellow fruit", "weight": 2}]
    assert grounded_rubric_problem(good + made_up, DOC, 0.5) == (
        "criterion 2: the gold fact is not from the document (0% of its words are)")
    assert "gold" in grounded_rubric_problem([{"criterion": "x", "gold": "", "weight": 1}], DOC, 0.5)
    assert grounded_rubric_problem(made_up, DOC, 0.0) is None  # the check can be switched off


def test_writer_rewards_by_hand():
    assert writer_rewards(False, None, [], None, 1.0) == (-1.0, None)  # no task: no rubric was written
    assert writer_rewards(True, False, [0.5, 0.2], None, 0.5) == (None, -0.5)  # the task is not judged
    # margin = s(reference) - mean s(answers) over the scored answers: 0.9 - (0.5 + 0.2) / 2 = 0.55
    task, rubric = writer_rewards(True, True, [0.5, None, 0.2], 0.9, 1.0)
    assert task == pytest.approx(0.55) and rubric == pytest.approx(0.55)
    assert writer_rewards(True, True, [0.5], None, 1.0) == (None, None)  # the reference could not be scored
    assert writer_rewards(True, True, [None, None], 0.9, 1.0) == (None, None)


def test_choose_pair_and_its_filters():
    """The released pipeline's filters, by hand."""
    assert choose_pair([0.2, 0.9, 0.1, 0.9], [10, 12, 30, 5], 0.001, 100) == (1, 2, None)  # first best, worst
    # std on the 0-2 scale: 0.5 and 0.5004 are 1.0 and 1.0008, std 0.0004 < 0.001; 0.5 and 0.5012: 0.0012 passes
    assert choose_pair([0.5, 0.5004], [1, 1], 0.001, 100) == (
        None, None, "the scores' standard deviation 0.0004 is below 0.001 (0-2 scale)")
    assert choose_pair([0.5, 0.5012], [1, 1], 0.001, 100) == (1, 0, None)
    # the same spread over more answers: max - min 0.0012 in both, but most answers alike lowers the std
    assert choose_pair([0.5] * 9 + [0.5012], [1] * 10, 0.001, 100)[2].startswith("the scores' standard deviation")
    assert choose_pair([0.5, 0.5], [1, 1], 0.0, 100)[2] == "every answer scored alike"  # even with no minimum
    assert choose_pair([0.9, 0.1], [150, 20], 0.001, 100) == (
        None, None, "best and worst differ by 130 words (> 100)")
    assert choose_pair([0.9, 0.1], [120, 20], 0.001, 100) == (0, 1, None)  # exactly 100 words apart is kept
    # an unscorable answer is left out, not the question
    assert choose_pair([0.9, None, 0.1], [1, 1, 1], 0.001, 100) == (0, 2, None)
    assert choose_pair([0.9, None], [1, 1], 0.001, 100) == (None, None, "fewer than two answers could be scored")


def test_words_are_counted_as_the_released_pipeline_counts_them():
    assert released_word_count("a b") == 2 and released_word_count("a  b") == 3  # split on single spaces
    assert released_word_count("a\nb c") == 2


def test_spread_by_length():
    texts = ["a b c", "a", "a b c d e", "a", "", "a b"]  # by words: 1 ("a", twice), 2, 3, 5; "" is left out
    assert spread_by_length(texts, 2) == [3, 2]  # the shortest (its last copy) and the longest
    assert spread_by_length(texts, 3) == [3, 0, 2]
    assert spread_by_length(texts, 10) == [3, 5, 0, 2]
    assert spread_by_length(texts, 1) == [2] and spread_by_length(texts, 0) == []


def test_parse_task_json():
    assert parse_task_json('Sure: {"question": "What is a suite?", "answer": "A block."} done') == (
        "What is a suite?", "A block.")
    assert parse_task_json("no json") == ("", "")
    assert parse_task_json('{"question": 3}') == ("", "")
    assert parse_task_json('{"question": "cut off') == ("", "")


# -- corpus and config ----------------------------------------------------------------------------------------

def test_corpora(tmp_path):
    pydoc = load_documents("pydoc")
    assert len(pydoc) > 50 and all(d["title"] and d["text"] for d in pydoc)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": DOC, "title": "for"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_documents(str(jsonl)) == [{"title": "for", "text": DOC}, {"title": "line 3", "text": "two"}]
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.md").write_text("bee")
    (folder / "a.txt").write_text("ay")
    (folder / "c.bin").write_text("ignored")
    assert [d["title"] for d in load_documents(str(folder))] == ["a.txt", "b.md"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ArenaError, match=r"game.corpus .*bad.jsonl:2: expected an object with a string \"text\""):
        load_documents(str(bad))
    with pytest.raises(ArenaError, match="no such file or folder"):
        load_documents(str(tmp_path / "missing"))


def test_the_variant_decides_what_the_game_produces():
    registry = load_registry()
    with pytest.raises(ConfigError, match="role 'solver' produces pairs with these settings but 'grpo' learns only from rewards") as exc:
        resolve(registry, "pop", overrides=["game.variant=pairs"])
    assert exc.value.path == "optimizer.name"
    assert resolve(registry, "pop", overrides=["game.variant=pairs", "optimizer=dpo"]).config.optimizer.name == "dpo"
    with pytest.raises(ConfigError, match="role 'task_writer' produces rewards .* but 'dpo' learns only from pairs"):
        resolve(registry, "pop", overrides=["optimizer=dpo"])
    with pytest.raises(ConfigError) as exc:
        resolve(registry, "pop", overrides=["game.min_document_words=300"])
    assert exc.value.path == "game.min_document_words"


MIX = "optimizer={{name: mix, parts: [{{name: {0}, trains: [solver]}}, {{name: {1}, trains: [task_writer, rubric_writer]}}]}}"


def test_each_mix_part_fits_what_its_own_roles_produce():
    """pairs with trained writers: the solver's pairs go to dpo and the writers' rewards to grpo, never swapped."""
    registry = load_registry()
    fit = resolve(registry, "pop", overrides=["game.variant=pairs", "game.train_writers=true", MIX.format("dpo", "grpo")])
    assert [p["name"] for p in fit.tree["optimizer"]["parts"]] == ["dpo", "grpo"]
    with pytest.raises(ConfigError, match="role 'solver' produces pairs .* but 'grpo' learns only from rewards") as exc:
        resolve(registry, "pop", overrides=["game.variant=pairs", "game.train_writers=true",
                                            MIX.format("grpo", "dpo")])
    assert exc.value.path == "optimizer.parts.0.name"
    # writers that are not trained (the pairs default) need no part, and a part may not claim them
    assert resolve(registry, "pop", overrides=["game.variant=pairs", "optimizer={name: mix, parts: [{name: dpo, "
                                                                     "trains: [solver]}]}"]).config.optimizer.name == "mix"
    with pytest.raises(ConfigError, match="'task_writer' is played but never trained") as exc:
        resolve(registry, "pop", overrides=["game.variant=pairs", MIX.format("dpo", "grpo")])
    assert exc.value.path == "optimizer.parts.1.trains"


@pytest.mark.parametrize("override,key", [
    ("game.corpus=/no/such/corpus", "game.corpus"),
    ("game.eval_size=500", "game.corpus"),
    ("game.criteria=6", "game.criteria"),
    ("game.variant=offline", "game.variant"),
])
def test_bad_settings_are_one_line_naming_the_key_and_leave_no_run(tiny_config, tmp_path, capsys, override, key):
    run = Path(next(a.split("=", 1)[1] for a in tiny_config if a.startswith("run.dir=")))
    assert main(["play", "pop", *tiny_config, override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err, err
    assert not run.exists()


def test_pairs_with_trained_writers_needs_an_optimizer_for_both_kinds(tiny_config, capsys):
    registry = load_registry()
    for optimizer in ("optimizer=dpo", "optimizer=grpo"):  # one kind would be played and never trained
        with pytest.raises(ConfigError, match=r"role '\w+' produces (pairs|rewards) with these settings but") as exc:
            resolve(registry, "pop", overrides=["game.variant=pairs", "game.train_writers=true", optimizer])
        assert exc.value.path == "optimizer.name"
    mix = ("optimizer={name: mix, parts: [{name: dpo, trains: [solver]}, "
           "{name: grpo, trains: [task_writer, rubric_writer]}]}")
    resolved = resolve(registry, "pop", overrides=["game.variant=pairs", "game.train_writers=true", mix])
    assert resolved.config.optimizer.name == "mix"
    run = Path(next(a.split("=", 1)[1] for a in tiny_config if a.startswith("run.dir=")))
    assert main(["play", "pop", *tiny_config, "game.variant=pairs", "game.train_writers=true", "optimizer=dpo"]) == 2
    assert "optimizer.name" in capsys.readouterr().err and not run.exists()


# -- the game on the tiny model -------------------------------------------------------------------------------

@pytest.fixture()
def corpus(tmp_path) -> Path:
    words = DOC.split()
    rows = [{"title": f"doc {i}", "text": " ".join(random.Random(i).sample(words, len(words)))} for i in range(6)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_game(tiny_model_dir, corpus, *overrides):
    registry = load_registry()
    config = resolve(registry, "pop", overrides=[f"model.path={tiny_model_dir}", "model.dtype=float32",
                                                 f"game.corpus={corpus}", "game.min_document_words=10",
                                                 "game.eval_size=2", *overrides]).config
    env = Env(config=config, registry=registry)
    env.policy = registry.build("backend", config.backend, env)
    return env, registry.build("game", config.game, env)


def scripted_score(text):
    """A response's length / 100 (at most 1), or None (invalid) when its length is a multiple of 7."""
    return None if len(text) % 7 == 0 else min(1.0, len(text) / 100)


class LengthJudge:
    """Scores by `scripted_score`, so a round's arithmetic can be checked by hand."""

    def __init__(self):
        self.items = []

    def judge(self, items):
        self.items += items
        return [Verdict.invalid("scripted") if scripted_score(item.response) is None
                else Verdict(scripted_score(item.response)) for item in items]


def test_the_laid_out_structure_always_gives_a_readable_task_and_rubric(tiny_model_dir, corpus):
    """Random weights write nonsense, yet every form has every field and a weight in [1, 5]: the rubric is always
    read; what is invalid is so for a stated reason."""
    env, game = make_game(tiny_model_dir, corpus, "game.criteria=3", "game.min_gold_overlap=0")
    ctx = RoundContext(iteration=1, policy=env.policy, judge=None, rng=random.Random(0), env=env)
    problems = game.write_tasks(ctx, game.train_documents * 2)
    for p in problems:
        assert set(p.task_form.fields) == {"question", "answer"}
        assert [k for k, _ in p.task_form.steps] == ["question", "answer"]
        assert p.task_error == task_problem(p.question, p.reference, p.document["text"], 0.25)
        p.question = p.question or "What does the for statement do?"  # rubrics for every form, valid task or not
        p.answers = env.policy.generate([game.solver_prompt(p.question)], n=2, max_new_tokens=8)[0]
    game.write_rubrics(ctx, problems)
    for p in problems:
        assert len(p.written_rubric) == 3
        assert all(1.0 <= c["weight"] <= 5.0 for c in p.written_rubric)
        assert set(p.rubric_form.fields) == {f"{k} {i}" for k in ("criterion", "gold") for i in (1, 2, 3)}
        assert (p.rubric is None) == (p.rubric_error is not None)
        if p.rubric_error:
            assert "criterion" in p.rubric_error
        for _, gen in p.rubric_form.steps:  # each field ends at its line break, the break token kept
            assert gen.truncated or "\n" in gen.text or gen.completion_ids[-1] in env.policy.eos_ids


def test_a_round_with_a_scripted_judge_by_hand(tiny_model_dir, corpus):
    env, game = make_game(tiny_model_dir, corpus, "game.min_question_overlap=0", "game.documents_per_round=3",
                          "game.answers=3", "game.field_max_new_tokens=6", "game.solver_max_new_tokens=12",
                          "game.train_writers=true")
    judge = LengthJudge()
    ctx = RoundContext(iteration=4, policy=env.policy, judge=judge, rng=random.Random(0), env=env)
    samples = game.play(ctx)
    by_role = {r: [s for s in samples if s.role == r] for r in game.roles}
    assert len(by_role["task_writer"]) == 3 * 2  # two fields per task
    judged = 0
    for i in range(3):
        task = [s for s in by_role["task_writer"] if s.metadata["problem"] == i]
        rubric = [s for s in by_role["rubric_writer"] if s.metadata["problem"] == i]
        answers = [s for s in by_role["solver"] if s.metadata["problem"] == i]
        meta = task[0].metadata
        if meta["task_error"]:
            assert {s.reward for s in task} == {-1.0} and not rubric and not answers
            continue
        assert len(answers) == 3 and len(rubric) == 2  # a criterion line each; gold facts are chosen, not written
        if meta["rubric_error"]:
            assert {s.reward for s in task} == {None} and {s.reward for s in rubric} == {-1.0}
            assert all(s.reward is None for s in answers)  # nothing to grade with: never trained as a 0
            continue
        mine = [item for item in judge.items if item.metadata["document"] == meta["document"]]
        assert [item.response for item in mine] == [s.completion for s in answers] + [meta["reference_answer"]]
        assert all(item.metadata["rubric"] == meta["rubric"] for item in mine)
        scores = [s.reward for s in answers]
        assert scores == [scripted_score(s.completion) for s in answers]
        ref, valid = scripted_score(meta["reference_answer"]), [x for x in scores if x is not None]
        expected = None if ref is None or not valid else ref - sum(valid) / len(valid)
        for s in task + rubric:
            assert s.reward == (None if expected is None else pytest.approx(expected))
        judged += 1
        assert {s.group for s in answers} == {f"4:{i}"}
    assert judged > 0  # the by-hand path was taken
    assert 0.0 <= ctx.metrics["pop/valid_tasks"] <= 1.0 and "problem" in ctx.notes


def test_written_gold_facts_are_lines_the_model_fills(tiny_model_dir, corpus):
    env, game = make_game(tiny_model_dir, corpus, "game.gold=write", "game.criteria=2")
    ctx = RoundContext(iteration=1, policy=env.policy, judge=None, rng=random.Random(0), env=env)
    (p,) = game.write_tasks(ctx, game.train_documents[:1])
    p.question, p.answers = "What does the for statement do?", []
    game.write_rubrics(ctx, [p])
    assert [k for k, _ in p.rubric_form.steps] == ["criterion 1", "gold 1", "criterion 2", "gold 2"]
    assert [c["gold"] for c in p.written_rubric] == [p.rubric_form.fields["gold 1"], p.rubric_form.fields["gold 2"]]
    # random weights write words from all over the vocabulary: not from the document, and said so
    assert p.rubric is None and "the gold fact is not from the document" in p.rubric_error


def test_a_chosen_gold_fact_is_the_models_likeliest_sentence_when_greedy(tiny_model_dir, corpus):
    """The choice scores all sentences in one batch with the prompt's forward shared: it must pick what scoring
    each sentence on its own, one unshared forward each, finds likeliest by mean log-prob."""
    import torch

    from arena.games.pop import GOLD_LABEL

    env, game = make_game(tiny_model_dir, corpus, "game.criteria=1")
    policy = env.policy
    ctx = RoundContext(iteration=1, policy=policy, judge=None, rng=random.Random(0), env=env)
    problems = game.write_tasks(ctx, game.train_documents[:2])
    for p in problems:
        p.question, p.answers = "What does the for statement do?", []
    seen = []
    score = policy.sequence_logprobs

    def spy(prompt_ids, completion_ids, **kw):
        seen.append(prompt_ids[0])
        return score(prompt_ids, completion_ids, **kw)

    policy.sequence_logprobs = spy
    game.write_rubrics(ctx, problems, greedy=True)
    policy.sequence_logprobs = score
    assert len(seen) == len(problems)
    for p, prompt in zip(problems, seen):
        sentences = document_sentences(p.document["text"])
        assert prompt[-len(policy.encode(GOLD_LABEL)):] == policy.encode(GOLD_LABEL)
        assert p.rubric_form.ids[:len(prompt)] == prompt  # the form went on from where the choice was made
        means = []
        for x in sentences:
            ids = policy.encode(" " + x)
            with torch.no_grad():
                means.append(float(policy.sequence_logprobs([prompt], [ids]).sum()) / len(ids))
        assert p.written_rubric[0]["gold"] == sentences[max(range(len(means)), key=means.__getitem__)]
        assert 1.0 <= p.written_rubric[0]["weight"] <= 5.0


def test_json_structure_reads_replies_and_says_why_not(tiny_model_dir, corpus):
    env, game = make_game(tiny_model_dir, corpus, "game.structure=json", "game.json_max_new_tokens=8")
    ctx = RoundContext(iteration=1, policy=env.policy, judge=None, rng=random.Random(0), env=env)
    problems = game.write_tasks(ctx, game.train_documents[:2])
    assert [k for p in problems for k, _ in p.task_form.steps] == ["reply", "reply"]
    assert all(p.task_error == "no question" for p in problems)  # 8 random tokens are no JSON object
    for p in problems:
        p.question, p.reference, p.answers = "What does the for statement do?", "It iterates.", []
    game.write_rubrics(ctx, problems)
    for p in problems:
        assert p.rubric is None and p.written_rubric is None
        assert p.rubric_error.startswith(("no JSON rubric", "not JSON"))


def test_held_out_problems_are_written_once_and_kept_in_the_game_state(tiny_model_dir, corpus, monkeypatch):
    import arena.games.pop as pop

    monkeypatch.setattr(pop, "task_problem", lambda *args: None)  # the tiny model's greedy questions are too short
    env, game = make_game(tiny_model_dir, corpus, "game.eval_size=3")
    judge = LengthJudge()
    ctx = RoundContext(iteration=0, policy=env.policy, judge=judge, rng=random.Random(0), env=env)
    first = game.evaluate(ctx)
    problems = game.eval_problems
    assert first["problems"] == len(problems) == 3 and not game.eval_rejected
    assert [e["document"] for e in problems] == [d["title"] for d in game.eval_documents
                                                 if all(not r.startswith(d["title"] + ":") for r in game.eval_rejected)]
    items = list(judge.items)
    assert [i.metadata["rubric"] for i in items] == [e["rubric"] for e in problems]
    # greedy answers, the same rubrics: the same scores on a second evaluation, and after a restart from the state
    assert game.evaluate(ctx) == first and game.eval_problems is problems
    _, fresh = make_game(tiny_model_dir, corpus, "game.eval_size=3")
    fresh.load_state_dict(json.loads(json.dumps(game.state_dict())))
    assert fresh.eval_problems == problems
    valid = [v for v in (scripted_score(i.response) for i in items) if v is not None]
    assert first["valid_frac"] == len(valid) / 3
    per_item = game.evaluate_items(ctx)  # what the means come from: one entry per problem (score: None if invalid)
    assert per_item["valid_frac"] == [0.0 if scripted_score(i.response) is None else 1.0 for i in items]
    assert [s is None for s in per_item["score"]] == [scripted_score(i.response) is None for i in items]
    assert [s for s in per_item["score"] if s is not None] == pytest.approx(valid) and per_item["problems"] == 3.0
    assert first.get("score") == (pytest.approx(sum(valid) / len(valid)) if valid else None)


def pop_args(tiny_config, corpus, *more):
    return ["play", "pop", *tiny_config, f"game.corpus={corpus}", "game.min_document_words=10", "game.eval_size=2",
            "game.min_question_overlap=0", "game.documents_per_round=2", "game.answers=2",
            "game.field_max_new_tokens=6", "game.solver_max_new_tokens=6", "run.eval_every=2", *more]


@pytest.mark.parametrize("variant", ["online", "pairs"])
def test_both_variants_play_train_and_resume_exactly(tiny_config, corpus, tmp_path, capsys, variant):
    more = ["game.variant=pairs", "optimizer=dpo", "game.min_score_std=0"] if variant == "pairs" else []
    run = Path(next(a.split("=", 1)[1] for a in tiny_config if a.startswith("run.dir=")))
    assert main(pop_args(tiny_config, corpus, "run.iterations=3", *more)) == 0
    out = capsys.readouterr().out
    assert "pop/valid_tasks" in out and "problem: [doc" in out
    samples = list(read_jsonl(run / "samples.jsonl"))
    metrics = list(read_jsonl(run / "metrics.jsonl"))
    assert [m["iteration"] for m in metrics] == [0, 1, 2, 3]
    assert "eval/problems" in metrics[0] and "pop/valid_tasks" in metrics[1]
    for m in metrics[1:]:  # a share of the rubrics written: absent only where no task was posed
        assert ("pop/valid_rubrics" in m) == (m["pop/valid_tasks"] > 0)
    trained = {s["role"] for s in samples if s["trained"]}
    if variant == "online":
        assert {"solver", "task_writer", "rubric_writer"} >= trained and "solver" in trained
        assert "kl" in metrics[1]
    else:
        assert trained <= {"solver"}
        pairs = [s for s in samples if s["metadata"].get("pair")]
        assert pairs and "margin" in metrics[1]
        for it in range(1, 4):
            for group in {s["group"] for s in pairs if s["iteration"] == it}:
                pair = {s["metadata"]["pair"]: s for s in pairs if s["group"] == group and s["iteration"] == it}
                assert set(pair) == {"chosen", "rejected"} and pair["chosen"]["reward"] > pair["rejected"]["reward"]
    cut = tmp_path / "cut"
    args = [a if not a.startswith("run.dir=") else f"run.dir={cut}" for a in tiny_config]
    assert main(pop_args(args, corpus, "run.iterations=2", *more)) == 0
    assert main(["play", "pop", "--resume", str(cut), "run.iterations=3"]) == 0
    capsys.readouterr()
    assert [s["completion"] for s in read_jsonl(cut / "samples.jsonl")] == [s["completion"] for s in samples]
    assert [m.get("eval/score") for m in read_jsonl(cut / "metrics.jsonl")] == [m.get("eval/score") for m in metrics]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["online", "pairs"])
def test_each_variant_on_the_embedded_model_killed_and_resumed(tmp_path, variant):
    """The real model writes tasks and rubrics and is judged on the default corpus; kill -9 after the first
    checkpoint, resume, and the run finishes with every round once and the held-out score at both ends."""
    run = tmp_path / "run"
    more = ["game.variant=pairs", "optimizer=dpo"] if variant == "pairs" else []
    kill_after_checkpoint(["play", "pop", f"run.dir={run}", "run.iterations=2", "run.eval_every=2",
                           "run.loggers=[plain]", "game.documents_per_round=2", "game.answers=2", "game.eval_size=2",
                           "game.field_max_new_tokens=16", "game.solver_max_new_tokens=16", *more], run,
                          timeout=600)
    done = subprocess.run([sys.executable, "-m", "arena", "play", "pop", "--resume", str(run)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    samples = list(read_jsonl(run / "samples.jsonl"))
    assert sorted({s["iteration"] for s in samples}) == [1, 2]
    assert all(s["metadata"]["problem"] in (0, 1) for s in samples)
    assert sum(s["role"] == "task_writer" for s in samples) == 2 * 2 * 2  # two lines, two documents, two rounds
    metrics = list(read_jsonl(run / "metrics.jsonl"))
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    assert metrics[0]["eval/problems"] == metrics[2]["eval/problems"]
    for m in metrics[1:]:
        assert 0.0 <= m["pop/valid_tasks"] <= 1.0 and 0.0 <= m.get("pop/valid_rubrics", 0.0) <= 1.0
    for s in samples:
        if s["role"] == "solver" and s["reward"] is not None:
            assert 0.0 <= s["reward"] <= 1.0 and len(s["metadata"]["verdict"]["ratings"]) == 2


def test_each_line_continues_from_the_exact_tokens_before_it(tiny_model_dir, corpus):
    """A filled line's sample was conditioned on the form so far plus its label; the form goes on from what the
    model wrote (an end token dropped) and a line break."""
    from arena.games.pop import ANSWER_LABEL, QUESTION_LABEL

    env, game = make_game(tiny_model_dir, corpus)
    policy = env.policy
    ctx = RoundContext(iteration=1, policy=policy, judge=None, rng=random.Random(0), env=env)
    for p in game.write_tasks(ctx, game.train_documents * 2):
        (_, question), (_, answer) = p.task_form.steps
        assert question.prompt_ids == policy.encode_chat(p.task_form.prompt) + policy.encode(QUESTION_LABEL)
        written = [t for t in question.completion_ids if t not in policy.eos_ids]
        line = question.prompt_ids + written
        if not policy.decode(written).endswith("\n"):
            line += policy.encode("\n")
        assert answer.prompt_ids == line + policy.encode(ANSWER_LABEL)
        assert p.task_form.ids[:len(answer.prompt_ids)] == answer.prompt_ids


def test_held_out_documents_without_a_valid_problem_are_reported(tiny_model_dir, corpus):
    """The tiny model's greedy questions fail validation: each held-out document is left out with its reason, a
    warning says so, and the evaluation reports no problems instead of a score."""
    from arena.errors import ArenaWarning

    env, game = make_game(tiny_model_dir, corpus, "game.eval_size=2")
    ctx = RoundContext(iteration=0, policy=env.policy, judge=LengthJudge(), rng=random.Random(0), env=env)
    with pytest.warns(ArenaWarning, match="none of the 2 held-out documents gave a valid question and rubric"):
        assert game.evaluate(ctx) == {"problems": 0.0}
    assert game.eval_problems == [] and len(game.eval_rejected) == 2
    assert all(r.split(": ", 1)[0] in {d["title"] for d in game.eval_documents} for r in game.eval_rejected)


def test_a_resume_on_other_documents_is_refused(tiny_model_dir, corpus, tmp_path):
    _, game = make_game(tiny_model_dir, corpus)
    state = game.state_dict()
    game.load_state_dict(state)  # the same documents: fine
    other = tmp_path / "other.jsonl"
    other.write_text(corpus.read_text().replace("iterable", "iterables"))
    _, moved = make_game(tiny_model_dir, other)
    with pytest.raises(ArenaError, match="its documents differ from those the run started with"):
        moved.load_state_dict(state)


def test_the_initial_sampler_writes_and_answers_with_the_starting_model(tiny_model_dir, corpus, monkeypatch):
    """sampler=initial (the released pipeline's data): every generation of a round runs on the starting model
    (reference=True), the writers greedily; so after a DPO step has moved the adapter, the same document gives
    the same question, rubric lines and (seeded) answers as before the step. (The tiny random model's greedy
    question is a row of colons: every task is accepted here, so that the round reaches answers and rubrics.)"""
    import arena.games.pop as pop
    from arena.plugins.optimizers.dpo import DPO, DPOOptions

    monkeypatch.setattr(pop, "task_problem", lambda *args: None)

    env, game = make_game(tiny_model_dir, corpus, "game.variant=pairs", "optimizer=dpo", "game.sampler=initial",
                          "game.min_question_overlap=0", "game.min_gold_overlap=0", "game.documents_per_round=4",
                          "game.answers=3", "game.field_max_new_tokens=12", "game.solver_max_new_tokens=8",
                          "game.min_score_std=0", "game.max_length_gap=1000")
    calls = []
    real_generate = env.policy.generate

    def spy(prompts, **kw):
        calls.append((kw.get("reference", False), kw.get("greedy", False)))
        return real_generate(prompts, **kw)

    env.policy.generate = spy

    def round_on_first_document():
        game.cursor = 0
        torch.manual_seed(5)
        ctx = RoundContext(iteration=1, policy=env.policy, judge=LengthJudge(), rng=random.Random(0), env=env)
        return game.play(ctx)

    first = round_on_first_document()
    assert calls and all(reference is True for reference, _ in calls)
    assert [greedy for _, greedy in calls].count(False) == 1  # only the answers are sampled; writer lines greedy
    assert [s for s in first if s.metadata.get("pair")]  # the round gave pairs to learn from
    DPO(DPOOptions(lr=0.5), env).step(first, game.roles)  # a large step: the adapter moves
    again = round_on_first_document()
    assert [(s.role, s.completion) for s in again] == [(s.role, s.completion) for s in first]


def test_the_initial_sampler_is_for_pairs_only(capsys):
    assert main(["config", "pop", "game.sampler=initial"]) == 2
    err = capsys.readouterr().err
    assert "game.sampler: initial: the starting model's samples are learnt from as pairs only" in err
