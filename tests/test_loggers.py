"""The progress lines: a game's headline metrics and notes, printed verbatim whatever the model wrote."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from arena.plugins.loggers import ConsoleLogger, PlainLogger, note_text, summary_line


def fake_run(headline=()):
    return SimpleNamespace(iterations=5, game=SimpleNamespace(headline_metrics=headline),
                           notes={"query": "Explain [/bold] and [red]this[/red]\nin   two lines " + "x" * 200})


def test_summary_line_shows_rewards_headline_metrics_and_time():
    metrics = {"reward/solver": 5.5, "reward/challenger": -1.25, "lsp/value": 2.5, "kl": 0.001, "loss": 0.5,
               "invalid/solver": 2.0, "time/iteration": 3.0}
    line = summary_line(fake_run(("lsp/value",)), 2, metrics)
    assert line.startswith("it 2/5")
    for part in ("reward/challenger -1.250", "reward/solver 5.500", "invalid/solver 2", "lsp/value 2.5",
                 "kl 0.001", "loss 0.5", "3.0s"):
        assert part in line
    assert "lsp/value" not in summary_line(fake_run(), 2, metrics)  # only the game's own headline metrics


def test_note_text_is_one_bounded_line():
    text = note_text("a\nb   c" + "y" * 300, width=40)
    assert "\n" not in text and len(text) == 40 and text.startswith("a b c") and text.endswith("…")


@pytest.mark.parametrize("logger_class", [PlainLogger, ConsoleLogger])
def test_notes_are_printed_verbatim(logger_class, capsys):
    logger = logger_class(None, None)
    logger.arena_metrics(fake_run(), 1, {"reward/solver": 1.0})
    out = capsys.readouterr().out
    assert "query: Explain [/bold] and [red]this[/red] in two lines" in out  # rich markup is not interpreted


def test_progress_line_shows_the_change_from_the_score_before_training():
    run = fake_run()
    run.baseline = {"eval/score": 2.5}
    assert "eval/score 2.5" in summary_line(run, 0, {"eval/score": 2.5}) and "before training" in summary_line(
        run, 0, {"eval/score": 2.5})
    line = summary_line(run, 4, {"eval/score": 2.75, "time/iteration": 1.0})
    assert "eval/score 2.75 (+0.25 since it 0)" in line
    assert "since it 0" not in summary_line(fake_run(), 4, {"eval/score": 2.75})  # no baseline: no change shown


# -- the tracker loggers, on real runs ------------------------------------------------------------------------

def _tracker_run(tiny_config, tmp_path, loggers, iterations, resume=False):
    from arena.cli import main

    run = tmp_path / "run"
    if resume:
        return main(["play", "prompts", "--resume", str(run), f"run.iterations={iterations}"])
    args = [a for a in tiny_config if not a.startswith(("run.dir=", "run.iterations=", "run.loggers="))]
    return main(["play", "prompts", *args, f"run.dir={run}", f"run.iterations={iterations}", f"run.loggers={loggers}",
                 "run.eval_every=1", "run.checkpoint_every=2", "game.group_size=2", "game.max_new_tokens=3",
                 "game.eval_size=2"])


def _crash_and_resume(tiny_config, tmp_path, loggers):
    """Three iterations, then as if killed before the last checkpoint was complete: the resume restores iteration 2
    and replays iteration 3, whose metrics the loggers had already written once."""
    import shutil

    assert _tracker_run(tiny_config, tmp_path, loggers, 3) == 0
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "000003")
    assert _tracker_run(tiny_config, tmp_path, None, 3, resume=True) == 0


def test_csv_holds_what_metrics_jsonl_holds_after_a_resume_too(tiny_config, tmp_path, capsys):
    import csv

    from arena.runstore import read_jsonl

    _crash_and_resume(tiny_config, tmp_path, "[plain,csv]")
    assert "resuming at iteration 3" in capsys.readouterr().out
    run = tmp_path / "run"
    records = list(read_jsonl(run / "metrics.jsonl"))
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2, 3]  # each iteration once
    for row, record in zip(rows, records):
        assert {k for k, v in row.items() if v != ""} == {k for k, v in record.items() if v is not None}
        for key, value in record.items():
            if value is not None:
                assert float(row[key]) == pytest.approx(value, rel=1e-12), key
    assert "loss" in rows[1] and "eval/score" in rows[0]


def test_tensorboard_event_files_hold_the_runs_metrics_once_per_step(tiny_config, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from arena.runstore import read_jsonl

    _crash_and_resume(tiny_config, tmp_path, "[plain,tensorboard]")
    assert "resuming at iteration 3" in capsys.readouterr().out
    run = tmp_path / "run"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = list(read_jsonl(run / "metrics.jsonl"))
    for key in ("loss", "reward/assistant", "eval/score", "time/iteration"):
        want = [(r["iteration"], r[key]) for r in records if r.get(key) is not None]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key


def test_a_missing_tracker_package_names_the_extra(tiny_config, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert _tracker_run(tiny_config, tmp_path, "[tensorboard]", 1) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'arena-selfplay[tensorboard]'" in err, err
    assert not (tmp_path / "run").exists()
