"""What the built-in optimizers share: one AdamW over the policy's trainable parameters whose settings always come
from the options (over a restored state too, since a resume may change them), and a clipped step that refuses a
non-finite gradient before it reaches the weights."""

from __future__ import annotations

import math
from typing import Any

import torch

from arena.distributed import SOLO, everywhere
from arena.errors import ArenaError, ConfigError
from arena.interfaces import Env, Optimizer
from arena.runstore import all_finite


def check_adam_betas(betas: list[float]) -> None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError("adam_betas", f"{betas}; expected two numbers in [0, 1), e.g. [0.9, 0.999]")


def unchanged(epoch: int) -> str:
    """The end of a non-finite-step error: whether the round's earlier epochs already moved the weights."""
    return ("; the weights were not changed" if epoch == 0 else
            f" in epoch {epoch + 1}; earlier epochs of this round changed the weights, resume from the last "
            "checkpoint to undo them")


class AdamWOptimizer(Optimizer):
    """Base of an optimizer whose options carry `lr`, `weight_decay`, `adam_betas` and `max_grad_norm`.

    In a run of several processes (`group`), each computes the gradient of its share of the round's micro-batches
    (`group.mine`); `update` sums them before the step, so every process takes the same step as one would."""

    def __init__(self, options: Any, env: Env):
        super().__init__(options, env)
        self.group = env.group or SOLO
        self.policy = env.policy
        self._micro_batch: int | None = None
        self.params = self.policy.trainable_parameters()
        self.torch_optimizer = torch.optim.AdamW(self.params, lr=options.lr, betas=tuple(options.adam_betas),
                                                 weight_decay=options.weight_decay)

    def micro_batch(self) -> int:
        """Sequences per training micro-batch: `micro_batch_size`, else the backend's suggestion for its device; in a
        run of several processes the smallest of theirs, so that every process plans the same micro-batches."""
        if self._micro_batch is None:
            size = getattr(self.options, "micro_batch_size", None) or self.policy.suggested_micro_batch()
            self._micro_batch = self.group.smallest(size)
        return self._micro_batch

    def update(self, epoch: int = 0) -> float:
        """Clip the accumulated gradient (max_grad_norm 0: measure only) and step; returns the norm before
        clipping. A non-finite norm clears the gradient and raises instead."""
        self.group.sum_gradients(self.params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.options.max_grad_norm or math.inf))
        if not math.isfinite(grad_norm):
            self.torch_optimizer.zero_grad(set_to_none=True)
            raise everywhere(ArenaError(f"the gradient norm is {grad_norm}{unchanged(epoch)}"))
        self.torch_optimizer.step()
        if not all_finite(self.params):  # e.g. an lr so high the step overflows: stop before a checkpoint has it
            raise everywhere(ArenaError(f"the update made the weights NaN or infinite (optimizer.lr {self.options.lr} "
                                        "too high?); nothing of it was saved: the last checkpoint holds the weights "
                                        "before it"))
        return grad_norm

    def state_dict(self) -> dict[str, Any]:
        return self.torch_optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore AdamW's moments; lr, weight decay and betas come from the options, which a resumed run may have
        changed (the saved param groups would otherwise silently keep the old ones)."""
        self.torch_optimizer.load_state_dict(state)
        for group in self.torch_optimizer.param_groups:
            group.update(lr=self.options.lr, weight_decay=self.options.weight_decay,
                         betas=tuple(self.options.adam_betas))
