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
