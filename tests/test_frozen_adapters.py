"""Frozen adapters (opponents without a second model): a call with `reference="name"` gives exactly what a backend
loaded with those weights gives, training never reaches them, a checkpoint keeps them, and each costs only the
LoRA weights."""

from __future__ import annotations

import pytest
import torch

from arena.interfaces import Policy
from arena.plugins.backends.hf.kernels import common_prefix

from tiny import make_backend, make_env

CHATS = [[{"role": "user", "content": t}] for t in
         ("Hi", "What is 12 + 30? Answer with the number only.", "Name a colour.")]
COMPLETIONS = [[100, 200, 300], [400, 500], [600], [700, 800, 900, 1000]]


def rows(policy):
    """Four rows, two of them one prompt: the shared-prompt path too."""
    p = [policy.encode_chat(c) for c in CHATS]
    return [p[0], p[1], p[0], p[2]], COMPLETIONS


def drift(policy, scale=0.3):
    """Move the trained adapter, as training would."""
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn_like(p) * scale)


def snapshot(policy):
    return [p.detach().clone() for p in policy.trainable_parameters()]


def scores(policy, reference=False):
    """Sequence log-probs, next-token log-probs (shared judge prefix) and greedy generations."""
    prompts, completions = rows(policy)
    candidates = [policy.token_id(str(k)) for k in range(8)]
    with torch.no_grad():
        seq = policy.sequence_logprobs(prompts, completions, reference=reference)
    nxt = policy.next_token_logprobs(prompts, candidates, reference=reference)
    gens = [g for gs in policy.generate(CHATS, max_new_tokens=6, greedy=True, reference=reference) for g in gs]
    return seq, nxt, gens


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)
    assert [g.completion_ids for g in a[2]] == [g.completion_ids for g in b[2]]
    torch.testing.assert_close(torch.tensor([lp for g in a[2] for lp in g.logprobs]),
                               torch.tensor([lp for g in b[2] for lp in g.logprobs]), atol=1e-5, rtol=0)


def test_a_frozen_adapter_equals_a_backend_loaded_with_its_weights(tiny_model_dir, tmp_path):
    policy = make_backend(tiny_model_dir)
    prompts, _ = rows(policy)
    assert common_prefix(prompts) >= policy.options.min_shared_prefix  # next_token_logprobs shares the prefix
    policy.save(str(tmp_path / "at-freeze"))
    policy.freeze_adapter("v0")
    drift(policy)
    other = make_backend(tiny_model_dir, perturb=False)
    other.load(str(tmp_path / "at-freeze"))

    frozen = scores(policy, reference="v0")
    assert_same(frozen, scores(other))
    assert (scores(policy)[0] - frozen[0]).abs().max() > 1e-3  # the trained adapter has moved on
    assert_same(scores(policy, reference=True), scores(other, reference=True))  # the base is still the base
    p, c = rows(policy)
    assert not policy.sequence_logprobs(p, c, reference="v0").requires_grad  # never differentiable


def test_lora_dropout_stays_off_in_frozen_calls(tiny_model_dir):
    from arena.plugins.backends.hf.backend import HFBackend, HFOptions

    policy = HFBackend(HFOptions(), make_env(tiny_model_dir, dropout=0.5))
    drift(policy)
    policy.freeze_adapter("v0")
    prompts, completions = rows(policy)
    first = policy.sequence_logprobs(prompts, completions, reference="v0")  # grad mode on: still no dropout
    torch.testing.assert_close(policy.sequence_logprobs(prompts, completions, reference="v0"), first, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(policy.sequence_logprobs(prompts, completions), first, atol=1e-6, rtol=0)
    assert not any(m.training for m in policy.model.modules())


def test_training_never_changes_a_frozen_adapter(tiny_model_dir):
    policy = make_backend(tiny_model_dir)
    params = policy.trainable_parameters()
    policy.freeze_adapter("v0")
    before = scores(policy, reference="v0")
    assert_same(before, scores(policy))  # frozen now: the same weights
    prompts, completions = rows(policy)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss = -policy.sequence_logprobs(prompts, completions).sum()
        scores(policy, reference="v0")  # opponent calls between forward and backward
        loss.backward()
        opt.step()
    assert_same(scores(policy, reference="v0"), before)
    assert (scores(policy)[0] - before[0]).abs().max() > 1e-3
    after = policy.trainable_parameters()
    assert len(after) == len(params) and all(a is b for a, b in zip(after, params))
    assert all(p.requires_grad for p in after)
    assert policy.frozen_adapters() == ["v0"]


def test_a_frozen_call_between_forward_and_backward_keeps_the_gradients(tiny_model_dir):
    """The swap leaves the trained parameters' version counters alone: a pending backward stays valid."""
    policy = make_backend(tiny_model_dir)
    policy.freeze_adapter("v0")
    drift(policy)
    prompts, completions = rows(policy)
    grads = []
    for interleave in (False, True):
        for p in policy.trainable_parameters():
            p.grad = None
        loss = policy.sequence_logprobs(prompts, completions).sum()
        if interleave:
            scores(policy, reference="v0")
        loss.backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_an_error_inside_a_frozen_call_leaves_the_trained_weights(tiny_model_dir):
    policy = make_backend(tiny_model_dir)
    policy.freeze_adapter("v0")
    drift(policy)
    trained, pointers = snapshot(policy), [p.data_ptr() for p in policy.trainable_parameters()]
    prompts, _ = rows(policy)
    with pytest.raises(IndexError):  # a token outside the vocabulary fails inside the forward
        policy.sequence_logprobs(prompts[:1], [[10**8]], reference="v0")
    with pytest.raises(RuntimeError, match="boom"), policy._adapter("v0"):
        raise RuntimeError("boom")
    for p, t, ptr in zip(policy.trainable_parameters(), trained, pointers):
        assert torch.equal(p, t) and p.data_ptr() == ptr


def test_save_load_keeps_the_frozen_adapters(tiny_model_dir, tmp_path):
    policy = make_backend(tiny_model_dir)
    policy.freeze_adapter("v0")
    drift(policy)
    policy.freeze_adapter("v1")
    policy.freeze_adapter("gone")
    policy.drop_adapter("gone")
    drift(policy)
    policy.save(str(tmp_path / "ckpt"))
    assert sorted(f.name for f in (tmp_path / "ckpt" / "frozen").iterdir()) == ["v0.safetensors", "v1.safetensors"]

    fresh = make_backend(tiny_model_dir, perturb=False)
    fresh.freeze_adapter("stale")
    fresh.load(str(tmp_path / "ckpt"))
    assert fresh.frozen_adapters() == ["v0", "v1"]  # the checkpoint is the truth: "stale" is gone
    for ref in ("v0", "v1", False):
        assert_same(scores(fresh, reference=ref), scores(policy, reference=ref))

    policy.drop_adapter("v1")
    policy.save(str(tmp_path / "ckpt"))  # saving again over it removes the dropped one's file
    assert [f.name for f in (tmp_path / "ckpt" / "frozen").iterdir()] == ["v0.safetensors"]
    make_backend(tiny_model_dir).save(str(tmp_path / "plain"))
    assert not (tmp_path / "plain" / "frozen").exists()
    fresh.load(str(tmp_path / "plain"))
    assert fresh.frozen_adapters() == []


def test_bad_and_unknown_names_are_clear_errors(tiny_model_dir):
    policy = make_backend(tiny_model_dir)
    for bad in ("", "a/b", "../x", "a b", "é", None):
        with pytest.raises(ValueError, match="letters, digits"):
            policy.freeze_adapter(bad)
    assert policy.frozen_adapters() == []
    policy.freeze_adapter("spin-1.0_a")
    policy.freeze_adapter("v2")
    prompts, completions = rows(policy)
    for call in (lambda: policy.sequence_logprobs(prompts, completions, reference="nope"),
                 lambda: policy.next_token_logprobs(prompts, [1, 2], reference="nope"),
                 lambda: policy.generate(CHATS, max_new_tokens=2, reference="nope"),
                 lambda: policy.drop_adapter("nope")):
        with pytest.raises(KeyError, match=r"'nope'.*\['spin-1.0_a', 'v2'\]"):
            call()
    # a backend without frozen adapters: the defaults say so
    assert Policy.frozen_adapters(policy) == []
    for method in (Policy.freeze_adapter, Policy.drop_adapter):
        with pytest.raises(NotImplementedError, match="no frozen adapters"):
            method(policy, "v0")


def test_a_frozen_adapter_costs_only_the_lora_weights(tiny_model_dir):
    policy = make_backend(tiny_model_dir)
    policy.freeze_adapter("v0")
    frozen = policy._frozen["v0"].values()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in frozen}
    trained = sum(p.numel() * p.element_size() for p in policy.trainable_parameters())
    assert sum(storages.values()) <= trained and len(frozen) == len(policy.trainable_parameters())
    assert not storages.keys() & {p.untyped_storage().data_ptr() for p in policy.trainable_parameters()}
