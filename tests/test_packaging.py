"""The installed distribution: one namespace (`arena`, with games and plugins mapped under it), no bare `games`,
`plugins` or `tests` package, and the built-ins registered as entry points of the `arena` group. Checked in a
subprocess whose working directory is not the repository, so the checkout itself is not on sys.path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PROBE = r'''
import importlib.metadata as md, importlib.util, json, sys
dist = md.distribution("arena-selfplay")
top = (dist.read_text("top_level.txt") or "").split()
eps = [(ep.name, ep.value, ep.dist.name if ep.dist else None) for ep in md.entry_points(group="arena")]
files = [str(f) for f in (dist.files or [])]
specs = {name: importlib.util.find_spec(name) is not None for name in ("games", "plugins", "tests")}
import arena, arena.games.prompts, arena.plugins.optimizers.grpo
mapped = {"arena.games": arena.games.__file__, "arena.plugins": arena.plugins.__file__}
print(json.dumps({"top_level": top, "entry_points": eps, "files": files, "bare": specs, "mapped": mapped,
                  "sys_path": sys.path}))
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("elsewhere")
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert str(REPO) not in data["sys_path"] and "" not in data["sys_path"][1:]
    return data


def test_no_bare_top_level_packages(installed):
    assert installed["bare"] == {"games": False, "plugins": False, "tests": False}
    assert installed["top_level"] in ([], ["arena"])  # editable installs may omit top_level.txt
    for f in installed["files"]:
        first = f.split("/")[0]
        assert first not in ("games", "plugins", "tests"), f


def test_games_and_plugins_import_under_arena(installed):
    for name, folder in (("arena.games", "games"), ("arena.plugins", "plugins")):
        init = Path(installed["mapped"][name])
        # editable: the repository's folder; a wheel: site-packages/arena/<folder>
        assert init.parent == REPO / folder or (init.parent.name == folder and init.parent.parent.name == "arena")


BUILTINS = {"prompts": "arena.games.prompts", "hf": "arena.plugins.backends.hf.backend",
            "grpo": "arena.plugins.optimizers.grpo", "judges": "arena.plugins.judges.general",
            "loggers": "arena.plugins.loggers"}


def test_builtins_are_entry_points_of_the_arena_group(installed):
    builtin = {name: value for name, value, dist in installed["entry_points"] if dist == "arena-selfplay"}
    for name, value in BUILTINS.items():
        assert builtin.get(name) == value, (name, builtin)
    assert all(value.startswith("arena.") for value in builtin.values())


def test_pyproject_lists_packages_explicitly():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    packages = setuptools["packages"]
    assert isinstance(packages, list)  # an explicit list, not packages.find over the repository root
    assert all(p == "arena" or p.startswith("arena.") for p in packages)
    assert setuptools["package-dir"]["arena.games"] == "games"
    assert setuptools["package-dir"]["arena.plugins"] == "plugins"
    assert project["project"]["name"] == "arena-selfplay"
    assert project["project"]["scripts"]["arena"] == "arena.cli:main"
    declared = project["project"]["entry-points"]["arena"]
    assert {name: declared.get(name) for name in BUILTINS} == BUILTINS
    # every folder with an __init__.py is listed, so that a wheel does not silently leave a subpackage out
    folders = {"arena": REPO / "arena", "arena.games": REPO / "games", "arena.plugins": REPO / "plugins"}
    on_disk = {f"{name}{'.' + '.'.join(init.parent.relative_to(root).parts) if init.parent != root else ''}"
               for name, root in folders.items() for init in root.rglob("__init__.py")}
    assert on_disk == set(packages)
