"""`arena report`: PNG plots, a summary and the best and worst samples, all from real runs' files; the plotted
values are the runs' own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arena.cli import main
from arena.report import read_run, report_series
from arena.runstore import read_jsonl

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("report")
    runs = []
    for name, lr in (("slow", "1e-5"), ("fast", "0.05")):
        run = root / name
        assert main(["play", "prompts", f"model.path={tiny_model_dir}", f"run.dir={run}", "run.iterations=3",
                     "run.eval_every=2", "run.loggers=[plain]", "model.lora.r=4", f"optimizer.lr={lr}",
                     "game.dataset=arithmetic", "game.group_size=2", "game.max_new_tokens=3",
                     "game.eval_size=2"]) == 0
        runs.append(run)
    return runs


def test_the_plotted_series_are_the_runs_metrics(two_runs):
    for path in two_runs:
        records = list(read_jsonl(path / "metrics.jsonl"))
        series = report_series(read_run(path))
        want = {key: [(r["iteration"], r[key]) for r in records if r.get(key) is not None]
                for key in ("reward/assistant", "eval/score", "kl", "loss", "time/generate")}
        assert series["rewards"]["reward/assistant"] == want["reward/assistant"]
        assert series["heldout"]["eval/score"] == want["eval/score"]
        assert [i for i, _ in want["eval/score"]] == [0, 2, 3]  # before training, every 2, and at the end
        assert series["training"]["kl"] == want["kl"] and series["training"]["loss"] == want["loss"]
        assert series["time"]["time/generate"] == want["time/generate"]
        assert "time/iteration" not in series["time"]


def test_a_mix_run_plots_each_parts_measures(tiny_model_dir, tmp_path):
    """Under a mix every part's own metrics are recorded and plotted, and none reads a made-up 0: the gradient
    norm is the mix's (one update), not a part's."""
    run = tmp_path / "mixed"
    assert main(["play", "prompts", f"model.path={tiny_model_dir}", f"run.dir={run}", "run.iterations=2",
                 "run.eval_every=0", "run.loggers=[plain]", "model.lora.r=4", "game.dataset=arithmetic",
                 "game.group_size=2", "game.max_new_tokens=3", "game.eval_size=2",
                 "optimizer={name: mix, parts: [{name: grpo, trains: [assistant], beta: 0.1}]}"]) == 0
    records = list(read_jsonl(run / "metrics.jsonl"))
    assert all("grpo/grad_norm" not in r and r["grad_norm"] > 0 for r in records)
    training = report_series(read_run(run))["training"]
    for key in ("loss", "grad_norm", "grpo/loss", "grpo/kl"):
        assert training[key] == [(r["iteration"], r[key]) for r in records], key
    assert all(value > 0 for _, value in training["grpo/kl"][1:])  # the second step moved away from the base


def test_report_writes_pngs_a_summary_and_samples(two_runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", *map(str, two_runs), "--out", str(out), "--iterations", "1,3"]) == 0
    printed = capsys.readouterr().out
    assert "slow (prompts): 3 iterations" in printed and "fast (prompts): 3 iterations" in printed
    assert "eval/score:" in printed
    for panel in ("rewards", "heldout", "training", "time"):
        data = (out / f"{panel}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, panel
    plotted = json.loads((out / "series.json").read_text())
    assert plotted["fast"]["rewards"]["reward/assistant"] == [
        [r["iteration"], r["reward/assistant"]] for r in read_jsonl(two_runs[1] / "metrics.jsonl")
        if r.get("reward/assistant") is not None]
    samples = (out / "samples.md").read_text()
    for run in two_runs:  # per run and chosen iteration: the best and the worst of the role, with its reward
        rewards = {s["iteration"]: [x["reward"] for x in read_jsonl(run / "samples.jsonl")
                                    if x["iteration"] == s["iteration"] and x["reward"] is not None]
                   for s in read_jsonl(run / "samples.jsonl")}
        for it in (1, 3):
            assert f"## {run.name} iteration {it}, assistant, best (reward {max(rewards[it]):.4g})" in samples
            assert f"## {run.name} iteration {it}, assistant, worst (reward {min(rewards[it]):.4g})" in samples


def test_report_defaults_and_bad_input(two_runs, tmp_path, capsys):
    assert main(["report", str(two_runs[0])]) == 0  # into the run's own folder
    assert (two_runs[0] / "report" / "rewards.png").is_file()
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2
    assert "no config.yaml and metrics.jsonl there" in capsys.readouterr().err
    assert main(["report", str(two_runs[0]), "--iterations", "one"]) == 2
    assert "--iterations one" in capsys.readouterr().err


def test_a_missing_matplotlib_names_the_extra(two_runs, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(two_runs[0]), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'arena-selfplay[report]'" in err
