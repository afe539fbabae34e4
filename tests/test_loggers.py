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
