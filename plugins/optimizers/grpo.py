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
from arena.errors import ArenaError
from arena.hookspecs import hookimpl
from arena.plugins.optimizers.adamw import AdamWOptimizer, check_adam_betas, unchanged
from arena.types import Role, Sample


@dataclass
class RoleObjective:
    weight: float = option(1.0, ge=0.0)  # the role's loss weight (LSP's α for the Challenger); 0 trains it not
    beta: Optional[float] = option(None, ge=0.0)  # KL coefficient; None: the optimizer's beta


@dataclass
class GRPOOptions:
    lr: float = option(1e-5, gt=0.0, le=1.0)  # AdamW: a step moves each weight by up to about lr
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
        check_adam_betas(self.adam_betas)


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


@dataclass
class _Round:
    """One round as GRPO trains on it: the plan (micro-batches, denominators, reference and old log-probs) and
    the metric sums of its passes."""

    micro: list[tuple[str, float, list[Sample]]] = field(default_factory=list)
    owned: list[int] = field(default_factory=list)  # the micro-batches this process computes (all, when alone)
    refs: list[Optional[torch.Tensor]] = field(default_factory=list)
    olds: dict[int, torch.Tensor] = field(default_factory=dict)
    denom: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    trained: list[Sample] = field(default_factory=list)
    samples: int = 0
    loss: float = 0.0
    kl: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    tokens: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    clipped: float = 0.0
    gap_sum: float = 0.0
    gap_tokens: float = 0.0
    grad_norm: Optional[float] = None  # set by a step; a pass accumulated for a mix has none of its own

    def add_up(self, group: Any) -> None:
        """The metric sums over every process of a run (each summed its own micro-batches)."""
        if group.size == 1:
            return
        roles = list(dict.fromkeys(role for role, _, _ in self.micro))
        values = group.sum([self.loss, self.clipped, self.gap_sum, self.gap_tokens,
                            *(self.kl[r] for r in roles), *(self.tokens[r] for r in roles)])
        self.loss, self.clipped, self.gap_sum, self.gap_tokens = values[:4]
        self.kl = defaultdict(float, zip(roles, values[4:4 + len(roles)]))
        self.tokens = defaultdict(float, zip(roles, values[4 + len(roles):]))

    def summary(self, passes: int) -> dict[str, float]:
        out = {"train/samples": float(self.samples)}
        if not passes:
            return {**out, "loss": 0.0}
        tokens = max(1.0, sum(self.tokens.values()))
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        out.update({"loss": self.loss / passes, "clip_frac": self.clipped / tokens,
                    "sampler_logprob_gap": self.gap_sum / max(1.0, self.gap_tokens),
                    "kl": sum(self.kl.values()) / tokens, "train/tokens": sum(self.tokens.values()) / passes})
        out.update({f"kl/{role}": value / max(1.0, self.tokens[role]) for role, value in self.kl.items()})
        return out


class GRPO(AdamWOptimizer):
    """GRPO-style policy gradient with group baselines, ratio clipping and a KL leash; AdamW."""

    Options = GRPOOptions
    consumes = "rewards"

    def _objective(self, role: str) -> tuple[float, float]:
        obj = self.options.roles.get(role) or RoleObjective()
        return obj.weight, self.options.beta if obj.beta is None else obj.beta

    def step(self, samples: Sequence[Sample], roles: dict[str, Role]) -> dict[str, float]:
        """One AdamW update from a round (`epochs` passes over it)."""
        plan = self._prepare(samples, roles)
        if not plan.micro:  # nothing with a gradient: no update, nothing trained on
            return plan.summary(0)
        for epoch in range(self.options.epochs):
            self.torch_optimizer.zero_grad(set_to_none=True)
            self.group.agree(lambda: self._backward(plan, epoch))  # a failure on any process stops all of them
            plan.grad_norm = self.update(epoch)
        self.torch_optimizer.zero_grad(set_to_none=True)
        for s in plan.trained:
            s.trained = True
        plan.add_up(self.group)
        return plan.summary(self.options.epochs)

    def accumulate(self, samples: Sequence[Sample], roles: dict[str, Role], scale: float = 1.0) -> dict[str, float]:
        """Add `scale` x the gradient of one pass of this round's loss to the parameters' `.grad`, without
        stepping: how the `mix` optimizer sums several objectives into one update."""
        plan = self._prepare(samples, roles)
        if plan.micro:
            self.group.agree(lambda: self._backward(plan, 0, scale))
            for s in plan.trained:
                s.trained = True
            plan.add_up(self.group)
        return plan.summary(1 if plan.micro else 0)

    def _prepare(self, samples: Sequence[Sample], roles: dict[str, Role]) -> "_Round":
        """Advantages, the per-role denominators, the micro-batches and their reference log-probs."""
        o = self.options
        self.check_roles(roles)
        advantages = group_advantages(samples, o.normalize_std)
        for s, a in zip(samples, advantages):
            s.advantage = a
        plan = _Round()
        batch = []
        # denominators fixed up front so micro-batch gradients add up to the exact full-batch gradient; they count
        # every sample the role trains on, including those skipped below because their gradient is zero
        for s, a in zip(samples, advantages):
            role = roles.get(s.role)
            if role is None or not role.trained or a is None or not s.completion_ids:
                continue
            weight, beta = self._objective(s.role)
            if weight == 0:
                continue
            plan.denom[s.role] += len(s.completion_ids) if o.aggregation == "token" else 1.0
            plan.trained.append(s)
            if a == 0 and beta == 0:
                continue  # contributes no gradient: skip its forward and backward
            batch.append(s)
        plan.samples = len(batch)
        by_key: dict[tuple[str, float], list[Sample]] = defaultdict(list)
        for s in batch:
            by_key[(s.role, s.temperature)].append(s)
        size = self.micro_batch()
        for (role, temperature), group in by_key.items():
            # one prompt's samples stay in one micro-batch, so the backend runs that prompt once for all of them
            group.sort(key=lambda s: (len(s.prompt_ids), s.prompt_ids))
            for i in range(0, len(group), size):
                plan.micro.append((role, temperature, group[i:i + size]))
        plan.owned = self.group.mine(len(plan.micro))
        plan.refs = [None] * len(plan.micro)

        def reference_pass() -> None:
            for k in plan.owned:
                role, temperature, mb = plan.micro[k]
                if self._objective(role)[1]:
                    plan.refs[k] = self.policy.sequence_logprobs([s.prompt_ids for s in mb],
                                                                 [s.completion_ids for s in mb],
                                                                 temperature=temperature, reference=True)
        self.group.agree(reference_pass)  # a failure on one process (out of memory) stops all of them
        return plan

    def _backward(self, plan: "_Round", epoch: int, scale: float = 1.0) -> None:
        """One pass: backward of `scale` x the loss, micro-batch by micro-batch, and the pass's metric sums.

        The "old" log-probs of the ratio are the first pass's own training forward, detached: the policy has not
        moved yet, so the ratio starts at exactly 1 in any dtype. The sampler's recorded log-probs differ from the
        training forward by rounding in bf16 (batch shapes, kernels); they stay in samples.jsonl and their gap is
        reported as `sampler_logprob_gap`."""
        o = self.options
        for k in plan.owned:
            (role, temperature, mb), ref = plan.micro[k], plan.refs[k]
            weight, beta = self._objective(role)
            logp = self.policy.sequence_logprobs([s.prompt_ids for s in mb], [s.completion_ids for s in mb],
                                                 temperature=temperature)
            mask = torch.zeros_like(logp)
            for i, s in enumerate(mb):
                mask[i, :len(s.completion_ids)] = 1
            if epoch == 0:
                plan.olds[k] = logp.detach()
                sampled, recorded = torch.zeros_like(logp), torch.zeros_like(logp)
                for i, s in enumerate(mb):
                    n = min(len(s.logprobs), logp.shape[1])
                    sampled[i, :n] = torch.tensor(s.logprobs[:n], dtype=logp.dtype)
                    recorded[i, :n] = 1
                plan.gap_sum += ((sampled - plan.olds[k]).abs() * recorded * mask).sum().item()
                plan.gap_tokens += (recorded * mask).sum().item()
            adv = torch.tensor([s.advantage for s in mb], dtype=logp.dtype, device=logp.device)
            loss_tok, kl, clipped = grpo_token_loss(logp, plan.olds[k], ref, adv, o.epsilon,
                                                    o.epsilon if o.epsilon_high is None else o.epsilon_high, beta)
            if o.aggregation == "token":
                loss = (loss_tok * mask).sum() / plan.denom[role]
            else:
                loss = ((loss_tok * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / plan.denom[role]
            if not torch.isfinite(loss):
                self.torch_optimizer.zero_grad(set_to_none=True)
                raise ArenaError(f"the {role} loss is {loss.item()}{unchanged(epoch)}. Common causes: a learning "
                                 "rate too high for the last steps, or a judge's rewards of extreme size")
            (scale * weight * loss).backward()
            plan.loss += weight * loss.item()
            plan.kl[role] += (kl.detach() * mask).sum().item()
            plan.tokens[role] += mask.sum().item()
            plan.clipped += (clipped * mask).sum().item()


@hookimpl
def register_optimizers(register: Any) -> None:
    register("grpo", GRPO)
