"""The public plugin API of arena: every hook a plugin may implement.

A plugin is a module (or object) with functions named like the hooks below, decorated with `arena.hookimpl`
(`from arena import hookimpl`); an undecorated or misspelt hook function fails the plugin at load time. A plugin
reaches arena through an entry point in the `arena` group or a `.py` file in `ARENA_PLUGINS_DIR`; a logger object
selected in `run.loggers` is also registered for the length of a run. Registration hooks receive a `register`
callback so that the core keeps naming and validation; lifecycle hooks observe a run. Hooks are called with
keyword arguments, so an implementation may take only the ones it needs. docs/plugins.md is the author's guide.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("arena")
hookimpl = pluggy.HookimplMarker("arena")


# -- registration ---------------------------------------------------------------------------------------------

@hookspec
def register_games(register: Callable[..., None]) -> None:
    """Register games: `register("name", GameClass, help="...")`. The class subclasses arena.Game and declares an
    `Options` dataclass; `help` defaults to the first line of its docstring. A name another plugin registered, or
    a class without an `Options` dataclass, fails this plugin (and only it)."""


@hookspec
def register_judges(register: Callable[..., None]) -> None:
    """Register judges: `register("name", JudgeClass)`, a subclass of arena.Judge with an `Options` dataclass."""


@hookspec
def register_optimizers(register: Callable[..., None]) -> None:
    """Register optimizers: `register("name", OptimizerClass)`, a subclass of arena.Optimizer with an `Options`
    dataclass."""


@hookspec
def register_backends(register: Callable[..., None]) -> None:
    """Register generation/training backends: `register("name", BackendClass)`, a subclass of arena.Backend with
    an `Options` dataclass."""


@hookspec
def register_loggers(register: Callable[..., None]) -> None:
    """Register loggers: `register("name", LoggerClass)`, a subclass of arena.Logger. A logger selected in
    `run.loggers` is built and registered as a plugin for the length of the run, so its methods named like the
    lifecycle hooks below and decorated with `@hookimpl` are called."""


@hookspec
def register_executors(register: Callable[..., None]) -> None:
    """Register code executors: `register("name", ExecutorClass)`, a subclass of arena.Executor with an `Options`
    dataclass. Games and judges that check answers by running code build one from their own config section."""


@hookspec
def register_commands(register: Callable[..., None]) -> None:
    """Register CLI sub-commands: `register("name", run, help="...", configure=None)`. `configure(parser)` adds
    argparse arguments; `run(args)` executes `arena name ...` and returns an exit status (None means 0). The
    built-in commands (list, play, config) cannot be replaced."""


# -- lifecycle ------------------------------------------------------------------------------------------------

@hookspec
def arena_run_start(run: Any) -> None:
    """A run is about to play its first (or, on resume, its next) iteration, after every component is built and a
    resumed run's checkpoint restored; a new run's held-out evaluation at iteration 0 comes next, when enabled.
    `run` is arena.loop.Run: `config` (resolved), `dir`, `iteration`,
    `iterations`, `start_iteration`, `game`, `policy`, and `metrics`/`notes` of the last iteration."""


@hookspec
def arena_phase_start(run: Any, phase: str) -> None:
    """A phase of a round begins: "generate", "judge", "optimize", "eval", or a game's own name (games mark
    theirs with `ctx.phase(name)`; one name may occur several times in a round)."""


@hookspec
def arena_phase_end(run: Any, phase: str, seconds: float, tokens: int) -> None:
    """A phase ended after `seconds`, in which the policy generated `tokens` new tokens. Called even
    when the phase raised."""


@hookspec
def arena_round_end(run: Any, iteration: int, samples: list) -> None:
    """A round was played, the optimizer stepped on it, and its Samples (with the advantages they were trained
    with) were written to samples.jsonl."""


@hookspec
def arena_metrics(run: Any, step: int, metrics: dict[str, float]) -> None:
    """An iteration's metrics, as written to metrics.jsonl (reward/<role>, invalid/<role>, loss, kl, eval/...,
    the game's own, time/...). Step 0, when there is one, is the held-out evaluation before any training."""


@hookspec
def arena_checkpoint_saved(run: Any, iteration: int, path: str) -> None:
    """A complete checkpoint was written (renamed into place) at `path`."""


@hookspec
def arena_run_end(run: Any, error: BaseException | None) -> None:
    """The run stopped: finished (`error` None), interrupted (KeyboardInterrupt), or failed. Called exactly once
    after every `arena_run_start`, however the run stops."""
