"""Generation throughput (new tokens per second) of the hf backend's decode loop and of vLLM, side by side in one
run, on the same model, weights, prompts and settings. Run it where vllm is installed (docs/configuration.md):

    python benchmarks/generation_throughput.py [--prompts 16] [--samples 4] [--tokens 64] [--repeat 2]

One `backend=vllm` policy serves both sides: its `generate` is vLLM's, `HFBackend.generate` on the same object is
the hf backend's, over the same LoRA adapter. Each side runs once to warm up, then `--repeat` times; the best time
counts. ShareGPT's first turns are the prompts.
"""

from __future__ import annotations

import argparse
import os
import time


def tokens_per_second(generate, prompts, args) -> tuple[float, int]:
    """(best tokens/s over the repeats, new tokens of one call), after one warm-up call."""
    import torch

    def once() -> tuple[float, int]:
        torch.manual_seed(0)
        start = time.perf_counter()
        outs = generate(prompts, n=args.samples, max_new_tokens=args.tokens, temperature=1.0)
        return time.perf_counter() - start, sum(len(g.completion_ids) for gens in outs for g in gens)

    once()
    best, tokens = min(once() for _ in range(args.repeat))
    return tokens / best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("overrides", nargs="*", help="config overrides (model.path=..., backend.memory_share=...)")
    args = parser.parse_args()

    import torch

    from arena.config import resolve
    from arena.games.data import sharegpt_pairs
    from arena.interfaces import Env
    from arena.plugins.backends.hf.backend import HFBackend
    from arena.registry import load_registry
    from arena.types import chat

    torch.set_num_threads(args.threads)
    registry = load_registry()
    config = resolve(registry, "prompts", overrides=["backend=vllm", *args.overrides]).config
    env = Env(config=config, registry=registry)
    start = time.perf_counter()
    policy = env.policy = registry.build("backend", config.backend, env)
    print(f"built the policy and vLLM's engine in {time.perf_counter() - start:.0f} s; model {config.model.path or 'embedded'}, "
          f"{policy.model.dtype}, {args.threads} threads")
    prompts = [chat(r["prompt"][:500]) for r in sharegpt_pairs()[:args.prompts]]
    sides = {"hf": lambda *a, **k: HFBackend.generate(policy, *a, **k), "vllm": policy.generate}
    results = {name: tokens_per_second(generate, prompts, args) for name, generate in sides.items()}
    print(f"{args.prompts} prompts x {args.samples} samples x up to {args.tokens} tokens")
    for name, (speed, tokens) in results.items():
        print(f"{name:>5}: {speed:8.1f} tokens/s ({tokens} tokens a call)")
    print(f"vllm / hf: {results['vllm'][0] / results['hf'][0]:.2f}x")


if __name__ == "__main__":
    main()
