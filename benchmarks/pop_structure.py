"""How often the model writes a usable POP task and rubric, by structure: free JSON, lines laid out by the framework
with written gold facts, and laid out with gold facts chosen from the document (the default). One pass of the
writers over the same training documents per setting, before any training, sampled at the game's temperature.

    python benchmarks/pop_structure.py [--documents 16] [--seed 0] [model.path=...]

Prints, per setting, the usable tasks and the usable rubrics (of the usable tasks) with the reasons for the rest.
"""

from __future__ import annotations

import argparse
import collections
import random
import time

import torch

from arena.config import resolve
from arena.interfaces import Env, RoundContext
from arena.registry import load_registry

SETTINGS = {
    "json": ["game.structure=json"],
    "fields, gold written": ["game.gold=write"],
    "fields, gold chosen": [],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args()
    registry = load_registry()
    policy = None
    for name, setting in SETTINGS.items():
        config = resolve(registry, "pop", overrides=[*overrides, *setting]).config
        env = Env(config=config, registry=registry)
        policy = policy or registry.build("backend", config.backend, env)
        env.policy = policy
        game = registry.build("game", config.game, env)
        torch.manual_seed(args.seed)
        ctx = RoundContext(iteration=1, policy=policy, judge=None, rng=random.Random(args.seed), env=env)
        t0 = time.perf_counter()
        problems = game.write_tasks(ctx, game.train_documents[:args.documents])
        posed = [p for p in problems if p.task_error is None]
        solver = game.roles["solver"]
        answers = policy.generate([game.solver_prompt(p.question) for p in posed], n=config.game.options.answers,
                                  max_new_tokens=solver.max_new_tokens, temperature=solver.temperature)
        for p, gens in zip(posed, answers):
            p.answers = gens
        game.write_rubrics(ctx, posed)
        usable = sum(p.rubric is not None for p in posed)
        print(f"{name}: usable tasks {len(posed)}/{len(problems)}, usable rubrics {usable}/{len(posed)} "
              f"({time.perf_counter() - t0:.0f} s)")
        reasons = collections.Counter([p.task_error for p in problems if p.task_error]
                                      + [p.rubric_error.split(" (")[0] for p in posed if p.rubric_error])
        for reason, count in reasons.most_common():
            print(f"    {count:3d}  {reason}")


if __name__ == "__main__":
    main()
