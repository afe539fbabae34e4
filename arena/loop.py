"""The run loop: for each iteration, play a round, record it, update the policy, evaluate, checkpoint.

Randomness is re-seeded at the start of every iteration from (run.seed, iteration), so a resumed run replays
exactly the rounds the uninterrupted one would have played, with no RNG state to restore.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from arena.config import Resolved
from arena.errors import ArenaError, ConfigError
from arena.interfaces import Env, RoundContext
from arena.registry import Registry
from arena.runstore import RunStore


@dataclass
class Run:
    """What lifecycle hooks see of a run."""

    config: Any
    dir: Path
    iterations: int
    iteration: int = 0
    start_iteration: int = 1
    metrics: dict[str, float] = field(default_factory=dict)  # the last iteration's
    notes: dict[str, str] = field(default_factory=dict)  # the last round's texts for displays (RoundContext.notes)
    game: Any = None
    policy: Any = None


def default_run_dir(game: str) -> Path:
    return Path("runs") / f"{game}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def seed_everything(seed: int, iteration: int) -> random.Random:
    import torch

    mixed = (seed * 1_000_003 + iteration) % (2**63)
    torch.manual_seed(mixed)
    return random.Random(mixed)


def round_metrics(samples: list[Any]) -> dict[str, float]:
    """Mean reward and invalid-verdict count per role; completion length."""
    rewards: dict[str, list[float]] = defaultdict(list)
    invalid: dict[str, int] = defaultdict(int)
    lengths = []
    for s in samples:
        lengths.append(len(s.completion_ids))
        if s.reward is None:
            invalid[s.role] += 1
        else:
            rewards[s.role].append(s.reward)
    out: dict[str, float] = {}
    for role in sorted(set(rewards) | set(invalid)):
        if rewards[role]:
            out[f"reward/{role}"] = sum(rewards[role]) / len(rewards[role])
        out[f"invalid/{role}"] = float(invalid[role])
    if lengths:
        out["completion_tokens"] = sum(lengths) / len(lengths)
    return out


def play(registry: Registry, resolved: Resolved, resume: str | Path | None = None) -> Path:
    """Play a resolved config; on `resume`, continue the run in that folder. Returns the run folder."""
    import torch

    tree = resolved.tree
    cfg = OmegaConf.create(tree)
    game_entry = registry.get("game", cfg.game.name, "game")
    optimizer_entry = registry.get("optimizer", cfg.optimizer.name, "optimizer")
    if optimizer_entry.obj.consumes not in game_entry.obj.produces:
        raise ConfigError("optimizer.name", f"{cfg.optimizer.name!r} learns from {optimizer_entry.obj.consumes} "
                          f"but game {cfg.game.name!r} produces {', '.join(sorted(game_entry.obj.produces))}; "
                          "choose an optimizer that consumes one of those")
    store = RunStore(resume if resume else (cfg.run.dir or default_run_dir(cfg.game.name)))
    if resume and not store.config_path.is_file():
        raise ArenaError(f"--resume {store.root}: no config.yaml there; expected a run directory")
    if not resume:
        store.check_new()
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)

    env = Env(config=cfg, registry=registry)
    run = Run(config=cfg, dir=store.root, iterations=cfg.run.iterations)
    env.run = run
    loggers = [registry.build("logger", name, env, f"run.loggers.{i}") for i, name in enumerate(cfg.run.loggers)]
    for i, logger in enumerate(loggers):
        registry.pm.register(logger, name=f"logger:{i}:{cfg.run.loggers[i]}")
    hook = registry.pm.hook
    error: BaseException | None = None
    started = False
    try:
        seed_everything(cfg.run.seed, 0)  # the adapter's random init must not depend on what ran before
        policy = registry.build("backend", tree["backend"], env)
        env.policy = run.policy = policy
        judge = registry.build("judge", tree["judge"], env)
        game = run.game = registry.build("game", tree["game"], env)
        optimizer = registry.build("optimizer", tree["optimizer"], env)
        optimizer.check_roles(game.roles)
        if not resume:  # created only once every component is built: a bad config leaves no folder behind
            store.create(resolved.to_yaml())

        start = 1
        if resume:
            latest = store.latest_checkpoint()
            store.rewind(latest[1] if latest else None)
            if latest:
                path, meta = latest
                policy.load(str(path / "adapter"))
                optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
                game.load_state_dict(json.loads((path / "game_state.json").read_text()))
                start = meta["iteration"] + 1
            store.write_config(resolved.to_yaml())  # overrides given with --resume (more iterations) are kept
        run.start_iteration = run.iteration = start
        hook.arena_run_start(run=run)
        started = True
        for it in range(start, cfg.run.iterations + 1):
            run.iteration = it
            t0 = time.perf_counter()
            ctx = RoundContext(iteration=it, policy=policy, judge=judge, rng=seed_everything(cfg.run.seed, it),
                               env=env)
            samples = game.play(ctx)
            store.append_samples(it, samples)
            hook.arena_round_end(run=run, iteration=it, samples=samples)
            with ctx.phase("optimize"):
                train = optimizer.step(samples, game.roles)
            metrics: dict[str, float] = {**round_metrics(samples), **train}
            last = it == cfg.run.iterations
            if cfg.run.eval_every > 0 and (it % cfg.run.eval_every == 0 or last):
                with ctx.phase("eval"):
                    metrics.update({f"eval/{k}": v for k, v in game.evaluate(ctx).items()})
            metrics.update(ctx.metrics)
            metrics["time/iteration"] = time.perf_counter() - t0
            run.metrics, run.notes = metrics, dict(ctx.notes)
            store.append_metrics({"iteration": it, **metrics})
            hook.arena_metrics(run=run, step=it, metrics=metrics)
            if it % cfg.run.checkpoint_every == 0 or last:
                tmp = store.begin_checkpoint(it)
                policy.save(str(tmp / "adapter"))
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                (tmp / "game_state.json").write_text(json.dumps(game.state_dict()))
                final = store.commit_checkpoint(it, tmp, keep=cfg.run.keep_checkpoints)
                hook.arena_checkpoint_saved(run=run, iteration=it, path=str(final))
    except BaseException as exc:
        error = exc
        raise
    finally:
        if started:
            hook.arena_run_end(run=run, error=error)
        for i in range(len(loggers)):
            registry.pm.unregister(name=f"logger:{i}:{cfg.run.loggers[i]}")
    return store.root
