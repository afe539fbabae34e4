"""The shared-prefix KV reuse of the hf backend (judges' next-token scoring, training's shared prompts) gives the
same values and gradients as the plain padded passes."""

import torch

from tiny import make_backend


def test_shared_prefix_matches_plain_pass(tiny_model_dir):
    backend = make_backend(tiny_model_dir, generation_batch_size=3)
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
    backend = make_backend(tiny_model_dir)
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
    worst = max(((x - y).abs().max() / (x.abs().max() + 1e-12)).item() for x, y in zip(g0, g1))
    assert worst < 1e-4, worst
    assert (o1[3, 1:] == 0).all() and (o1[3, 0] != 0), "padding positions are zero, real ones are not"


def test_shared_prompt_with_one_token_completions(tiny_model_dir):
    backend = make_backend(tiny_model_dir, perturb=False)
    a = backend.encode_chat([{"role": "user", "content": "hi"}])
    backend.options.share_prompts = True
    shared = backend.sequence_logprobs([a, a], [[5], [6]], reference=True)
    backend.options.share_prompts = False
    plain = backend.sequence_logprobs([a, a], [[5], [6]], reference=True)
    assert shared.shape == (2, 1) and torch.allclose(shared, plain, atol=1e-5)
