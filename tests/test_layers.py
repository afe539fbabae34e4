"""Dependencies point one way: the core (`arena/`) imports no game and no plugin, a game imports no plugin (it names
judges and executors through the config and the core's types), and a plugin imports no game. What two sides share
lives in the core (arena/values.py, arena/rubrics.py, arena/prompt_file.py). Read from the source, imports inside
functions and under TYPE_CHECKING included, so that a lazy import cannot hide a wrong direction."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# folder on disk -> the package it installs as (pyproject's package-dir)
ROOTS = {"arena": "arena", "games": "arena.games", "plugins": "arena.plugins",
         "examples/arena-example-game": ""}  # a third-party plugin: a plugin as far as layers go


def layer(module: str) -> str | None:
    if module.startswith("arena.games"):
        return "game"
    if module.startswith("arena.plugins"):
        return "plugin"
    if module == "arena" or module.startswith("arena."):
        return "core"
    return None  # the standard library or a third-party package


FORBIDDEN = {("core", "game"), ("core", "plugin"), ("game", "plugin"), ("plugin", "game")}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in a file; `from arena.plugins import x` names arena.plugins.x."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def violations(source: str, own_layer: str, where: str) -> list[str]:
    return [f"{where}:{line}: a {own_layer} imports {module} (a {layer(module)})"
            for line, module in imported_modules(source) if (own_layer, layer(module)) in FORBIDDEN]


def source_files() -> list[tuple[Path, str]]:
    """Every project source file with its layer (tests and benchmarks may import anything)."""
    files = []
    for folder, package in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            if "tests" in path.relative_to(REPO / folder).parts:
                continue
            files.append((path, layer(package) if package else "plugin"))
    return files


def test_every_layer_is_walked():
    layers = [own for _, own in source_files()]
    assert layers.count("core") >= 10 and layers.count("game") >= 5 and layers.count("plugin") >= 10


def test_dependencies_point_one_way():
    found = []
    for path, own in source_files():
        found += violations(path.read_text(encoding="utf-8"), own, str(path.relative_to(REPO)))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, own, bad", [
    ("from arena.plugins.judges.rubric import parse_rubric", "game", True),
    ("def f():\n    from arena.games.data import load_prompt_file", "core", True),
    ("import arena.games.azr", "plugin", True),
    ("from arena.plugins import loggers", "core", True),
    ("from arena.rubrics import parse_rubric\nfrom arena import Game", "game", False),
    ("from arena.plugins.optimizers.adamw import AdamWOptimizer", "plugin", False),  # plugin to plugin is fine
    ("from arena.games.prompts import TEMPERATURE_HINT", "game", False),
])
def test_the_walk_catches_a_wrong_direction(source, own, bad):
    """The check itself: the imports the layout forbids are found wherever they sit, the allowed ones pass."""
    assert bool(violations(source, own, "x.py")) is bad
