"""The `hf` backend: transformers generation and training with a LoRA adapter (peft).

The reference policy is the same model with the adapter disabled (exact base logits, no second copy). Sampling
records log-softmax(logits / T) of each chosen token while generating, so training never recomputes "old"
log-probs, and the training forward uses the same T so the ratio starts at exactly 1.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from arena.errors import ConfigError
from arena.hookspecs import hookimpl
from arena.interfaces import Backend, Env
from arena.models import load_causal_lm
from arena.types import Generation, Messages


@dataclass
class HFOptions:
    generation_batch_size: int = 64  # sequences per generate call
    logits_budget_mb: int = 64  # the largest chunk of LM-head logits held at once by training log-probs
    share_prompts: bool = True  # training: completions of one prompt reuse its forward pass
    min_shared_prefix: int = 16  # judge prompts sharing at least this many leading tokens reuse their KV cache


def _left_pad(seqs: Sequence[list[int]], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _distinct(prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct prompts in first-seen order, and for each input row the index of its prompt among them."""
    index: dict[tuple[int, ...], int] = {}
    rows = [index.setdefault(tuple(p), len(index)) for p in prompts]
    return [list(p) for p in index], rows


def _common_prefix(seqs: Sequence[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


class HFBackend(Backend):
    """Transformers + peft LoRA on CPU or GPU; batched sampling with left padding."""

    Options = HFOptions

    def __init__(self, options: HFOptions, env: Env):
        from peft import LoraConfig, get_peft_model

        self.options = options
        m = env.config.model
        model, self.tokenizer, self.device = load_causal_lm(m.path, m.dtype, m.device)
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in m.lora.target_modules if t not in names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
                             if isinstance(mod, torch.nn.Linear)})
            raise ConfigError("model.lora.target_modules",
                              f"{missing} not in the model; its linear layers are: {', '.join(linear)}")
        lora = LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                          target_modules=list(m.lora.target_modules), task_type="CAUSAL_LM")
        self.model = get_peft_model(model, lora)
        _keep_lora_inputs_low_precision(self.model)
        if model.config._attn_implementation == "sdpa" and self.device == "cpu":
            model.set_attn_implementation(_register_cpu_gqa_sdpa())
        # logits_to_keep=1 feeds the head a strided hidden[:, -1:]; in bf16 that takes a bmm path that copies the
        # weight per row (+1.7 GB, +1.2 s on the benchmark). A contiguous input keeps it one plain matmul.
        model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
        self.model.eval()
        self.pad_id = self.tokenizer.pad_token_id
        self.eos_ids = {self.tokenizer.eos_token_id}
        if isinstance(model.generation_config.eos_token_id, int):
            self.eos_ids.add(model.generation_config.eos_token_id)
        elif model.generation_config.eos_token_id:
            self.eos_ids.update(model.generation_config.eos_token_id)
        self.generated_tokens = 0

    # -- text ---------------------------------------------------------------------------------------------------
    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        if self.tokenizer.chat_template:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True, return_dict=True)
            return list(out["input_ids"])
        text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return self.tokenizer.encode(text + ("\n\nassistant:" if add_generation_prompt else ""))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_id(self, text: str) -> int:
        ids = self.encode(text)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens for this tokenizer, not one")
        return ids[0]

    def _adapter(self, reference: bool) -> Any:
        return self.model.disable_adapter() if reference else contextlib.nullcontext()

    # -- sampling -----------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Messages | list[int]], *, n: int = 1, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 reference: bool = False) -> list[list[Generation]]:
        encoded = [p if (p and isinstance(p[0], int)) or not p else self.encode_chat(p) for p in prompts]
        flat = [ids for ids in encoded for _ in range(n)]
        order = sorted(range(len(flat)), key=lambda k: len(flat[k]))  # similar lengths share a batch: less padding
        results: list[Generation | None] = [None] * len(flat)
        step = max(1, self.options.generation_batch_size)
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            for k, gen in zip(chunk, self._generate_batch([flat[k] for k in chunk], max_new_tokens,
                                                          temperature, top_p, greedy, reference)):
                results[k] = gen
        return [results[i * n:(i + 1) * n] for i in range(len(encoded))]

    def _generate_batch(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                        greedy: bool, reference: bool) -> list[Generation]:
        """Our own decode loop rather than `model.generate`: each distinct prompt is prefilled once and its KV
        cache gathered to its samples, tokens are drawn by `_sample`, and log p(token) at temperature T is
        recorded as drawn."""
        t = 1.0 if greedy else temperature
        distinct, rows_of = _distinct(prompts)
        row_prompt = torch.tensor(rows_of, device=self.device)
        ids, mask = _left_pad(distinct, self.pad_id, self.device)
        eos = torch.tensor(sorted(self.eos_ids), device=self.device)
        rows = len(prompts)
        tokens = torch.full((rows, max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        logprobs = torch.zeros(rows, max_new_tokens)
        done = torch.zeros(rows, dtype=torch.bool, device=self.device)
        steps = 0
        with torch.inference_mode(), self._adapter(reference):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True,
                             logits_to_keep=1)
            cache = out.past_key_values
            if len(distinct) < rows:
                cache.batch_select_indices(row_prompt)
            logits = out.logits[:, -1].index_select(0, row_prompt)
            mask = mask.index_select(0, row_prompt)
            position = _positions(mask)[:, -1:] + 1
            for step in range(max_new_tokens):
                scaled = logits.float() if t == 1.0 else logits.float() / t
                lse = torch.logsumexp(scaled, dim=-1, keepdim=True)
                token = scaled.argmax(-1) if greedy else _sample(scaled, lse, top_p)
                token = token.masked_fill(done, self.pad_id)
                tokens[:, step] = token
                logprobs[:, step] = (scaled.gather(1, token[:, None]) - lse).squeeze(1).cpu()
                steps = step + 1
                done |= torch.isin(token, eos)
                if steps == max_new_tokens or bool(done.all()):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                logits = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                                    past_key_values=cache, use_cache=True).logits[:, -1]
                position = position + 1
        new = tokens[:, :steps].cpu()
        gens = []
        for row, prompt in enumerate(prompts):
            row_tokens = new[row].tolist()
            end = next((i for i, tok in enumerate(row_tokens) if tok in self.eos_ids), None)
            length = len(row_tokens) if end is None else end + 1  # keep the end token: the model learns to stop
            completion = row_tokens[:length]
            gens.append(Generation(prompt_ids=list(prompt), completion_ids=completion,
                                   logprobs=logprobs[row, :length].tolist(), text=self.decode(completion),
                                   truncated=end is None))
            self.generated_tokens += length
        return gens

    # -- scoring ------------------------------------------------------------------------------------------------
    def next_token_logprobs(self, prompts: Sequence[list[int]], candidates: Sequence[int], *,
                            reference: bool = False) -> torch.Tensor:
        """Judges send many prompts that open with the same long rubric: that shared prefix is run once and its
        KV cache reused by every row, which cuts a self-reward pass to roughly the length of the varying part."""
        out = []
        step = max(1, self.options.generation_batch_size)
        cand = torch.tensor(list(candidates), device=self.device)
        prefix = _common_prefix(prompts) if len(prompts) > 1 else 0
        prefix = min(prefix, min(len(p) for p in prompts) - 1) if prompts else 0  # every row keeps a suffix
        with torch.inference_mode(), self._adapter(reference):
            cached = None
            if prefix >= self.options.min_shared_prefix:
                ids = torch.tensor([list(prompts[0][:prefix])], device=self.device)
                cached = self.model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
            for start in range(0, len(prompts), step):
                rows = prompts[start:start + step]
                if cached is None:
                    ids, mask = _left_pad(rows, self.pad_id, self.device)
                    logits = self.model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                                        logits_to_keep=1).logits[:, -1].float()
                else:
                    ids, mask = _left_pad([r[prefix:] for r in rows], self.pad_id, self.device)
                    full = torch.cat([torch.ones(len(rows), prefix, dtype=mask.dtype, device=mask.device), mask], 1)
                    cache = copy.deepcopy(cached)
                    cache.batch_repeat_interleave(len(rows))
                    logits = self.model(input_ids=ids, attention_mask=full,
                                        position_ids=_positions(full)[:, prefix:], past_key_values=cache,
                                        use_cache=True, logits_to_keep=1).logits[:, -1].float()
                out.append(torch.log_softmax(logits, dim=-1).index_select(1, cand).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(candidates))

    def sequence_logprobs(self, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], *,
                          temperature: float = 1.0, reference: bool = False) -> torch.Tensor:
        """Completions of one prompt (a GRPO group) share its forward pass: each distinct prompt runs once and
        its KV cache is gathered for every row, gradients included (`share_prompts`)."""
        width = max(len(c) for c in completion_ids)
        comp = torch.full((len(completion_ids), width), self.pad_id, dtype=torch.long)
        comp_mask = torch.zeros_like(comp)
        for i, c in enumerate(completion_ids):
            comp[i, :len(c)] = torch.tensor(c)
            comp_mask[i, :len(c)] = 1
        comp, comp_mask = comp.to(self.device), comp_mask.to(self.device)
        distinct, row_prompt = _distinct(prompt_ids)
        share = self.options.share_prompts and len(distinct) < len(prompt_ids)
        grad = not reference and torch.is_grad_enabled()
        base = self.model.get_base_model()
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        with self._adapter(reference), (contextlib.nullcontext() if grad else torch.no_grad()):
            if share:
                prompt, prompt_mask = _left_pad(distinct, self.pad_id, self.device)
                first = decoder(input_ids=prompt, attention_mask=prompt_mask, position_ids=_positions(prompt_mask),
                                use_cache=True)
                index = torch.tensor(row_prompt, device=self.device)
                cache = first.past_key_values
                cache.batch_select_indices(index)  # differentiable gather: gradients reach the shared prompt
                prompt_mask = prompt_mask.index_select(0, index)
                mask = torch.cat([prompt_mask, comp_mask], dim=1)
                last = first.last_hidden_state[:, -1:].index_select(0, index)
                if width == 1:
                    hidden = last
                else:
                    rest = decoder(input_ids=comp[:, :width - 1], attention_mask=mask[:, :mask.shape[1] - 1],
                                   position_ids=_positions(mask)[:, prompt.shape[1]:prompt.shape[1] + width - 1],
                                   past_key_values=cache, use_cache=True).last_hidden_state
                    hidden = torch.cat([last, rest], dim=1)  # position t predicts completion token t
            else:
                prompt, prompt_mask = _left_pad(prompt_ids, self.pad_id, self.device)
                ids = torch.cat([prompt, comp], dim=1)
                mask = torch.cat([prompt_mask, comp_mask], dim=1)
                p = prompt.shape[1]
                hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                                 use_cache=False).last_hidden_state[:, p - 1:p - 1 + width]
            # the head runs only at real completion positions (padding skipped), in chunks of at most
            # `logits_budget_mb` of logits that backward recomputes: no [rows, width, vocab] tensor is ever kept
            valid = comp_mask.bool()
            chunk = max(1, int(self.options.logits_budget_mb * 2**20 // (4 * head.out_features)))
            out = torch.zeros(comp.shape, dtype=torch.float32, device=self.device)
            if isinstance(head, torch.nn.Linear):
                picked = TokenLogprobs.apply(hidden[valid], comp[valid], head.weight, head.bias, temperature, chunk)
            else:  # an unusual head: plain autograd, one piece
                logits = head(hidden[valid]).float() / temperature
                picked = logits.gather(1, comp[valid][:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
            out = out.masked_scatter(valid, picked)
        return out

    # -- training -----------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, path: str) -> None:
        self.model.save_pretrained(path)

    def load(self, path: str) -> None:
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        set_peft_model_state_dict(self.model, load_peft_weights(path, device=self.device))


def _sample(scaled: torch.Tensor, lse: torch.Tensor, top_p: float) -> torch.Tensor:
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


class _UpcastLinear(torch.autograd.Function):
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


def _keep_lora_inputs_low_precision(model: torch.nn.Module) -> None:
    """In a bf16 model with float32 adapters, let each LoRA A take the bf16 input itself (`_UpcastLinear`)."""
    from peft.tuners.lora import Linear as LoraLinear

    for module in model.modules():
        if not isinstance(module, LoraLinear) or module.lora_variant:
            continue
        parts = list(module.lora_A.values())
        base_dtype = module.get_base_layer().weight.dtype
        if not parts or any(a.bias is not None or a.weight.dtype == base_dtype for a in parts):
            continue
        module.cast_input_dtype_enabled = False  # peft's own cast; each A now casts in _UpcastLinear
        for a in parts:
            a.forward = lambda x, a=a: _UpcastLinear.apply(x, a.weight)


def _cpu_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention on CPU. transformers' `sdpa` copies K and V to every query head whenever a padding mask is given
    (`repeat_kv`), and autograd keeps the copies for backward: 3x the K/V memory for SmolLM2's 9 query and 3 KV
    heads. torch's CPU kernel takes a mask together with grouped heads, so we pass them straight through; a
    single query token (decoding) takes `_decode_attention`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    plain = kwargs.get("softcap") is None and kwargs.get("position_bias") is None and query.device.type == "cpu"
    if plain and query.shape[2] == 1 and not dropout:
        return _decode_attention(query, key, value, attention_mask, scaling), None
    if not plain or groups == 1 or attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _decode_attention(query, key, value, mask, scaling):
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


def _register_cpu_gqa_sdpa() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("arena_cpu_sdpa", _cpu_gqa_sdpa)
    AttentionMaskInterface.register("arena_cpu_sdpa", ALL_MASK_ATTENTION_FUNCTIONS.get("sdpa", sdpa_mask))
    return "arena_cpu_sdpa"


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


@hookimpl
def register_backends(register: Any) -> None:
    register("hf", HFBackend)
