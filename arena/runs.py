"""A run folder as something to use after (or while) it plays: its resolved config, its checkpoints, and its
policy with a checkpoint's adapter loaded. The commands that read runs (`arena export`) start here; the files
themselves belong to the run store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arena.errors import ArenaError
from arena.runstore import ADAPTER, RunStore


@dataclass
class TrainedRun:
    """A run's resolved config (`arena.config.Resolved`), the checkpoint chosen and its iteration."""

    dir: Path
    resolved: Any
    checkpoint: Path
    iteration: int


def open_run(run_dir: str | Path, registry: Any, checkpoint: int | None = None, key: str = "RUN") -> TrainedRun:
    """The run in `run_dir` at checkpoint `checkpoint` (an iteration), or at its newest complete one. A folder
    that is not a run, or a checkpoint it does not have, is one line naming `key` and what there is."""
    from arena.config import load_file, resolve

    store = RunStore(run_dir)
    if not store.config_path.is_file():
        raise ArenaError(f"{key} {run_dir}: no config.yaml there; expected a run folder (runs/<game>-<time>)")
    saved = load_file(str(store.config_path), key=f"{key} {run_dir}:")
    game = saved.get("game", {}).get("name") if isinstance(saved.get("game"), dict) else None
    if not isinstance(game, str):
        raise ArenaError(f"{key} {run_dir}: its config.yaml names no game")
    resolved = resolve(registry, game, base=saved)
    done = {int(p.name): p for p in store.complete_checkpoints()}
    if not done:
        raise ArenaError(f"{key} {run_dir}: no complete checkpoint yet; a run saves one every "
                         "run.checkpoint_every iterations and at its end")
    if checkpoint is None:
        checkpoint = max(done)
    if checkpoint not in done:
        raise ArenaError(f"--checkpoint {checkpoint}: {run_dir} has checkpoints {', '.join(map(str, sorted(done)))}")
    return TrainedRun(Path(run_dir), resolved, done[checkpoint], checkpoint)


def trained_policy(run: TrainedRun, registry: Any) -> Any:
    """The run's backend, built from its config, with the checkpoint's adapter loaded."""
    from arena.interfaces import Env
    from arena.loop import seed_everything

    config = run.resolved.config
    seed_everything(config.run.seed, 0)
    policy = registry.build("backend", config.backend, Env(config=config, registry=registry))
    policy.load(str(run.checkpoint / ADAPTER))
    return policy
