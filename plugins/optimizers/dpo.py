"""The `dpo` optimizer: learns from preference pairs (DPO, IPO, hinge; SPIN when the reference is the opponent).

A game hands it pairs: two Samples of one role and one group, `metadata["pair"]` "chosen" and "rejected". A pair
with a member whose reward is None (an invalid verdict) is never trained on. Each pair may name its reference, a
frozen adapter, in `metadata["reference"]`; otherwise the reference is the base model. Log-probs are summed over
the completion at temperature 1, as in the DPO paper. Samples without `metadata["pair"]` are not pairs: left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from arena.config import option
from arena.distributed import everywhere
from arena.errors import ArenaError, ConfigError
from arena.hookspecs import hookimpl
from arena.plugins.optimizers.adamw import AdamWOptimizer, check_adam_betas, unchanged
from arena.types import Role, Sample

KINDS = ("sigmoid", "ipo", "hinge")


@dataclass
class RoleWeight:
    weight: float = option(1.0, ge=0.0)  # the role's loss weight; 0 trains it not


@dataclass
class DPOOptions:
    lr: float = option(1e-5, gt=0.0, le=1.0)  # AdamW: a step moves each weight by up to about lr
    beta: float = option(0.1, gt=0.0)  # how far from the reference the policy may go (IPO: target margin 1/(2β))
    loss: str = option("sigmoid", choices=KINDS)  # sigmoid: DPO and SPIN; ipo: squared; hinge: SLiC
    # None: each pair's metadata["reference"], else the base model; "base": always the base model; any other
    # name: that frozen adapter for every pair
    reference: Optional[str] = None
    max_grad_norm: float = option(1.0, ge=0.0)  # 0 disables clipping
    weight_decay: float = option(0.0, ge=0.0)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    epochs: int = option(1, ge=1)  # passes over a round's pairs, one AdamW step each
    # sequences per forward/backward, a pair's two kept together; None: the backend's suggestion
    micro_batch_size: Optional[int] = option(None, ge=1)
    roles: dict[str, RoleWeight] = field(default_factory=dict)

    def check(self) -> None:
        check_adam_betas(self.adam_betas)
        if self.reference == "":
            raise ConfigError("reference", "empty; leave it unset, write base, or name a frozen adapter")


@dataclass
class Pair:
    role: str
    group: str
    chosen: Sample
    rejected: Sample
    reference: Optional[str] = None  # the frozen adapter the game named, if any


def pairs_of(samples: Sequence[Sample], roles: dict[str, Role] | None = None) -> tuple[list[Pair], int]:
    """The valid pairs in order of appearance, and how many pairs were left out because a member's reward is
    None. Samples of roles not in `roles` or not trained are skipped (None: every role). A group with a missing
    or duplicated member, or whose members name different references, is an ArenaError: the game broke the
    contract, and guessing which samples belong together would train on the wrong comparison."""
    members: dict[tuple[str, str], dict[str, list[Sample]]] = {}
    for s in samples:
        if "pair" not in s.metadata:
            continue
        if roles is not None and (s.role not in roles or not roles[s.role].trained):
            continue
        side = s.metadata["pair"]
        if side not in ("chosen", "rejected"):
            raise ArenaError(f"role {s.role}, group {s.group!r}: metadata pair={side!r}; expected 'chosen' or "
                             "'rejected'")
        members.setdefault((s.role, s.group), {"chosen": [], "rejected": []})[side].append(s)
    pairs, invalid = [], 0
    for (role, group), sides in members.items():
        for side, found in sides.items():
            if len(found) != 1:
                other = "rejected" if side == "chosen" else "chosen"
                raise ArenaError(f"role {role}, group {group!r} has {len(found)} {side} samples and "
                                 f"{len(sides[other])} {other}; a pair is one of each")
        chosen, rejected = sides["chosen"][0], sides["rejected"][0]
        refs = {s.metadata["reference"] for s in (chosen, rejected) if s.metadata.get("reference") is not None}
        if len(refs) > 1:
            raise ArenaError(f"role {role}, group {group!r}: the pair's members name different references "
                             f"{sorted(refs)}")
        if chosen.reward is None or rejected.reward is None:
            invalid += 1
            continue
        pairs.append(Pair(role, group, chosen, rejected, refs.pop() if refs else None))
    return pairs, invalid


def pairwise_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, beta: float,
                  kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss of summed log-probs ([pairs] each), with h = (π_c - ref_c) - (π_r - ref_r):
    sigmoid -log σ(βh), ipo (h - 1/(2β))², hinge relu(1 - βh). Also the implicit rewards β(π - ref), detached."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"loss kind {kind!r}; expected one of: {', '.join(KINDS)}")
    return (losses, (beta * (policy_chosen - ref_chosen)).detach(),
            (beta * (policy_rejected - ref_rejected)).detach())


@dataclass
class Prepared:
    """A round made ready once, reused by every epoch: the reference pass is the same for all of them."""

    pairs: list[Pair]  # those trained on (valid, in a trained role of weight > 0)
    invalid: int
    # (pairs, per-pair weight w_role / pairs of the role, reference sums [2·pairs]: chosen, rejected alternating;
    # None for a micro-batch another process of the run computes)
    batches: list[tuple[list[Pair], list[float], Optional[torch.Tensor]]]
    owned: list[int]  # the micro-batches this process computes (all, when alone)


class NonFiniteLoss(ArenaError):
    """A non-finite loss, caught before its backward; `step` adds what happened to the weights."""


class DPO(AdamWOptimizer):
    """Direct preference optimisation over a round's pairs; AdamW."""

    Options = DPOOptions
    consumes = "pairs"

    def _weight(self, role: str) -> float:
        return (self.options.roles.get(role) or RoleWeight()).weight

    def _reference(self, pair: Pair) -> bool | str:
        """What `sequence_logprobs(reference=...)` gets: True for the base model, else a frozen adapter's name."""
        ref = self.options.reference
        named = pair.reference if ref is None else (None if ref == "base" else ref)
        if named is None:
            return True
        if named not in self.policy.frozen_adapters():
            where = "optimizer.reference" if ref is not None else f"a pair of group {pair.group!r} (metadata.reference)"
            raise ArenaError(f"{where}: no frozen adapter {named!r}; frozen adapters: "
                             f"{', '.join(self.policy.frozen_adapters()) or 'none'}")
        return named

    def _logprobs(self, pairs: list[Pair], reference: bool | str = False) -> torch.Tensor:
        seqs = [s for p in pairs for s in (p.chosen, p.rejected)]
        return self.policy.sequence_logprobs([s.prompt_ids for s in seqs], [s.completion_ids for s in seqs],
                                             temperature=1.0, reference=reference).sum(1)

    def _prepare(self, samples: Sequence[Sample], roles: dict[str, Role]) -> Prepared:
        """Pair the samples, cut them into micro-batches and run the reference pass once (no grad)."""
        self.check_roles(roles)
        valid, invalid = pairs_of(samples, roles)
        pairs = [p for p in valid if self._weight(p.role) > 0]
        count: dict[str, int] = {}
        for p in pairs:
            count[p.role] = count.get(p.role, 0) + 1
        by_ref: dict[bool | str, list[Pair]] = {}
        for p in pairs:  # one reference per micro-batch
            by_ref.setdefault(self._reference(p), []).append(p)
        per_batch = max(1, self.micro_batch() // 2)
        planned = []
        for ref, group in by_ref.items():
            group.sort(key=lambda p: (len(p.chosen.prompt_ids), p.chosen.prompt_ids))  # shared prompts
            planned += [(ref, group[i:i + per_batch]) for i in range(0, len(group), per_batch)]
        owned = self.group.mine(len(planned))

        def reference_pass() -> list[Any]:
            with torch.no_grad():
                return [(mb, [self._weight(p.role) / count[p.role] for p in mb],
                         self._logprobs(mb, ref).detach() if k in owned else None)
                        for k, (ref, mb) in enumerate(planned)]
        return Prepared(pairs, invalid, self.group.agree(reference_pass), owned)  # a failure on one stops all

    def accumulate(self, samples: Sequence[Sample], roles: dict[str, Role], scale: float = 1.0) -> dict[str, float]:
        """Add `scale` x the gradient of one pass of this round's loss to the trainable parameters' .grad, neither
        zeroing nor stepping: how the `mix` optimizer sums objectives into one update. Marks the pairs trained,
        as grpo's does (the mixer clears the flags if its update fails)."""
        prepared = self._prepare(samples, roles)
        try:
            sums = self.group.agree(lambda: self._accumulate(prepared, scale))
        except NonFiniteLoss as exc:
            raise everywhere(ArenaError(f"{exc}{unchanged(0)}"), exc) from None
        for p in prepared.pairs:
            p.chosen.trained = p.rejected.trained = True
        return self._metrics(prepared, sums)

    def _accumulate(self, r: Prepared, scale: float = 1.0) -> dict[str, float]:
        """The loss and its backward, micro-batch by micro-batch (this process's), and the metric sums. Raises
        NonFiniteLoss before the backward of a non-finite micro-batch (earlier ones have already added to .grad)."""
        o = self.options
        sums = dict.fromkeys(("loss", "margin", "accuracy", "logps/chosen", "logps/rejected", "rewards/chosen",
                              "rewards/rejected"), 0.0)
        for k in r.owned:
            mb, weights, ref = r.batches[k]
            logp = self._logprobs(mb)
            ref = ref.to(logp.device)
            losses, chosen_r, rejected_r = pairwise_loss(logp[0::2], logp[1::2], ref[0::2], ref[1::2], o.beta, o.loss)
            loss = (losses * torch.tensor(weights, dtype=losses.dtype, device=losses.device)).sum()
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"the dpo loss is {loss.item()} (roles {', '.join(sorted({p.role for p in mb}))})"
                                    f". Common causes: a learning rate too high for the last steps, or a beta so "
                                    "small that the ipo target 1/(2·beta) overflows")
            (scale * loss).backward()
            sums["loss"] += loss.item()
            sums["margin"] += (chosen_r - rejected_r).sum().item()
            sums["accuracy"] += (chosen_r > rejected_r).sum().item()
            sums["logps/chosen"] += logp[0::2].detach().sum().item()
            sums["logps/rejected"] += logp[1::2].detach().sum().item()
            sums["rewards/chosen"] += chosen_r.sum().item()
            sums["rewards/rejected"] += rejected_r.sum().item()
        return sums

    def _metrics(self, r: Prepared, sums: dict[str, float]) -> dict[str, float]:
        """The round's metrics from the metric sums, added up over the processes of a run."""
        if self.group.size > 1:
            sums = dict(zip(sums, self.group.sum(list(sums.values()))))
        n = len(r.pairs)
        metrics = {k: v if k == "loss" else v / max(1, n) for k, v in sums.items()}
        metrics["pairs/trained"] = float(n)
        metrics["pairs/invalid"] = float(r.invalid)
        return metrics

    def step(self, samples: Sequence[Sample], roles: dict[str, Role]) -> dict[str, float]:
        """One AdamW update per epoch from the round's pairs; the pair metrics are the first epoch's (the policy
        as the round found it), the loss the mean over epochs, as grpo's."""
        o = self.options
        prepared = self._prepare(samples, roles)
        if not prepared.pairs:  # nothing to learn from: no update, nothing trained on
            return self._metrics(prepared, self._accumulate(prepared))  # no update: no gradient norm to report
        first: dict[str, float] = {}
        losses, grad_norm = [], 0.0
        for epoch in range(o.epochs):
            self.torch_optimizer.zero_grad(set_to_none=True)
            try:
                metrics = self._metrics(prepared, self.group.agree(lambda: self._accumulate(prepared)))
            except NonFiniteLoss as exc:
                self.torch_optimizer.zero_grad(set_to_none=True)
                raise everywhere(ArenaError(f"{exc}{unchanged(epoch)}"), exc) from None
            first = first or metrics
            losses.append(metrics["loss"])
            grad_norm = self.update(epoch)
        self.torch_optimizer.zero_grad(set_to_none=True)
        for p in prepared.pairs:
            p.chosen.trained = p.rejected.trained = True
        return {**first, "loss": sum(losses) / len(losses), "grad_norm": grad_norm}


@hookimpl
def register_optimizers(register: Any) -> None:
    register("dpo", DPO)
