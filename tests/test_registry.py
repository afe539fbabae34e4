"""Plugin discovery: entry points and ARENA_PLUGINS_DIR files, failure isolation, the ARENA_PLUGINS allow-list
and its warnings, Options validation at registration, tracing, `arena list`, and the plugin guide's examples
(docs/plugins.md), which are run as plugins here so that the guide stays true."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from arena.cli import main
from arena.config import resolve
from arena.errors import ArenaWarning, ConfigError
from arena.registry import load_registry

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"

BUILTINS = {
    "game": {"prompts": "prompts", "lsp": "lsp", "spin": "spin", "azr": "azr", "pop": "pop"},
    "judge": {"self_reward": "judges", "llm_judge": "judges", "reward_model": "judges", "exact_match": "judges",
              "mix": "judges", "rubric": "rubric"},
    "optimizer": {"grpo": "grpo", "dpo": "dpo", "mix": "mix_optimizer"},
    "backend": {"hf": "hf"},
    "logger": {"console": "loggers", "plain": "loggers"},
    "executor": {"sandbox": "sandbox"},
}

GOOD = '''
from dataclasses import dataclass
from arena.hookspecs import hookimpl
from arena.interfaces import Game, Judge
from arena.types import Verdict


@dataclass
class GoodGameOptions:
    rounds: int = 2


class GoodGame(Game):
    """A game from a one-file plugin.

    More text that is not the help line."""

    Options = GoodGameOptions

    @property
    def roles(self):
        return {}

    def play(self, ctx):
        return []


class GoodJudge(Judge):
    def judge(self, items):
        return [Verdict(1.0) for _ in items]


@hookimpl
def register_games(register):
    register("goodgame", GoodGame)


@hookimpl
def register_judges(register):
    register("goodjudge", GoodJudge, help="always 1")
'''

BROKEN = '''
raise RuntimeError("boom at import")
'''

DUPLICATE = '''
from arena.hookspecs import hookimpl
from arena.interfaces import Judge


class Other(Judge):
    def judge(self, items):
        return []


@hookimpl
def register_judges(register):
    register("dup_only", Other)      # registered before the clash: must not survive the plugin's failure
    register("exact_match", Other)   # a built-in's name
'''

NO_OPTIONS = '''
from arena.hookspecs import hookimpl


class Bare:
    """A judge class that declares no Options."""

    def __init__(self, options, env):
        pass


@hookimpl
def register_judges(register):
    register("bare", Bare)
'''

NOT_A_DATACLASS = '''
from arena.hookspecs import hookimpl


class Loose:
    class Options:
        x = 1


@hookimpl
def register_optimizers(register):
    register("loose", Loose)
'''


def write_plugins(folder, **files: str):
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(text))
    return folder


@pytest.fixture()
def clean_env(monkeypatch):
    for var in ("ARENA_PLUGINS", "ARENA_PLUGINS_DIR", "ARENA_TRACE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_builtins_load_through_entry_points(clean_env):
    registry = load_registry()
    assert registry.failed == {}
    for kind, names in BUILTINS.items():
        for name, plugin in names.items():
            assert registry.entries[kind][name].plugin == plugin, (kind, name)
        assert set(names) <= set(registry.names(kind))
    assert registry.names("judge") == sorted(registry.names("judge"))
    assert registry.commands["export"].plugin == "commands"  # built-in commands come through the entry point too
    assert registry.entries["judge"]["exact_match"].help.startswith("1.0 when")  # first docstring line


def test_plugins_dir_failures_are_isolated(clean_env, tmp_path):
    folder = write_plugins(tmp_path / "plugins", good=GOOD, broken=BROKEN, dup=DUPLICATE, nooptions=NO_OPTIONS,
                           notdc=NOT_A_DATACLASS)
    (folder / "README.txt").write_text("not a plugin")
    clean_env.setenv("ARENA_PLUGINS_DIR", str(folder))
    registry = load_registry()

    assert set(registry.failed) == {"file:broken.py", "file:dup.py", "file:nooptions.py", "file:notdc.py"}
    assert "RuntimeError" in registry.failed["file:broken.py"]
    assert "boom at import" in registry.failed["file:broken.py"]
    assert "'exact_match'" in registry.failed["file:dup.py"] and "'judges'" in registry.failed["file:dup.py"]
    assert "Options" in registry.failed["file:nooptions.py"] and "'bare'" in registry.failed["file:nooptions.py"]
    assert "Options" in registry.failed["file:notdc.py"]

    # the good one loaded, with its plugin name and help lines
    assert registry.entries["game"]["goodgame"].plugin == "file:good.py"
    assert registry.entries["game"]["goodgame"].help == "A game from a one-file plugin."
    assert registry.entries["judge"]["goodjudge"].plugin == "file:good.py"
    assert registry.entries["judge"]["goodjudge"].help == "always 1"
    # the built-in keeps its name; the failed plugin leaves nothing behind
    assert registry.entries["judge"]["exact_match"].plugin == "judges"
    assert "dup_only" not in registry.entries["judge"]
    assert "bare" not in registry.entries["judge"] and "loose" not in registry.entries["optimizer"]
    assert registry.pm.get_plugin("file:dup.py") is None
    assert registry.pm.get_plugin("file:broken.py") is None
    assert registry.pm.get_plugin("file:good.py") is not None
    for kind, names in BUILTINS.items():
        assert set(names) <= set(registry.names(kind))


def test_duplicate_between_two_plugin_files(clean_env, tmp_path):
    one = '''
from arena.hookspecs import hookimpl
from arena.interfaces import Judge


class J(Judge):
    def judge(self, items):
        return []


@hookimpl
def register_judges(register):
    register("shared", J)
'''
    folder = write_plugins(tmp_path / "p", a_first=one, b_second=one)
    clean_env.setenv("ARENA_PLUGINS_DIR", str(folder))
    registry = load_registry()
    assert registry.entries["judge"]["shared"].plugin == "file:a_first.py"
    assert set(registry.failed) == {"file:b_second.py"}
    assert "'file:a_first.py'" in registry.failed["file:b_second.py"]


def test_duplicate_command_names_are_rejected(clean_env, tmp_path):
    cmd = '''
from arena.hookspecs import hookimpl


@hookimpl
def register_commands(register):
    register("hello", lambda args: 0, help="{who}")
'''
    folder = write_plugins(tmp_path / "p", a_cmd=cmd.replace("{who}", "first"),
                           b_cmd=cmd.replace("{who}", "second"))
    clean_env.setenv("ARENA_PLUGINS_DIR", str(folder))
    registry = load_registry()
    assert registry.commands["hello"].plugin == "file:a_cmd.py"
    assert registry.commands["hello"].help == "first"
    assert set(registry.failed) == {"file:b_cmd.py"}
    assert "hello" in registry.failed["file:b_cmd.py"]


def test_blank_docstring_is_no_help(clean_env, tmp_path):
    blank = '''
from arena.hookspecs import hookimpl
from arena.interfaces import Judge


class Quiet(Judge):
    """   """

    def judge(self, items):
        return []


@hookimpl
def register_judges(register):
    register("quiet", Quiet)
'''
    clean_env.setenv("ARENA_PLUGINS_DIR", str(write_plugins(tmp_path / "p", quiet=blank)))
    registry = load_registry()
    assert registry.failed == {}
    assert registry.entries["judge"]["quiet"].help == ""


THIRD_PARTY = '''
from arena.hookspecs import hookimpl
from arena.interfaces import Judge


class ThirdJudge(Judge):
    """A judge from an installed third-party package."""

    def judge(self, items):
        return []


@hookimpl
def register_judges(register):
    register("third_judge", ThirdJudge)
'''


@pytest.fixture()
def third_party(clean_env, tmp_path):
    """Two fake third-party entry points (dist None, so not arena-selfplay's): `third` loads, `broken_ep` cannot
    be imported."""
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "arena_test_third_party.py").write_text(THIRD_PARTY)
    clean_env.syspath_prepend(str(pkg))
    fakes = [importlib.metadata.EntryPoint("third", "arena_test_third_party", "arena"),
             importlib.metadata.EntryPoint("broken_ep", "arena_test_no_such_module_xyz", "arena")]
    real = importlib.metadata.entry_points

    def entry_points(**kw):
        found = list(real(**kw))
        return found + fakes if kw.get("group") == "arena" else found

    clean_env.setattr(importlib.metadata, "entry_points", entry_points)
    return clean_env


def test_third_party_entry_point_and_a_broken_one(third_party):
    registry = load_registry()
    assert registry.entries["judge"]["third_judge"].plugin == "third"
    assert set(registry.failed) == {"broken_ep"}
    assert "ModuleNotFoundError" in registry.failed["broken_ep"]
    for kind, names in BUILTINS.items():
        assert set(names) <= set(registry.names(kind))


@pytest.mark.parametrize("allow,loaded", [
    ("", False),
    ("third", True),
    (" third , other ", True),
    ("other", False),
])
def test_allow_list(third_party, allow, loaded):
    third_party.setenv("ARENA_PLUGINS", allow)
    if "other" in allow:  # a name no installed plugin has: most likely a typo, so it is said
        with pytest.warns(ArenaWarning, match=r"ARENA_PLUGINS names 'other', which matches no installed plugin; "
                                              r"installed: broken_ep, third"):
            registry = load_registry()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ArenaWarning)
            registry = load_registry()
    assert ("third_judge" in registry.entries["judge"]) is loaded
    assert "broken_ep" not in registry.failed  # not allowed: not even imported
    for kind, names in BUILTINS.items():  # built-ins always load
        for name, plugin in names.items():
            assert registry.entries[kind][name].plugin == plugin


def test_trace_plugins(clean_env, capsys):
    clean_env.setenv("ARENA_TRACE_PLUGINS", "1")
    registry = load_registry()
    err = capsys.readouterr().err
    # the registration hooks go through pluggy too, once per plugin that implements them
    assert err.count("register_games [hook]") == len({e.plugin for e in registry.entries["game"].values()})
    assert "register_judges [hook]" in err and "register_loggers [hook]" in err
    assert "register_backends [hook]" in err and "finish register_games" in err
    assert "register for 'prompts'" in err  # a trace line says whose registration it is
    registry.pm.hook.arena_phase_start(run=None, phase="generate")
    err = capsys.readouterr().err
    assert "arena_phase_start" in err and "generate" in err
    assert registry.entries["game"]["prompts"].plugin == "prompts"  # attribution is kept


def test_no_trace_without_the_switch(clean_env, capsys):
    load_registry()
    assert "register_games" not in capsys.readouterr().err


def test_hookimpl_is_exported_at_the_top_level():
    import arena
    import arena.hookspecs

    assert arena.hookimpl is arena.hookspecs.hookimpl and arena.hookspec is arena.hookspecs.hookspec
    assert {"hookimpl", "hookspec", "Game", "Judge", "Optimizer", "Logger", "RoundContext"} <= set(arena.__all__)
    # importing arena stays light: a plugin module (and `arena list`) does not pay for torch
    probe = "import sys, arena; from arena import hookimpl; print(sorted(m for m in sys.modules if m == 'torch'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


UNDECORATED = '''
from arena import Judge


class J(Judge):
    def judge(self, items):
        return []


def register_judges(register):  # no @hookimpl: pluggy would ignore it
    register("undecorated", J)
'''

MISSPELT = '''
from arena import Judge, hookimpl


class J(Judge):
    def judge(self, items):
        return []


@hookimpl
def register_judge(register):  # not an arena hook
    register("misspelt", J)
'''


def test_undecorated_and_misspelt_hooks_fail_the_plugin(clean_env, tmp_path):
    folder = write_plugins(tmp_path / "p", undecorated=UNDECORATED, misspelt=MISSPELT, good=GOOD)
    clean_env.setenv("ARENA_PLUGINS_DIR", str(folder))
    registry = load_registry()
    assert set(registry.failed) == {"file:undecorated.py", "file:misspelt.py"}
    assert "register_judges without @hookimpl" in registry.failed["file:undecorated.py"]
    assert "'register_judge', which is no arena hook" in registry.failed["file:misspelt.py"]
    assert "register_judges" in registry.failed["file:misspelt.py"]  # the hooks it could have meant are listed
    assert registry.pm.get_plugin("file:misspelt.py") is None
    assert registry.entries["game"]["goodgame"].plugin == "file:good.py"


def test_a_raising_registration_hook_fails_only_its_plugin(clean_env, tmp_path):
    raising = '''
from arena import Judge, hookimpl


class J(Judge):
    def judge(self, items):
        return []


@hookimpl
def register_judges(register):
    register("early", J)
    raise ValueError("bad registration")
'''
    folder = write_plugins(tmp_path / "p", a_raising=raising, b_good=GOOD)
    clean_env.setenv("ARENA_PLUGINS_DIR", str(folder))
    registry = load_registry()
    assert registry.failed == {"file:a_raising.py": "ValueError: bad registration"}
    assert "early" not in registry.entries["judge"]
    assert registry.entries["judge"]["goodjudge"].plugin == "file:b_good.py"


def test_plugins_dir_that_is_not_a_folder_warns(clean_env, tmp_path):
    missing = tmp_path / "nope"
    clean_env.setenv("ARENA_PLUGINS_DIR", str(missing))
    with pytest.warns(ArenaWarning, match=f"ARENA_PLUGINS_DIR {re.escape(str(missing))}: no such folder; no file "
                                          "plugins loaded"):
        registry = load_registry()
    assert registry.failed == {} and "prompts" in registry.entries["game"]
    a_file = tmp_path / "plugin.py"
    a_file.write_text(GOOD)
    clean_env.setenv("ARENA_PLUGINS_DIR", str(a_file))
    with pytest.warns(ArenaWarning, match="plugin.py: not a folder; no file plugins loaded"):
        registry = load_registry()
    assert "goodgame" not in registry.entries["game"]


def test_allow_list_warnings(third_party):
    third_party.setenv("ARENA_PLUGINS", "thrid")
    with pytest.warns(ArenaWarning) as caught:
        registry = load_registry()
    assert [str(w.message) for w in caught if w.category is ArenaWarning] == [
        "ARENA_PLUGINS names 'thrid', which matches no installed plugin; installed: broken_ep, third"]
    assert "third_judge" not in registry.entries["judge"]
    third_party.setenv("ARENA_PLUGINS", "third,prompts")  # a built-in's name is harmless: built-ins always load
    with warnings.catch_warnings():
        warnings.simplefilter("error", ArenaWarning)
        registry = load_registry()
    assert "third_judge" in registry.entries["judge"]


def test_allow_list_warning_through_the_cli(clean_env, capsys):
    clean_env.setenv("ARENA_PLUGINS", "nosuch")
    assert main(["list"]) == 0
    err = capsys.readouterr().err
    assert "arena: warning: ARENA_PLUGINS names 'nosuch', which matches no installed plugin; installed: " in err


def test_arena_list_shows_each_name_with_its_plugin(clean_env, tmp_path, capsys):
    folder = write_plugins(tmp_path / "plugins", good=GOOD, broken=BROKEN)
    clean_env.setenv("ARENA_PLUGINS_DIR", str(folder))
    clean_env.setenv("COLUMNS", "160")
    assert main(["list"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()

    def cells(line: str) -> list[str]:
        return [c for c in re.split(r"[\s│┃|]+", line) if c]

    def row(kind: str, name: str) -> list[str]:  # one name may be a judge and an optimizer (mix)
        found = [cells(line) for line in lines if cells(line)[:2] == [kind, name]]
        assert len(found) == 1, f"{kind} {name} listed {len(found)} times:\n{out}"
        return found[0]

    expected = {(kind, name): plugin for kind, names in BUILTINS.items() for name, plugin in names.items()}
    expected.update({("game", "goodgame"): "file:good.py", ("judge", "goodjudge"): "file:good.py"})
    for (kind, name), plugin in expected.items():
        assert plugin in row(kind, name), row(kind, name)
    assert "boom at import" in out  # the failed plugin is listed too
    assert "file:broken.py" in err and "boom at import" in err  # and warned about


def test_arena_list_describes_each_builtin_in_a_whole_sentence(clean_env):
    """Each description is a docstring's whole first paragraph (a summary that wraps is not cut at its first line),
    one sentence short enough for the table."""
    from arena.registry import KINDS, summary

    registry = load_registry()
    texts = {(kind, name): registry.entries[kind][name].help for kind in KINDS for name in registry.names(kind)}
    texts.update({("command", name): command.help for name, command in registry.commands.items()})
    for (kind, name), text in texts.items():
        if registry.entries.get(kind, {}).get(name, None) is not None:
            assert text == summary(registry.entries[kind][name].obj.__doc__), (kind, name)
        assert text.endswith(".") and len(text) <= 110 and "\n" not in text, (kind, name, text)
    assert summary("Two lines\n    of one sentence.\n\n    Details.") == "Two lines of one sentence."


# -- the plugin guide's examples ------------------------------------------------------------------------------

def guide_files() -> dict[str, str]:
    """The code blocks docs/plugins.md marks `<!-- tested: FILE -->`, by file name."""
    blocks = re.findall(r"<!-- tested: (\S+) -->\s*```python\n(.*?)```", GUIDE.read_text(), re.S)
    return dict(blocks)


def test_guide_python_blocks_compile():
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) >= 5
    for i, code in enumerate(blocks):
        compile(code, f"docs/plugins.md block {i}", "exec")


def test_guide_lists_every_hook():
    import arena.hookspecs as hookspecs

    text = GUIDE.read_text()
    for name in (n for n in vars(hookspecs) if hasattr(getattr(hookspecs, n), "arena_spec")):
        params = ", ".join(p for p in getattr(hookspecs, name).__code__.co_varnames[
            :getattr(hookspecs, name).__code__.co_argcount])
        assert f"`{name}({params})`" in text, f"docs/plugins.md does not list {name}({params})"


@pytest.fixture()
def guide_plugins(clean_env, tmp_path):
    files = guide_files()
    assert set(files) == {"shout.py", "reinforce.py", "rival.py"}
    clean_env.setenv("ARENA_PLUGINS_DIR", str(write_plugins(tmp_path / "guide", **{
        name.removesuffix(".py"): code for name, code in files.items()})))
    return clean_env


def test_guide_examples_register_and_validate(guide_plugins):
    from arena import Env, JudgeItem
    from arena.config import resolve

    registry = load_registry()
    assert registry.failed == {}
    assert registry.entries["game"]["shout"].plugin == "file:shout.py"
    assert registry.entries["judge"]["contains"].plugin == "file:shout.py"
    assert registry.entries["optimizer"]["reinforce"].plugin == "file:reinforce.py"
    assert registry.entries["logger"]["tally"].plugin == "file:reinforce.py"
    assert registry.entries["game"]["shout"].help == "Reply with the word you are asked for (a one-role example game)."

    resolved = resolve(registry, "shout", overrides=["game.group_size=2"])
    assert resolved.config.judge.name == "contains"  # the game's defaults layer
    env = Env(config=resolved.config, registry=registry)
    game = registry.build("game", resolved.config.game, env)
    assert list(game.roles) == ["speaker"] and game.options.group_size == 2
    judge = registry.build("judge", resolved.config.judge, env)
    verdicts = judge.judge([JudgeItem(prompt=[], response="An Apple!", reference="apple"),
                            JudgeItem(prompt=[], response="pear", reference="apple"),
                            JudgeItem(prompt=[], response="apple")])
    assert [(v.score, v.valid) for v in verdicts[:2]] == [(1.0, True), (0.0, True)] and not verdicts[2].valid

    # the errors the guide promises, at resolve time
    with pytest.raises(ConfigError, match=r"^game\.words: empty; give at least one word$"):
        resolve(registry, "shout", overrides=["game.words=[]"])
    with pytest.raises(ConfigError, match=r"^game\.group_size: 0; expected at least 1$"):
        resolve(registry, "shout", overrides=["game.group_size=0"])


def test_guide_examples_play_a_run(guide_plugins, tiny_config, tmp_path, capsys):
    rc = main(["play", "shout", *tiny_config, "optimizer=reinforce", "optimizer.lr=1e-2", "game.max_new_tokens=4",
               "game.group_size=2", "run.loggers=[plain,tally]"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "tally 1/2: speaker 4 (0 invalid)" in err and "tally 2/2: speaker 4 (0 invalid)" in err
    assert "tally: done" in err
    assert "shout/hits" in out and "answer:" in out  # headline metric and note on the plain logger's lines
    run = tmp_path / "run"
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [1] * 4 + [2] * 4
    assert all(s["role"] == "speaker" and s["reward"] in (0.0, 1.0) and s["trained"] for s in samples)
    assert all(s["advantage"] is not None for s in samples)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    assert "eval/hits" in metrics[0] and "eval/hits" in metrics[2] and "train/samples" in metrics[1]
    state = json.loads((run / "checkpoints" / "000002" / "game_state.json").read_text())
    assert state == {"cursor": 4}


RUN_START_SPY = '''
import sys

from arena import hookimpl


@hookimpl
def arena_run_start(run):  # after a resume's checkpoint is restored, before the first round
    print(f"spy: start {run.start_iteration} frozen {run.policy.frozen_adapters()}", file=sys.stderr)
'''


def test_guide_rival_declares_its_roles_to_the_config(guide_plugins):
    """role_names and produced_by_role let `arena config` refuse a mix's roles without loading a model."""
    import arena.plugins.backends.hf.backend as hf
    from arena import Env

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    guide_plugins.setattr(hf, "load_causal_lm", no_model)
    registry = load_registry()
    assert registry.failed == {}
    with pytest.raises(ConfigError, match=r"^optimizer\.parts\.0\.trains: no role 'playr'; the game's roles "
                                          r"are: player, rival$"):
        resolve(registry, "rival", overrides=["optimizer={name: mix, parts: [{name: grpo, trains: [playr]}]}"])
    with pytest.raises(ConfigError, match=r"^optimizer\.roles\.playr: no such role"):
        resolve(registry, "rival", overrides=["optimizer.roles.playr.weight=2"])
    with pytest.raises(ConfigError, match=r"^optimizer\.parts\.0\.trains: role 'rival' is played but never "):
        resolve(registry, "rival",
                overrides=["optimizer={name: mix, parts: [{name: grpo, trains: [player, rival]}]}"])
    # the frozen rival needs no part
    resolved = resolve(registry, "rival", overrides=["optimizer={name: mix, parts: [{name: grpo, trains: [player]}]}"])

    game_class = registry.entries["game"]["rival"].obj
    options = resolved.config.game.options
    assert game_class.produced_by_role(options) == {"player": frozenset({"rewards"}), "rival": frozenset()}
    assert game_class.freezes(options, "rival") is True and game_class.freezes(options, "other") is False
    game = registry.build("game", resolved.config.game, Env(config=resolved.config, registry=registry))
    game.check_built_roles()  # what it builds agrees with what it declares
    assert {name: role.trained for name, role in game.roles.items()} == {"player": True, "rival": False}


def test_guide_rival_plays_and_resumes_with_its_frozen_adapter(guide_plugins, tiny_config, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    write_plugins(tmp_path / "guide", spy=RUN_START_SPY)  # beside the guide's files: reports each run's start
    # refresh_every=5: the rival frozen at iteration 1 plays iterations 2 and 3, the last one after the resume
    game = ["game.max_new_tokens=4", "game.refresh_every=5"]
    assert main(["play", "rival", *tiny_config, *game]) == 0
    err = capsys.readouterr().err
    assert "spy: start 1 frozen []" in err, err
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "000002"
    assert (checkpoint / "adapter" / "frozen" / "rival.safetensors").is_file()
    assert "adapter/frozen/rival.safetensors" in json.loads((checkpoint / "meta.json").read_text())["sha256"]
    frozen = load_file(checkpoint / "adapter" / "frozen" / "rival.safetensors")

    assert main(["play", "rival", "--resume", str(run), "run.iterations=3"]) == 0
    err = capsys.readouterr().err
    assert "spy: start 3 frozen ['rival']" in err, err  # restored from checkpoint 2, before round 3 was played
    restored = load_file(run / "checkpoints" / "000003" / "adapter" / "frozen" / "rival.safetensors")
    assert frozen.keys() == restored.keys() and all(torch.equal(frozen[k], restored[k]) for k in frozen)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["000002", "000003"]  # keep_checkpoints 2

    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [1] * 12 + [2] * 12 + [3] * 12  # 4 prompts: 1 rival + 2 player
    rival = [s for s in samples if s["role"] == "rival"]
    player = [s for s in samples if s["role"] == "player"]
    assert len(rival) == 12 and len(player) == 24
    assert not any(s["trained"] for s in rival)  # played, recorded, never trained on
    assert all(s["trained"] == (s["reward"] is not None) for s in player) and any(s["trained"] for s in player)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2, 3] and all("rival/wins" in m for m in metrics)


EXITS = '''
import sys

sys.exit(3)
'''

FUTURE_DATACLASS = '''
from __future__ import annotations

from dataclasses import dataclass

from arena.hookspecs import hookimpl
from arena.interfaces import Judge
from arena.types import Verdict


@dataclass
class HalfOptions:
    score: float = 0.5


class Half(Judge):
    """a dataclass with postponed annotations"""

    Options = HalfOptions

    def judge(self, items):
        return [Verdict(self.options.score) for _ in items]


@hookimpl
def register_judges(register):
    register("half", Half)
'''


def test_a_plugin_that_exits_on_import_is_a_failure_not_the_end(clean_env, tmp_path, capsys):
    folder = write_plugins(tmp_path / "plugins", exits=EXITS, good=GOOD)
    clean_env.setenv("ARENA_PLUGINS_DIR", str(folder))
    registry = load_registry()
    assert registry.failed == {"file:exits.py": "SystemExit: 3"}
    assert "goodgame" in registry.names("game")
    assert main(["list"]) == 0
    out, err = capsys.readouterr()
    assert "goodgame" in out and "plugin 'file:exits.py' failed to load: SystemExit: 3" in err


def test_a_file_plugin_with_postponed_annotations_loads(clean_env, tmp_path):
    clean_env.setenv("ARENA_PLUGINS_DIR", str(write_plugins(tmp_path / "plugins", future=FUTURE_DATACLASS)))
    registry = load_registry()
    assert registry.failed == {}
    resolved = resolve(registry, "prompts", overrides=["judge=half", "judge.score=0.25"])
    assert resolved.config.judge.options.score == 0.25


def test_help_lists_every_command_plugins_register(clean_env, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for command in ("list", "play", "config", "eval", "report", "export"):
        assert f"    {command} " in out, out
    assert "95%" in out  # a help text's % is shown, not taken for a format
