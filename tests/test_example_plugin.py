"""The third-party plugin in examples/arena-example-game, installed as a user would install it, but into a
temporary folder (`pip install --target`), never into this environment; arena then runs in subprocesses with
that folder on PYTHONPATH, so the plugin is found only through its `arena` entry point.

Also runs the plugin's own test suite (examples/arena-example-game/tests) against that install: the main CI runs
`pytest` over tests/ only, and this is how those tests run there."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "arena-example-game"
PLUGIN = "arena_example_game"  # the entry point's name: the plugin name `arena list` shows


def _distributions() -> set[str]:
    return {d.metadata["Name"] for d in importlib.metadata.distributions()}


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, Path]:
    """(a clean copy of the example's source, the folder it was pip-installed into)."""
    src = tmp_path_factory.mktemp("example-src") / EXAMPLE.name
    # a copy, so the build's build/ and *.egg-info never land in the repository
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__",
                                                                ".pytest_cache"))
    target = tmp_path_factory.mktemp("example-site")
    before = _distributions()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "--quiet", "--target", str(target), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _distributions() == before, "installing the example changed the main environment"
    assert (target / f"{PLUGIN}.py").is_file()
    dist_info = next(target.glob("arena_example_game-*.dist-info"))
    assert f"[arena]\n{PLUGIN} = {PLUGIN}" in (dist_info / "entry_points.txt").read_text()
    return src, target


def _env(target: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), env.get("PYTHONPATH", "")) if p)
    env.pop("ARENA_PLUGINS", None)  # an allow-list in the caller's environment would hide the plugin
    env.update(COLUMNS="200", HF_HUB_OFFLINE="1")
    return env


def arena(target: Path, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arena", *args], cwd=cwd, env=_env(target), capture_output=True,
                          text=True, timeout=timeout)


def test_plugin_is_absent_without_the_install(tmp_path):
    if "arena-example-game" in _distributions():
        pytest.skip("arena-example-game is installed in this environment (pip install -e examples/...)")
    proc = subprocess.run([sys.executable, "-m", "arena", "list"], cwd=tmp_path, capture_output=True, text=True,
                          env={**_env(tmp_path), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "mirror" not in proc.stdout and "overlap" not in proc.stdout


def test_arena_list_shows_the_plugins_game_and_judge(example, tmp_path):
    _, target = example
    proc = arena(target, "list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "failed to load" not in proc.stderr
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in proc.stdout.splitlines() if "│" in line]
    assert ["game", "mirror", PLUGIN] in [r[:3] for r in rows]
    assert ["judge", "overlap", PLUGIN] in [r[:3] for r in rows]
    assert ["game", "prompts", "prompts"] in [r[:3] for r in rows]  # built-ins still there


def test_arena_config_uses_the_games_default_judge(example, tmp_path):
    _, target = example
    proc = arena(target, "config", "mirror", "--sources", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert 'judge.name' in proc.stdout and '"overlap"   # game mirror defaults' in proc.stdout
    exact = arena(target, "config", "mirror", "judge.mode=exact", "game.copies_per_list=2", cwd=tmp_path)
    assert exact.returncode == 0 and "mode: exact" in exact.stdout and "copies_per_list: 2" in exact.stdout
    bad = arena(target, "config", "mirror", "game.copies=2", cwd=tmp_path)
    assert bad.returncode == 2 and "game.copies: unknown key" in bad.stderr


def test_a_setter_that_only_plays_needs_no_mix_part(example, tmp_path):
    """The plugin declares its roles and that an untrained setter produces nothing to train: a mix then trains the
    copier alone, and the same mix is refused while the setter is trained."""
    _, target = example
    mix = "optimizer={name: mix, parts: [{name: grpo, trains: [copier]}]}"
    frozen = arena(target, "config", "mirror", "game.train_setter=false", mix, cwd=tmp_path)
    assert frozen.returncode == 0, frozen.stderr
    trained = arena(target, "config", "mirror", mix, cwd=tmp_path)
    assert trained.returncode == 2 and "optimizer.parts: no part trains role 'setter'" in trained.stderr


def _check_run(run_dir: Path, lists: int, copies: int) -> tuple[list[dict], list[dict]]:
    from arena.runstore import read_jsonl

    samples = list(read_jsonl(run_dir / "samples.jsonl"))
    metrics = list(read_jsonl(run_dir / "metrics.jsonl"))
    assert [m["iteration"] for m in metrics] == [0, 1, 2]  # 0: the held-out score before training
    for it in (1, 2):
        rows = [s for s in samples if s["iteration"] == it]
        assert Counter(s["role"] for s in rows) == {"setter": lists, "copier": lists * copies}
        assert {s["group"] for s in rows if s["role"] == "setter"} == {f"{it}:setter"}
        assert Counter(s["group"] for s in rows if s["role"] == "copier") == {
            f"{it}:list{i}": copies for i in range(lists)}
        for s in rows:
            if s["role"] == "copier":
                assert 0.0 <= s["reward"] <= 1.0
            elif s["metadata"]["format_ok"]:
                mates = [c["reward"] for c in rows if c["group"] == s["metadata"]["copier_group"]]
                assert s["reward"] == pytest.approx(1 - sum(mates) / len(mates))
            else:
                assert s["reward"] == -1.0
    for m in metrics[1:]:
        assert {"reward/setter", "reward/copier", "loss", "mirror/setter_format_ok"} <= set(m)
    for m in (metrics[0], metrics[-1]):  # before training, and at the end
        assert {"eval/f1", "eval/exact", "eval/score", "eval/setter_format_ok"} <= set(m)
    assert json.loads((run_dir / "checkpoints" / "000002" / "meta.json").read_text())["iteration"] == 2
    return samples, metrics


def test_play_mirror_on_a_tiny_model(example, tiny_config, tmp_path):
    _, target = example
    proc = arena(target, "play", "mirror", *tiny_config, "game.lists_per_round=2", "game.copies_per_list=2",
                 "game.max_new_tokens=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "it 2/2" in proc.stdout and "reward/copier" in proc.stdout
    _check_run(tmp_path / "run", lists=2, copies=2)


@pytest.mark.slow
def test_play_mirror_on_the_embedded_model(example, tmp_path):
    _, target = example
    run_dir = tmp_path / "run"
    proc = arena(target, "play", "mirror", f"run.dir={run_dir}", "run.iterations=2", "run.loggers=[plain]",
                 "model.lora.r=4", "game.lists_per_round=2", "game.copies_per_list=2", "game.max_new_tokens=24",
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    samples, metrics = _check_run(run_dir, lists=2, copies=2)
    # the real model, asked greedily to repeat held-out lists, gets most words right; a random model would not.
    # (Sampled copies at temperature 1 are too few here to say anything: 8 of them all scored 0 in one run.)
    assert metrics[-1]["eval/f1"] > 0.3, metrics[-1]


def test_the_plugins_own_tests_pass(example):
    """examples/arena-example-game/tests, run against the --target install (python -P: the copy's folder is not
    put on sys.path, so the installed module is the one under test)."""
    src, target = example
    proc = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=src, env=_env(target), capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and not re.search(r"skipped|error|xfail|deselected", summary), tail
