"""The `pop` game: rubric self-play grounded in a corpus (POP: Huang, Chou, Zhang, Cardie, arXiv 2604.20051).

From a document, one model plays four parts:
  task writer    sees the document; writes a self-contained question and a reference answer from its facts;
  solver         sees only the question; writes `answers` answers;
  rubric writer  sees the document, the question, the reference and a spread of the answers; writes a rubric of
                 weighted criteria, each with a gold fact taken from the document;
  judge          rates each answer on each criterion 0, 1 or 2 against its gold fact (the `rubric` judge):
                 score = Σ w·rating / (2·Σ w).
The gold facts come from the document the solver never sees: the gap between generating and verifying that the
game exploits. Two variants: `online` trains the solver with GRPO on the score (the answers to one question share
a baseline); `pairs` (the paper's released pipeline) hands the pairwise optimizer the best and the worst answer of
each question that passes the filters (`choose_pair`).

Small models rarely write valid JSON, so by default the framework lays the structure out and the model fills one
line per field (`structure: fields`): "Question:", "Answer:", then per criterion "Criterion k:", "Gold fact:"
and a weight read from the model's probabilities of the digits 1-5. Every field is its own sample, all of a
part's fields sharing its reward. `structure: json` asks for the paper's JSON instead, for larger models.

With `train_writers`, both writers learn from the reference margin: the rubric score of the reference answer
(written with the document) minus the mean score of the solver's answers (written without it). A task and rubric
that make the document matter earn a high margin; a rubric that rates everything alike earns 0. An invalid task
or rubric earns -format_penalty. Rules as plain arithmetic: `task_problem`, `grounding`, `writer_rewards`,
`choose_pair`; docs/pop.md has them all.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from arena.config import option
from arena.errors import ArenaError, ArenaWarning, ConfigError
from arena.games.data import data_checked, held_out_split, load_documents
from arena.games.prompts import TEMPERATURE_HINT
from arena.hookspecs import hookimpl
from arena.interfaces import Env, Game, RoundContext
from arena.rubrics import MAX_CRITERIA, Criterion, first_json, parse_rubric, rubric_problem
from arena.types import Generation, JudgeItem, Messages, Role, Sample, Verdict, chat, verdict_items

VARIANTS = ("online", "pairs")
STRUCTURES = ("fields", "json")
WEIGHTS = (1, 2, 3, 4, 5)
# The lines the framework lays out (structure: fields); the model fills the rest of each line.
QUESTION_LABEL, ANSWER_LABEL = "Question:", "Answer:"
CRITERION_LABEL, GOLD_LABEL, WEIGHT_LABEL = "Criterion {k}:", "Gold fact:", "Weight (1-5): "

TASK_PROMPT = """Here are some facts.

{document}

Write a quiz question that tests one of these facts, and its correct answer. Someone taking the quiz will not see \
the facts above.{format}"""

TASK_JSON = """ Reply with JSON only: {"question": "...", "answer": "..."}"""

RUBRIC_PROMPT = """Read this document, a question about it and its correct answer.

<document>
{document}
</document>

Question: {question}
Correct answer: {reference}
{answers}
Write a grading rubric for answers to the question: {criteria} specific criteria that tell a correct, complete \
answer from a poor one. Give each a gold fact, a fact from the document that a good answer states, and a weight \
from 1 to 5.{format}"""

RUBRIC_JSON = """ Reply with JSON only: a list of 1 to 5 objects {"criterion": "...", "gold": "...", "weight": 3}."""

# Phrases by which a question gives away that it was written from a text the solver cannot see.
MENTIONS_SOURCE = re.compile(r"\b(the|this|these|those|given|above|following) (document|passage|text|article|"
                             r"excerpt|reading|facts?|notes?)\b", re.IGNORECASE)
STOPWORDS = frozenset("""the and for are but not you all any can had her was one our out has his how its may new now
old see two way who did get him let say she too use that with have this will your from they been were what when
which their there then than them these those into also only such more most some other over each very just about
would could should does done""".split())


@dataclass
class PopOptions:
    variant: str = option("online", choices=VARIANTS)  # online: GRPO on the score; pairs: best vs worst answer
    # whose samples a round trains on. policy: the model as it is now (on-policy); initial: the starting model
    # (adapter off) writing greedily, as the released pipeline samples its whole data set once before one DPO
    # epoch (pairs only)
    sampler: str = option("policy", choices=("policy", "initial"))
    corpus: str = "pydoc"  # pydoc (Python's language reference), a JSONL file of {"text": ...}, or a text folder
    min_document_words: int = option(50, ge=1)  # shorter documents are left out
    max_document_words: int = option(192, ge=1)  # the opening of each document the writers see (paper: ~1024)
    documents_per_round: int = option(4, ge=1)  # one question per document
    answers: int = option(4, ge=2)  # solver answers per question; they share a baseline (online) or give a pair
    structure: str = option("fields", choices=STRUCTURES)  # fields: the framework lays out the lines; json: free
    criteria: int = option(2, ge=1, le=MAX_CRITERIA)  # fields: criteria per rubric (two specific ones beat five)
    shown_answers: int = option(2, ge=0)  # candidate answers the rubric writer sees, spread by length
    # fields: how a gold fact is filled. choose: the model picks one of the document's sentences by its own
    # probabilities (always from the document); write: it writes the line, checked by min_gold_overlap
    gold: str = option("choose", choices=("choose", "write"))
    min_gold_overlap: float = option(0.5, ge=0.0, le=1.0)  # share of a gold fact's words found in the document
    min_question_overlap: float = option(0.25, ge=0.0, le=1.0)  # and of a question's: it must be about the document
    # train both writers too, on the reference margin; None: yes for online, no for pairs (the released pipeline)
    train_writers: Optional[bool] = None
    format_penalty: float = option(1.0, ge=0.0)  # a writer's reward for an invalid task or rubric is minus this
    # pairs, the released filters: a question whose scores (0-2 scale) have a smaller standard deviation gives no
    # pair; nor one whose best and worst answers differ by more words
    min_score_std: float = option(0.001, ge=0.0)
    max_length_gap: int = option(100, ge=0)
    field_max_new_tokens: int = option(48, ge=1)  # fields: the most tokens of one line
    json_max_new_tokens: int = option(256, ge=1)  # json: the most tokens of a writer's reply
    solver_max_new_tokens: int = option(64, ge=1)
    temperature: float = option(0.7, gt=0.0, hint=TEMPERATURE_HINT)
    top_p: float = option(1.0, gt=0.0, le=1.0)
    system_prompt: Optional[str] = None  # the solver's system message, if any
    eval_size: int = option(8, ge=0)  # held-out documents, each with a fixed question and rubric; 0: no eval
    max_answer_chars: int = option(400, ge=1)  # how much of each shown answer the rubric writer reads

    def check(self) -> None:
        if self.sampler == "initial" and (self.variant != "pairs" or self.train_writers):
            raise ConfigError("sampler", "initial: the starting model's samples are learnt from as pairs only; set "
                                         "game.variant=pairs and leave game.train_writers off")
        if self.min_document_words > self.max_document_words:
            raise ConfigError("min_document_words", f"{self.min_document_words} is more than max_document_words "
                                                    f"({self.max_document_words})")


# -- the rules, as plain arithmetic ---------------------------------------------------------------------------

def excerpt(text: str, max_words: int) -> str:
    """The opening `max_words` words of a document, its line breaks kept."""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    return text[:ends[min(max_words, len(ends)) - 1]].strip() if ends else ""


def content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9_]+", text.lower()) if len(w) >= 3 and w not in STOPWORDS]


def grounding(fact: str, document: str) -> float:
    """Share of a gold fact's content words (3+ letters, not stop words) that occur in the document; 0 when it has
    none. A rubric's facts must come from the document, or its gold says nothing the solver could not guess."""
    words = content_words(fact)
    if not words:
        return 0.0
    known = set(content_words(document))
    return sum(w in known for w in words) / len(words)


def document_sentences(text: str, min_words: int = 4, max_words: int = 60) -> list[str]:
    """The document's sentences (split at . ! ? and at blank lines, whitespace folded) of `min_words` to
    `max_words` words with a content word, in order, each once: the gold facts a rubric writer may choose from."""
    parts = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    sentences = [" ".join(p.split()) for p in parts]
    return list(dict.fromkeys(x for x in sentences if min_words <= len(x.split()) <= max_words and content_words(x)))


def task_problem(question: str, answer: str, document: str, min_overlap: float) -> str | None:
    """Why a written task cannot be used (None when it can): no question, a question of fewer than 3 words, one
    that mentions its source, one about something else (less than `min_overlap` of its content words occur in the
    document), or no reference answer."""
    if not question.strip():
        return "no question"
    if len(question.split()) < 3:
        return "the question has fewer than 3 words"
    if MENTIONS_SOURCE.search(question):
        return "the question mentions the document"
    share = grounding(question, document)
    if share < min_overlap:
        return f"the question is not about the document ({share:.0%} of its words are in it)"
    if not answer.strip():
        return "no reference answer"
    return None


def grounded_rubric_problem(rubric: list[dict[str, Any]], document: str, min_overlap: float) -> str | None:
    """`rubric_problem`, then whether each gold fact comes from the document."""
    problem = rubric_problem(rubric)
    if problem:
        return problem
    for k, c in enumerate(rubric, 1):
        share = grounding(c["gold"], document)
        if share < min_overlap:
            return f"criterion {k}: the gold fact is not from the document ({share:.0%} of its words are)"
    return None


def writer_rewards(task_ok: bool, rubric_ok: bool | None, answer_scores: Sequence[float | None],
                   reference_score: float | None, format_penalty: float) -> tuple[float | None, float | None]:
    """(task writer, rubric writer) rewards. An invalid task: -format_penalty and no rubric (None). A valid task
    with an invalid rubric: the task is not judged (None), the rubric writer gets -format_penalty. Both valid: the
    reference margin s(reference) - mean s(answers) for both, over the answers the judge could score; None when
    the reference or every answer could not be scored."""
    if not task_ok:
        return -format_penalty, None
    if not rubric_ok:
        return None, -format_penalty
    scored = [s for s in answer_scores if s is not None]
    if reference_score is None or not scored:
        return None, None
    margin = reference_score - sum(scored) / len(scored)
    return margin, margin


def choose_pair(scores: Sequence[float | None], words: Sequence[int], min_std: float,
                max_length_gap: int) -> tuple[int | None, int | None, str | None]:
    """(best, worst, None), the indices of the first highest and first lowest scored answer, or (None, None, why
    not). The released pipeline's filters: answers the judge could not score are left out (two scored ones are
    needed); a question whose scores, on the rubric's 0-2 scale, have a (population) standard deviation below
    `min_std` gives no pair; nor one whose best and worst answers differ by more than `max_length_gap` words
    (the judge may be rating length; `words` as the caller counts them)."""
    scored = [i for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return None, None, "fewer than two answers could be scored"
    best = max(scored, key=lambda i: (scores[i], -i))
    worst = min(scored, key=lambda i: (scores[i], i))
    if scores[best] == scores[worst]:
        return None, None, "every answer scored alike"
    std = statistics.pstdev(2 * scores[i] for i in scored)  # scores are on [0, 1]; the rubric's scale is 0-2
    if std < min_std:
        return None, None, f"the scores' standard deviation {std:.3g} is below {min_std} (0-2 scale)"
    gap = abs(words[best] - words[worst])
    if gap > max_length_gap:
        return None, None, f"best and worst differ by {gap} words (> {max_length_gap})"
    return best, worst, None


def released_word_count(text: str) -> int:
    """Words as the released pipeline counts them for the length filter: split on single spaces."""
    return len(text.split(" "))


def spread_by_length(texts: Sequence[str], k: int) -> list[int]:
    """Indices of up to k distinct texts spread from the shortest to the longest: what the rubric writer sees."""
    distinct = list({t.strip(): i for i, t in enumerate(texts) if t.strip()}.values())
    distinct.sort(key=lambda i: (len(texts[i].split()), i))
    if k <= 0 or not distinct:
        return []
    if k >= len(distinct):
        return distinct
    if k == 1:
        return [distinct[-1]]
    return [distinct[round(j * (len(distinct) - 1) / (k - 1))] for j in range(k)]


def parse_task_json(text: str) -> tuple[str, str]:
    """(question, answer) from a JSON object in a model's reply; empty strings where it has none."""
    value, _ = first_json(text)
    if not isinstance(value, dict):
        return "", ""
    question, answer = value.get("question"), value.get("answer")
    return (question if isinstance(question, str) else "", answer if isinstance(answer, str) else "")


def trains_writers(options: PopOptions) -> bool:
    return options.train_writers if options.train_writers is not None else options.variant == "online"


# -- forms: the structure the framework lays out --------------------------------------------------------------

@dataclass
class Form:
    """One writer's reply being filled: the tokens so far (prompt, labels and filled fields) and, per generated
    field, the prompt it continued and what the model wrote."""

    prompt: Messages
    ids: list[int]
    fields: dict[str, str] = field(default_factory=dict)
    steps: list[tuple[str, Generation]] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass
class Problem:
    """A document's question through the round: task, answers, rubric and scores."""

    document: dict[str, str]
    task_form: Form
    question: str = ""
    reference: str = ""
    task_error: str | None = None
    answers: list[Generation] = field(default_factory=list)
    rubric_form: Form | None = None
    written_rubric: list[dict[str, Any]] | None = None  # as read from the writer's reply (None: unreadable)
    rubric: list[dict[str, Any]] | None = None  # the written rubric when it passed validation
    rubric_error: str | None = None
    verdicts: list[Verdict] = field(default_factory=list)  # one per answer, then the reference's
    pair: tuple[int | None, int | None, str | None] = (None, None, None)

    @property
    def scores(self) -> list[float | None]:
        return [v.score if v.valid else None for v in self.verdicts[:len(self.answers)]]

    @property
    def reference_score(self) -> float | None:
        v = self.verdicts[len(self.answers)] if len(self.verdicts) > len(self.answers) else None
        return v.score if v is not None and v.valid else None

    def writer_rewards(self, format_penalty: float) -> tuple[float | None, float | None]:
        return writer_rewards(self.task_error is None, self.rubric is not None, self.scores, self.reference_score,
                              format_penalty)


class PopGame(Game):
    """POP: write a task and a rubric from a document, answer the task blind, grade by the rubric."""

    Options = PopOptions
    role_names = ("task_writer", "solver", "rubric_writer")

    @classmethod
    def freezes(cls, options: Any, name: str) -> bool:
        return False  # no frozen adapters: an optimizer's reference can only be the base model
    defaults = {"judge": {"name": "rubric"}, "run": {"iterations": 10, "eval_every": 5},
                "optimizer": {"name": "grpo", "lr": 2e-5}}
    headline_metrics = ("pop/valid_tasks", "pop/valid_rubrics", "pop/score", "pop/margin", "pop/pairs")

    @classmethod
    def produced_by_role(cls, options: PopOptions) -> dict[str, frozenset[str]]:
        writers = frozenset({"rewards"}) if trains_writers(options) else frozenset()
        solver = frozenset({"rewards" if options.variant == "online" else "pairs"})
        return {"task_writer": writers, "solver": solver, "rubric_writer": writers}

    @classmethod
    def check_options(cls, options: PopOptions, registry: Any, path: str) -> None:
        with data_checked(path):  # the corpus and its contents, as play reads them
            cls.split(options, cls.documents(options), 0)

    @staticmethod
    def documents(options: PopOptions) -> list[dict[str, str]]:
        """The corpus's documents long enough to write from, each cut to `max_document_words`."""
        return [{"title": d["title"], "text": excerpt(d["text"], options.max_document_words)}
                for d in load_documents(options.corpus) if len(d["text"].split()) >= options.min_document_words]

    @staticmethod
    def split(options: PopOptions, documents: list[dict[str, str]], seed: int) -> tuple[list[dict], list[dict]]:
        """(held-out, training) documents, distinct by text, split by a shuffle fixed by `seed`."""
        return held_out_split(documents, options.eval_size, seed, options.corpus,
                              f"documents of at least {options.min_document_words} words", key="corpus",
                              field="text")

    def __init__(self, options: PopOptions, env: Env):
        super().__init__(options, env)
        documents = self.documents(options)
        # what the checkpoints' cursor and held-out problems refer to: `pydoc` changes with the Python version
        self.corpus_digest = hashlib.sha256(json.dumps(documents).encode()).hexdigest()[:16]
        self.eval_documents, self.train_documents = self.split(options, documents, env.config.run.seed)
        self.cursor = 0
        self.eval_problems: list[dict[str, Any]] | None = None  # written once, at the first evaluation
        self.eval_rejected: list[str] = []
        writer = dict(max_new_tokens=options.field_max_new_tokens if options.structure == "fields"
                      else options.json_max_new_tokens, temperature=options.temperature, top_p=options.top_p,
                      trained=trains_writers(options))
        self._roles = {
            "task_writer": Role("task_writer", **writer),
            "solver": Role("solver", max_new_tokens=options.solver_max_new_tokens, temperature=options.temperature,
                           top_p=options.top_p),
            "rubric_writer": Role("rubric_writer", **writer),
        }

    @property
    def roles(self) -> dict[str, Role]:
        return self._roles

    # -- writing ----------------------------------------------------------------------------------------------

    def _fill(self, ctx: RoundContext, role: Role, forms: Sequence[Form], label: str, key: str, greedy: bool,
              reference: bool) -> None:
        """Write `label` into every form and let the model fill the rest of the line, all forms in one batch. The
        form goes on from the exact tokens the model wrote, less an end token, on a new line."""
        policy = ctx.policy
        prompts = [f.ids + policy.encode(label) for f in forms]
        with ctx.phase("generate"):
            gens = policy.generate(prompts, n=1, max_new_tokens=self.options.field_max_new_tokens,
                                   temperature=role.temperature, top_p=role.top_p, greedy=greedy,
                                   reference=reference, stop=("\n",))
        newline = policy.encode("\n")
        for form, prompt, (gen,) in zip(forms, prompts, gens):
            form.fields[key] = gen.text.strip().split("\n")[0].strip()
            form.steps.append((key, gen))
            kept = list(gen.completion_ids)
            if not gen.truncated and "\n" not in policy.decode(kept[-1:]):
                kept = kept[:-1]  # it ended on an end token: the form goes on after a line break instead
            form.ids = prompt + kept + ([] if policy.decode(kept).endswith("\n") else newline)

    def _weigh(self, ctx: RoundContext, forms: Sequence[Form], reference: bool) -> None:
        """Each form's next weight: the expected digit 1-5 under the model's next-token probabilities (a number
        every time, never unreadable). The rubric keeps it as it is; the form shows it rounded to a digit."""
        import torch

        policy = ctx.policy
        prompts = [f.ids + policy.encode(WEIGHT_LABEL) for f in forms]
        digits = [policy.token_id(str(w)) for w in WEIGHTS]
        probs = torch.softmax(policy.next_token_logprobs(prompts, digits, reference=reference).float(), dim=-1)
        expected = (probs @ torch.tensor(WEIGHTS, dtype=probs.dtype)).tolist()
        for form, prompt, w in zip(forms, prompts, expected):
            form.weights.append(round(w, 3))
            form.ids = prompt + policy.encode(f"{int(w + 0.5)}\n")

    def _choose_gold(self, ctx: RoundContext, problems: Sequence[Problem], key: str, greedy: bool,
                     reference: bool) -> None:
        """Fill each form's gold-fact line with one of its document's sentences, drawn from the model's
        length-normalised log-probability of each as the line's continuation (softmax at the writer's temperature;
        the likeliest when greedy). A choice, not a generation: the rubric writer trains on its criteria only."""
        import torch

        policy, role = ctx.policy, self._roles["rubric_writer"]
        for p in problems:
            form = p.rubric_form
            sentences = document_sentences(p.document["text"]) or [" ".join(p.document["text"].split()[:60])]
            prompt = form.ids + policy.encode(GOLD_LABEL)
            ids = [policy.encode(" " + x) for x in sentences]
            with ctx.phase("choose"), torch.no_grad():
                logp = policy.sequence_logprobs([prompt] * len(ids), ids, reference=reference).float().cpu()
            mean = logp.sum(1) / torch.tensor([len(x) for x in ids], dtype=torch.float32)
            if greedy:
                pick = int(mean.argmax())
            else:
                weights = torch.softmax(mean / role.temperature, dim=0).tolist()
                pick = ctx.rng.choices(range(len(ids)), weights=weights)[0]
            form.fields[key] = sentences[pick]
            form.ids = prompt + ids[pick] + policy.encode("\n")

    def _reply(self, ctx: RoundContext, role: Role, forms: Sequence[Form], greedy: bool,
               reference: bool) -> list[str]:
        """structure=json: each writer's whole reply, one generation per form."""
        with ctx.phase("generate"):
            gens = ctx.policy.generate([f.ids for f in forms], n=1, max_new_tokens=role.max_new_tokens,
                                       temperature=role.temperature, top_p=role.top_p, greedy=greedy,
                                       reference=reference)
        for form, (gen,) in zip(forms, gens):
            form.steps.append(("reply", gen))
        return [g.text for (g,) in gens]

    def write_tasks(self, ctx: RoundContext, documents: Sequence[dict[str, str]], greedy: bool = False,
                    reference: bool = False) -> list[Problem]:
        json_mode = self.options.structure == "json"
        problems = []
        for d in documents:
            prompt = chat(TASK_PROMPT.format(document=d["text"], format=TASK_JSON if json_mode else ""))
            problems.append(Problem(d, Form(prompt, ctx.policy.encode_chat(prompt))))
        forms, role = [p.task_form for p in problems], self._roles["task_writer"]
        if json_mode:
            for p, text in zip(problems, self._reply(ctx, role, forms, greedy, reference)):
                p.question, p.reference = parse_task_json(text)
        else:
            self._fill(ctx, role, forms, QUESTION_LABEL, "question", greedy, reference)
            self._fill(ctx, role, forms, ANSWER_LABEL, "answer", greedy, reference)
            for p in problems:
                p.question, p.reference = p.task_form.fields["question"], p.task_form.fields["answer"]
        for p in problems:
            p.task_error = task_problem(p.question, p.reference, p.document["text"],
                                        self.options.min_question_overlap)
        return problems

    def write_rubrics(self, ctx: RoundContext, problems: Sequence[Problem], greedy: bool = False,
                      reference: bool = False) -> None:
        o = self.options
        for p in problems:
            shown = [p.answers[i].text[:o.max_answer_chars].strip()
                     for i in spread_by_length([a.text for a in p.answers], o.shown_answers)]
            block = "".join(f"\nAnswer {k} to grade:\n{text}\n" for k, text in enumerate(shown, 1))
            prompt = chat(RUBRIC_PROMPT.format(
                document=p.document["text"], question=p.question, reference=p.reference, answers=block,
                criteria="1 to 5" if o.structure == "json" else o.criteria,
                format=RUBRIC_JSON if o.structure == "json" else ""))
            p.rubric_form = Form(prompt, ctx.policy.encode_chat(prompt))
        forms, role = [p.rubric_form for p in problems], self._roles["rubric_writer"]
        if o.structure == "json":
            for p, text in zip(problems, self._reply(ctx, role, forms, greedy, reference)):
                criteria, p.rubric_error = parse_rubric(text)
                p.written_rubric = [c.to_json() for c in criteria] if criteria else None
        else:
            for k in range(1, o.criteria + 1):
                self._fill(ctx, role, forms, CRITERION_LABEL.format(k=k), f"criterion {k}", greedy, reference)
                if o.gold == "choose":
                    self._choose_gold(ctx, problems, f"gold {k}", greedy, reference)
                else:
                    self._fill(ctx, role, forms, GOLD_LABEL, f"gold {k}", greedy, reference)
                self._weigh(ctx, forms, reference)
            for p in problems:
                f = p.rubric_form
                p.written_rubric = [Criterion(f.fields[f"criterion {k}"], f.fields[f"gold {k}"],
                                              f.weights[k - 1]).to_json() for k in range(1, o.criteria + 1)]
        for p in problems:
            if p.written_rubric is not None:
                p.rubric_error = grounded_rubric_problem(p.written_rubric, p.document["text"], o.min_gold_overlap)
            p.rubric = p.written_rubric if p.rubric_error is None else None

    def solver_prompt(self, question: str) -> Messages:
        return chat(question, self.options.system_prompt)

    def _judge(self, ctx: RoundContext, problems: Sequence[Problem]) -> None:
        """Every answer (and the reference, for the margin) of each problem with a rubric, in one judge call."""
        items, owners = [], []
        for p in problems:
            if p.rubric is None:
                continue
            for text in [*(a.text for a in p.answers), p.reference]:
                items.append(JudgeItem(prompt=self.solver_prompt(p.question), response=text, reference=p.reference,
                                       metadata={"rubric": p.rubric, "document": p.document["title"]}))
                owners.append(p)
        for p, v in zip(owners, self._verdicts(ctx, items)):
            p.verdicts.append(v)

    @staticmethod
    def _verdicts(ctx: RoundContext, items: list[JudgeItem]) -> list[Verdict]:
        if not items:
            return []
        with ctx.phase("judge"):
            verdicts = ctx.judge.judge(items)
        if len(verdicts) != len(items):
            raise ArenaError(f"judge: returned {len(verdicts)} verdicts for {len(items)} answers; a judge must "
                             "return one verdict per item, in order")
        return verdicts

    # -- a round ----------------------------------------------------------------------------------------------

    def play(self, ctx: RoundContext) -> list[Sample]:
        o = self.options
        docs = [self.train_documents[(self.cursor + i) % len(self.train_documents)]
                for i in range(o.documents_per_round)]
        self.cursor = (self.cursor + o.documents_per_round) % len(self.train_documents)
        initial = o.sampler == "initial"  # the starting model writes greedily and answers: off-policy pairs
        problems = self.write_tasks(ctx, docs, greedy=initial, reference=initial)
        posed = [p for p in problems if p.task_error is None]
        if posed:
            solver = self._roles["solver"]
            with ctx.phase("generate"):
                outs = ctx.policy.generate([self.solver_prompt(p.question) for p in posed], n=o.answers,
                                           max_new_tokens=solver.max_new_tokens, temperature=solver.temperature,
                                           top_p=solver.top_p, reference=initial)
            for p, gens in zip(posed, outs):
                p.answers = gens
            self.write_rubrics(ctx, posed, greedy=initial, reference=initial)
            self._judge(ctx, posed)
        samples = [s for i, p in enumerate(problems) for s in self._samples(ctx, i, p)]
        self._report(ctx, problems)
        return samples

    def _samples(self, ctx: RoundContext, index: int, p: Problem) -> list[Sample]:
        o = self.options
        task_reward, rubric_reward = p.writer_rewards(o.format_penalty)
        meta = {"document": p.document["title"], "problem": index, "question": p.question,
                "reference_answer": p.reference, "task_error": p.task_error, "rubric": p.written_rubric,
                "rubric_error": p.rubric_error}
        samples = []
        for role, form, reward in (("task_writer", p.task_form, task_reward),
                                   ("rubric_writer", p.rubric_form, rubric_reward)):
            for step, (key, gen) in enumerate(form.steps if form else []):
                samples.append(Sample.from_generation(
                    self._roles[role], form.prompt, gen, reward=reward, group=f"{ctx.iteration}:{role}",
                    metadata={**meta, "field": key, "step": step, "weights": form.weights or None}))
        if o.variant == "pairs" and p.rubric is not None:
            p.pair = choose_pair(p.scores, [released_word_count(a.text) for a in p.answers], o.min_score_std,
                                 o.max_length_gap)
        best, worst, why = p.pair
        for j, (gen, verdict) in enumerate(zip(p.answers, p.verdicts or [None] * len(p.answers))):
            score = verdict.score if verdict is not None and verdict.valid else None
            extra: dict[str, Any] = {}
            if o.variant == "pairs":
                extra = ({"pair": "chosen"} if j == best else {"pair": "rejected"} if j == worst
                         else {"pair_filter": why or p.rubric_error or ("could not be scored" if score is None
                                                                        else "neither best nor worst")})
            samples.append(Sample.from_generation(
                self._roles["solver"], self.solver_prompt(p.question), gen, reward=score,
                group=f"{ctx.iteration}:{index}",
                metadata={**meta, "answer": j, "verdict": None if verdict is None else verdict.details, **extra}))
        return samples

    def _report(self, ctx: RoundContext, problems: Sequence[Problem]) -> None:
        posed = [p for p in problems if p.task_error is None]
        ctx.metrics["pop/valid_tasks"] = len(posed) / len(problems)
        if posed:  # no task posed: no rubric was written, so there is no share (not a share of 0)
            ctx.metrics["pop/valid_rubrics"] = sum(p.rubric is not None for p in posed) / len(posed)
        scores = [s for p in posed for s in p.scores if s is not None]
        if scores:
            ctx.metrics["pop/score"] = sum(scores) / len(scores)
        refs = [p.reference_score for p in posed if p.reference_score is not None]
        if refs:
            ctx.metrics["pop/reference_score"] = sum(refs) / len(refs)
        margins = [m for p in posed if p.rubric is not None for m in p.writer_rewards(0.0)[1:] if m is not None]
        if margins:
            ctx.metrics["pop/margin"] = sum(margins) / len(margins)
        if self.options.variant == "pairs":
            ctx.metrics["pop/pairs"] = float(sum(p.pair[0] is not None for p in posed))
        errors = [e for p in problems for e in (p.task_error, p.rubric_error) if e]
        if errors:
            ctx.notes["invalid"] = "; ".join(dict.fromkeys(errors))
        shown = next((p for p in posed if p.rubric is not None), posed[0] if posed else problems[0])
        ctx.notes["problem"] = f"[{shown.document['title']}] {shown.question or '(none)'} -> {shown.reference}"
        if shown.rubric is not None:
            ctx.notes["rubric"] = " | ".join(f"{c['criterion']} (gold: {c['gold']}; w {c['weight']:g})"
                                             for c in shown.rubric)

    # -- held-out evaluation ----------------------------------------------------------------------------------

    def write_eval_problems(self, ctx: RoundContext) -> None:
        """A fixed question and rubric per held-out document, written once, greedily, by the reference model (the
        rubric writer sees no answers). Those that fail validation are left out, their reasons kept."""
        problems = self.write_tasks(ctx, self.eval_documents, greedy=True, reference=True)
        posed = [p for p in problems if p.task_error is None]
        self.write_rubrics(ctx, posed, greedy=True, reference=True)
        self.eval_problems = [{"document": p.document["title"], "question": p.question, "reference": p.reference,
                               "rubric": p.rubric} for p in posed if p.rubric is not None]
        self.eval_rejected = [f"{p.document['title']}: {p.task_error or p.rubric_error}" for p in problems
                              if p.task_error or p.rubric is None]
        if not self.eval_problems:
            warnings.warn(f"game.eval_size: none of the {len(problems)} held-out documents gave a valid question "
                          f"and rubric ({'; '.join(self.eval_rejected[:3])}); raise eval_size", ArenaWarning,
                          stacklevel=2)

    def evaluate_items(self, ctx: RoundContext) -> dict[str, Any]:
        """The solver's greedy answers to the fixed held-out questions, scored by the judge against their rubrics:
        `score` (each valid verdict), `valid_frac` and `problems` (how many fixed problems there are)."""
        if not self.options.eval_size:
            return {}
        items = self.held_out_answers(ctx)
        if not items:
            return {"problems": 0.0}
        return {**verdict_items(self._verdicts(ctx, items)), "problems": float(len(items))}

    def held_out_answers(self, ctx: RoundContext) -> list[JudgeItem]:
        """The solver's greedy answers to the fixed held-out questions, each with its reference and rubric."""
        if not self.options.eval_size:
            return []
        if self.eval_problems is None:
            self.write_eval_problems(ctx)
        solver = self._roles["solver"]
        prompts = [self.solver_prompt(e["question"]) for e in self.eval_problems]
        if not prompts:
            return []
        with ctx.phase("generate"):
            outs = ctx.policy.generate(prompts, n=1, max_new_tokens=solver.max_new_tokens, greedy=True)
        return [JudgeItem(prompt=prompt, response=gens[0].text, reference=e["reference"],
                          metadata={"rubric": e["rubric"], "document": e["document"]})
                for prompt, gens, e in zip(prompts, outs, self.eval_problems)]

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "eval_problems": self.eval_problems, "eval_rejected": self.eval_rejected,
                "corpus": self.corpus_digest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("corpus", self.corpus_digest) != self.corpus_digest:
            raise ArenaError(f"game.corpus {self.options.corpus}: its documents differ from those the run started "
                             "with (another Python's pydoc, or an edited file); resume where they are the same")
        self.cursor = int(state.get("cursor", 0))
        self.eval_problems = state.get("eval_problems")
        self.eval_rejected = list(state.get("eval_rejected", []))


@hookimpl
def register_games(register: Any) -> None:
    register("pop", PopGame)
