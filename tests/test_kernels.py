"""The backend's tensor routines (arena.plugins.backends.hf.kernels), each against the plain computation it replaces."""

from __future__ import annotations

import pytest
import torch

from arena.plugins.backends.hf.kernels import (TokenLogprobs, UpcastLinear, common_prefix, decode_attention, distinct, left_pad,
                                   positions, sample_tokens)


# -- batching ---------------------------------------------------------------------------------------------------

def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[5], [6]]) == 0
    assert common_prefix([[7, 8]]) == 2


def test_distinct_keeps_first_seen_order():
    prompts, rows = distinct([[1, 2], [3], [1, 2], [4], [3]])
    assert prompts == [[1, 2], [3], [4]]
    assert rows == [0, 1, 0, 2, 1]


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 0]]


# -- sampling ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_p", [1.0, 0.75])
def test_sample_tokens_follows_the_distribution(top_p):
    """Inverse-CDF sampling against the exact probabilities: frequencies within 5 sigma, a zero-probability token
    never drawn, and top_p keeping the smallest set of tokens whose mass reaches it, renormalised."""
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    rows = 20000
    scaled = probs.log().expand(rows, 4).clone()
    draws = sample_tokens(scaled, torch.logsumexp(scaled, -1, keepdim=True), top_p)
    want = probs if top_p == 1.0 else torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8
    counts = torch.bincount(draws, minlength=4).double()
    sigma = (rows * want * (1 - want)).sqrt()
    assert ((counts - rows * want).abs() <= 5 * sigma + 1).all(), counts
    assert counts[3] == 0


# -- the LM head's log-probs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_plain_autograd(chunk, temperature):
    """The chunked LM-head function (its own backward, logits recomputed) against log_softmax + gather."""
    torch.manual_seed(0)
    n, dim, vocab = 7, 5, 11
    hidden = torch.randn(n, dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, vocab, (n,))
    upstream = torch.randn(n, dtype=torch.float64)

    def grads(fn):
        for t in (hidden, weight, bias):
            t.grad = None
        out = fn()
        (out * upstream).sum().backward()
        return out.detach(), [t.grad.clone() for t in (hidden, weight, bias)]

    plain = lambda: torch.log_softmax((hidden @ weight.T + bias) / temperature, -1).gather(1, tokens[:, None])[:, 0]
    fused = lambda: TokenLogprobs.apply(hidden, tokens, weight, bias, temperature, chunk)
    (want, want_grads), (got, got_grads) = grads(plain), grads(fused)
    assert got.dtype == torch.float32  # log-probs are float32 whatever the model's dtype
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


# -- LoRA in a low-precision model ------------------------------------------------------------------------------

def test_upcast_linear_equals_casting_first():
    """A bf16 input times a float32 weight: same output and gradients as casting the input with autograd."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8).to(torch.bfloat16).requires_grad_(True)
    w = torch.randn(5, 8, requires_grad=True)
    upstream = torch.randn(3, 4, 5)

    def run(fn):
        x.grad = w.grad = None
        out = fn()
        (out * upstream).sum().backward()
        return out.detach(), x.grad.clone(), w.grad.clone()

    got = run(lambda: UpcastLinear.apply(x, w))
    want = run(lambda: torch.nn.functional.linear(x.float(), w))
    assert got[1].dtype == torch.bfloat16
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


# -- attention on CPU -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa(heads, kv_heads, mask_kind, dtype):
    torch.manual_seed(0)
    q = torch.randn(5, heads, 1, 16).to(dtype)
    k, v = torch.randn(5, kv_heads, 12, 16).to(dtype), torch.randn(5, kv_heads, 12, 16).to(dtype)
    keep = torch.ones(5, 1, 1, 12, dtype=torch.bool)
    keep[1, ..., :4] = False  # left padding
    keep[3, ..., :7] = False
    mask = {"bool": keep, "float": torch.zeros(keep.shape).masked_fill(~keep, float("-inf")), "none": None}[mask_kind]
    group = heads // kv_heads
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1),
        attn_mask=mask, scale=0.3).transpose(1, 2)
    got = decode_attention(q, k, v, mask, 0.3)
    assert got.shape == (5, 1, heads, 16) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)
