"""Meta-tests of the plugin API (arena/hookspecs.py): every hook is documented, every lifecycle hook is called
during a real (tiny) run, and every registration hook is exercised by a plugin whose components that run uses.

The plugin is a one-file plugin in ARENA_PLUGINS_DIR; it records what it sees as JSON lines in a file."""

from __future__ import annotations

import inspect
import json
import os
import textwrap

from pathlib import Path

import pytest

import arena.hookspecs as hookspecs
from arena.cli import main
from arena.registry import load_registry

RECORDER = '''
import json
import os

from arena.games.prompts import PromptsGame
from arena.hookspecs import hookimpl
from arena.interfaces import Logger
from arena.plugins.optimizers.grpo import GRPO
from arena.plugins.backends.hf.backend import HFBackend
from arena.plugins.judges.general import ExactMatch
from arena.plugins.executors.sandbox import SandboxExecutor


def _rec(event, **data):
    with open(os.environ["ARENA_TEST_HOOK_LOG"], "a") as f:
        f.write(json.dumps({"event": event, **data}) + "\\n")


@hookimpl
def arena_run_start(run):
    _rec("arena_run_start", iteration=run.iteration, iterations=run.iterations, dir=str(run.dir))


@hookimpl
def arena_phase_start(run, phase):
    _rec("arena_phase_start", phase=phase, iteration=run.iteration)


@hookimpl
def arena_phase_end(run, phase, seconds, tokens):
    _rec("arena_phase_end", phase=phase, seconds=seconds, tokens=tokens, iteration=run.iteration)


@hookimpl
def arena_round_end(run, iteration, samples):
    written = os.path.join(run.dir, "samples.jsonl")
    with open(written) as f:
        records = [json.loads(line) for line in f]
    _rec("arena_round_end", iteration=iteration, n=len(samples), roles=sorted({s.role for s in samples}),
         written=[r["iteration"] for r in records],
         trained_with=[r["advantage"] for r in records if r["iteration"] == iteration],
         advantages=[s.advantage for s in samples])


@hookimpl
def arena_metrics(run, step, metrics):
    _rec("arena_metrics", step=step, keys=sorted(metrics))


@hookimpl
def arena_checkpoint_saved(run, iteration, path):
    _rec("arena_checkpoint_saved", iteration=iteration, path=path, complete=os.path.isfile(os.path.join(path, "meta.json")))


@hookimpl
def arena_run_end(run, error):
    _rec("arena_run_end", error=None if error is None else repr(error), iteration=run.iteration)


class RecGame(PromptsGame):
    def __init__(self, options, env):
        super().__init__(options, env)
        _rec("built", kind="game")


class RecJudge(ExactMatch):
    def __init__(self, options, env):
        super().__init__(options, env)
        _rec("built", kind="judge")


class RecOptimizer(GRPO):
    def __init__(self, options, env):
        super().__init__(options, env)
        _rec("built", kind="optimizer")

    def step(self, samples, roles):
        _rec("optimizer_step", n=len(samples))
        return super().step(samples, roles)


class RecBackend(HFBackend):
    def __init__(self, options, env):
        super().__init__(options, env)
        _rec("built", kind="backend")


class RecLogger(Logger):
    def __init__(self, options, env):
        super().__init__(options, env)
        _rec("built", kind="logger")

    @hookimpl
    def arena_metrics(self, run, step, metrics):
        _rec("logger_metrics", step=step)


class RecExecutor(SandboxExecutor):
    def run(self, jobs):
        _rec("executor_run", n=len(jobs))
        return super().run(jobs)


def _hello(args):
    _rec("command", who=args.who)
    print(f"hello {args.who}")
    return 3


@hookimpl
def register_games(register):
    register("rec_game", RecGame)


@hookimpl
def register_judges(register):
    register("rec_judge", RecJudge)


@hookimpl
def register_optimizers(register):
    register("rec_opt", RecOptimizer)


@hookimpl
def register_backends(register):
    register("rec_backend", RecBackend)


@hookimpl
def register_executors(register):
    register("rec_executor", RecExecutor)


@hookimpl
def register_loggers(register):
    register("rec_logger", RecLogger)


@hookimpl
def register_commands(register):
    register("hello", _hello, help="say hello", configure=lambda p: p.add_argument("--who", default="world"))
'''

REGISTRATION = {"register_games": "game", "register_judges": "judge", "register_optimizers": "optimizer",
                "register_backends": "backend", "register_loggers": "logger", "register_executors": "executor",
                "register_commands": "command"}


def hook_specs() -> dict[str, object]:
    return {name: fn for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, "arena_spec")}


def lifecycle_hooks() -> set[str]:
    return {name for name in hook_specs() if not name.startswith("register_")}


@pytest.fixture()
def recorder(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "recorder.py").write_text(textwrap.dedent(RECORDER))
    log = tmp_path / "hooks.jsonl"
    monkeypatch.setenv("ARENA_PLUGINS_DIR", str(folder))
    monkeypatch.setenv("ARENA_TEST_HOOK_LOG", str(log))
    monkeypatch.delenv("ARENA_PLUGINS", raising=False)

    def events() -> list[dict]:
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    return events


def test_every_hook_is_documented():
    specs = hook_specs()
    assert len(specs) >= 13
    assert (hookspecs.__doc__ or "").strip()
    for name, fn in specs.items():
        doc = inspect.getdoc(fn) or ""
        assert len(doc) >= 30, f"hook {name} needs a docstring saying when it is called and what it receives"


def test_hook_families_are_the_documented_ones():
    specs = set(hook_specs())
    assert {n for n in specs if n.startswith("register_")} == set(REGISTRATION)
    assert lifecycle_hooks() == {"arena_run_start", "arena_phase_start", "arena_phase_end", "arena_round_end",
                                 "arena_metrics", "arena_checkpoint_saved", "arena_run_end"}


def test_the_recorder_implements_every_hook(recorder):
    registry = load_registry()
    assert registry.failed == {}
    plugin = registry.pm.get_plugin("file:recorder.py")
    for name in hook_specs():
        assert hasattr(plugin, name), f"test plugin lacks {name}: the meta-tests would not exercise it"
    registry.pm.check_pending()  # every hookimpl of the plugin matches a spec (no misspelt hook names)


def test_every_registration_hook_is_exercised(recorder, capsys):
    registry = load_registry()
    assert registry.failed == {}
    for hook, kind in REGISTRATION.items():
        if kind == "command":
            assert registry.commands["hello"].plugin == "file:recorder.py"
            assert registry.commands["hello"].help == "say hello"
        else:
            mine = [name for name, e in registry.entries[kind].items() if e.plugin == "file:recorder.py"]
            assert mine, f"{hook}: the test plugin registered nothing"
    # a plugin command runs through the CLI, with its own arguments and exit status
    assert main(["hello", "--who", "arena"]) == 3
    assert "hello arena" in capsys.readouterr().out
    assert main(["hello"]) == 3
    assert "hello world" in capsys.readouterr().out
    assert [e["who"] for e in recorder() if e["event"] == "command"] == ["arena", "world"]


def test_every_lifecycle_hook_is_called_in_a_run(recorder, tiny_config, tmp_path, capsys):
    rc = main(["play", "rec_game", *tiny_config, "game.dataset=arithmetic", "judge=rec_judge",
               "game.max_new_tokens=8", "game.prompts_per_round=2", "game.group_size=2", "game.eval_size=2",
               "optimizer=rec_opt", "backend=rec_backend", "run.loggers=[plain,rec_logger]"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    events = recorder()
    names = [e["event"] for e in events]

    missing = lifecycle_hooks() - set(names)
    assert not missing, f"lifecycle hooks never called in a run: {sorted(missing)}"

    # every component the run used came from the plugin's registration hooks
    assert sorted(e["kind"] for e in events if e["event"] == "built") == \
        ["backend", "game", "judge", "logger", "optimizer"]
    assert names.count("optimizer_step") == 2

    assert names.count("arena_run_start") == 1 and names.count("arena_run_end") == 1
    lifecycle = [e for e in events if e["event"] in lifecycle_hooks()]
    assert lifecycle[0]["event"] == "arena_run_start" and lifecycle[0]["iteration"] == 1
    assert lifecycle[0]["iterations"] == 2 and lifecycle[0]["dir"] == str(tmp_path / "run")
    assert lifecycle[-1] == {"event": "arena_run_end", "error": None, "iteration": 2}

    starts = [(e["iteration"], e["phase"]) for e in events if e["event"] == "arena_phase_start"]
    ends = [(e["iteration"], e["phase"]) for e in events if e["event"] == "arena_phase_end"]
    assert starts == ends
    assert {"generate", "judge", "optimize"} <= {p for _, p in starts}
    assert (2, "eval") in starts  # the last iteration is evaluated
    generate = [e for e in events if e["event"] == "arena_phase_end" and e["phase"] == "generate"]
    assert all(e["tokens"] > 0 and e["seconds"] >= 0 for e in generate)
    assert all(e["tokens"] <= 2 * 2 * 8 for e in generate)

    rounds = [e for e in events if e["event"] == "arena_round_end"]
    assert [(e["iteration"], e["n"], e["roles"]) for e in rounds] == [(1, 4, ["assistant"]), (2, 4, ["assistant"])]
    # when the hook fires, the round is in samples.jsonl with the advantages the optimizer computed
    assert [e["written"] for e in rounds] == [[1] * 4, [1] * 4 + [2] * 4]
    assert all(e["trained_with"] == e["advantages"] for e in rounds)
    assert any(a is not None for e in rounds for a in e["advantages"])
    metrics = [e for e in events if e["event"] == "arena_metrics"]
    assert [e["step"] for e in metrics] == [0, 1, 2]  # step 0: the held-out evaluation before training
    assert "eval/valid_frac" in metrics[0]["keys"] and "loss" not in metrics[0]["keys"]
    assert "loss" in metrics[1]["keys"] and "reward/assistant" in metrics[1]["keys"]
    assert "eval/valid_frac" in metrics[2]["keys"]
    saved = [e for e in events if e["event"] == "arena_checkpoint_saved"]
    assert [e["iteration"] for e in saved] == [1, 2] and all(e["complete"] for e in saved)
    assert [e["step"] for e in events if e["event"] == "logger_metrics"] == [0, 1, 2]  # a logger plugin hears hooks
    # order within an iteration: the optimizer steps, then the round is recorded (with the advantages it was
    # trained with), then metrics, then the checkpoint
    first = [n for n in names[names.index("optimizer_step"):]
             if n in ("arena_round_end", "optimizer_step", "arena_metrics", "arena_checkpoint_saved")][:4]
    assert first == ["optimizer_step", "arena_round_end", "arena_metrics", "arena_checkpoint_saved"]
    assert os.path.isdir(tmp_path / "run" / "checkpoints")


def test_run_end_is_called_once_when_a_round_fails(recorder, tiny_config, tmp_path, monkeypatch, capsys):
    from arena.games import prompts

    def explode(self, ctx):
        raise RuntimeError("the game broke")

    monkeypatch.setattr(prompts.PromptsGame, "play", explode)
    with pytest.raises(RuntimeError, match="the game broke"):
        main(["play", "rec_game", *tiny_config, "game.dataset=arithmetic", "judge=exact_match",
              "game.max_new_tokens=4", "game.eval_size=2"])
    ends = [e for e in recorder() if e["event"] == "arena_run_end"]
    assert len(ends) == 1 and "the game broke" in ends[0]["error"]


RAISING_HOOK = '''
from arena.hookspecs import hookimpl


@hookimpl
def arena_round_end(run, iteration, samples):
    raise ValueError("boom in a plugin")
'''


def test_a_plugin_hook_that_raises_is_one_line_naming_it(tiny_config, tmp_path, monkeypatch, capsys):
    from arena.cli import main

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "bad_hook.py").write_text(RAISING_HOOK)
    monkeypatch.setenv("ARENA_PLUGINS_DIR", str(plugins))
    rc = main(["play", "prompts", *tiny_config, "game.dataset=arithmetic", "judge=exact_match",
               "game.prompts_per_round=2", "game.group_size=2", "game.max_new_tokens=2", "game.eval_size=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("arena: error: plugin 'file:bad_hook.py': its arena_round_end hook raised ValueError: "
                           f"boom in a plugin at {plugins / 'bad_hook.py'}:7"), last
    # it stopped in the first round, before any checkpoint: no folder is left, and no --resume is advised (it
    # would only start over, and could not take the change that fixes the error)
    run = Path(next(a.split("=", 1)[1] for a in tiny_config if a.startswith("run.dir=")))
    assert not run.exists() and "--resume" not in err and "nothing was kept" in err
