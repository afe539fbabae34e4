"""Bad input to the commands that read and write runs, met from outside as a user meets it: each is one line naming
what is wrong (exit 2, no traceback), found before minutes of work whose output would be lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from arena.cli import main
from arena.runstore import read_jsonl
from tiny import play_prompts



@pytest.fixture(scope="module")
def played(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished 2-iteration run; each test uses a copy of it."""
    return play_prompts(tiny_model_dir, tmp_path_factory.mktemp("played") / "run", 2)


@pytest.fixture()
def run(played, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(played, copy)
    return copy


def one_line(capsys, argv: list[str], *words: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def test_export_to_a_place_it_cannot_write(run, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line(capsys, ["export", str(run), "/proc/arena-x"], "OUT /proc/arena-x: cannot create a folder in /proc")
    one_line(capsys, ["export", str(run), str(afile / "model")], f"{afile} is a file, not a folder")


def test_report_out_that_cannot_be_written(run, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line(capsys, ["report", str(run), "--out", str(afile)], f"--out {afile}: is a file; expected a folder")
    one_line(capsys, ["report", str(run), "--out", "/proc/arena-x"], "--out /proc/arena-x: cannot create a folder")


def test_report_iterations_the_run_did_not_play(run, tmp_path, capsys):
    one_line(capsys, ["report", str(run), "--out", str(tmp_path / "r"), "--iterations", "99,100"],
             "--iterations 99,100:", "has no iteration 99; it played 1-2")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("junk", ['not json\n', '{"loss": 1.0}\n', '[1, 2]\n', '{"iteration": "3"}\n'])
def test_report_on_a_metrics_file_with_junk(run, tmp_path, capsys, junk):
    lines = (run / "metrics.jsonl").read_text().count("\n")
    with (run / "metrics.jsonl").open("a") as f:
        f.write(junk)
    one_line(capsys, ["report", str(run), "--out", str(tmp_path / "r")],
             f"metrics.jsonl:{lines + 1}: not a metrics record")


def test_report_skips_values_that_are_not_numbers(run, tmp_path, capsys):
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"iteration": 3, "loss": "high", "kl": None, "reward/assistant": [1]}) + "\n")
    assert main(["report", str(run), "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    series = json.loads((tmp_path / "r" / "series.json").read_text())["run"]
    assert [i for i, _ in series["training"]["loss"]] == [1, 2]


def test_eval_refuses_before_evaluating_when_it_could_not_write(run, tmp_path, capsys):
    (run / "evals").write_text("a file where the results folder goes")
    one_line(capsys, ["eval", str(run)], f"RUN {run}: cannot write the results to {run / 'evals'}",
             "give --out FILE")
    one_line(capsys, ["eval", str(run), "--out", str(tmp_path)], "is a folder; expected the path of a JSON file")
    one_line(capsys, ["eval", str(run), "--max-new-tokens", "8"], "--max-new-tokens 8: sets the answer length for "
                                                                   "--prompts only")


def test_eval_writes_to_out_when_asked(run, tmp_path, capsys):
    out = tmp_path / "results" / "eval.json"
    assert main(["eval", str(run), "--out", str(out), "compare=exact_match"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert "held_out" in json.loads(out.read_text()) and not (run / "evals").exists()


@pytest.fixture()
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only; CI runs as root, as this machine does)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Fill a file system to its last byte; returns the filler to delete."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 16, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


FILL_WHEN = """
import os
from pathlib import Path

from arena.hookspecs import hookimpl


def _fill():
    disk = os.environ.get("ARENA_TEST_FILL")
    if disk and not (Path(disk) / "filler").exists():
        from test_bad_input import fill
        fill(Path(disk))


@hookimpl
def {hook}(run, **kw):
    if run.iteration == 3:
        _fill()
"""


@pytest.mark.parametrize("when, where", [
    (None, "config.yaml"),                   # full before the resume starts: its config cannot be written
    ("arena_run_start", "samples.jsonl"),    # full before iteration 3's records
    ("arena_metrics", "checkpoints/000003"),  # full between iteration 3's records and its checkpoint
])
def test_a_full_disk_is_one_line_and_nothing_written_is_lost(played, small_disk, tmp_path, capsys, monkeypatch,
                                                             when, where):
    run = small_disk / "run"
    shutil.copytree(played, run)
    if when is None:
        fill(small_disk)
    else:
        plugins = tmp_path / "plugins"
        plugins.mkdir()
        (plugins / "fill_disk.py").write_text(FILL_WHEN.format(hook=when))
        monkeypatch.setenv("ARENA_PLUGINS_DIR", str(plugins))
        monkeypatch.setenv("ARENA_TEST_FILL", str(small_disk))
    rc = main(["play", "prompts", "--resume", str(run), "run.iterations=4"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"arena: error: {run / where}: cannot write it (No space left on device)"
    monkeypatch.delenv("ARENA_TEST_FILL", raising=False)
    (small_disk / "filler").unlink()
    assert main(["play", "prompts", "--resume", str(run), "run.iterations=4"]) == 0  # checkpoint 2 reads back whole
    capsys.readouterr()
    assert [r["iteration"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    assert [r["iteration"] for r in read_jsonl(run / "samples.jsonl")] == [i for i in (1, 2, 3, 4) for _ in range(4)]


def test_a_model_of_the_wrong_kind_is_refused_by_arena_config(tiny_model_dir, reward_model_dir, capsys):
    """Read from config.json before any weights load: a classifier cannot be the policy, a causal LM cannot be a
    reward model."""
    one_line(capsys, ["config", "prompts", f"model.path={reward_model_dir}"],
             "model.path:", "a sequence-classification model (LlamaForSequenceClassification), not a causal "
             "language model", "judge: {name: reward_model, path:")
    one_line(capsys, ["config", "prompts", f"judge={{name: reward_model, path: {tiny_model_dir}}}"],
             "judge.path:", "ForCausalLM; expected a sequence classifier")
    assert main(["config", "prompts", f"model.path={tiny_model_dir}",
                 f"judge={{name: reward_model, path: {reward_model_dir}}}"]) == 0
    capsys.readouterr()


def test_max_new_tokens_past_the_models_context_is_refused_by_arena_config(tiny_model_dir, capsys):
    one_line(capsys, ["config", "prompts", f"model.path={tiny_model_dir}", "game.max_new_tokens=5000"],
             "game.max_new_tokens: 5000; the model's context holds 2048 tokens")
    one_line(capsys, ["config", "lsp", f"model.path={tiny_model_dir}", "judge.max_new_tokens=100000000"],
             "judge.max_new_tokens: 100000000")
    assert main(["config", "prompts", f"model.path={tiny_model_dir}", "game.max_new_tokens=2048"]) == 0
    capsys.readouterr()


def test_the_gguf_header_reader_agrees_with_the_gguf_package():
    """context_length reads only a GGUF file's header (milliseconds, where gguf's reader maps every tensor)."""
    from gguf import GGUFReader

    from arena.plugins.backends.hf.models import context_length, embedded_gguf, gguf_context_length

    path = embedded_gguf()
    field = GGUFReader(str(path), "r").fields["llama.context_length"]
    assert gguf_context_length(path) == int(field.parts[field.data[0]][0]) == context_length(None) == 8192


def test_lora_targets_the_model_lacks_are_refused_by_arena_config(tiny_model_dir, capsys):
    """From the model's config alone (its modules built on the meta device): the embedded GGUF's architecture from
    its header, a folder's from config.json."""
    one_line(capsys, ["config", "prompts", "model.lora.target_modules=[zzz]"],
             "model.lora.target_modules: ['zzz'] not in the model; LoRA can adapt its projections:", "q_proj")
    one_line(capsys, ["config", "prompts", f"model.path={tiny_model_dir}", "model.lora.target_modules=[q_proj,zzz]"],
             "['zzz'] not in the model")
    assert main(["config", "prompts", f"model.path={tiny_model_dir}", "model.lora.target_modules=[q_proj,up_proj]"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("room", [0, 256 * 1024])  # bytes left: a full disk, one that fills while writing
def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(run, small_disk, capsys, room):
    filler = fill(small_disk)
    os.truncate(filler, max(0, filler.stat().st_size - room))
    rc = main(["export", str(run), str(small_disk / "model")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"OUT {small_disk / 'model'}: cannot write the model there (" in err and "No space left" in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no half-written model left behind
