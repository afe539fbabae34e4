"""A run folder as something to use after (or while) it plays: its resolved config, its checkpoints, and its
policy with a checkpoint's adapter loaded. The commands that read runs (`arena export`, `arena eval`) start here;
the files themselves belong to the run store."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arena.errors import ArenaError
from arena.runstore import ADAPTER, CHECKPOINTS, GAME_STATE, META, RunStore, all_finite


@dataclass
class TrainedRun:
    """A run's resolved config (`arena.config.Resolved`), the checkpoint chosen, its iteration and its game state."""

    dir: Path
    resolved: Any
    checkpoint: Path
    iteration: int
    game_state: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.dir.resolve().name}@{self.iteration}"


def open_target(path: str | Path, registry: Any, checkpoint: int | None = None, overrides: list[str] = (),
                key: str = "RUN") -> TrainedRun:
    """A run folder (at `checkpoint`, or its newest), one of its checkpoint folders, or a checkpoint's adapter
    folder: what a user may point at to say "this trained model"."""
    p = Path(path)
    if p.name == ADAPTER and not (p / "config.yaml").is_file():
        p = p.parent
    if p.name.isdigit() and p.parent.name == CHECKPOINTS and (p.parent.parent / "config.yaml").is_file():
        if checkpoint is not None and checkpoint != int(p.name):
            raise ArenaError(f"--checkpoint {checkpoint}: {path} is checkpoint {int(p.name)} already; give a run "
                             "folder with --checkpoint, or a checkpoint folder alone")
        return open_run(p.parent.parent, registry, int(p.name), overrides, key)
    if not (p / "config.yaml").is_file():
        raise ArenaError(f"{key} {path}: expected a run folder (runs/<game>-<time>), one of its checkpoints "
                         f"(RUN/{CHECKPOINTS}/000010) or a checkpoint's {ADAPTER} folder")
    return open_run(p, registry, checkpoint, overrides, key)


def open_run(run_dir: str | Path, registry: Any, checkpoint: int | None = None, overrides: list[str] = (),
             key: str = "RUN") -> TrainedRun:
    """The run in `run_dir` at checkpoint `checkpoint` (an iteration), or at its newest complete one, its config
    with `overrides` (key=value) applied. A folder that is not a run, or a checkpoint it does not have, is one
    line naming `key` and what there is."""
    from arena.config import load_file, resolve

    store = RunStore(run_dir)
    if not store.config_path.is_file():
        raise ArenaError(f"{key} {run_dir}: no config.yaml there; expected a run folder (runs/<game>-<time>)")
    saved = load_file(str(store.config_path), key=f"{key} {run_dir}:")
    game = saved.get("game", {}).get("name") if isinstance(saved.get("game"), dict) else None
    if not isinstance(game, str):
        raise ArenaError(f"{key} {run_dir}: its config.yaml names no game")
    resolved = resolve(registry, game, overrides=list(overrides), base=saved)
    done = {int(p.name): p for p in store.complete_checkpoints() if (p / META).is_file()}
    if not done:
        raise ArenaError(f"{key} {run_dir}: no complete checkpoint yet; a run saves one every "
                         "run.checkpoint_every iterations and at its end")
    if checkpoint is None:
        checkpoint = max(done)
    if checkpoint not in done:
        raise ArenaError(f"--checkpoint {checkpoint}: {run_dir} has checkpoints {', '.join(map(str, sorted(done)))}")
    state_file = done[checkpoint] / GAME_STATE
    try:
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ArenaError(f"{state_file}: cannot read the game state ({exc})") from None
    return TrainedRun(Path(run_dir), resolved, done[checkpoint], checkpoint, state)


def trained_policy(run: TrainedRun, registry: Any) -> Any:
    """The run's backend, built from its config, with the checkpoint's adapter loaded."""
    from arena.interfaces import Env
    from arena.loop import seed_everything

    config = run.resolved.config
    seed_everything(config.run.seed, 0)
    policy = registry.build("backend", config.backend, Env(config=config, registry=registry))
    policy.load(str(run.checkpoint / ADAPTER))
    if not all_finite(policy.trainable_parameters()):
        raise ArenaError(f"{run.checkpoint / ADAPTER}: its weights hold NaN or infinite values; this checkpoint "
                         "cannot be used (an earlier one may be)")
    return policy
