"""DPO: the pairwise losses and the pairing against hand-computed values, then real steps on the tiny model whose
gradients and metrics are compared with the documented objective written out pair by pair."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from arena.config import resolve, validate
from arena.errors import ArenaError, ConfigError
from arena.interfaces import Env
from arena.plugins.optimizers.dpo import DPO, DPOOptions, RoleWeight, pairs_of, pairwise_loss
from arena.registry import load_registry
from arena.types import Role, Sample
from tiny import applied_gradient, assert_same_grads, gradients, make_backend

BETA = 0.1
# summed log-probs (policy chosen, policy rejected, ref chosen, ref rejected) giving h = 2, -2, 0 and 20
LOGPS = [(-3.0, -5.0, -4.0, -4.0), (-6.0, -2.0, -5.0, -3.0), (-1.0, -1.0, -1.0, -1.0), (0.0, -20.0, 0.0, 0.0)]
EXPECTED = {
    "sigmoid": [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.2)), math.log(2), math.log(1 + math.exp(-2))],
    "ipo": [(2 - 5) ** 2, (-2 - 5) ** 2, (0 - 5) ** 2, (20 - 5) ** 2],  # 1/(2β) = 5
    "hinge": [1 - 0.2, 1 + 0.2, 1.0, 0.0],  # relu(1 - βh)
}


def columns(dtype=torch.float64):
    return [torch.tensor(c, dtype=dtype, requires_grad=True) for c in zip(*LOGPS)]


# -- pairwise_loss --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_pairwise_loss_by_hand(kind):
    losses, chosen, rejected = pairwise_loss(*columns(), BETA, kind)
    assert losses.tolist() == pytest.approx(EXPECTED[kind])
    assert chosen.tolist() == pytest.approx([0.1, -0.1, 0.0, 0.0])  # β(π_c - ref_c)
    assert rejected.tolist() == pytest.approx([-0.1, 0.1, 0.0, -2.0])  # β(π_r - ref_r)
    assert not chosen.requires_grad and not rejected.requires_grad


def test_pairwise_loss_gradients_by_hand():
    pc, pr, rc, rr = columns()
    losses, _, _ = pairwise_loss(pc, pr, rc, rr, BETA, "sigmoid")
    losses.sum().backward()
    # d/dπ_c of -log σ(βh) = -β σ(-βh) = -β / (1 + exp(βh)); the rejected side is its negative
    want = [-BETA / (1 + math.exp(BETA * h)) for h in (2, -2, 0, 20)]
    assert pc.grad.tolist() == pytest.approx(want)
    assert pr.grad.tolist() == pytest.approx([-w for w in want])
    assert rc.grad.tolist() == pytest.approx([-w for w in want])  # the reference enters with the opposite sign
    pc.grad = None
    pairwise_loss(pc, pr, rc, rr, BETA, "ipo")[0].sum().backward()
    assert pc.grad.tolist() == pytest.approx([2 * (h - 5) for h in (2, -2, 0, 20)])
    pc.grad = None
    pairwise_loss(pc, pr, rc, rr, BETA, "hinge")[0].sum().backward()
    assert pc.grad.tolist() == pytest.approx([-BETA, -BETA, -BETA, 0.0])
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        pairwise_loss(pc, pr, rc, rr, BETA, "kto")


# -- pairs_of -------------------------------------------------------------------------------------------------

def P(side, group="g", role="a", reward=1.0, **meta) -> Sample:
    metadata = {} if side is None else {"pair": side, **meta}
    return Sample(role=role, prompt=[], completion="", prompt_ids=[1], completion_ids=[2], logprobs=[0.0],
                  reward=reward, group=group, metadata=metadata)


def test_pairs_of_pairs_by_role_and_group():
    samples = [P("rejected", "q1"), P("chosen", "q2"), P("chosen", "q1"), P("rejected", "q2"),
               P("chosen", "q1", role="b"), P("rejected", "q1", role="b"), P(None, "q1")]
    pairs, invalid = pairs_of(samples)
    assert invalid == 0
    assert [(p.role, p.group) for p in pairs] == [("a", "q1"), ("a", "q2"), ("b", "q1")]
    assert pairs[0].chosen is samples[2] and pairs[0].rejected is samples[0]
    assert pairs[1].chosen is samples[1] and pairs[1].rejected is samples[3]
    assert all(p.reference is None for p in pairs)


def test_pairs_with_an_invalid_member_are_left_out_and_counted():
    samples = [P("chosen", "q1", reward=None), P("rejected", "q1"), P("chosen", "q2"), P("rejected", "q2"),
               P("chosen", "q3"), P("rejected", "q3", reward=None), P("chosen", "q4", reward=None),
               P("rejected", "q4", reward=None)]
    pairs, invalid = pairs_of(samples)
    assert [p.group for p in pairs] == ["q2"] and invalid == 3


@pytest.mark.parametrize("samples, message", [
    ([P("chosen", "q1"), P("chosen", "q2"), P("rejected", "q2")], "group 'q1' has 0 rejected samples and 1 chosen"),
    ([P("rejected", "q1")], "group 'q1' has 0 chosen samples and 1 rejected"),
    ([P("chosen"), P("chosen"), P("rejected")], "has 2 chosen samples and 1 rejected"),
    ([P("chosen"), P("rejected"), P("rejected", reward=None)], "has 2 rejected samples"),
    ([P("best"), P("rejected")], "pair='best'"),
    ([P("chosen", reference="x"), P("rejected", reference="y")], r"different references \['x', 'y'\]"),
])
def test_broken_pairs_are_errors(samples, message):
    with pytest.raises(ArenaError, match=message):
        pairs_of(samples)


def test_untrained_and_unknown_roles_are_skipped():
    roles = {"a": Role("a"), "frozen": Role("frozen", trained=False)}
    # the skipped roles' groups are not even checked: a frozen role's samples are no concern of the optimizer
    samples = [P("chosen"), P("rejected"), P("chosen", role="frozen"), P("chosen", role="ghost"),
               P("rejected", role="ghost")]
    pairs, invalid = pairs_of(samples, roles)
    assert [p.role for p in pairs] == ["a"] and invalid == 0
    assert len(pairs_of(samples[3:])[0]) == 1  # without roles every role is paired


def test_a_pair_names_its_reference_on_either_member():
    samples = [P("chosen", "q1", reference="opponent"), P("rejected", "q1"),
               P("chosen", "q2"), P("rejected", "q2", reference="opponent"),
               P("chosen", "q3", reference="opponent"), P("rejected", "q3", reference="opponent")]
    assert [p.reference for p in pairs_of(samples)[0]] == ["opponent"] * 3


# -- real steps on the tiny model -----------------------------------------------------------------------------

@pytest.fixture()
def fresh(fresh_policy):
    return fresh_policy


ROLES = {"a": Role("a"), "b": Role("b"), "frozen": Role("frozen", trained=False)}
# (role, group, chosen length, rejected length)
SPECS = [("a", "q1", 3, 5), ("a", "q2", 6, 2), ("a", "q3", 4, 4), ("b", "q1", 5, 7), ("b", "q2", 2, 3)]


def make_pairs(policy, specs=SPECS, rewards=(1.0, 0.0)) -> list[Sample]:
    """Two samples per spec answering one prompt, as a game's pair would."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for role, group, *lengths in specs:
        prompt_ids = policy.encode_chat([{"role": "user", "content": f"{role} question {group}"}])
        for side, length, reward in zip(("chosen", "rejected"), lengths, rewards):
            out.append(Sample(role=role, prompt=[], completion="", prompt_ids=prompt_ids,
                              completion_ids=torch.randint(100, 5000, (length,), generator=gen).tolist(),
                              logprobs=[0.0] * length, reward=reward, group=group, metadata={"pair": side}))
    return out


def optimizer(policy, **kw) -> DPO:
    return DPO(DPOOptions(**{"lr": 1e-2, "max_grad_norm": 0.0, **kw}), Env(config=None, registry=None, policy=policy))


def step_grads(policy, samples, game_roles=ROLES, **kw):
    """Run one DPO step and return the gradient it applied (captured just before AdamW's step) and its metrics."""
    copies = [replace(s, metadata=dict(s.metadata)) for s in samples]
    return applied_gradient(optimizer(policy, **kw), copies, game_roles)


def summed(policy, s: Sample, reference=False) -> torch.Tensor:
    return policy.sequence_logprobs([s.prompt_ids], [s.completion_ids], reference=reference)[0].sum()


def objective_grads(policy, samples, game_roles=ROLES, beta=BETA, loss="sigmoid", roles=None):
    """The documented objective, one pair at a time: per trained role, its weight times the mean over its valid
    pairs of the loss of h = (log π(y_c) - log ref(y_c)) - (log π(y_r) - log ref(y_r)), log-probs summed at
    temperature 1, the reference the base model; roles summed."""
    params = policy.trainable_parameters()
    for p in params:
        p.grad = None
    total = 0.0
    for role in sorted({s.role for s in samples}):
        weight = (roles or {}).get(role, RoleWeight()).weight
        if not game_roles[role].trained or weight == 0:
            continue
        groups = sorted({s.group for s in samples if s.role == role})
        pairs = []
        for g in groups:
            c = next(s for s in samples if s.role == role and s.group == g and s.metadata["pair"] == "chosen")
            r = next(s for s in samples if s.role == role and s.group == g and s.metadata["pair"] == "rejected")
            if c.reward is not None and r.reward is not None:
                pairs.append((c, r))
        for c, r in pairs:
            with torch.no_grad():
                ref_margin = summed(policy, c, True) - summed(policy, r, True)
            h = summed(policy, c) - summed(policy, r) - ref_margin
            term = {"sigmoid": torch.log1p(torch.exp(-beta * h)), "ipo": (h - 1 / (2 * beta)) ** 2,
                    "hinge": torch.clamp(1 - beta * h, min=0)}[loss]
            total = total + weight * term / len(pairs)
    total.backward()
    grads = gradients(params)
    for p in params:
        p.grad = None
    return grads


def weights(policy):
    return [p.detach().clone() for p in policy.trainable_parameters()]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_gradient_is_the_documented_objective(fresh, loss):
    samples = make_pairs(fresh)
    kw = {"loss": loss, "beta": 0.5, "roles": {"b": RoleWeight(weight=0.3)}}
    got, _ = step_grads(fresh, samples, **kw)
    assert_same_grads(got, objective_grads(fresh, samples, **kw))


def test_micro_batching_gives_the_same_gradient(fresh):
    samples = make_pairs(fresh)
    one, _ = step_grads(fresh, samples, micro_batch_size=64)
    for size in (1, 2, 3):  # 1 still keeps a pair together
        many, _ = step_grads(fresh, samples, micro_batch_size=size)
        assert_same_grads(many, one)


def test_invalid_untrained_and_weightless_pairs_contribute_nothing(fresh):
    samples = make_pairs(fresh)
    extra = make_pairs(fresh, SPECS + [("frozen", "q1", 4, 6), ("a", "bad", 3, 3)])
    extra[-1].reward = None
    base, m1 = step_grads(fresh, samples)
    more, m2 = step_grads(fresh, extra)
    assert_same_grads(more, base)
    assert_same_grads(more, objective_grads(fresh, extra))
    assert (m1["pairs/trained"], m1["pairs/invalid"], m2["pairs/trained"], m2["pairs/invalid"]) == (5, 0, 5, 1)
    no_b, _ = step_grads(fresh, samples, roles={"b": RoleWeight(weight=0.0)})
    only_a, _ = step_grads(fresh, [s for s in samples if s.role == "a"])
    assert_same_grads(no_b, only_a)


def test_metrics_are_the_hand_computed_values(fresh):
    samples = make_pairs(fresh)
    with torch.no_grad():
        pc = [summed(fresh, s).item() for s in samples[0::2]]
        pr = [summed(fresh, s).item() for s in samples[1::2]]
        rc = [summed(fresh, s, True).item() for s in samples[0::2]]
        rr = [summed(fresh, s, True).item() for s in samples[1::2]]
    chosen = [BETA * (a - b) for a, b in zip(pc, rc)]
    rejected = [BETA * (a - b) for a, b in zip(pr, rr)]
    margins = [c - r for c, r in zip(chosen, rejected)]
    loss = [math.log1p(math.exp(-m)) for m in margins]  # -log σ(βh), βh = the margin
    _, m = step_grads(fresh, samples)
    assert m["pairs/trained"] == 5 and m["pairs/invalid"] == 0
    assert m["logps/chosen"] == pytest.approx(sum(pc) / 5, rel=1e-5)
    assert m["logps/rejected"] == pytest.approx(sum(pr) / 5, rel=1e-5)
    assert m["rewards/chosen"] == pytest.approx(sum(chosen) / 5, rel=1e-4, abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(sum(rejected) / 5, rel=1e-4, abs=1e-6)
    assert m["margin"] == pytest.approx(sum(margins) / 5, rel=1e-4, abs=1e-6)
    assert m["accuracy"] == sum(x > 0 for x in margins) / 5
    assert 0 < m["accuracy"] < 1  # both outcomes present: the count is really tested
    assert m["loss"] == pytest.approx(sum(loss[:3]) / 3 + sum(loss[3:]) / 2, rel=1e-4)  # roles a and b summed
    assert m["grad_norm"] > 0


def test_a_step_moves_the_lora_weights_and_raises_the_margin(fresh):
    samples = make_pairs(fresh)
    before = weights(fresh)
    opt = optimizer(fresh, lr=1e-3)
    first = opt.step(samples, ROLES)
    assert any(not torch.equal(a, b) for a, b in zip(weights(fresh), before))
    second = optimizer(fresh, lr=1e-3).step(make_pairs(fresh), ROLES)  # evaluated again after the update
    assert second["margin"] > first["margin"]
    assert second["loss"] < first["loss"]


def test_accumulate_adds_the_scaled_gradient_without_stepping(fresh):
    samples = make_pairs(fresh)
    full, _ = step_grads(fresh, samples)
    opt = optimizer(fresh)
    before = weights(fresh)
    existing = [torch.ones_like(p) for p in opt.params]
    for p, e in zip(opt.params, existing):
        p.grad = e.clone()
    metrics = opt.accumulate(samples, ROLES, scale=2.0)
    assert_same_grads([p.grad - e for p, e in zip(opt.params, existing)], [2 * g for g in full])
    assert all(torch.equal(a, b) for a, b in zip(weights(fresh), before))
    assert all(s.trained for s in samples)  # as grpo's: the mixer clears the flags if its update fails
    assert metrics["pairs/trained"] == 5 and "margin" in metrics


def test_a_non_finite_loss_stops_the_step_before_the_weights_change(fresh):
    before = weights(fresh)
    # 1/(2β) overflows float32: the ipo loss is infinite
    with pytest.raises(ArenaError, match="dpo loss is inf.*the weights were not changed"):
        optimizer(fresh, loss="ipo", beta=1e-300).step(make_pairs(fresh), ROLES)
    assert all(torch.equal(p, b) for p, b in zip(fresh.trainable_parameters(), before))
    assert all(p.grad is None for p in fresh.trainable_parameters())


def test_a_non_finite_gradient_stops_the_step_and_says_which_epoch(fresh):
    param = next(p for n, p in fresh.model.named_parameters() if "lora_A" in n)
    calls = []

    def poison(grad, after=0):
        calls.append(1)
        return grad * float("nan") if len(calls) > after else grad

    handle = param.register_hook(poison)
    before = weights(fresh)
    try:
        samples = make_pairs(fresh)
        with pytest.raises(ArenaError, match="gradient norm is nan; the weights were not changed"):
            optimizer(fresh).step(samples, ROLES)
        assert all(torch.equal(p, b) for p, b in zip(fresh.trainable_parameters(), before))
        assert not any(s.trained for s in samples)
        handle.remove()
        calls.clear()
        handle = param.register_hook(lambda g: poison(g, after=1))  # one backward per epoch: poison the second
        with pytest.raises(ArenaError, match="in epoch 2; earlier epochs of this round changed the weights"):
            optimizer(fresh, epochs=2, micro_batch_size=64).step(make_pairs(fresh), ROLES)
    finally:
        handle.remove()


def test_samples_say_whether_they_were_trained_on(fresh):
    samples = make_pairs(fresh, SPECS + [("frozen", "q1", 3, 3), ("a", "bad", 3, 3), ("b", "q9", 2, 2)])
    samples[-3].reward = None  # ("a", "bad")'s rejected member: the whole pair is invalid
    optimizer(fresh, roles={"b": RoleWeight(weight=1.0)}).step(samples, ROLES)
    assert [s.trained for s in samples] == [True] * 10 + [False] * 4 + [True] * 2
    zero_b = make_pairs(fresh)
    optimizer(fresh, roles={"b": RoleWeight(weight=0.0)}).step(zero_b, ROLES)
    assert [s.trained for s in zero_b] == [True] * 6 + [False] * 4
    nothing = make_pairs(fresh, [("frozen", "q1", 3, 3)])
    before = weights(fresh)
    metrics = optimizer(fresh).step(nothing, ROLES)
    assert metrics["pairs/trained"] == 0 and metrics["loss"] == 0 and "grad_norm" not in metrics  # no update, no norm
    assert all(torch.equal(p, b) for p, b in zip(fresh.trainable_parameters(), before))
    assert not any(s.trained for s in nothing)


def spy_references(monkeypatch, policy):
    """A stand-in for frozen adapters: a named reference is the base model plus 0.05 per token. Records every
    `reference` argument."""
    seen = []
    original = type(policy).sequence_logprobs

    def spy(self, prompt_ids, completion_ids, *, temperature=1.0, reference=False):
        seen.append(reference)
        if isinstance(reference, str):
            base = original(self, prompt_ids, completion_ids, temperature=temperature, reference=True)
            mask = torch.zeros_like(base)
            for i, c in enumerate(completion_ids):
                mask[i, :len(c)] = 1
            return base + 0.05 * mask
        return original(self, prompt_ids, completion_ids, temperature=temperature, reference=reference)

    monkeypatch.setattr(type(policy), "sequence_logprobs", spy)
    monkeypatch.setattr(type(policy), "frozen_adapters", lambda self: ["mirror", "opponent"])
    return seen


def test_references_per_pair_and_from_the_options(fresh, monkeypatch):
    samples = make_pairs(fresh)
    for s in samples[:4]:  # pairs a/q1 and a/q2 name the opponent
        s.metadata["reference"] = "opponent"
    seen = spy_references(monkeypatch, fresh)
    step_grads(fresh, samples, micro_batch_size=64)
    assert seen.count("opponent") == 1 and seen.count(True) == 1  # one reference pass per reference
    named, _ = step_grads(fresh, samples)
    base, _ = step_grads(fresh, make_pairs(fresh))
    forced, _ = step_grads(fresh, samples, reference="base")
    assert_same_grads(forced, base)
    seen.clear()
    step_grads(fresh, samples, reference="mirror")
    assert set(r for r in seen if r) == {"mirror"}
    # the named reference really enters the loss: +0.05 per token shifts h by 0.05·(len_r - len_c)
    assert (torch.cat([g.flatten() for g in named]) - torch.cat([g.flatten() for g in base])).norm() > 0


def test_a_frozen_copy_of_the_policy_as_reference(tiny_model_dir):
    """With the backend's own frozen adapters (SPIN): a reference that is the policy itself gives h = 0."""
    policy = make_backend(tiny_model_dir)
    if not hasattr(policy, "freeze_adapter"):
        pytest.skip("the backend has no freeze_adapter yet")
    policy.freeze_adapter("opponent")
    samples = make_pairs(policy)
    for s in samples:
        s.metadata["reference"] = "opponent"
    metrics = optimizer(policy, lr=1e-3).step(samples, ROLES)
    assert metrics["margin"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["loss"] == pytest.approx(2 * math.log(2), rel=1e-4)  # two roles, -log σ(0) each
    assert all(s.trained for s in samples)


# -- options --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, key", [
    ({"beta": 0}, "optimizer.beta"), ({"lr": 0.0}, "optimizer.lr"), ({"loss": "kto"}, "optimizer.loss"),
    ({"max_grad_norm": -1.0}, "optimizer.max_grad_norm"), ({"weight_decay": -0.1}, "optimizer.weight_decay"),
    ({"epochs": 0}, "optimizer.epochs"), ({"micro_batch_size": 0}, "optimizer.micro_batch_size"),
    ({"adam_betas": [0.9]}, "optimizer.adam_betas"), ({"adam_betas": [0.9, 1.0]}, "optimizer.adam_betas"),
    ({"reference": ""}, "optimizer.reference"), ({"roles": {"a": {"weight": -1.0}}}, "optimizer.roles.a.weight"),
    ({"roles": {"a": {"beta": 0.1}}}, "optimizer.roles.a.beta"), ({"gamma": 1}, "optimizer.gamma"),
])
def test_bad_options_name_their_key(data, key):
    with pytest.raises(ConfigError) as exc:
        validate(DPOOptions, data, "optimizer")
    assert exc.value.path == key


def test_good_options():
    o = validate(DPOOptions, {"loss": "ipo", "reference": "opponent", "roles": {"a": {"weight": 2.0}}}, "optimizer")
    assert (o.loss, o.reference, o.roles["a"], o.beta, o.lr) == ("ipo", "opponent", RoleWeight(2.0), 0.1, 1e-5)


def test_registered_as_a_pairs_optimizer():
    registry = load_registry()
    assert registry.get("optimizer", "dpo").obj is DPO
    with pytest.raises(ConfigError, match="role 'assistant' produces rewards with these settings but 'dpo' learns only from pairs"):
        resolve(registry, "prompts", overrides=["optimizer=dpo"])


def test_unknown_role_in_options_is_an_error(fresh):
    with pytest.raises(ConfigError) as exc:
        optimizer(fresh, roles={"challenger": RoleWeight()}).step(make_pairs(fresh), ROLES)
    assert exc.value.path == "optimizer.roles.challenger"
    assert "a, b, frozen" in str(exc.value)


def test_a_restored_state_keeps_the_options_settings(fresh):
    opt = optimizer(fresh, lr=1e-2, weight_decay=0.1)
    opt.step(make_pairs(fresh), ROLES)
    other = optimizer(fresh, lr=3e-4, weight_decay=0.0, adam_betas=[0.8, 0.99])
    other.load_state_dict(opt.state_dict())
    assert all(g["lr"] == 3e-4 and g["weight_decay"] == 0.0 and g["betas"] == (0.8, 0.99)
               for g in other.torch_optimizer.param_groups)
    assert other.torch_optimizer.state  # the moments were restored


def test_a_reference_that_is_not_a_frozen_adapter_is_one_line(fresh):
    """optimizer.reference naming an adapter not frozen yet (or a pair naming one) is the user's error, said in
    one line that names where it came from, not a KeyError from inside the backend."""
    from arena.errors import ArenaError

    samples = make_pairs(fresh)
    with pytest.raises(ArenaError, match=r"^optimizer.reference: no frozen adapter 'later'; frozen adapters: "):
        optimizer(fresh, reference="later").step(samples, ROLES)
    for s in samples:
        s.metadata["reference"] = "gone"
    with pytest.raises(ArenaError, match=r"pair of group .* \(metadata.reference\): no frozen adapter 'gone'"):
        optimizer(fresh).step(samples, ROLES)
