"""`arena eval`: trained checkpoints and the base model they started from, scored on one held-out set with the
game's own measure, each score with a 95% confidence interval, and each checkpoint's win rate against the base.

Intervals are percentile bootstraps of the mean over held-out items (2,000 resamples, a fixed seed, so a rerun
prints the same numbers). The base is the same policy with its adapter off (`reference=True`), so every model is
held in memory once. The win rate is AlpacaEval's: per prompt a judge compares the trained model's greedy answer
with the base's in both orders (trained first, then second), which cancels a judge's preference for a position;
the mean of the two gives P(trained is better), a win above 0.5, a loss below, a tie (half a win) at 0.5 or
when both answers are the same text.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from arena.errors import ArenaError
from arena.interfaces import Env, Policy, RoundContext
from arena.runstore import ADAPTER
from arena.types import Comparison, JudgeItem, Verdict, chat, verdict_items

LEVEL = 0.95
RESAMPLES = 2000
INTERVAL = f"{LEVEL:.0%} percentile bootstrap of the mean over held-out items, {RESAMPLES} resamples"


@dataclass
class Estimate:
    """A mean over held-out items with its confidence interval."""

    mean: float
    low: float
    high: float
    n: int


def bootstrap(values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Estimate:
    """The mean of `values` and its percentile bootstrap interval (one item: an interval of width 0)."""
    if not values:
        raise ValueError("no values to estimate from")
    n = len(values)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return Estimate(sum(values) / n, means[round(tail * (resamples - 1))], means[round((1 - tail) * (resamples - 1))], n)


def preference(trained_first: Verdict, trained_second: Verdict) -> float | None:
    """P(trained is better) from the two orders: the judge's P(first) with the trained answer first, and 1 -
    P(first) with it second. None when either verdict is invalid."""
    if not (trained_first.valid and trained_second.valid):
        return None
    return 0.5 + (trained_first.score - trained_second.score) / 2  # exactly 0.5 when the orders agree


def outcome(p: float) -> float:
    """A win (1), a loss (0) or a tie (0.5) from P(trained is better)."""
    return 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5


def compare_answers(judge: Any, trained: Sequence[JudgeItem], base: Sequence[JudgeItem]) -> list[float | None]:
    """P(trained is better) per prompt (None: the judge could not say). Both lists answer the same prompts in the
    same order; identical answers are a tie without asking the judge."""
    if [t.prompt for t in trained] != [b.prompt for b in base]:
        raise ArenaError("the trained and base models answered different held-out prompts; the game's held-out set "
                         "must not depend on the model")
    asked = [i for i, (t, b) in enumerate(zip(trained, base)) if t.response != b.response]
    pairs = [Comparison(trained[i].prompt, trained[i].response, base[i].response, trained[i].reference,
                        trained[i].metadata) for i in asked]
    verdicts = judge.compare(pairs + [Comparison(c.prompt, c.second, c.first, c.reference, c.metadata)
                                      for c in pairs])
    if len(verdicts) != 2 * len(pairs):
        raise ArenaError(f"compare judge: returned {len(verdicts)} verdicts for {2 * len(pairs)} pairs")
    prefs: list[float | None] = [0.5] * len(trained)
    for k, i in enumerate(asked):
        prefs[i] = preference(verdicts[k], verdicts[k + len(pairs)])
    return prefs


def win_rate(prefs: Sequence[float | None]) -> dict[str, Any]:
    """Wins, ties and losses, the win rate (ties half) with its interval, and the mean preference."""
    known = [p for p in prefs if p is not None]
    outcomes = [outcome(p) for p in known]
    out: dict[str, Any] = {"wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "losses": outcomes.count(0.0),
                           "invalid": len(prefs) - len(known)}
    if known:
        out["win_rate"] = asdict(bootstrap(outcomes))
        out["preference"] = asdict(bootstrap(known))
    return out


def summarise(items: dict[str, Any]) -> tuple[dict[str, Estimate], dict[str, float]]:
    """A game's per-item held-out results as estimates (lists) and counts (plain numbers)."""
    estimates, counts = {}, {}
    for key, value in items.items():
        if isinstance(value, list):
            present = [float(v) for v in value if v is not None]
            if present:
                estimates[key] = bootstrap(present)
        else:
            counts[key] = float(value)
    return estimates, counts


def paired_differences(trained: dict[str, Any], base: dict[str, Any]) -> dict[str, Estimate]:
    """Per held-out measure, the mean of trained minus base item by item, with its interval, over the items both
    have a value for (an invalid verdict is None; lists of unequal length are not paired). Both models answer
    the same items, so most of the spread between items cancels: a gain far smaller than either model's own
    interval can still be told from zero."""
    out = {}
    for key, values in trained.items():
        other = base.get(key)
        if not (isinstance(values, list) and isinstance(other, list)) or len(values) != len(other):
            continue  # not one value per held-out item on both sides: there is nothing to pair
        both = [float(t) - float(b) for t, b in zip(values, other) if t is not None and b is not None]
        if both:
            out[key] = bootstrap(both)
    return out


class ModelView(Policy):
    """The run's policy as one model under evaluation: the base (`base=True`: every call runs with the adapter
    off) or the trained one. Greedy generations are remembered, so the game's measure and the win rate read one
    set of answers and the model answers each held-out prompt once."""

    def __init__(self, policy: Policy, base: bool):
        self.policy, self.base = policy, base
        self._greedy: dict[str, Any] = {}

    @property
    def generated_tokens(self) -> int:  # type: ignore[override]
        return self.policy.generated_tokens

    def _ref(self, reference: bool | str) -> bool | str:
        return True if self.base and reference is False else reference

    def generate(self, prompts, *, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, greedy=False,
                 reference=False, stop=()):
        kwargs = dict(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
                      reference=self._ref(reference), stop=tuple(stop))
        if not greedy:
            return self.policy.generate(prompts, **kwargs)
        key = json.dumps([list(prompts), kwargs], sort_keys=True)
        if key not in self._greedy:
            self._greedy[key] = self.policy.generate(prompts, **kwargs)
        return copy.deepcopy(self._greedy[key])

    def next_token_logprobs(self, prompts, candidates, *, reference=False):
        return self.policy.next_token_logprobs(prompts, candidates, reference=self._ref(reference))

    def sequence_logprobs(self, prompt_ids, completion_ids, *, temperature=1.0, reference=False):
        return self.policy.sequence_logprobs(prompt_ids, completion_ids, temperature=temperature,
                                             reference=self._ref(reference))

    def encode_chat(self, messages, add_generation_prompt=True):
        return self.policy.encode_chat(messages, add_generation_prompt)

    def encode(self, text):
        return self.policy.encode(text)

    def decode(self, ids):
        return self.policy.decode(ids)

    def token_id(self, text):
        return self.policy.token_id(text)

    def suggested_micro_batch(self):
        return self.policy.suggested_micro_batch()

    def trainable_parameters(self):
        return []

    def frozen_adapters(self):
        return self.policy.frozen_adapters()

    def save(self, path):
        raise ArenaError("a model under evaluation is not saved")

    def load(self, path):
        raise ArenaError("a model under evaluation is not loaded into")


@dataclass
class PromptFile:
    """A held-out set given by path (`--prompts`): JSONL of {"prompt", "answer"?}; the measure is the run's judge
    on the greedy answers."""

    path: str
    max_new_tokens: int

    def __post_init__(self) -> None:
        from arena.prompt_file import load_prompt_file

        if not Path(self.path).is_file():
            raise ArenaError(f"--prompts {self.path}: no such file; expected a JSONL file of "
                             '{"prompt": ..., "answer": ...} lines')
        self.records = load_prompt_file(self.path, "--prompts")

    def held_out_answers(self, ctx: RoundContext) -> list[JudgeItem]:
        prompts = [chat(r["prompt"]) for r in self.records]
        outs = ctx.policy.generate(prompts, n=1, max_new_tokens=self.max_new_tokens, greedy=True)
        return [JudgeItem(prompt=p, response=g[0].text, reference=r.get("answer"))
                for p, r, g in zip(prompts, self.records, outs)]

    def evaluate_items(self, ctx: RoundContext) -> dict[str, Any]:
        answers = self.held_out_answers(ctx)
        with ctx.phase("judge"):
            return verdict_items(ctx.judge.judge(answers))


# What `arena eval key=value` may change: how answers are judged and where the model runs. The rest (the game and
# its data, the seed, the model) defines the held-out set and the models under test: a larger game.eval_size, for
# one, would move prompts the run trained on into it.
EVAL_OVERRIDES = ("judge", "backend", "model.device", "model.dtype", "run.threads")


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuse an override outside EVAL_OVERRIDES, naming its key."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not any(key == k or key.startswith(k + ".") for k in EVAL_OVERRIDES):
            raise ArenaError(f"{key}: arena eval may override only {', '.join(EVAL_OVERRIDES)} (and compare); the "
                             "rest defines the held-out set and the models under test")


def evaluate_runs(runs: list[Any], registry: Any, compare: dict[str, Any], prompts: PromptFile | None = None,
                  say: Callable[[str], None] = print, group: Any = None) -> dict[str, Any]:
    """Score the base model and each trained run (arena.runs.TrainedRun) on the first run's held-out set, or on
    `prompts`. The runs must share their game and model (the adapters are loaded in turn into one policy).
    `group`: the processes of a launched `arena eval`, across which every generate and judge call is split."""
    from arena.config import flatten
    from arena.loop import seed_everything

    first = runs[0]
    config = first.resolved.config
    for run in runs[1:]:
        if run.resolved.config.game.name != config.game.name:
            raise ArenaError(f"RUN {run.dir}: plays {run.resolved.config.game.name!r}, {first.dir} plays "
                             f"{config.game.name!r}; evaluate runs of one game together")
        for section in ("model", "game", "run.seed"):  # one held-out set, one model: else the rows mean different things
            path = section.split(".")
            ours, theirs = first.resolved.tree, run.resolved.tree
            for part in path:
                ours, theirs = ours[part], theirs[part]
            ours, theirs = flatten({section: ours}), flatten({section: theirs})
            differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            if differ:
                raise ArenaError(f"RUN {run.dir}: {differ[0]} is {theirs.get(differ[0])!r} there and "
                                 f"{ours.get(differ[0])!r} in {first.dir}; evaluate runs of one held-out set and "
                                 "model together")
    labels = [run.label for run in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{run.dir.parent.name}/{run.label}" for run in runs]
    if len(set(labels)) < len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise ArenaError(f"RUN {twice}: named twice; give each checkpoint once")
    from arena.distributed import SOLO

    group = group or SOLO
    env = Env(config=config, registry=registry, group=group)
    group.check_device(config.model.device)

    def build() -> tuple[Any, Any, Any, Any]:  # on every process; a failure on any of them stops all
        seed_everything(config.run.seed, 0)
        policy = env.policy = registry.build("backend", config.backend, env)
        judge = registry.build("judge", config.judge, env)
        comparer = registry.build("judge", compare, env, "compare")
        game = registry.build("game", config.game, env)
        game.load_state_dict(first.game_state)
        return policy, judge, comparer, game
    policy, judge, comparer, game = group.agree(build)
    held_out = prompts or game

    models: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[JudgeItem]] = {}
    try:
        for run, label in [(None, "base"), *zip(runs, labels)]:
            if run is not None:
                try:
                    policy.load(str(run.checkpoint / ADAPTER))
                except Exception as exc:  # noqa: BLE001 - a damaged or foreign adapter: one line, not a traceback
                    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                    raise ArenaError(f"{run.checkpoint / ADAPTER}: cannot load it ({reason})") from None
            view = ModelView(policy, base=run is None)
            # the base is the model before training: iteration 0, as the run's own first evaluation
            ctx = RoundContext(iteration=0 if run is None else run.iteration, policy=view, judge=judge,
                               rng=seed_everything(config.run.seed, 0, group.rank), env=env)
            t0 = time.perf_counter()
            items = held_out.evaluate_items(ctx)
            answers[label] = held_out.held_out_answers(ctx)
            estimates, counts = summarise(items)
            models[label] = {"metrics": {k: asdict(e) for k, e in estimates.items()}, "counts": counts, "items": items}
            if run is not None:
                models[label]["differences"] = {k: asdict(e) for k, e in
                                                paired_differences(items, models["base"]["items"]).items()}
            if run is not None and answers[label]:
                prefs = compare_answers(comparer, answers[label], answers["base"])
                models[label]["win_rate"] = {**win_rate(prefs), "preferences": prefs}
            say(f"{label}: evaluated in {time.perf_counter() - t0:.0f} s")
    finally:
        policy.close()
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "game": config.game.name,
        "held_out": prompts.path if prompts else f"the held-out set of game {config.game.name}",
        "checkpoints": [{"run": str(r.dir), "iteration": r.iteration} for r in runs],
        "judge": first.resolved.tree["judge"],
        "compare": compare,
        "interval": INTERVAL,
        "models": models,
        "answers": [{"prompt": a.prompt, "reference": a.reference,
                     **{label: answers[label][i].response for label in answers}}
                    for i, a in enumerate(answers["base"])],
    }


def _cell(estimate: dict[str, Any] | None) -> str:
    if not estimate:
        return "-"
    return f"{estimate['mean']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The printed table: one row per held-out measure (mean [95% interval]), each trained model's paired
    difference from the base, counts, then the win rate."""
    labels = list(results["models"])
    header = ["measure", "n", *labels]
    rows = []
    keys = list(dict.fromkeys(k for m in results["models"].values() for k in m["metrics"]))
    for key in keys:
        cells = [results["models"][label]["metrics"].get(key) for label in labels]
        n = sorted({c["n"] for c in cells if c})
        rows.append([key, "/".join(map(str, n)), *(_cell(c) for c in cells)])
    for key in keys:
        cells = [results["models"][label].get("differences", {}).get(key) for label in labels]
        if any(cells):
            n = sorted({c["n"] for c in cells if c})
            rows.append([f"{key} - base, paired", "/".join(map(str, n)), *(_cell(c) for c in cells)])
    for key in dict.fromkeys(k for m in results["models"].values() for k in m["counts"]):
        rows.append([key, "", *(f"{results['models'][label]['counts'][key]:g}"
                                if key in results["models"][label]["counts"] else "-" for label in labels)])
    if any("win_rate" in m for m in results["models"].values()):
        cells = []
        for label in labels:
            w = results["models"][label].get("win_rate")
            cells.append("-" if not w else
                         f"{_cell(w.get('win_rate'))} {w['wins']}-{w['ties']}-{w['losses']}"
                         + (f" ({w['invalid']} invalid)" if w["invalid"] else ""))
        rows.append(["win rate vs base (W-T-L)", str(len(results["answers"])), *cells])
    return header, rows


def write_results(results: dict[str, Any], runs: list[Any], out: Path | None = None) -> list[Path]:
    """The results as JSON in each run's `evals/` folder, named by checkpoint and time (or in `out` alone);
    written beside and renamed, so a file there is whole."""
    from arena.runstore import finite_json

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    text = json.dumps(finite_json(results), indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)
        return [out]
    paths = []
    for run in runs:
        folder = run.dir / "evals"
        folder.mkdir(exist_ok=True)
        path = folder / f"{run.iteration:06d}-{stamp}.json"
        n = 1
        while path.exists():  # two evals within a second: keep both
            n += 1
            path = folder / f"{run.iteration:06d}-{stamp}-{n}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        paths.append(path)
    return paths
