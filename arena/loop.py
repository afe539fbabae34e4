"""The run loop: for each iteration, play a round, record it, update the policy, evaluate, checkpoint.

Randomness is re-seeded at the start of every iteration from (run.seed, iteration), so a resumed run replays
exactly the rounds the uninterrupted one would have played, with no RNG state to restore.

Under a launcher every process runs this same loop (arena/distributed.py): the components split their calls
across the processes, the run store writes on process 0 only, and the hooks are called there only.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from arena.config import Resolved, check_resume_changes
from arena.distributed import SOLO, Group, digest, everywhere
from arena.errors import ArenaError, ConfigError
from arena.interfaces import Env, RoundContext
from arena.registry import Registry
from arena.runstore import RunStore, checkpoint_files, load_checkpoint_files, read_jsonl


@dataclass
class Run:
    """What lifecycle hooks see of a run."""

    config: Any
    dir: Path
    iterations: int
    iteration: int = 0
    start_iteration: int = 1
    metrics: dict[str, float] = field(default_factory=dict)  # the last iteration's
    baseline: dict[str, float] = field(default_factory=dict)  # held-out scores before training (iteration 0)
    notes: dict[str, str] = field(default_factory=dict)  # the last round's texts for displays (RoundContext.notes)
    game: Any = None
    policy: Any = None
    resumable: bool = True  # false once a new run stops before its first checkpoint: its folder is removed
    processes: int = 1  # how many processes play it (a launched run)


def default_run_dir(game: str) -> Path:
    return Path("runs") / f"{game}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def seed_everything(seed: int, iteration: int, process: int = 0) -> random.Random:
    """torch's generator and the returned `random.Random` seeded from (seed, iteration). The Random, which games
    decide with, is the same on every process of a run; torch's, which samples tokens, differs per process, so
    that processes sampling different prompts do not draw the same numbers."""
    import torch

    mixed = (seed * 1_000_003 + iteration) % (2**63)
    torch.manual_seed((mixed + process * 0x9E3779B97F4A7C15) % (2**63))
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


def play(registry: Registry, resolved: Resolved, resume: str | Path | None = None, group: Group = SOLO) -> Path:
    """Play a resolved config; on `resume`, continue the run in that folder. Returns the run folder.

    The folder is locked for the whole run, so a second process (a second --resume) cannot write into it. `group`:
    the processes of a launched run; process 0 chooses, locks and writes the folder."""
    import torch

    cfg = resolved.config
    group.check_device(cfg.model.device)
    root = group.on_main(lambda: str(resume if resume else (cfg.run.dir or default_run_dir(cfg.game.name))))
    store = RunStore(root, writer=group.main)

    def open_folder() -> bool:
        if resume and not store.config_path.is_file():
            raise ArenaError(f"--resume {store.root}: no config.yaml there; expected a run directory")
        if resume:
            store.lock()
            return False
        store.check_new()
        return not store.root.exists()
    made_folder = group.on_main(open_folder)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)

    env = Env(config=cfg, registry=registry, group=group)
    run = Run(config=cfg, dir=store.root, iterations=cfg.run.iterations, processes=group.size)
    env.run = run
    registry.calls_hooks = group.main  # loggers and plugins observe the run once, on process 0
    names = cfg.run.loggers if group.main else []  # a missing logger package stops every process, said once
    loggers = group.agree(lambda: [registry.build("logger", name, env, f"run.loggers.{i}")
                                   for i, name in enumerate(names)])
    for i, logger in enumerate(loggers):
        registry.pm.register(logger, name=f"logger:{i}:{names[i]}")
    hook = registry.hooks
    error: BaseException | None = None
    started = created = False
    policy = None
    try:
        def build() -> tuple[Any, Any, Any, Any]:
            seed_everything(cfg.run.seed, 0)  # the adapter's random init must not depend on what ran before
            policy = registry.build("backend", cfg.backend, env)
            env.policy = run.policy = policy
            judge = registry.build("judge", cfg.judge, env)
            game = run.game = registry.build("game", cfg.game, env)
            optimizer = registry.build("optimizer", cfg.optimizer, env)
            game.check_built_roles()
            optimizer.check_roles(game.roles)
            return policy, judge, game, optimizer
        policy, judge, game, optimizer = group.agree(build)
        if not resume:  # created (and locked) only once every component is built: a bad config leaves no folder
            group.on_main(lambda: store.create(resolved.to_yaml()))
            created = True

        start = 1
        if resume:
            def restore() -> tuple[dict[str, Any] | None, dict[str, bytes] | None]:
                meta = store.restore(policy=policy, optimizer=optimizer, game=game,
                                     check=lambda meta: check_resume(resolved, meta))
                store.write_config(resolved.to_yaml())  # the settings a resume may change (docs/runs.md) are kept
                several = meta is not None and group.size > 1
                return meta, checkpoint_files(store.checkpoint_dir(meta["iteration"])) if several else None
            meta, files = group.on_main(restore)
            if files is not None:  # the checkpoint process 0 restored, loaded by the others from what it sent
                group.agree(lambda: None if group.main else
                            load_checkpoint_files(files, policy=policy, optimizer=optimizer, game=game))
            start = meta["iteration"] + 1 if meta else 1
        run.start_iteration = run.iteration = start
        run.baseline = _baseline(store) if start > 1 and group.main else {}
        hook.arena_run_start(run=run)
        started = True
        evaluating = cfg.run.eval_every > 0
        if start == 1 and evaluating:  # where the run started: every later score is read against this one
            run.iteration = 0
            ctx = RoundContext(iteration=0, policy=policy, judge=judge,
                               rng=seed_everything(cfg.run.seed, 0, group.rank), env=env)
            with ctx.phase("eval"):
                run.baseline = {f"eval/{k}": v for k, v in game.evaluate(ctx).items()}
            if run.baseline:  # a game without held-out work has nothing to record
                store.append_metrics({"iteration": 0, **run.baseline, **ctx.metrics})
                hook.arena_metrics(run=run, step=0, metrics={**run.baseline, **ctx.metrics})
        for it in range(start, cfg.run.iterations + 1):
            run.iteration = it
            t0 = time.perf_counter()
            ctx = RoundContext(iteration=it, policy=policy, judge=judge,
                               rng=seed_everything(cfg.run.seed, it, group.rank), env=env)
            samples = game.play(ctx)
            with ctx.phase("optimize"), group.local(), policy.updating():
                try:
                    train = optimizer.step(samples, game.roles)
                except ArenaError as exc:
                    store.append_samples(it, samples)  # kept for diagnosis; a resume replays this round
                    raise everywhere(ArenaError(f"iteration {it}: {exc}"), exc) from None
            store.append_samples(it, samples)  # after the step: each record carries the advantage it was trained with
            if group.size > 1:  # every process must hold what process 0 holds (and checkpoints)
                group.check_same(f"the game state and weights after iteration {it}",
                                 digest(game.state_dict(), policy.frozen_adapters(), *policy.trainable_parameters()))
            hook.arena_round_end(run=run, iteration=it, samples=samples)
            metrics: dict[str, float] = {**round_metrics(samples), **train}
            last = it == cfg.run.iterations
            if evaluating and (it % cfg.run.eval_every == 0 or last):
                with ctx.phase("eval"):
                    metrics.update({f"eval/{k}": v for k, v in game.evaluate(ctx).items()})
            metrics.update(ctx.metrics)
            metrics["time/iteration"] = time.perf_counter() - t0
            run.metrics, run.notes = metrics, dict(ctx.notes)
            store.append_metrics({"iteration": it, **metrics})
            hook.arena_metrics(run=run, step=it, metrics=metrics)
            if it % cfg.run.checkpoint_every == 0 or last:
                final = store.save_checkpoint(it, policy=policy, optimizer=optimizer, game=game,
                                              keep=cfg.run.keep_checkpoints, config=resolved.tree)
                hook.arena_checkpoint_saved(run=run, iteration=it, path=str(final))
    except BaseException as exc:
        error = exc
        run.resumable = not (created and not store.complete_checkpoints())
        raise
    finally:
        try:
            if started:
                hook.arena_run_end(run=run, error=error)
        finally:
            if policy is not None:
                policy.close()
            for i in range(len(loggers)):
                registry.pm.unregister(name=f"logger:{i}:{names[i]}")
            store.unlock()
            if error is not None and not run.resumable:  # a new run stopped before its first checkpoint: a
                store.discard(made_folder)               # --resume would only start it over; leave no folder
    return store.root


def check_resume(resolved: Resolved, meta: dict[str, Any]) -> None:
    """Before a checkpoint is loaded: the resumed config may differ from the one it was made with only where a
    resume may change things (a hand-edited config.yaml is held to the same rule as the command line), and it
    must not end before the iteration the run has reached."""
    if isinstance(meta.get("config"), dict):
        try:
            check_resume_changes(meta["config"], resolved.tree)
        except ConfigError as exc:
            raise ArenaError(f"{exc} (checkpoint {meta['iteration']} was made with the former; config.yaml "
                             "edited by hand?)") from None
    if resolved.config.run.iterations < meta["iteration"]:
        raise ArenaError(f"run.iterations: {resolved.config.run.iterations}, but the run has already played "
                         f"{meta['iteration']} iterations; give at least {meta['iteration']}")


def _baseline(store: RunStore) -> dict[str, float]:
    """The held-out scores recorded at iteration 0, if the run has them."""
    for record in read_jsonl(store.metrics_path):
        if record.get("iteration") == 0:  # a score that was not finite was written as null
            return {k: v for k, v in record.items() if k.startswith("eval/") and v is not None}
    return {}
