"""A decode step of arena's own for Llama-type models, used by the hf backend's sampling loop on a CPU.

At the 32 rows of a GRPO round a decode step multiplies small matrices, and much of its time goes to the number
of operations: transformers' step with peft's LoRA layers makes 17 matrix products and about 430 torch calls a
layer (a LoRA path for each of q, k, v and o, mask building, cache bookkeeping); this one makes 11 and about
310, with the weights packed once per set of adapter weights:

- q, k and v as one product, and their LoRA adapters as two more (A matrices stacked, B matrices on a block
  diagonal), in float32 and added before rounding as peft does: the adapter is not merged into the weights,
  which in bfloat16 would round away an update smaller than a weight's last bit;
- the KV cache in one buffer per layer, allocated for the whole completion and written in place, instead of a
  cache that grows by concatenation every step.

Norms, rotary embedding, MLP and LM head are the model's own modules and transformers' own functions. tests/test_decode.py holds the step to the
plain forward pass.
"""

from __future__ import annotations

from typing import Any

import torch

from arena.plugins.backends.hf.kernels import decode_attention

LLAMA_TYPES = ("llama", "mistral")  # the decoder layer this step reproduces: no biases, RMSNorm, rotary, SiLU MLP


def unsupported(model: Any) -> str | None:
    """Why `model` (peft-wrapped) cannot take this decode step, or None when it can."""
    base = model.get_base_model()
    config = base.config
    if config.model_type not in LLAMA_TYPES:
        return f"model type {config.model_type!r} (only {', '.join(LLAMA_TYPES)})"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "biases in attention or MLP"
    if getattr(config, "sliding_window", None):
        return "sliding-window attention"
    from peft.tuners.lora import Linear as LoraLinear

    for module in (m for m in model.modules() if isinstance(m, LoraLinear)):
        if module.lora_variant or len(module.active_adapters) != 1 or module.fan_in_fan_out:
            return "a LoRA variant (DoRA), several active adapters or fan_in_fan_out"
        if any(getattr(module, "lora_bias", {}).values()):
            return "a bias on LoRA B (lora_bias)"
    return None


class Packed:
    """One projection of a layer (q, k and v together, or o) for a decode step: the base weights, packed, and
    the LoRA adapter beside them as peft computes it (float32, added to the base's output before it is rounded
    to the model's dtype), its A matrices stacked and its B matrices, scaled, on a block diagonal: one product
    each however many projections share the input."""

    def __init__(self, linears: list[Any]):
        with torch.no_grad():
            weights = [_base(linear).weight for linear in linears]
            self.weight = weights[0] if len(weights) == 1 else torch.cat(weights)  # one: no copy
            adapters = [_adapter(linear) for linear in linears]
            self.a = self.b = None
            if any(adapters):
                self.a = torch.cat([a for a, _ in filter(None, adapters)])
                self.b = self.weight.new_zeros(self.weight.shape[0], self.a.shape[0], dtype=torch.float32)
                row = col = 0
                for weight, adapter in zip(weights, adapters):
                    if adapter is not None:
                        a, b = adapter
                        self.b[row:row + weight.shape[0], col:col + a.shape[0]] = b
                        col += a.shape[0]
                    row += weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(x, self.weight)
        if self.a is None:
            return out
        lora = torch.nn.functional.linear(torch.nn.functional.linear(x.float(), self.a), self.b)
        return (out + lora).to(out.dtype)


def _base(linear: Any) -> Any:
    return linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear


def _adapter(linear: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B x scale) in float32 of the LoRA adapter acting on `linear` now, or None (none, disabled, merged)."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(linear, LoraLinear) or linear.disable_adapters or linear.merged:
        return None
    name = linear.active_adapters[0]
    return linear.lora_A[name].weight.float(), linear.lora_B[name].weight.float() * linear.scaling[name]


class PackedWeights:
    """Each layer's q, k, v projections packed into one, and its o projection, for the adapter weights in place
    when it is built."""

    def __init__(self, model: Any):
        decoder = model.get_base_model().get_decoder()
        self.qkv = [Packed([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
                    for layer in decoder.layers]
        self.o = [Packed([layer.self_attn.o_proj]) for layer in decoder.layers]


class Decoder:
    """Decode steps for one batch of rows that a prefill (transformers' forward) started: its KV cache is copied
    into buffers with room for `new_tokens` more positions."""

    def __init__(self, model: Any, weights: PackedWeights, cache: Any, mask: torch.Tensor, new_tokens: int):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        base = model.get_base_model()
        self.decoder, self.head = base.get_decoder(), base.get_output_embeddings()
        self.rotary = apply_rotary_pos_emb  # transformers' own, as the model's layers apply it
        self.weights = weights
        config = base.config
        attn = self.decoder.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.split = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        rows, filled = mask.shape
        self.filled = filled
        self.mask = torch.zeros(rows, filled + new_tokens, dtype=torch.bool, device=mask.device)
        self.mask[:, :filled] = mask.bool()
        self.keys, self.values = [], []
        for keys, values in _layers(cache):
            shape = (rows, self.kv_heads, filled + new_tokens, self.head_dim)
            k = keys.new_empty(shape)
            v = values.new_empty(shape)
            k[:, :, :filled] = keys
            v[:, :, :filled] = values
            self.keys.append(k)
            self.values.append(v)

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] after `token` [rows] at `position` [rows, 1]."""
        rows = token.shape[0]
        at = self.filled
        self.filled += 1
        self.mask[:, at] = True
        mask = self.mask[:, None, None, :self.filled]
        x = self.decoder.embed_tokens(token[:, None])
        cos, sin = self.decoder.rotary_emb(x, position)  # [rows, 1, dim]
        for i, layer in enumerate(self.decoder.layers):
            h = layer.input_layernorm(x)
            q, k, v = self.weights.qkv[i](h).split(self.split, dim=-1)
            q = q.view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self.rotary(q, k, cos, sin)
            self.keys[i][:, :, at:at + 1] = k
            self.values[i][:, :, at:at + 1] = v.view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            out = decode_attention(q, self.keys[i][:, :, :self.filled], self.values[i][:, :, :self.filled], mask,
                                   self.scaling)
            x = x + self.weights.o[i](out.reshape(rows, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.head(self.decoder.norm(x))[:, -1]


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers DynamicCache, in the layout of its version."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))
