"""Plugin discovery: entry points and ARENA_PLUGINS_DIR files, failure isolation, the ARENA_PLUGINS allow-list,
Options validation at registration, and `arena list`."""

from __future__ import annotations

import importlib.metadata
import re
import textwrap

import pytest

from arena.cli import main
from arena.registry import load_registry

BUILTINS = {
    "game": {"prompts": "prompts"},
    "judge": {"self_reward": "judges", "llm_judge": "judges", "reward_model": "judges", "exact_match": "judges",
              "mix": "judges"},
    "optimizer": {"grpo": "grpo"},
    "backend": {"hf": "hf"},
    "logger": {"console": "loggers", "plain": "loggers"},
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
    registry = load_registry()
    assert ("third_judge" in registry.entries["judge"]) is loaded
    assert "broken_ep" not in registry.failed  # not allowed: not even imported
    for kind, names in BUILTINS.items():  # built-ins always load
        for name, plugin in names.items():
            assert registry.entries[kind][name].plugin == plugin


def test_trace_plugins(clean_env, capsys):
    clean_env.setenv("ARENA_TRACE_PLUGINS", "1")
    registry = load_registry()
    registry.pm.hook.arena_phase_start(run=None, phase="generate")
    err = capsys.readouterr().err
    assert "arena_phase_start" in err and "generate" in err


def test_arena_list_shows_each_name_with_its_plugin(clean_env, tmp_path, capsys):
    folder = write_plugins(tmp_path / "plugins", good=GOOD, broken=BROKEN)
    clean_env.setenv("ARENA_PLUGINS_DIR", str(folder))
    clean_env.setenv("COLUMNS", "160")
    assert main(["list"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()

    def cells(line: str) -> list[str]:
        return [c for c in re.split(r"[\s│┃|]+", line) if c]

    def row(name: str) -> list[str]:
        found = [cells(line) for line in lines if name in cells(line)]
        assert len(found) == 1, f"{name} listed {len(found)} times:\n{out}"
        return found[0]

    expected = {name: plugin for names in BUILTINS.values() for name, plugin in names.items()}
    expected.update({"goodgame": "file:good.py", "goodjudge": "file:good.py"})
    for name, plugin in expected.items():
        assert plugin in row(name), row(name)
    assert "game" in row("goodgame") and "judge" in row("goodjudge")
    assert "boom at import" in out  # the failed plugin is listed too
    assert "file:broken.py" in err and "boom at import" in err  # and warned about
