"""`mirror`: a two-role self-play game, and `overlap`, the judge it scores with. A third-party arena plugin.

One model plays both roles. Each round the **setter** writes `lists_per_round` short lists of words (it is asked
for `min_words`..`max_words` words on a theme drawn for the round), and the **copier** is shown each list and
asked to repeat it exactly, `copies_per_list` times. The run's judge (`overlap` by default: word-overlap F1
between the copy and the list) scores every copy.

Rewards:
  copier  the judge's score of its copy.
  setter  1 - (mean judge score of the copies of its list) / judge_max_score: a list that is hard to copy pays.
          The list is the words after the setter's last colon (a preamble ending in ':' is dropped), else all of
          its words. A setter output that is not a list of min_words..max_words words gets `format_penalty` instead
          (metadata `format_ok: false`), and its copiers copy a list drawn from the buffer of earlier valid lists,
          so every round still trains the copier.

Group keys give GRPO the right baselines: the copies of one list share a group (`<iteration>:list<i>`); the
setter's lists of a round share one group (`<iteration>:setter`). Valid lists join a bounded buffer, seeded with
built-in lists; the buffer is game state and is saved with every checkpoint.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from arena import Env, Game, Judge, JudgeItem, Role, RoundContext, Sample, Verdict
from arena.errors import ConfigError
from arena.hookspecs import hookimpl

__version__ = "0.1.0"

_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")  # letters, with inner apostrophes or hyphens


def words(text: str) -> list[str]:
    """The words of `text`, lower-cased, in order: runs of letters (with inner ' or -). Digits, list markers,
    punctuation and emoji are not words, so "1. Apple, 2. pear!" is ["apple", "pear"]."""
    return _WORD.findall(text.lower())


def setter_list(text: str) -> list[str]:
    """The list a setter wrote: the words after its last colon when any follow it ("Sure! Words about food:
    bread, cheese, olive" is ["bread", "cheese", "olive"]), else all its words. A list with a preamble but no
    colon, or with more words after it, is simply too long and gets the format penalty."""
    _, colon, tail = text.rpartition(":")
    return words(tail) if colon and words(tail) else words(text)


def overlap_f1(response: Sequence[str], reference: Sequence[str]) -> tuple[float, float, float]:
    """(precision, recall, F1) of the multiset overlap of two word lists (order-insensitive, like SQuAD's F1)."""
    same = sum((Counter(response) & Counter(reference)).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    precision, recall = same / len(response), same / len(reference)
    return precision, recall, 2 * precision * recall / (precision + recall)


# -- the judge ------------------------------------------------------------------------------------------------

@dataclass
class OverlapOptions:
    mode: str = "f1"  # f1: word-overlap F1 in [0, 1]; exact: 1.0 only for the same words in the same order


class Overlap(Judge):
    """Word-overlap F1 (or exact match) of a response against the record's reference word list."""

    Options = OverlapOptions

    def __init__(self, options: OverlapOptions, env: Env):
        super().__init__(options, env)
        if options.mode not in ("f1", "exact"):
            raise ConfigError("mode", f"{options.mode!r}; expected f1 or exact")

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        verdicts = []
        for item in items:
            if item.reference is None:
                verdicts.append(Verdict.invalid("the item has no reference word list to compare with"))
                continue
            want = words(item.reference)
            if not want:
                verdicts.append(Verdict.invalid("the reference holds no words", reference=item.reference))
                continue
            got = words(item.response)
            precision, recall, f1 = overlap_f1(got, want)
            exact = got == want
            score = f1 if self.options.mode == "f1" else float(exact)
            verdicts.append(Verdict(score, details={"mode": self.options.mode, "precision": precision,
                                                    "recall": recall, "f1": f1, "exact": exact,
                                                    "response_words": len(got)}))
        return verdicts


# -- the game -------------------------------------------------------------------------------------------------

SETTER_TEMPLATE = ("Write a list of {min_words} to {max_words} different English words about {theme}, separated "
                   "by commas. Reply with the list only, nothing else.")
COPIER_TEMPLATE = ("Repeat the following list of words exactly, in the same order, separated by commas. Reply "
                   "with the list only, nothing else.\n\n{words}")

THEMES = ["animals", "food", "the weather", "music", "travel", "colours", "tools", "the sea", "sports",
          "plants", "the city", "science", "clothes", "feelings", "space", "the kitchen"]
# The buffer starts with these, so a round whose setter wrote no valid list still has lists to copy.
SEED_LISTS = [["apple", "river", "candle"], ["green", "hammer", "cloud", "violin"],
              ["tiger", "pencil", "ocean", "bread", "lamp"], ["winter", "coffee", "mirror"],
              ["garden", "rocket", "silver", "honey", "bridge", "forest"], ["quiet", "orange", "ladder", "storm"]]
# Held out: never in the buffer, never trained on; the copier copies them greedily in `evaluate`.
EVAL_LISTS = [["salt", "piano", "window"], ["marble", "falcon", "thunder", "cotton"],
              ["jungle", "kettle", "saddle", "meadow", "anchor"], ["blue", "seven", "eagle"],
              ["velvet", "compass", "harbor", "lantern", "pepper", "glacier"], ["dream", "puzzle", "canyon", "tulip"]]
EVAL_THEMES = ["animals", "food", "music", "space"]


@dataclass
class MirrorOptions:
    lists_per_round: int = 4  # setter lists per round; they share the setter's baseline
    copies_per_list: int = 4  # copier answers per list; they share a baseline
    min_words: int = 3
    max_words: int = 6
    max_new_tokens: int = 32  # for both roles
    setter_temperature: float = 1.0
    copier_temperature: float = 1.0
    top_p: float = 1.0
    format_penalty: float = -1.0  # the setter's reward for output that is not a list of min..max words
    judge_max_score: float = 1.0  # the judge's best score: setter reward = 1 - mean copier score / this
    train_setter: bool = True  # false: only the copier learns (the setter still plays)
    buffer_size: int = 64  # valid lists kept for rounds whose setter wrote none
    themes: list[str] = field(default_factory=lambda: list(THEMES))


class MirrorGame(Game):
    """Setter writes a 3-6 word list, copier repeats it; copier paid by overlap, setter by the copier's misses."""

    Options = MirrorOptions
    defaults = {"judge": "overlap"}
    role_names = ("setter", "copier")  # the optimizer's role settings are then checked before the model loads

    @classmethod
    def produced_by_role(cls, options: MirrorOptions) -> dict[str, frozenset[str]]:
        """With train_setter false the setter still plays but is never trained: it needs no optimizer part."""
        return {"setter": frozenset({"rewards"} if options.train_setter else ()), "copier": frozenset({"rewards"})}

    def __init__(self, options: MirrorOptions, env: Env):
        super().__init__(options, env)
        for key in ("lists_per_round", "copies_per_list", "max_new_tokens", "buffer_size", "min_words"):
            if getattr(options, key) < 1:
                raise ConfigError(key, "must be at least 1")
        if options.max_words < options.min_words:
            raise ConfigError("max_words", f"{options.max_words} is below min_words {options.min_words}")
        if options.judge_max_score <= 0:
            raise ConfigError("judge_max_score", "must be positive")
        if not options.themes:
            raise ConfigError("themes", "needs at least one theme")
        self._roles = {
            "setter": Role("setter", trained=options.train_setter, max_new_tokens=options.max_new_tokens,
                           temperature=options.setter_temperature, top_p=options.top_p),
            "copier": Role("copier", max_new_tokens=options.max_new_tokens,
                           temperature=options.copier_temperature, top_p=options.top_p),
        }
        self.buffer: list[list[str]] = [list(w) for w in SEED_LISTS]
        self.lists_accepted = 0

    @property
    def roles(self) -> dict[str, Role]:
        return self._roles

    def valid_list(self, ws: Sequence[str]) -> bool:
        return self.options.min_words <= len(ws) <= self.options.max_words

    def setter_prompt(self, theme: str) -> list[dict[str, str]]:
        o = self.options
        return [{"role": "user", "content": SETTER_TEMPLATE.format(min_words=o.min_words, max_words=o.max_words,
                                                                   theme=theme)}]

    @staticmethod
    def copier_prompt(ws: Sequence[str]) -> list[dict[str, str]]:
        return [{"role": "user", "content": COPIER_TEMPLATE.format(words=", ".join(ws))}]

    def play(self, ctx: RoundContext) -> list[Sample]:
        o, setter, copier = self.options, self._roles["setter"], self._roles["copier"]
        theme = ctx.rng.choice(o.themes)
        setter_prompt = self.setter_prompt(theme)
        with ctx.phase("generate"):
            lists = ctx.policy.generate([setter_prompt], n=o.lists_per_round, max_new_tokens=setter.max_new_tokens,
                                        temperature=setter.temperature, top_p=setter.top_p)[0]
        parsed = [setter_list(g.text) for g in lists]
        ok = [self.valid_list(ws) for ws in parsed]
        # the list each setter output is copied as: its own when valid, else one drawn from the buffer
        targets = [ws if good else list(ctx.rng.choice(self.buffer)) for ws, good in zip(parsed, ok)]
        copier_prompts = [self.copier_prompt(ws) for ws in targets]
        with ctx.phase("generate"):
            copies = ctx.policy.generate(copier_prompts, n=o.copies_per_list, max_new_tokens=copier.max_new_tokens,
                                         temperature=copier.temperature, top_p=copier.top_p)
        items = [JudgeItem(prompt=p, response=g.text, reference=", ".join(ws), metadata={"words": ws})
                 for p, ws, gens in zip(copier_prompts, targets, copies) for g in gens]
        with ctx.phase("judge"):
            verdicts = ctx.judge.judge(items)

        samples: list[Sample] = []
        k = 0
        for i, (gen, ws, good, target, prompt, gens) in enumerate(zip(lists, parsed, ok, targets, copier_prompts,
                                                                      copies)):
            group = f"{ctx.iteration}:list{i}"
            scores = []
            for gen_c in gens:
                v = verdicts[k]
                k += 1
                if v.valid:
                    scores.append(v.score)
                samples.append(Sample.from_generation(
                    copier, prompt, gen_c, reward=v.score if v.valid else None, group=group,
                    metadata={"words": target, "source": "setter" if good else "buffer", "list": i,
                              "valid": v.valid, "verdict": v.details}))
            copier_mean = sum(scores) / len(scores) if scores else None
            if not good:
                reward = o.format_penalty
            elif copier_mean is None:
                reward = None  # no valid verdict on its list: nothing to learn from
            else:
                reward = 1.0 - copier_mean / o.judge_max_score
            samples.append(Sample.from_generation(
                setter, setter_prompt, gen, reward=reward, group=f"{ctx.iteration}:setter",
                metadata={"theme": theme, "words": ws, "format_ok": good, "list": i, "copier_group": group,
                          "copier_mean": copier_mean,
                          **({} if good else {"penalty": f"{len(ws)} words; expected {o.min_words}-{o.max_words}"}),
                          }))
        for ws, good in zip(parsed, ok):
            if good and ws not in self.buffer:
                self.buffer.append(list(ws))
                self.lists_accepted += 1
        del self.buffer[:-o.buffer_size]
        ctx.metrics["mirror/setter_format_ok"] = sum(ok) / len(ok)
        ctx.metrics["mirror/buffer"] = float(len(self.buffer))
        return samples

    def evaluate(self, ctx: RoundContext) -> dict[str, float]:
        """Greedy copies of the held-out lists, scored by the run's judge and by word F1 and exact match; and the
        share of greedy setter outputs on fixed themes that are valid lists."""
        copier = self._roles["copier"]
        prompts = [self.copier_prompt(ws) for ws in EVAL_LISTS]
        outs = ctx.policy.generate(prompts, n=1, max_new_tokens=copier.max_new_tokens, greedy=True)
        texts = [g[0].text for g in outs]
        verdicts = ctx.judge.judge([JudgeItem(prompt=p, response=t, reference=", ".join(ws), metadata={"words": ws})
                                    for p, t, ws in zip(prompts, texts, EVAL_LISTS)])
        f1s = [overlap_f1(words(t), ws)[2] for t, ws in zip(texts, EVAL_LISTS)]
        exact = [words(t) == ws for t, ws in zip(texts, EVAL_LISTS)]
        setter_outs = ctx.policy.generate([self.setter_prompt(t) for t in EVAL_THEMES], n=1,
                                          max_new_tokens=self._roles["setter"].max_new_tokens, greedy=True)
        setter_ok = [self.valid_list(setter_list(g[0].text)) for g in setter_outs]
        valid = [v.score for v in verdicts if v.valid]
        out = {"valid_frac": len(valid) / len(verdicts), "f1": sum(f1s) / len(f1s),
               "exact": sum(exact) / len(exact), "setter_format_ok": sum(setter_ok) / len(setter_ok)}
        if valid:
            out["score"] = sum(valid) / len(valid)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": [list(ws) for ws in self.buffer], "lists_accepted": self.lists_accepted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "buffer" in state:
            self.buffer = [list(ws) for ws in state["buffer"]]
        self.lists_accepted = int(state.get("lists_accepted", 0))


# -- registration: the `arena` entry point of this distribution points at this module --------------------------

@hookimpl
def register_games(register: Any) -> None:
    register("mirror", MirrorGame)


@hookimpl
def register_judges(register: Any) -> None:
    register("overlap", Overlap)
