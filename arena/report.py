"""`arena report RUN [RUN ...]`: what runs did, per iteration, as PNG plots (several runs overlaid), a short
summary in the terminal, and the best and worst samples of chosen iterations. Everything is read from the run
folders' metrics.jsonl and samples.jsonl: `report_series` picks the plotted values, apart from the drawing, so a
test can hold them against the files."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arena.errors import ArenaError
from arena.runstore import RunStore, read_jsonl

REPORT_INSTALL = "pip install 'arena-selfplay[report]'"
# the optimizers' own measures, plotted plain (`kl`) and per mix part (`grpo/kl`, `dpo/margin`)
TRAINING = ("loss", "kl", "grad_norm", "margin", "accuracy")


def _training(key: str) -> bool:
    parts = key.split("/")
    return key in TRAINING or (len(parts) == 2 and parts[1] in TRAINING)


# panel -> (title, which metric keys it shows)
PANELS = {
    "rewards": ("mean reward per role", lambda k: k.startswith("reward/")),
    "heldout": ("held-out scores (iteration 0: before training)", lambda k: k.startswith("eval/")),
    "training": ("the update: loss, KL to the reference, gradient norm, pair margin and accuracy", _training),
    "time": ("seconds per phase", lambda k: k.startswith("time/")),
}


@dataclass
class RunRecord:
    """One run as the report reads it."""

    dir: Path
    name: str
    game: str
    metrics: list[dict[str, Any]]
    headline: tuple[str, ...] = ()
    series: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)


def read_run(path: str | Path, registry: Any = None) -> RunRecord:
    """A run folder's metrics and game; not a run folder, or one without metrics, is one line naming it."""
    from omegaconf import OmegaConf

    store = RunStore(path)
    if not store.config_path.is_file() or not store.metrics_path.is_file():
        raise ArenaError(f"RUN {path}: no config.yaml and metrics.jsonl there; expected a run folder")
    config = OmegaConf.to_container(OmegaConf.load(store.config_path))
    game = str((config.get("game") or {}).get("name", "?"))
    metrics = metrics_records(store.metrics_path)
    if not metrics:
        raise ArenaError(f"RUN {path}: metrics.jsonl holds no iteration yet")
    headline: tuple[str, ...] = ()
    if registry is not None and game in registry.entries.get("game", {}):
        headline = tuple(getattr(registry.entries["game"][game].obj, "headline_metrics", ()))
    return RunRecord(Path(path), Path(path).name, game, metrics, headline)


def metrics_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line that is not a JSON object with an integer `iteration` (a file
    edited or damaged by hand) is one error naming the file and the line. Values that are not numbers are left
    for `report_series` to skip."""
    records = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n") or not raw.strip():
                continue  # a last line cut short by a crash, or a blank one
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if not (isinstance(record, dict) and isinstance(record.get("iteration"), int)
                    and not isinstance(record["iteration"], bool)):
                raise ArenaError(f"{path}:{number}: not a metrics record (expected a JSON object with an integer "
                                 "\"iteration\"); the file was changed by hand")
            records.append(record)
    return records


def _number(value: Any) -> float | None:
    """A metric value as a float, or None where it is not a finite number (null, text, a hand-edited list)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def report_series(run: RunRecord) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per panel (PANELS, plus `game` for the game's headline metrics), per metric key, the (iteration, value)
    points the run recorded: every finite value of metrics.jsonl, in iteration order."""
    panels = {name: dict[str, list[tuple[int, float]]]() for name in (*PANELS, "game")}
    for record in sorted(run.metrics, key=lambda r: r["iteration"]):
        for key, value in record.items():
            if key == "iteration" or _number(value) is None:
                continue
            if key == "time/iteration" or key == "eval/valid_frac":
                continue
            for panel, (_, wanted) in PANELS.items():
                if wanted(key):
                    panels[panel].setdefault(key, []).append((record["iteration"], float(value)))
            if key in run.headline:
                panels["game"].setdefault(key, []).append((record["iteration"], float(value)))
    return {name: series for name, series in panels.items() if series}


def plot(runs: list[RunRecord], out: Path) -> list[Path]:
    """One PNG per panel that any run has: a small plot per metric (their scales differ: a count beside a score),
    every run's line overlaid in each."""
    try:
        import matplotlib
    except ImportError:
        raise ArenaError(f"arena report draws with matplotlib; run `{REPORT_INSTALL}`") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files = []
    titles = {**{k: t for k, (t, _) in PANELS.items()}, "game": "the game's own measures"}
    for panel, title in titles.items():
        keys = sorted({key for run in runs for key in run.series.get(panel, {})})
        if not keys:
            continue
        cols = min(3, len(keys))
        rows = -(-len(keys) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            for n, run in enumerate(runs):  # a run keeps its colour in every plot
                points = run.series.get(panel, {}).get(key)
                if points:
                    ax.plot([i for i, _ in points], [v for _, v in points], marker="o", markersize=3,
                            color=f"C{n % 10}", label=run.name)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if len(runs) > 1:
                ax.legend(fontsize=7, loc="best")
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle(title)
        fig.tight_layout()
        path = out / f"{panel}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    return files


def summary(run: RunRecord) -> list[str]:
    """A few lines per run: iterations, each held-out score first -> last, the last rewards, total time."""
    done = [r for r in run.metrics if r["iteration"] > 0]
    lines = [f"{run.name} ({run.game}): {len(done)} iterations, "
             f"{sum(_number(r.get('time/iteration')) or 0.0 for r in done) / 60:.1f} min"]
    for key, points in sorted(run.series.get("heldout", {}).items()):
        (i0, first), (i1, last) = points[0], points[-1]
        lines.append(f"  {key}: {first:.4g} (it {i0}) -> {last:.4g} (it {i1}), {last - first:+.3g}")
    if done:
        last = done[-1]
        rewards = "  ".join(f"{k} {v:.3g}" for k, v in sorted(last.items())
                            if k.startswith("reward/") and _number(v) is not None)
        if rewards:
            lines.append(f"  last rewards (it {last['iteration']}): {rewards}")
    return lines


def _spans(numbers: list[int]) -> str:
    """1,2,3,5 -> '1-3, 5'."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def extreme_samples(run: RunRecord, iterations: list[int], per_role: int = 1) -> list[dict[str, Any]]:
    """For each chosen iteration and role, its `per_role` highest- and lowest-reward samples (samples without a
    reward left out), as {iteration, role, rank: best|worst, reward, prompt, completion}."""
    by_key: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for s in read_jsonl(RunStore(run.dir).samples_path):
        if s.get("iteration") in iterations and s.get("reward") is not None:
            by_key.setdefault((s["iteration"], s["role"]), []).append(s)
    out = []
    for (iteration, role), samples in sorted(by_key.items()):
        ranked = sorted(samples, key=lambda s: s["reward"], reverse=True)
        picks = [("best", s) for s in ranked[:per_role]] + [("worst", s) for s in ranked[::-1][:per_role]]
        for rank, s in picks:
            users = [m["content"] for m in s.get("prompt", []) if m.get("role") == "user"]
            out.append({"iteration": iteration, "role": role, "rank": rank, "reward": s["reward"],
                        "prompt": users[-1] if users else "", "completion": s.get("completion", "")})
    return out


def write_samples(samples: list[dict[str, Any]], path: Path) -> None:
    blocks = [f"## {s.get('run', '')} iteration {s['iteration']}, {s['role']}, {s['rank']} (reward {s['reward']:.4g})\n\n"
              f"**prompt**\n\n```\n{s['prompt']}\n```\n\n**completion**\n\n```\n{s['completion']}\n```\n"
              for s in samples]
    path.write_text("# Best and worst samples\n\n" + "\n".join(blocks), encoding="utf-8")


def report(paths: list[str], out: str | None = None, iterations: list[int] | None = None,
           registry: Any = None) -> tuple[list[Path], list[str]]:
    """Read the runs, plot them into `out` (default: <first run>/report), write samples.md and series.json there
    (what was plotted, for anyone to check), and return the files and the summary lines."""
    runs = [read_run(p, registry) for p in paths]
    for run in runs:
        run.series = report_series(run)
        played = {r["iteration"] for r in run.metrics if r["iteration"] > 0}
        missing = sorted(set(iterations or ()) - played)
        if missing:
            raise ArenaError(f"--iterations {','.join(map(str, iterations))}: {run.dir} has no iteration "
                             f"{missing[0]}; it played {_spans(sorted(played)) or 'none yet'}")
    folder = Path(out) if out else runs[0].dir / "report"
    files = plot(runs, folder)
    (folder / "series.json").write_text(json.dumps({run.name: run.series for run in runs}, indent=1))
    lines = [line for run in runs for line in summary(run)]
    chosen = []
    for run in runs:
        done = sorted({r["iteration"] for r in run.metrics if r["iteration"] > 0})
        wanted = iterations or ([done[0], done[-1]] if done else [])
        chosen += [{**s, "run": run.name} for s in extreme_samples(run, wanted)]
    write_samples(chosen, folder / "samples.md")
    files += [folder / "series.json", folder / "samples.md"]
    return files, lines
