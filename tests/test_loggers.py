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


@pytest.mark.parametrize("logger, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_tracker_package_names_the_extra(tiny_config, tmp_path, capsys, monkeypatch, logger, module):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # as if the package were not installed
    assert _tracker_run(tiny_config, tmp_path, f"[{logger}]", 1) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pip install 'arena-selfplay[{logger}]'" in err, err
    assert not (tmp_path / "run").exists()


def _wandb_records(run):
    """The records of the run's offline .wandb file, as W&B's own reader prints them (`wandb leet inspect --json`,
    one JSON object per record)."""
    import json
    import os
    import subprocess
    import sys

    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files  # a resume rewrites the folder: one W&B log, never an old one beside it
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(files[0])],
                         capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false"})
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_wandb_offline_files_hold_the_runs_metrics_and_config_once_per_step(tiny_config, tmp_path, capsys,
                                                                             monkeypatch):
    import shutil

    import yaml

    from arena.runstore import read_jsonl

    for name in ("WANDB_MODE", "WANDB_ERROR_REPORTING", "WANDB_SILENT"):  # the logger sets them for the process:
        monkeypatch.setenv(name, "")  # recorded, so that they are restored after the test
        monkeypatch.delenv(name)
    run = tmp_path / "run"
    assert _tracker_run(tiny_config, tmp_path, "[plain,wandb]", 3) == 0
    run_id = (run / "wandb" / "run_id").read_text()
    first = [r["history"]["item"] for r in _wandb_records(run) if r["type"] == "history"]
    shutil.rmtree(run / "checkpoints" / "000003")  # as if killed before the last checkpoint was complete
    assert _tracker_run(tiny_config, tmp_path, None, 3, resume=True) == 0  # replays iteration 3
    assert "resuming at iteration 3" in capsys.readouterr().out

    records = _wandb_records(run)
    metrics = list(read_jsonl(run / "metrics.jsonl"))
    history = [r["history"] for r in records if r["type"] == "history"]
    assert [h["step"].get("num", 0) for h in history] == [m["iteration"] for m in metrics] == [0, 1, 2, 3]
    for h, m in zip(history, metrics):  # every value W&B holds is the run store's, and nothing more
        got = {k: v for k, v in h["item"].items() if not k.startswith("_")}
        want = {k: v for k, v in m.items() if k != "iteration" and v is not None}
        assert got.keys() == want.keys(), m["iteration"]
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-12), (m["iteration"], key)
    assert "loss" in history[1]["item"] and "eval/score" in history[0]["item"]
    assert history[3]["item"]["time/iteration"] != first[3]["time/iteration"]  # the replay's values, not the first

    run_record = next(r["run"] for r in records if r["type"] == "run")
    assert run_record["run_id"] == run_id and run_record["display_name"] == "run" and run_record["project"] == "arena"
    config = {k: v for k, v in run_record["config"]["update"].items() if k != "_wandb"}
    assert config == yaml.safe_load((run / "config.yaml").read_text())
    assert config["run"]["loggers"] == ["plain", "wandb"]
    assert [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"] == [0]  # finished


NO_NETWORK = """
import socket, sys
from pathlib import Path
from types import SimpleNamespace

def no_network(host, *args, **kwargs):
    print(f"network lookup: {host}", file=sys.stderr, flush=True)
    raise OSError("no network")

socket.getaddrinfo = no_network
from arena.plugins.loggers import WandbLogger

run = SimpleNamespace(dir=Path(sys.argv[1]), start_iteration=1)
logger = WandbLogger(None, None)
logger.arena_run_start(run)
logger.arena_metrics(run, 1, {"loss": 0.5})
logger.arena_run_end(run, None)
"""


def test_the_wandb_logger_never_reaches_for_the_network(tmp_path):
    """In a process of its own: W&B's analytics would probe its server from a thread, as late as the exit."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run:\n  iterations: 1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    done = subprocess.run([sys.executable, "-c", NO_NETWORK, str(run)], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 0 and "network lookup" not in done.stderr, done.stderr
    assert done.stdout == ""  # and silent: arena's progress display stays whole
    history = [r["history"] for r in _wandb_records(run) if r["type"] == "history"]
    assert [(h["step"]["num"], h["item"]["loss"]) for h in history] == [(1, 0.5)]
