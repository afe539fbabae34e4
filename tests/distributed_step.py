"""One optimizer step on fixed samples, alone or as one of several processes: `python tests/distributed_step.py
MODEL OPTIMIZER OUT` or the same under `torchrun --nproc_per_node N`. Writes OUT/rank<R>.pt with the gradient the
step applied (summed over the processes), the weights after it and the metrics, for tests/test_distributed.py to
compare with one process."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from arena.distributed import join  # noqa: E402
from arena.registry import load_registry  # noqa: E402
from arena.types import Role  # noqa: E402
from test_grpo import make_samples  # noqa: E402
from tiny import applied_gradient, make_backend, make_env  # noqa: E402

# (role, group, reward, completion length): several groups and micro-batches, so that each process gets a share
REWARDS = [("a", "q1", 1.0, 3), ("a", "q1", 0.0, 6), ("a", "q1", 0.5, 4), ("a", "q2", 2.0, 5), ("a", "q2", 0.0, 2),
           ("a", "q3", 1.0, 4), ("a", "q3", -1.0, 3), ("a", "q4", 0.2, 5), ("a", "q4", 0.9, 2)]
PAIRS = [("b", f"p{i}", reward, length) for i in range(5) for reward, length in ((1.0, 3 + i), (0.0, 2 + i))]
OPTIMIZERS = {
    "grpo": {"name": "grpo", "lr": 1e-2, "beta": 0.05, "micro_batch_size": 2},
    "dpo": {"name": "dpo", "lr": 1e-2, "beta": 0.1, "micro_batch_size": 2},
    "mix": {"name": "mix", "lr": 1e-2, "parts": [{"name": "grpo", "trains": ["a"], "beta": 0.05, "micro_batch_size": 2},
                                                 {"name": "dpo", "trains": ["b"], "weight": 0.5, "micro_batch_size": 2}]},
}


def samples_for(policy, name: str) -> list:
    rewards = make_samples(policy, REWARDS) if name in ("grpo", "mix") else []
    pairs = make_samples(policy, PAIRS) if name in ("dpo", "mix") else []
    for i, s in enumerate(pairs):
        s.metadata["pair"] = "chosen" if i % 2 == 0 else "rejected"
    return rewards + pairs


def main(model: str, name: str, out: str) -> None:
    group = join("cpu")
    torch.set_num_threads(1)
    torch.manual_seed(0)  # LoRA A's random init, the same in every process, as the run loop seeds it
    policy = make_backend(model)
    env = make_env(model)
    env.policy, env.group = policy, group
    roles = {"a": Role("a"), "b": Role("b")}
    optimizer = load_registry().build("optimizer", OPTIMIZERS[name], env)
    samples = samples_for(policy, name)
    grads, metrics = applied_gradient(optimizer, samples, roles, undo=False)
    torch.save({"grads": grads, "weights": [p.detach().clone() for p in optimizer.params],
                "metrics": metrics, "trained": [s.trained for s in samples], "size": group.size},
               Path(out) / f"rank{group.rank}.pt")
    group.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
