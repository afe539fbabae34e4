"""GRPO: group advantages and the token loss against hand-computed values, then real steps on the tiny model whose
gradients are compared with a direct implementation of the documented objective."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from arena.errors import ConfigError
from arena.interfaces import Env
from arena.plugins.optimizers.grpo import GRPO, GRPOOptions, RoleObjective, group_advantages, grpo_token_loss
from arena.registry import load_registry
from arena.types import Role, Sample
from tiny import applied_gradient, assert_same_grads, gradients


def S(reward, group="g", role="a", advantage=None) -> Sample:
    return Sample(role=role, prompt=[], completion="", prompt_ids=[1], completion_ids=[2], logprobs=[0.0],
                  reward=reward, advantage=advantage, group=group)


# -- group_advantages -----------------------------------------------------------------------------------------

def test_mean_baseline_per_role_and_group():
    samples = [S(1.0), S(2.0), S(6.0), S(0.0, group="h"), S(4.0, group="h"), S(10.0, role="b")]
    assert group_advantages(samples) == pytest.approx([-2.0, -1.0, 3.0, -2.0, 2.0, 0.0])


def test_std_normalisation():
    samples = [S(1.0), S(2.0), S(3.0), S(5.0, group="h"), S(7.0, group="h")]
    adv = group_advantages(samples, normalize_std=True)
    s = math.sqrt(2 / 3)  # population std of 1, 2, 3
    assert adv == pytest.approx([-1 / s, 0.0, 1 / s, -1.0, 1.0], rel=1e-5)
    assert group_advantages(samples, normalize_std=False) == pytest.approx([-1.0, 0.0, 1.0, -1.0, 1.0])


@pytest.mark.parametrize("normalize_std", [False, True])
def test_ties_and_groups_of_one_give_zero(normalize_std):
    samples = [S(3.0), S(3.0), S(3.0), S(0.5, group="alone")]
    assert group_advantages(samples, normalize_std) == [0.0, 0.0, 0.0, 0.0]


def test_invalid_rewards_give_none_and_leave_the_baseline():
    samples = [S(1.0), S(None), S(3.0), S(None, group="h")]
    assert group_advantages(samples) == [-1.0, None, 1.0, None]


def test_game_set_advantages_are_kept_and_leave_the_baseline():
    samples = [S(1.0), S(100.0, advantage=0.25), S(3.0)]
    assert group_advantages(samples) == [-1.0, 0.25, 1.0]


def test_an_invalid_reward_is_never_trained_on_even_with_a_game_set_advantage():
    # Sample's contract: reward None (an invalid verdict) is recorded, not trained on
    assert group_advantages([S(None, advantage=-0.5), S(2.0, advantage=0.5)]) == [None, 0.5]


# -- grpo_token_loss ------------------------------------------------------------------------------------------

RATIOS = [0.5, 1.0, 1.1, 1.5]


def token_loss(advantage, beta=0.0, ref=None, eps_low=0.2, eps_high=0.3):
    logp = torch.log(torch.tensor([RATIOS], dtype=torch.float64)).requires_grad_()
    old = torch.zeros_like(logp)
    loss, kl, clipped = grpo_token_loss(logp, old, ref, torch.tensor([advantage], dtype=torch.float64),
                                        eps_low, eps_high, beta)
    loss.sum().backward()
    return loss.detach()[0].tolist(), kl[0].tolist(), clipped[0].tolist(), logp.grad[0].tolist()


def test_clipping_with_a_positive_advantage():
    loss, kl, clipped, grad = token_loss(2.0)
    # -min(r·A, clip(r, 0.8, 1.3)·A): only r=1.5 is clipped (to 1.3)
    assert loss == pytest.approx([-1.0, -2.0, -2.2, -2.6])
    assert clipped == [0.0, 0.0, 0.0, 1.0]
    assert grad == pytest.approx([-1.0, -2.0, -2.2, 0.0])  # d(-r·A)/dlogp = -r·A; none through the clip
    assert kl == [0.0] * 4


def test_clipping_with_a_negative_advantage():
    loss, _, clipped, grad = token_loss(-1.0)
    # with A < 0 the lower bound is the active one: r=0.5 -> 0.8; r=1.5 stays unclipped (pessimistic bound)
    assert loss == pytest.approx([0.8, 1.0, 1.1, 1.5])
    assert clipped == [1.0, 0.0, 0.0, 0.0]
    assert grad == pytest.approx([0.0, 1.0, 1.1, 1.5])


def test_k3_kl_penalty():
    ref = torch.zeros(1, 4, dtype=torch.float64)  # ref log-prob 0; policy log-prob log r
    loss, kl, _, grad = token_loss(0.0, beta=0.1, ref=ref)
    expected = [1 / r + math.log(r) - 1 for r in RATIOS]  # exp(ref - logp) - (ref - logp) - 1
    assert kl == pytest.approx(expected)
    assert kl == pytest.approx([0.306853, 0.0, 0.004401, 0.072132], abs=1e-6)
    assert loss == pytest.approx([0.1 * k for k in expected])
    assert grad == pytest.approx([0.1 * (1 - 1 / r) for r in RATIOS])  # d/dlogp of beta·k3
    _, kl0, _, _ = token_loss(0.0, beta=0.0, ref=ref)
    assert kl0 == [0.0] * 4  # beta 0: no penalty computed


# -- real steps on the tiny model -----------------------------------------------------------------------------

@pytest.fixture()
def fresh(fresh_policy):
    return fresh_policy


ROLES = {"a": Role("a"), "b": Role("b"), "frozen": Role("frozen", trained=False)}


def make_samples(policy, specs, temperature: float = 1.0) -> list[Sample]:
    """specs: (role, group, reward, completion length). Samples of one (role, group) answer the same prompt, as
    in a game. Old log-probs are the current ones shifted by ±0.3 on alternate tokens, so some ratios fall outside
    the clip range."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for i, (role, group, reward, length) in enumerate(specs):
        prompt_ids = policy.encode_chat([{"role": "user", "content": f"{role} question {group} " + "x " * len(group)}])
        completion = torch.randint(100, 5000, (length,), generator=gen).tolist()
        with torch.no_grad():
            lp = policy.sequence_logprobs([prompt_ids], [completion], temperature=temperature)[0, :length]
        shift = torch.tensor([0.3 if k % 2 else -0.3 for k in range(length)]) * (1 if i % 2 else -1)
        out.append(Sample(role=role, prompt=[], completion="", prompt_ids=prompt_ids, completion_ids=completion,
                          logprobs=(lp + shift).tolist(), temperature=temperature, reward=reward, group=group))
    return out


SPECS = [("a", "q1", 1.0, 3), ("a", "q1", 0.0, 6), ("a", "q1", 0.5, 4), ("a", "q2", 2.0, 5), ("a", "q2", 0.0, 2),
         ("b", "q1", -1.0, 4), ("b", "q1", 1.0, 7)]


def optimizer(policy, **kw) -> GRPO:
    options = GRPOOptions(**{"lr": 1e-2, "max_grad_norm": 0.0, **kw})
    return GRPO(options, Env(config=None, registry=None, policy=policy))


def step_grads(policy, samples, game_roles=ROLES, **kw):
    """Run one GRPO step and return the gradient it applied (captured just before AdamW's step)."""
    return applied_gradient(optimizer(policy, **kw), [replace(s) for s in samples], game_roles)


def objective_grads(policy, samples, game_roles=ROLES, **kw):
    """The documented objective written out directly, one sample at a time: per role, sum over its samples of the
    clipped-ratio loss (the ratio against the policy's own detached log-probs, not the sampler's) with a k3 KL
    (the role's β) at the sample's temperature; `token` divides by all of the
    role's tokens, `sequence` averages per sequence then over sequences; roles are summed with their weights.
    Untrained roles and invalid rewards are left out."""
    o = GRPOOptions(**{"lr": 1e-2, "max_grad_norm": 0.0, **kw})
    params = policy.trainable_parameters()
    for p in params:
        p.grad = None
    advantages = group_advantages(samples, o.normalize_std)
    total = 0.0
    for role in sorted({s.role for s in samples}):
        if not game_roles[role].trained:
            continue
        obj = o.roles.get(role, RoleObjective())
        beta = o.beta if obj.beta is None else obj.beta
        mine = [(s, a) for s, a in zip(samples, advantages) if s.role == role and a is not None]
        tokens = sum(len(s.completion_ids) for s, _ in mine)
        for s, a in mine:
            logp = policy.sequence_logprobs([s.prompt_ids], [s.completion_ids], temperature=s.temperature)
            ref = policy.sequence_logprobs([s.prompt_ids], [s.completion_ids], temperature=s.temperature,
                                           reference=True) if beta else None
            # the "old" policy is the policy before the step, under the training forward's own numerics
            loss, _, _ = grpo_token_loss(logp, logp.detach(), ref, torch.tensor([a]), o.epsilon,
                                         o.epsilon if o.epsilon_high is None else o.epsilon_high, beta)
            term = loss.sum() / tokens if o.aggregation == "token" else loss.mean() / len(mine)
            total = total + obj.weight * term
    total.backward()
    grads = gradients(params)
    for p in params:
        p.grad = None
    return grads


def grads_differ(x, y) -> bool:
    a, b = torch.cat([t.flatten() for t in x]), torch.cat([t.flatten() for t in y])
    return float((a - b).norm()) > 1e-2 * float(b.norm())


def test_step_updates_the_lora_weights_only(fresh):
    samples = make_samples(fresh, SPECS)
    lora = {n: p.detach().clone() for n, p in fresh.model.named_parameters() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in fresh.model.named_parameters() if not p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    metrics = optimizer(fresh).step(samples, ROLES)
    after = dict(fresh.model.named_parameters())
    changed = [n for n, v in lora.items() if not torch.equal(after[n], v)]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert all(torch.equal(after[n], v) for n, v in base.items())
    assert metrics["train/samples"] == 7.0
    assert metrics["train/tokens"] == sum(length for *_, length in SPECS)
    assert metrics["kl"] > 0 and metrics["kl/a"] > 0 and metrics["grad_norm"] > 0
    assert metrics["clip_frac"] == 0  # one epoch: the ratio is exactly 1, whatever the sampler recorded
    assert metrics["sampler_logprob_gap"] == pytest.approx(0.3)  # make_samples shifts every recorded token by 0.3
    assert all(math.isfinite(v) for v in metrics.values())
    # a second epoch sees the policy moved by the first: its ratios leave 1 and some are clipped
    two = optimizer(fresh, lr=0.5, epochs=2, epsilon=0.01).step(make_samples(fresh, SPECS), ROLES)
    assert 0 < two["clip_frac"] < 1
    # the optimizer wrote the advantages it used onto the samples it was given
    given = make_samples(fresh, SPECS)
    optimizer(fresh).step(given, ROLES)
    assert [s.advantage for s in given] == pytest.approx(group_advantages(make_samples(fresh, SPECS)))


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_gradient_is_the_documented_objective(fresh, aggregation):
    samples = make_samples(fresh, SPECS)
    kw = {"aggregation": aggregation, "beta": 0.05,
          "roles": {"a": RoleObjective(weight=1.0), "b": RoleObjective(weight=0.5, beta=0.2)}}
    got, _ = step_grads(fresh, samples, **kw)
    assert_same_grads(got, objective_grads(fresh, samples, **kw))


def test_token_and_sequence_aggregation_differ(fresh):
    samples = make_samples(fresh, SPECS)
    token, _ = step_grads(fresh, samples, aggregation="token")
    sequence, _ = step_grads(fresh, samples, aggregation="sequence")
    assert grads_differ(token, sequence)
    # with equal lengths they coincide: the token mean is then the mean of per-sequence means
    equal = make_samples(fresh, [(r, g, w, 4) for r, g, w, _ in SPECS if r == "a"])
    token, _ = step_grads(fresh, equal, aggregation="token")
    sequence, _ = step_grads(fresh, equal, aggregation="sequence")
    assert_same_grads(token, sequence)


def test_untrained_roles_and_invalid_rewards_contribute_nothing(fresh):
    samples = make_samples(fresh, SPECS)
    extra = make_samples(fresh, SPECS + [("frozen", "q1", 5.0, 6), ("frozen", "q1", -5.0, 3),
                                         ("a", "q1", None, 5), ("b", "q1", None, 8)])
    base, m1 = step_grads(fresh, samples)
    more, m2 = step_grads(fresh, extra)
    assert_same_grads(more, base)
    assert m1["train/samples"] == m2["train/samples"] == 7.0
    assert "kl/frozen" not in m2
    # only invalid or untrained samples: nothing to learn, no update
    nothing = make_samples(fresh, [("frozen", "q1", 1.0, 3), ("frozen", "q1", 0.0, 3), ("a", "q1", None, 3)])
    before = [p.detach().clone() for p in fresh.trainable_parameters()]
    metrics = optimizer(fresh).step(nothing, ROLES)
    assert metrics["loss"] == 0.0 and metrics["train/samples"] == 0.0
    assert all(torch.equal(p, b) for p, b in zip(fresh.trainable_parameters(), before))


def test_micro_batching_gives_the_same_gradient(fresh):
    samples = make_samples(fresh, SPECS)
    for aggregation in ("token", "sequence"):
        one, _ = step_grads(fresh, samples, aggregation=aggregation, micro_batch_size=64)
        many, _ = step_grads(fresh, samples, aggregation=aggregation, micro_batch_size=1)
        some, _ = step_grads(fresh, samples, aggregation=aggregation, micro_batch_size=3)
        assert_same_grads(many, one)
        assert_same_grads(some, one)


def test_mixed_temperatures(fresh):
    hot = make_samples(fresh, SPECS[:3], temperature=1.0)
    cold = make_samples(fresh, [("a", "q9", 1.0, 4), ("a", "q9", 3.0, 3)], temperature=0.7)
    got, _ = step_grads(fresh, hot + cold)
    assert_same_grads(got, objective_grads(fresh, hot + cold))


def test_per_role_weight_and_beta(fresh):
    samples = make_samples(fresh, SPECS)
    plain, _ = step_grads(fresh, samples)
    weighted, _ = step_grads(fresh, samples, roles={"b": RoleObjective(weight=3.0)})
    assert grads_differ(plain, weighted)
    assert_same_grads(weighted, objective_grads(fresh, samples, roles={"b": RoleObjective(weight=3.0)}))
    # weight 0 is the same as leaving the role's samples out
    no_b, _ = step_grads(fresh, samples, roles={"b": RoleObjective(weight=0.0)})
    only_a, _ = step_grads(fresh, [s for s in samples if s.role == "a"])
    assert_same_grads(no_b, only_a)
    # a role's beta overrides the optimizer's
    kw = {"beta": 0.0, "roles": {"a": RoleObjective(beta=0.5)}}
    got, metrics = step_grads(fresh, samples, **kw)
    assert_same_grads(got, objective_grads(fresh, samples, **kw))
    assert metrics["kl/a"] > 0


def test_no_reference_pass_when_beta_is_zero(fresh, monkeypatch):
    samples = make_samples(fresh, SPECS)
    calls = []
    original = type(fresh).sequence_logprobs

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("reference", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(fresh), "sequence_logprobs", spy)
    step_grads(fresh, samples, beta=0.0)
    assert calls and not any(calls)
    calls.clear()
    step_grads(fresh, samples, beta=0.0, roles={"b": RoleObjective(beta=0.1)})
    assert any(calls)


def test_zero_advantage_samples_count_in_the_token_mean(fresh):
    """A tied group has advantage 0 but its tokens are still the role's tokens: the token mean must not change
    with β (here 0, which lets the optimizer skip their forward pass)."""
    samples = make_samples(fresh, SPECS[:5] + [("a", "tie", 1.0, 6), ("a", "tie", 1.0, 5)])
    got, _ = step_grads(fresh, samples, beta=0.0)
    assert_same_grads(got, objective_grads(fresh, samples, beta=0.0))
    tiny_beta, _ = step_grads(fresh, samples, beta=1e-9)
    assert_same_grads(got, tiny_beta)


def test_unknown_role_in_options_is_an_error(fresh):
    samples = make_samples(fresh, SPECS[:2])
    with pytest.raises(ConfigError) as exc:
        optimizer(fresh, roles={"challenger": RoleObjective()}).step(samples, ROLES)
    assert exc.value.path == "optimizer.roles.challenger"
    assert "a, b, frozen" in str(exc.value)


def test_bad_options_name_their_key(fresh):
    registry = load_registry()
    env = Env(config=None, registry=registry, policy=fresh)
    with pytest.raises(ConfigError) as exc:
        registry.build("optimizer", {"name": "grpo", "aggregation": "mean"}, env)
    assert exc.value.path == "optimizer.aggregation"
    with pytest.raises(ConfigError) as exc:
        registry.build("optimizer", {"name": "grpo", "micro_batch_size": 0}, env)
    assert exc.value.path == "optimizer.micro_batch_size"
    opt = registry.build("optimizer", {"name": "grpo", "roles": {"a": {"weight": 2.0}}}, env)
    assert opt.options.roles["a"] == RoleObjective(weight=2.0, beta=None)


def test_state_dict_round_trip(fresh):
    samples = make_samples(fresh, SPECS)
    opt = optimizer(fresh)
    opt.step(samples, ROLES)
    state = opt.state_dict()
    assert state["state"]  # AdamW moments exist after a step
    other = optimizer(fresh)
    other.load_state_dict(state)
    first = next(iter(state["state"].values()))["exp_avg"]
    assert torch.equal(next(iter(other.torch_optimizer.state_dict()["state"].values()))["exp_avg"], first)


# -- the second pass: exact first-step ratios, non-finite steps, what samples.jsonl learns --------------------

def test_bf16_first_step_ratio_is_exactly_one(tiny_model_dir, monkeypatch):
    """In bf16 the sampler's log-probs differ from the training forward's by rounding; the ratio must still start
    at exactly 1 (old = the training forward's own detached log-probs) and nothing may be clipped."""
    import arena.plugins.optimizers.grpo as grpo_module
    from arena.plugins.backends.hf.backend import HFBackend, HFOptions
    from tiny import make_env

    env = make_env(tiny_model_dir)
    env.config.model.dtype = "bfloat16"
    policy = HFBackend(HFOptions(), env)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    prompt = [{"role": "user", "content": "Name three rivers."}]
    (gens,) = policy.generate([prompt], n=6, max_new_tokens=12, temperature=0.7)
    samples = [Sample.from_generation(Role("a", temperature=0.7), prompt, g, reward=float(i % 3), group="g")
               for i, g in enumerate(gens)]
    seen = []
    original = grpo_module.grpo_token_loss

    def spy(logp, old, *args):
        seen.append(torch.equal(logp.detach(), old))
        return original(logp, old, *args)

    monkeypatch.setattr(grpo_module, "grpo_token_loss", spy)
    metrics = GRPO(GRPOOptions(epsilon=1e-6, beta=0.05), Env(config=None, registry=None, policy=policy)).step(
        samples, {"a": Role("a")})
    assert seen and all(seen)
    assert metrics["clip_frac"] == 0.0
    assert metrics["sampler_logprob_gap"] > 0  # the disagreement the old ratio would have carried is real


def test_a_non_finite_loss_stops_the_step_before_the_weights_change(fresh):
    from arena.errors import ArenaError

    samples = make_samples(fresh, SPECS)
    samples[0].reward = float("inf")
    before = [p.detach().clone() for p in fresh.trainable_parameters()]
    with pytest.raises(ArenaError, match="loss is nan|loss is inf"):
        optimizer(fresh).step(samples, ROLES)
    assert all(torch.equal(p, b) for p, b in zip(fresh.trainable_parameters(), before))
    assert all(p.grad is None for p in fresh.trainable_parameters())


def test_a_non_finite_gradient_stops_the_step_before_the_weights_change(fresh):
    from arena.errors import ArenaError

    param = next(p for n, p in fresh.model.named_parameters() if "lora_A" in n)
    handle = param.register_hook(lambda g: g * float("nan"))
    before = [p.detach().clone() for p in fresh.trainable_parameters()]
    try:
        with pytest.raises(ArenaError, match="gradient norm is nan"):
            optimizer(fresh).step(make_samples(fresh, SPECS), ROLES)
    finally:
        handle.remove()
    assert all(torch.equal(p, b) for p, b in zip(fresh.trainable_parameters(), before))


def test_samples_say_whether_they_were_trained_on(fresh):
    samples = make_samples(fresh, SPECS + [("frozen", "q1", 5.0, 6), ("a", "q1", None, 5)])
    optimizer(fresh).step(samples, ROLES)
    assert [s.trained for s in samples] == [True] * len(SPECS) + [False, False]
    assert samples[-1].advantage is None and all(s.advantage is not None for s in samples[:len(SPECS)])


def test_a_restored_state_keeps_the_options_learning_rate(fresh):
    """--resume optimizer.lr=X must train at X: AdamW's saved param_groups would otherwise win."""
    opt = optimizer(fresh, lr=1e-2, weight_decay=0.1)
    opt.step(make_samples(fresh, SPECS), ROLES)
    other = optimizer(fresh, lr=3e-4, weight_decay=0.0)
    other.load_state_dict(opt.state_dict())
    assert all(g["lr"] == 3e-4 and g["weight_decay"] == 0.0 for g in other.torch_optimizer.param_groups)
    assert other.torch_optimizer.state  # the moments were restored


def test_later_epochs_ratio_against_the_first_epochs_own_log_probs(fresh):
    """With epochs=2 every micro-batch's second-epoch ratio is taken against its own first-epoch log-probs: the
    update must not depend on how the round is cut into micro-batches."""
    samples = make_samples(fresh, SPECS)
    start = [p.detach().clone() for p in fresh.trainable_parameters()]

    def weights_after(micro_batch_size):
        with torch.no_grad():
            for p, s in zip(fresh.trainable_parameters(), start):
                p.copy_(s)
        optimizer(fresh, epochs=2, lr=0.05, epsilon=0.05, micro_batch_size=micro_batch_size).step(
            [replace(s) for s in samples], ROLES)
        return [p.detach().clone() for p in fresh.trainable_parameters()]

    whole, split = weights_after(64), weights_after(2)
    assert any(not torch.equal(w, s) for w, s in zip(whole, start))
    assert_same_grads([w - s for w, s in zip(split, start)], [w - s for w, s in zip(whole, start)], tol=1e-3)
