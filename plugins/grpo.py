"""The `grpo` optimizer: group-relative advantages, a clipped ratio objective and a KL leash to the reference.

One model plays every role, so there is one update per round: each role contributes its own objective (loss
weight, β) and the losses are summed into one backward pass. Roles with `trained: false` contribute nothing.
Samples whose reward is None (an invalid verdict) are not trained on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from arena.config import option
from arena.errors import ArenaError, ConfigError
from arena.hookspecs import hookimpl
from arena.interfaces import Env, Optimizer
from arena.types import Role, Sample


@dataclass
class RoleObjective:
    weight: float = option(1.0, ge=0.0)  # the role's loss weight (LSP's α for the Challenger); 0 trains it not
    beta: Optional[float] = option(None, ge=0.0)  # KL coefficient; None: the optimizer's beta


@dataclass
class GRPOOptions:
    lr: float = option(1e-5, gt=0.0)
    beta: float = option(0.05, ge=0.0)  # KL to the reference (k3 estimator); 0 skips the reference pass entirely
    epsilon: float = option(0.2, gt=0.0, le=1.0)  # ratio clip range [1 - epsilon, 1 + epsilon_high]
    epsilon_high: Optional[float] = option(None, gt=0.0)  # None: same as epsilon
    normalize_std: bool = False  # divide advantages by the group's standard deviation
    # token: mean over all of a role's tokens; sequence: mean per sequence, then over sequences
    aggregation: str = option("token", choices=("token", "sequence"))
    max_grad_norm: float = option(1.0, ge=0.0)  # 0 disables clipping
    weight_decay: float = option(0.0, ge=0.0)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    epochs: int = option(1, ge=1)  # passes over a round's samples
    # sequences per forward/backward; gradients accumulate across micro-batches. None: the backend's suggestion
    # for its device (8 on CPU: 37% less peak memory than 16 at the same speed, benchmarks/grpo_step.py; on a GPU
    # sized from free memory, up to 64)
    micro_batch_size: Optional[int] = option(None, ge=1)
    roles: dict[str, RoleObjective] = field(default_factory=dict)

    def check(self) -> None:
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError("adam_betas", f"{self.adam_betas}; expected two numbers in [0, 1), e.g. [0.9, 0.999]")


def group_advantages(samples: Sequence[Sample], normalize_std: bool = False, eps: float = 1e-6) -> list[float | None]:
    """Advantage of each sample: samples with no reward get None; a game-set `advantage` is kept as it is (no
    std normalisation: the game's rules define it); otherwise reward minus the mean reward of its (role, group),
    divided by the group's (population) standard deviation when `normalize_std`. A group of one has advantage 0."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for s in samples:
        if s.advantage is None and s.reward is not None:
            groups[(s.role, s.group)].append(s.reward)
    stats = {}
    for key, rewards in groups.items():
        mean = sum(rewards) / len(rewards)
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
        stats[key] = (mean, std)
    out: list[float | None] = []
    for s in samples:
        if s.reward is None:  # an invalid verdict is never trained on, whatever advantage a game set
            out.append(None)
        elif s.advantage is not None:
            out.append(s.advantage)
        else:
            mean, std = stats[(s.role, s.group)]
            out.append((s.reward - mean) / (std + eps) if normalize_std else s.reward - mean)
    return out


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                    advantages: torch.Tensor, epsilon_low: float, epsilon_high: float,
                    beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss, KL and clipped flag ([batch, tokens] each) of the clipped-ratio objective with a k3 KL
    penalty: -min(r·A, clip(r)·A) + β·(exp(ref - logp) - (ref - logp) - 1)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).float()
    if ref_logp is not None and beta:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    else:
        kl = torch.zeros_like(logp)
    return loss, kl, was_clipped


def _unchanged(epoch: int) -> str:
    return ("; the weights were not changed" if epoch == 0 else
            f" in epoch {epoch + 1}; earlier epochs of this round changed the weights, resume from the last "
            "checkpoint to undo them")


class GRPO(Optimizer):
    """GRPO-style policy gradient with group baselines, ratio clipping and a KL leash; AdamW."""

    Options = GRPOOptions
    consumes = "rewards"

    def __init__(self, options: GRPOOptions, env: Env):
        super().__init__(options, env)
        self.policy = env.policy
        self.micro_batch_size = options.micro_batch_size or self.policy.suggested_micro_batch()
        params = self.policy.trainable_parameters()
        self.torch_optimizer = torch.optim.AdamW(params, lr=options.lr, betas=tuple(options.adam_betas),
                                                 weight_decay=options.weight_decay)
        self.params = params

    def _objective(self, role: str) -> tuple[float, float]:
        obj = self.options.roles.get(role) or RoleObjective()
        return obj.weight, self.options.beta if obj.beta is None else obj.beta

    def check_roles(self, roles: dict[str, Role]) -> None:
        unknown = sorted(set(self.options.roles) - set(roles))
        if unknown:
            raise ConfigError(f"optimizer.roles.{unknown[0]}", f"no such role; the game's roles are: "
                                                               f"{', '.join(roles)}")

    def step(self, samples: Sequence[Sample], roles: dict[str, Role]) -> dict[str, float]:
        o = self.options
        self.check_roles(roles)
        advantages = group_advantages(samples, o.normalize_std)
        for s, a in zip(samples, advantages):
            s.advantage = a
        batch = []
        # denominators fixed up front so micro-batch gradients add up to the exact full-batch gradient; they count
        # every sample the role trains on, including those skipped below because their gradient is zero
        denom: dict[str, float] = defaultdict(float)
        trained: list[Sample] = []  # marked only once the update is made
        for s, a in zip(samples, advantages):
            role = roles.get(s.role)
            if role is None or not role.trained or a is None or not s.completion_ids:
                continue
            weight, beta = self._objective(s.role)
            if weight == 0:
                continue
            denom[s.role] += len(s.completion_ids) if o.aggregation == "token" else 1.0
            trained.append(s)
            if a == 0 and beta == 0:
                continue  # contributes no gradient: skip its forward and backward
            batch.append(s)
        metrics: dict[str, float] = {"train/samples": float(len(batch))}
        if not batch:  # nothing with a gradient: no update, nothing trained on
            metrics["loss"] = 0.0
            return metrics
        by_key: dict[tuple[str, float], list[Sample]] = defaultdict(list)
        for s in batch:
            by_key[(s.role, s.temperature)].append(s)
        micro = []
        for (role, temperature), group in by_key.items():
            # one prompt's samples stay in one micro-batch, so the backend runs that prompt once for all of them
            group.sort(key=lambda s: (len(s.prompt_ids), s.prompt_ids))
            for i in range(0, len(group), self.micro_batch_size):
                micro.append((role, temperature, group[i:i + self.micro_batch_size]))
        refs: list[torch.Tensor | None] = []
        for role, temperature, mb in micro:
            beta = self._objective(role)[1]
            refs.append(self.policy.sequence_logprobs([s.prompt_ids for s in mb], [s.completion_ids for s in mb],
                                                      temperature=temperature, reference=True) if beta else None)
        total_loss = 0.0
        kl_sum: dict[str, float] = defaultdict(float)
        tok_count: dict[str, float] = defaultdict(float)
        clip_sum = gap_sum = gap_tokens = 0.0
        grad_norm = 0.0
        # The "old" log-probs of the ratio are the first epoch's own training forward, detached: the policy has
        # not moved yet, so the ratio starts at exactly 1 in any dtype. The sampler's recorded log-probs differ
        # from the training forward by rounding in bf16 (batch shapes, kernels); they stay in samples.jsonl and
        # their gap is reported as `sampler_logprob_gap`.
        olds: list[torch.Tensor] = []
        for epoch in range(o.epochs):
            self.torch_optimizer.zero_grad(set_to_none=True)
            for k, ((role, temperature, mb), ref) in enumerate(zip(micro, refs)):
                weight, beta = self._objective(role)
                logp = self.policy.sequence_logprobs([s.prompt_ids for s in mb], [s.completion_ids for s in mb],
                                                     temperature=temperature)
                mask = torch.zeros_like(logp)
                for i, s in enumerate(mb):
                    mask[i, :len(s.completion_ids)] = 1
                if epoch == 0:
                    olds.append(logp.detach())
                    sampled, recorded = torch.zeros_like(logp), torch.zeros_like(logp)
                    for i, s in enumerate(mb):
                        n = min(len(s.logprobs), logp.shape[1])
                        sampled[i, :n] = torch.tensor(s.logprobs[:n], dtype=logp.dtype)
                        recorded[i, :n] = 1
                    gap_sum += ((sampled - olds[k]).abs() * recorded * mask).sum().item()
                    gap_tokens += (recorded * mask).sum().item()
                adv = torch.tensor([s.advantage for s in mb], dtype=logp.dtype, device=logp.device)
                loss_tok, kl, clipped = grpo_token_loss(logp, olds[k], ref, adv, o.epsilon,
                                                        o.epsilon if o.epsilon_high is None else o.epsilon_high,
                                                        beta)
                if o.aggregation == "token":
                    loss = (loss_tok * mask).sum() / denom[role]
                else:
                    loss = ((loss_tok * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / denom[role]
                if not torch.isfinite(loss):
                    self.torch_optimizer.zero_grad(set_to_none=True)
                    raise ArenaError(f"the {role} loss is {loss.item()}{_unchanged(epoch)}. Common causes: a "
                                     "learning rate too high for the last steps, or a judge's rewards of extreme "
                                     "size")
                (weight * loss).backward()
                total_loss += weight * loss.item()
                kl_sum[role] += (kl.detach() * mask).sum().item()
                tok_count[role] += mask.sum().item()
                clip_sum += (clipped * mask).sum().item()
            # the norm before clipping; clipping by infinity only measures it
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, o.max_grad_norm or math.inf))
            if not math.isfinite(grad_norm):
                self.torch_optimizer.zero_grad(set_to_none=True)
                raise ArenaError(f"the gradient norm is {grad_norm}{_unchanged(epoch)}")
            self.torch_optimizer.step()
        self.torch_optimizer.zero_grad(set_to_none=True)
        for s in trained:
            s.trained = True
        tokens = max(1.0, sum(tok_count.values()))
        metrics["loss"] = total_loss / o.epochs
        metrics["grad_norm"] = grad_norm
        metrics["clip_frac"] = clip_sum / tokens
        metrics["sampler_logprob_gap"] = gap_sum / max(1.0, gap_tokens)
        for role in kl_sum:
            metrics[f"kl/{role}"] = kl_sum[role] / max(1.0, tok_count[role])
        metrics["kl"] = sum(kl_sum.values()) / tokens
        metrics["train/tokens"] = sum(tok_count.values()) / o.epochs
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self.torch_optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore AdamW's moments; the learning rate, weight decay and betas come from the options, which a
        resumed run may have changed (a saved state would otherwise silently keep the old ones)."""
        self.torch_optimizer.load_state_dict(state)
        for group in self.torch_optimizer.param_groups:
            group.update(lr=self.options.lr, weight_decay=self.options.weight_decay,
                         betas=tuple(self.options.adam_betas))


@hookimpl
def register_optimizers(register: Any) -> None:
    register("grpo", GRPO)
