"""The public plugin API of arena: every hook a plugin may implement.

A plugin is a module (or object) with functions named like the hooks below, decorated with `arena.hookimpl`.
It reaches arena through an entry point in the `arena` group, a `.py` file in `ARENA_PLUGINS_DIR`, or, for
loggers, by being selected in `run.loggers`. Registration hooks receive a `register` callback so that the core
keeps naming and validation; lifecycle hooks observe a run.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("arena")
hookimpl = pluggy.HookimplMarker("arena")


# -- registration ---------------------------------------------------------------------------------------------

@hookspec
def register_games(register: Callable[..., None]) -> None:
    """Register games: `register("name", GameClass)`. The class subclasses arena.Game and declares `Options`."""


@hookspec
def register_judges(register: Callable[..., None]) -> None:
    """Register judges: `register("name", JudgeClass)`, a subclass of arena.Judge with an `Options` dataclass."""


@hookspec
def register_optimizers(register: Callable[..., None]) -> None:
    """Register optimizers: `register("name", OptimizerClass)`, a subclass of arena.Optimizer."""


@hookspec
def register_backends(register: Callable[..., None]) -> None:
    """Register generation/training backends: `register("name", BackendClass)`, a subclass of arena.Backend."""


@hookspec
def register_loggers(register: Callable[..., None]) -> None:
    """Register loggers: `register("name", LoggerClass)`. A logger selected in `run.loggers` receives the
    lifecycle hooks below for the length of the run."""


@hookspec
def register_commands(register: Callable[..., None]) -> None:
    """Register CLI sub-commands: `register("name", run, help="...", configure=None)`. `configure(parser)` adds
    argparse arguments; `run(args)` executes the command and returns an exit status (None means 0)."""


# -- lifecycle ------------------------------------------------------------------------------------------------

@hookspec
def arena_run_start(run: Any) -> None:
    """A run is about to play its first (or, on resume, its next) iteration. `run` is arena.loop.Run:
    `run.config`, `run.dir`, `run.iteration`, `run.iterations`."""


@hookspec
def arena_phase_start(run: Any, phase: str) -> None:
    """A phase of a round begins: "generate", "judge", "optimize", "eval", or a game's own name."""


@hookspec
def arena_phase_end(run: Any, phase: str, seconds: float, tokens: int) -> None:
    """A phase ended after `seconds`, having generated `tokens` new tokens."""


@hookspec
def arena_round_end(run: Any, iteration: int, samples: list) -> None:
    """A round was played and its Samples written to samples.jsonl, before the optimizer step."""


@hookspec
def arena_metrics(run: Any, step: int, metrics: dict[str, float]) -> None:
    """An iteration's metrics, as written to metrics.jsonl (rewards per role, loss, KL, eval/..., time)."""


@hookspec
def arena_checkpoint_saved(run: Any, iteration: int, path: str) -> None:
    """A complete checkpoint was written (renamed into place) at `path`."""


@hookspec
def arena_run_end(run: Any, error: BaseException | None) -> None:
    """The run stopped: finished (`error` None), interrupted, or failed. Called once, always."""
