"""Tensor routines the hf backend is built from, kept apart from it so each can be tested against the plain
computation it replaces: batching helpers, token sampling, the chunked LM-head log-prob, LoRA inputs kept in
low precision and grouped-query attention on CPU."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# -- batching ---------------------------------------------------------------------------------------------------


def left_pad(seqs: Sequence[list[int]], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of `seqs` padded on the left, so that every row's last token is the last column."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def distinct(prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct prompts in first-seen order, and for each input row the index of its prompt among them."""
    index: dict[tuple[int, ...], int] = {}
    rows = [index.setdefault(tuple(p), len(index)) for p in prompts]
    return [list(p) for p in index], rows


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all of `seqs` share."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: real tokens count from 0, padding sits at 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# -- sampling ---------------------------------------------------------------------------------------------------


def sample_tokens(scaled: torch.Tensor, lse: torch.Tensor, top_p: float) -> torch.Tensor:
    """One token per row from softmax(scaled) (lse: its log-sum-exp), restricted to the smallest set of tokens
    whose mass reaches top_p. Inverse CDF in float32: ~2 ms a step for 32 rows x 49k, where torch.multinomial
    takes ~27 ms and a float64 CDF ~11 ms on 2 cores; a token of probability 0 is never drawn."""
    probs = (scaled - lse).exp_()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the mass before this token already suffices
        probs = probs.scatter(1, order, sorted_probs.masked_fill(outside, 0.0))
    cdf = probs.cumsum_(-1)
    u = torch.rand(len(cdf), 1, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)


# -- the LM head's log-probs ------------------------------------------------------------------------------------


class TokenLogprobs(torch.autograd.Function):
    """log softmax(h W^T + b)[token] / T for N positions, computed in chunks of `chunk` rows. Backward recomputes
    each chunk's logits from the saved hidden states and log-sum-exp, so no [N, vocab] tensor outlives a chunk:
    the LM head's logits are the largest activation of a small model (49k vocabulary x every position)."""

    @staticmethod
    def forward(ctx, hidden, tokens, weight, bias, temperature, chunk):
        out = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, len(hidden), chunk):
            logits = TokenLogprobs._logits(hidden[s:s + chunk], weight, bias, temperature)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            out[s:s + chunk] = logits.gather(1, tokens[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
        ctx.save_for_backward(hidden, tokens, weight, bias, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def _logits(hidden, weight, bias, temperature):
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        return logits if temperature == 1.0 else logits.div_(temperature)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, tokens, weight, bias, lse = ctx.saved_tensors
        need_h, _, need_w, need_b = ctx.needs_input_grad[:4]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for s in range(0, len(hidden), ctx.chunk):
            h, g = hidden[s:s + ctx.chunk], grad_out[s:s + ctx.chunk].float()
            # d/dlogits of (logit[token] - lse) = onehot - softmax, times the upstream gradient, over T
            grad = TokenLogprobs._logits(h, weight, bias, ctx.temperature).sub_(lse[s:s + ctx.chunk, None]).exp_()
            grad.mul_(-g[:, None]).scatter_add_(1, tokens[s:s + ctx.chunk, None], g[:, None])
            if ctx.temperature != 1.0:
                grad.div_(ctx.temperature)
            if need_h:
                grad_h[s:s + ctx.chunk] = grad.to(weight.dtype) @ weight
            if need_w:
                grad_w += grad.t() @ h.float()
            if need_b:
                grad_b += grad.sum(0)
        return (grad_h, None, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None)


# -- LoRA in a low-precision model ------------------------------------------------------------------------------


class UpcastLinear(torch.autograd.Function):
    """x @ W^T for a low-precision x (bf16) and a float32 W, saving x as it came. peft casts x to float32 in
    each LoRA layer and autograd then keeps those float32 copies: three of the same input for q, k and v, per
    layer. The cast is exact, so saving x and casting again in backward gives the same gradients."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = (grad @ weight).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad.flatten(0, -2).t() @ x.flatten(0, -2).to(grad.dtype)) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def keep_lora_inputs_low_precision(model: torch.nn.Module) -> None:
    """In a bf16 model with float32 adapters, let each LoRA A take the bf16 input itself (`UpcastLinear`)."""
    from peft.tuners.lora import Linear as LoraLinear

    for module in model.modules():
        if not isinstance(module, LoraLinear) or module.lora_variant:
            continue
        parts = list(module.lora_A.values())
        base_dtype = module.get_base_layer().weight.dtype
        if not parts or any(a.bias is not None or a.weight.dtype == base_dtype for a in parts):
            continue
        module.cast_input_dtype_enabled = False  # peft's own cast; each A now casts in UpcastLinear
        for a in parts:
            a.forward = lambda x, a=a: UpcastLinear.apply(x, a.weight)


# -- attention on CPU -------------------------------------------------------------------------------------------


def cpu_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention on CPU. transformers' `sdpa` copies K and V to every query head whenever a padding mask is given
    (`repeat_kv`), and autograd keeps the copies for backward: 3x the K/V memory for SmolLM2's 9 query and 3 KV
    heads. torch's CPU kernel takes a mask together with grouped heads, so we pass them straight through; a
    single query token (decoding) takes `decode_attention`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    plain = kwargs.get("softcap") is None and kwargs.get("position_bias") is None and query.device.type == "cpu"
    if plain and query.shape[2] == 1 and not dropout:
        return decode_attention(query, key, value, attention_mask, scaling), None
    if not plain or groups == 1 or attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def decode_attention(query, key, value, mask, scaling):
    """One query token per row (decoding): two small float32 matmuls with the query heads grouped by their KV
    head. torch's CPU flash kernel takes ~1.3 ms a call here in bf16 (32 rows, 110 keys), this ~0.24 ms, with
    the same error; 30 layers x 64 steps of it was a third of generation."""
    b, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(b, kv_heads, heads // kv_heads, dim).float()
    scores = (q @ key.float().transpose(-1, -2)) * (dim ** -0.5 if scaling is None else scaling)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    out = torch.softmax(scores, dim=-1) @ value.float()  # [b, kv_heads, group, dim]
    return out.reshape(b, 1, heads, dim).to(query.dtype)


def register_cpu_gqa_sdpa() -> str:
    """Register `cpu_gqa_sdpa` with transformers (sdpa's masks) and return its attention-implementation name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("arena_cpu_sdpa", cpu_gqa_sdpa)
    AttentionMaskInterface.register("arena_cpu_sdpa", ALL_MASK_ATTENTION_FUNCTIONS.get("sdpa", sdpa_mask))
    return "arena_cpu_sdpa"
