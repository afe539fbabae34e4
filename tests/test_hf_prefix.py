"""The shared-prefix KV reuse of next_token_logprobs gives the same log-probs as the plain batched pass."""

import torch
from omegaconf import OmegaConf

from arena.config import core_defaults
from arena.interfaces import Env
from arena.plugins.hf import HFBackend, HFOptions, _common_prefix
from arena.registry import load_registry


def test_common_prefix():
    assert _common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert _common_prefix([[5], [6]]) == 0


def test_shared_prefix_matches_plain_pass(tiny_model_dir):
    cfg = core_defaults("prompts")
    cfg["model"]["path"] = str(tiny_model_dir)
    env = Env(config=OmegaConf.create(cfg), registry=load_registry())
    backend = HFBackend(HFOptions(generation_batch_size=3), env)
    with torch.no_grad():  # make the adapter matter, so policy and reference differ
        for name, p in backend.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rubric = backend.encode_chat([{"role": "user", "content": "Score this answer carefully. " * 8 + "X"}])
    prompts = [rubric + backend.encode(f" answer number {i}" + " more" * i) for i in range(7)]
    candidates = [backend.token_id(str(k)) for k in range(8)]
    for reference in (False, True):
        backend.options.min_shared_prefix = 10**9
        plain = backend.next_token_logprobs(prompts, candidates, reference=reference)
        backend.options.min_shared_prefix = 4
        shared = backend.next_token_logprobs(prompts, candidates, reference=reference)
        assert torch.allclose(plain, shared, atol=1e-4), (reference, (plain - shared).abs().max())
    policy = backend.next_token_logprobs(prompts, candidates)
    assert not torch.allclose(policy, shared, atol=1e-3), "the adapter should change the policy's scores"


def test_shared_prompt_training_pass_matches_plain(tiny_model_dir):
    """Rows sharing a prompt reuse its forward pass; values and gradients equal the plain padded pass."""
    cfg = core_defaults("prompts")
    cfg["model"]["path"] = str(tiny_model_dir)
    env = Env(config=OmegaConf.create(cfg), registry=load_registry())
    backend = HFBackend(HFOptions(), env)
    with torch.no_grad():
        for name, p in backend.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    a = backend.encode_chat([{"role": "user", "content": "first prompt, a longer one"}])
    b = backend.encode_chat([{"role": "user", "content": "second"}])
    prompts = [a, a, b, a, b]
    completions = [[11, 12, 13], [14, 15], [16, 17, 18, 19], [20], [21, 22]]
    params = backend.trainable_parameters()
    results = {}
    for share in (False, True):
        backend.options.share_prompts = share
        for p in params:
            p.grad = None
        out = backend.sequence_logprobs(prompts, completions, temperature=0.7)
        (out.sum() * 1.0).backward()
        ref = backend.sequence_logprobs(prompts, completions, temperature=0.7, reference=True)
        results[share] = (out.detach(), ref, [p.grad.clone() for p in params])
    (o0, r0, g0), (o1, r1, g1) = results[False], results[True]
    assert torch.allclose(o0, o1, atol=1e-5) and torch.allclose(r0, r1, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(g0, g1))
    assert (o1[3, 1:] == 0).all() and (o1[3, 0] != 0), "padding positions are zero, real ones are not"


def test_shared_prompt_with_one_token_completions(tiny_model_dir):
    cfg = core_defaults("prompts")
    cfg["model"]["path"] = str(tiny_model_dir)
    backend = HFBackend(HFOptions(), Env(config=OmegaConf.create(cfg), registry=load_registry()))
    a = backend.encode_chat([{"role": "user", "content": "hi"}])
    backend.options.share_prompts = True
    shared = backend.sequence_logprobs([a, a], [[5], [6]], reference=True)
    backend.options.share_prompts = False
    plain = backend.sequence_logprobs([a, a], [[5], [6]], reference=True)
    assert shared.shape == (2, 1) and torch.allclose(shared, plain, atol=1e-5)
