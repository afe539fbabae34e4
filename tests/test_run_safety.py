"""A run folder through the CLI on the tiny model: one process at a time, what a resume may change, a damaged
checkpoint, and what samples.jsonl records of the update."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from arena.cli import main
from arena.runstore import read_jsonl

FAST = ["game.dataset=arithmetic", "judge=exact_match", "game.prompts_per_round=2", "game.group_size=2",
        "game.max_new_tokens=4", "game.eval_size=2", "run.eval_every=1"]


def _play(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_second_process_cannot_use_a_running_run_folder(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    args = [a for a in tiny_config if not a.startswith("run.iterations")]
    busy = subprocess.Popen([sys.executable, "-m", "arena", "play", "prompts", *args, *FAST,
                             "run.iterations=1000000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not list(run.glob("checkpoints/0*/meta.json")):  # the folder is locked and a round is saved
            assert busy.poll() is None, busy.communicate()
            assert time.time() < deadline
            time.sleep(0.1)
        before = (run / "samples.jsonl").stat().st_size
        rc, _, err = _play(capsys, "play", "prompts", "--resume", str(run))
        assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert str(run) in err and "another arena process" in err
        assert (run / "samples.jsonl").stat().st_size >= before  # nothing was cut back under the running process
    finally:
        busy.kill()
        busy.wait()
    played = max(int(p.parent.name) for p in run.glob("checkpoints/0*/meta.json"))
    rc, out, _ = _play(capsys, "play", "prompts", "--resume", str(run), f"run.iterations={played + 1}")  # kill -9 freed it
    assert rc == 0 and "resuming at iteration" in out


def test_resume_applies_what_may_change_and_refuses_the_rest(tiny_config, tmp_path, capsys, tiny_model_dir):
    import shutil

    run = tmp_path / "run"
    other = shutil.copytree(tiny_model_dir, tmp_path / "another-model")  # a valid model, at another path
    assert _play(capsys, "play", "prompts", *tiny_config, *FAST, "run.iterations=1")[0] == 0
    for override, key in (("model.lora.r=8", "model.lora.r"), (f"model.path={other}", "model.path"),
                          ("game.group_size=3", "game.group_size"), ("judge=self_reward", "judge.name"),
                          ("run.seed=4", "run.seed")):
        rc, _, err = _play(capsys, "play", "prompts", "--resume", str(run), override)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith(f"arena: error: {key}:"), err
        assert "cannot change on --resume" in err
    assert "lr: 1.0e-05" in (run / "config.yaml").read_text()  # a refused resume records nothing

    seen = []
    from arena.plugins.optimizers import grpo

    original = grpo.GRPO.step

    def spy(self, samples, roles):
        seen.append([g["lr"] for g in self.torch_optimizer.param_groups])
        return original(self, samples, roles)

    grpo.GRPO.step = spy
    try:
        rc, out, err = _play(capsys, "play", "prompts", "--resume", str(run), "run.iterations=2", "optimizer.lr=0.02")
    finally:
        grpo.GRPO.step = original
    assert rc == 0, err
    assert seen == [[0.02]]  # the restored AdamW trains at the new rate, not the saved one
    assert "lr: 0.02" in (run / "config.yaml").read_text()


def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert _play(capsys, "play", "prompts", *tiny_config, *FAST, "run.iterations=2")[0] == 0
    damaged = run / "checkpoints" / "000002" / "optimizer.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    rc, out, err = _play(capsys, "play", "prompts", "--resume", str(run), "run.iterations=3")
    assert rc == 0, err
    assert "arena: warning:" in err and "optimizer.pt" in err and "Traceback" not in err
    assert "resuming at iteration 2" in out
    assert [s["iteration"] for s in read_jsonl(run / "samples.jsonl")] == [1] * 4 + [2] * 4 + [3] * 4
    assert [m["iteration"] for m in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3]


def test_samples_record_the_advantage_they_were_trained_with(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert _play(capsys, "play", "prompts", *tiny_config, *FAST, "run.iterations=1")[0] == 0
    samples = list(read_jsonl(run / "samples.jsonl"))
    assert samples and all(s["trained"] and s["advantage"] is not None for s in samples)
    for group in {s["group"] for s in samples}:  # reward minus the group's mean: the recorded advantages sum to 0
        assert sum(s["advantage"] for s in samples if s["group"] == group) == pytest.approx(0.0, abs=1e-6)
    metrics = list(read_jsonl(run / "metrics.jsonl"))
    assert metrics[0]["iteration"] == 0 and {"eval/score", "eval/valid_frac"} <= set(metrics[0])


def test_a_non_finite_step_stops_the_run_naming_the_iteration(tiny_config, tmp_path, capsys, monkeypatch):
    """A judge that returns an infinite score in round 2: one line naming iteration 2, the weights of checkpoint 1
    untouched, round 2's samples kept for diagnosis (a resume cuts them back and replays the round)."""
    from arena.plugins.judges.general import ExactMatch
    from arena.types import Verdict

    calls = []
    original = ExactMatch.judge

    def judge(self, items):
        verdicts = original(self, items)
        if len(items) == 4:  # a round (held-out evaluations score 2 items)
            calls.append(len(items))
            if len(calls) == 2:
                verdicts[0] = Verdict(float("inf"))
        return verdicts

    monkeypatch.setattr(ExactMatch, "judge", judge)
    run = tmp_path / "run"
    rc, out, err = _play(capsys, "play", "prompts", *tiny_config, *FAST, "run.iterations=3")
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("arena: error: iteration 2: the assistant loss is nan")
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")] == ["000001"]
    assert [s["iteration"] for s in read_jsonl(run / "samples.jsonl")] == [1] * 4 + [2] * 4
    assert all(not s["trained"] for s in read_jsonl(run / "samples.jsonl") if s["iteration"] == 2)
    monkeypatch.setattr(ExactMatch, "judge", original)
    rc, out, err = _play(capsys, "play", "prompts", "--resume", str(run))
    assert rc == 0 and "resuming at iteration 2" in out, err


def test_prompts_over_the_length_limit_in_a_users_file_are_counted(tmp_path):
    import warnings

    from arena.errors import ArenaWarning
    from arena.games.data import short_records

    records = [{"prompt": "short"}, {"prompt": "x" * 50}, {"prompt": "y" * 60}]
    with pytest.warns(ArenaWarning, match=r"game.dataset my.jsonl: left out 2 of 3 prompts longer than 10 "
                                          r"characters \(game.max_prompt_chars\)"):
        assert short_records(records, 10, "my.jsonl", "game.dataset", "game.max_prompt_chars") == records[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the built-in sets are filtered by design: no warning
        short_records(records, 10, "sharegpt", "game.dataset", "game.max_prompt_chars")


@pytest.mark.parametrize("content, problem", [
    ("", "empty"),
    ("version https://git-lfs.github.com/spec/v1\n", "not a JSON array"),
    ('[{"conversations": "x"}, 3, {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human"}]}]',
     "no conversation opens with a human turn and an answer"),
])
def test_a_damaged_sharegpt_file_is_one_line_and_never_cached(tmp_path, monkeypatch, content, problem):
    """A broken install of the ShareGPT package (a cut-short copy on a bare machine was seen to fail with
    `ValueError: substring not found` deep in the parser) is one line naming the file, and nothing is cached, so
    that a reinstall is read afresh."""
    from arena.errors import ArenaError
    from arena.games import data

    source = tmp_path / "ShareGPT.json"
    source.write_text(content, encoding="utf-8")
    monkeypatch.setenv("ARENA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_sharegpt_file", lambda: source)
    with pytest.raises(ArenaError) as caught:
        data.sharegpt_pairs()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"game.dataset sharegpt: {source}: {problem};")
    assert "--force-reinstall" in message
    assert not (tmp_path / "cache" / "data").exists()
    source.write_text('[{"conversations": [{"from": "human", "value": " hi "}, {"from": "gpt", "value": "yo"}]}, '
                      '{"conversations": [{"from": "human", "value": "cut', encoding="utf-8")
    assert data.sharegpt_pairs() == [{"prompt": "hi", "answer": "yo"}]  # the cut-off tail is dropped quietly
    source.write_text("", encoding="utf-8")  # the source spoilt again: the cache answers, not the file
    assert data.sharegpt_pairs() == [{"prompt": "hi", "answer": "yo"}]
