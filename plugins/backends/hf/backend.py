"""The `hf` backend: transformers generation and training with a LoRA adapter (peft).

The reference policy is the same model with the adapter disabled (exact base logits, no second copy); frozen
adapters (opponents) are copies of the LoRA weights alone, swapped in for a call (`_adapter`). Sampling
records log-softmax(logits / T) of each chosen token while generating (kept in samples.jsonl), and the training
forward uses the same T. Batch sizes follow the device: the measured CPU optimum on a CPU, free memory on a GPU.
The tensor routines it is built from live in `arena.plugins.backends.hf.kernels`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from arena.config import option
from arena.errors import ArenaError, ConfigError
from arena.hookspecs import hookimpl
from arena.interfaces import Backend, Env
from arena.plugins.backends.hf.decode import Decoder, PackedWeights, unsupported
from arena.plugins.backends.hf.models import (context_length, load_causal_lm, lora_target_problem, model_skeleton,
                                              release_free_heap)
from arena.plugins.backends.hf.kernels import (TokenLogprobs, common_prefix, distinct, keep_lora_inputs_low_precision, left_pad,
                                   positions, register_cpu_gqa_sdpa, sample_tokens)
from arena.types import Generation, Messages

# The measured CPU optimum (benchmarks/grpo_step.py): larger batches only add memory there. On a GPU the same
# sizes cost 4x (one H200 iteration: 4.76 s at 64/8, 1.28 s at 256/64), so there they follow free memory.
CPU_GENERATION_BATCH = 64
CPU_MICRO_BATCH = 8
FROZEN = "frozen"  # save(): the frozen adapters, one <name>.safetensors each, in this subfolder


@dataclass
class HFOptions:
    # sequences per generate / scoring batch; None: 64 on CPU, on a GPU all of a call's sequences, as far as
    # free memory holds their KV cache
    generation_batch_size: Optional[int] = option(None, ge=1)
    # the largest chunk of LM-head logits held at once by training log-probs
    logits_budget_mb: int = option(64, ge=1)
    share_prompts: bool = True  # training: completions of one prompt reuse its forward pass
    min_shared_prefix: int = option(16, ge=1)  # judge prompts sharing this many leading tokens reuse their KV cache
    # sampling's decode steps on arena's own step for Llama-type models, weights packed once per set of adapter
    # weights (decode.py); None: on a CPU, where the model allows it
    packed_decode: Optional[bool] = None


@dataclass(frozen=True)
class Stops:
    """The tokens that can end a completion for a set of stop strings: as id sets for the host, as masks over the
    logits width for the decode loop."""

    holds: frozenset[int]
    blank: frozenset[int]
    holds_mask: torch.Tensor
    blank_mask: torch.Tensor


def generation_rows(free_bytes: int, tokens: int, *, layers: int, kv_heads: int, head_dim: int, vocab: int,
                    dtype_bytes: int) -> int:
    """Sequences of `tokens` (prompt + new) one generation batch can hold in `free_bytes` of GPU memory: each
    row's KV cache (K and V in every layer) and the float32 copies of one step's logits that sampling makes (about
    four rows of the vocabulary), in half the free memory, leaving the rest for the prefill's activations."""
    per_row = 2 * layers * kv_heads * head_dim * tokens * dtype_bytes + 4 * vocab * 4
    return max(1, free_bytes // 2 // per_row)


def micro_batch_for(device_type: str, free_bytes: int, bytes_per_sequence: int, cap: int = 64) -> int:
    """Sequences per training forward/backward: 8 on CPU; on a GPU the largest power of two (it divides the usual
    group sizes) whose activations fit in half the free memory, at most `cap`."""
    if device_type != "cuda":
        return CPU_MICRO_BATCH
    n = int(max(1, min(cap, free_bytes // 2 // max(1, bytes_per_sequence))))
    return 1 << (n.bit_length() - 1)


def _cache_of(out: Any) -> Any:
    """The KV cache a forward returned: `cache` in current transformers, `past_key_values` in older 5.x."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


class HFBackend(Backend):
    """Transformers + peft LoRA on CPU or GPU; batched sampling with left padding."""

    Options = HFOptions

    @classmethod
    def context_length(cls, model: Any) -> int | None:
        return context_length(model.path)

    @classmethod
    def check_model(cls, model: Any) -> None:
        """LoRA's target modules against the model's, from its config alone (the load checks them again)."""
        skeleton = model_skeleton(model.path)
        problem = skeleton is not None and lora_target_problem(skeleton, model.lora.target_modules)
        if problem:
            raise ConfigError("model.lora.target_modules", problem)

    def __init__(self, options: HFOptions, env: Env):
        from peft import LoraConfig, get_peft_model

        self.options = options
        m = env.config.model
        model, self.tokenizer, self.device = load_causal_lm(m.path, m.dtype, m.device)
        problem = lora_target_problem(model, m.lora.target_modules)
        if problem:  # an ArenaError, not a ConfigError: the key is the model's, not relative to the backend's
            raise ArenaError(f"model.lora.target_modules: {problem}")
        lora = LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                          target_modules=list(m.lora.target_modules), task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft reads transformers' deprecated name on every load
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            self.model = get_peft_model(model, lora)
        keep_lora_inputs_low_precision(self.model)
        if model.config._attn_implementation == "sdpa" and self.device == "cpu":
            model.set_attn_implementation(register_cpu_gqa_sdpa())
        # logits_to_keep=1 feeds the head a strided hidden[:, -1:]; in bf16 that takes a bmm path that copies the
        # weight per row (+1.7 GB, +1.2 s on the benchmark). A contiguous input keeps it one plain matmul.
        model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
        self.model.eval()  # the base's own dropout stays off; LoRA's is switched on in training (`_lora_dropout`)
        self._dropouts = [mod for name, mod in self.model.named_modules()
                          if "lora_dropout" in name.split(".") and isinstance(mod, torch.nn.Dropout)]
        # transformers renamed `past_key_values` to `cache` (the old name warns on every call); older 5.x lack it
        forward = inspect.signature(model.get_decoder().forward).parameters
        self._cache_kw = "cache" if "cache" in forward else "past_key_values"
        # each look at "all rows done?" waits for the GPU to catch up; on CPU it costs nothing
        self.done_check_every = 16 if self.device.startswith("cuda") else 1
        self.pad_id = self.tokenizer.pad_token_id
        self.eos_ids = {self.tokenizer.eos_token_id}
        if isinstance(model.generation_config.eos_token_id, int):
            self.eos_ids.add(model.generation_config.eos_token_id)
        elif model.generation_config.eos_token_id:
            self.eos_ids.update(model.generation_config.eos_token_id)
        self.generated_tokens = 0
        self._frozen: dict[str, dict[str, torch.Tensor]] = {}  # name -> {trainable parameter name: copy}
        self._stop_cache: dict[tuple[str, ...], Stops] = {}
        why_not = unsupported(self.model)
        if options.packed_decode and why_not:
            raise ConfigError("backend.packed_decode", f"this model cannot take arena's decode step: {why_not}")
        self.packed_decode = (self.device == "cpu" if options.packed_decode is None else options.packed_decode
                              ) and not why_not
        self._packed: tuple[Any, PackedWeights] | None = None  # (which weights, as of when), their packing

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

    # -- helpers ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _adapter(self, reference: bool | str) -> Iterator[None]:
        """The weights a call runs on: the trained adapter, the base (adapter disabled) or a frozen adapter. A
        frozen one's tensors take the place of the trained parameters' `.data` until the call ends: no copy, and
        unlike an in-place `copy_` it leaves their version counters alone, so a graph built before the call (a
        loss awaiting backward) stays valid. The parameter objects, their grads and optimizer state are untouched."""
        if not isinstance(reference, str):
            with self.model.disable_adapter() if reference else contextlib.nullcontext():
                yield
            return
        params = dict(self._trained())
        trained = {}
        try:
            for name, tensor in self._frozen_weights(reference).items():
                trained[name] = params[name].data
                params[name].data = tensor
            yield
        finally:
            for name, tensor in trained.items():
                params[name].data = tensor

    def _trained(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def _frozen_weights(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._frozen:
            raise KeyError(f"no frozen adapter {name!r}; frozen adapters: {self.frozen_adapters() or 'none'}")
        return self._frozen[name]

    @contextlib.contextmanager
    def _lora_dropout(self, active: bool) -> Iterator[None]:
        """`model.lora.dropout` in the differentiable training forward only (never sampling, judging or the
        reference): the model stays in eval mode and just LoRA's dropout modules switch, back afterwards."""
        if not active:
            yield
            return
        was = [mod.training for mod in self._dropouts]
        for mod in self._dropouts:
            mod.train()
        try:
            yield
        finally:
            for mod, flag in zip(self._dropouts, was):
                mod.train(flag)

    def _cache(self, cache: Any) -> dict[str, Any]:
        return {self._cache_kw: cache}

    def _packed_weights(self, reference: bool | str) -> PackedWeights:
        """The packed decode weights of the adapter `reference` names, inside its `_adapter` context: built once
        and kept while the weights stay as they were (the trained ones: their tensors and version counters, which
        an optimizer step or a load moves; a frozen one: until it is frozen again, dropped or loaded)."""
        if reference is True:
            key: Any = True
        elif isinstance(reference, str):
            key = (reference, id(self._frozen_weights(reference)))
        else:  # torch's optimizers move the counters, except fused AdamW: the loop's updating() covers that one
            key = tuple((p.data_ptr(), p._version) for p in self.trainable_parameters())
        if self._packed is None or self._packed[0] != key:
            self._packed = None  # the old packing is freed before the new one is built
            self._packed = (key, PackedWeights(self.model))
        return self._packed[1]

    def _check_context(self, prompt: int, more: int = 0, what: str = "") -> None:
        """A sequence past the model's context runs on positions it never learned, or fails deep in attention:
        say so in the user's terms instead."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and prompt + more > limit:
            plus = f" + {more} {what}" if more else ""
            raise ArenaError(f"a prompt of {prompt} tokens{plus} is longer than the model's context length of "
                             f"{limit} tokens (its max_position_embeddings)")

    def _free_gpu_bytes(self) -> int:
        """Free GPU memory, counting what torch's allocator keeps reserved but unused."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def _dtype_bytes(self) -> int:
        return self.model.get_input_embeddings().weight.element_size()

    def _batch_size(self, rows: int, tokens: int) -> int:
        """Sequences per batch for a call of `rows` sequences of at most `tokens` tokens each."""
        if self.options.generation_batch_size is not None:
            return self.options.generation_batch_size
        if not self.device.startswith("cuda"):
            return CPU_GENERATION_BATCH
        c = self.model.config
        heads = c.num_attention_heads
        fit = generation_rows(self._free_gpu_bytes(), tokens, layers=c.num_hidden_layers,
                              kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                              head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                              vocab=c.vocab_size, dtype_bytes=self._dtype_bytes())
        return max(1, min(rows, fit))

    def suggested_micro_batch(self, tokens: int = 512) -> int:
        """Sequences per training micro-batch for this device: 8 on CPU; on a GPU what free memory holds of
        sequences of `tokens` tokens (activations kept for backward: ~12 hidden + 4 MLP widths per layer and
        token), at most 64."""
        if not self.device.startswith("cuda"):
            return micro_batch_for("cpu", 0, 1)
        c = self.model.config
        mlp = getattr(c, "intermediate_size", None) or 4 * c.hidden_size
        per_token = c.num_hidden_layers * (12 * c.hidden_size + 4 * mlp) * self._dtype_bytes()
        return micro_batch_for("cuda", self._free_gpu_bytes(), per_token * tokens)

    # -- memory -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def updating(self) -> Iterator[None]:
        """The packed decode weights go before the step (stale after it; the step's peak memory stays as it was);
        after it, once a round, freed heap pages go back to the system (`release_free_heap`)."""
        self._packed = None
        try:
            yield
        finally:
            if self.device == "cpu":
                release_free_heap()

    # -- sampling -----------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Messages | list[int]], *, n: int = 1, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 reference: bool | str = False, stop: Sequence[str] = ()) -> list[list[Generation]]:
        """temperature 0 is greedy decoding (its log-probs recorded at T=1)."""
        encoded, greedy = self._generation_inputs(prompts, temperature, greedy)
        flat = [ids for ids in encoded for _ in range(n)]
        if not flat:
            return [[] for _ in encoded]
        longest = max(len(ids) for ids in flat)
        self._check_context(longest, max_new_tokens, "max_new_tokens")
        order = sorted(range(len(flat)), key=lambda k: len(flat[k]))  # similar lengths share a batch: less padding
        results: list[Generation | None] = [None] * len(flat)
        step = self._batch_size(len(flat), longest + max_new_tokens)
        stops = self._stop_tokens(tuple(stop))
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            for k, gen in zip(chunk, self._generate_batch([flat[k] for k in chunk], max_new_tokens,
                                                          temperature, top_p, greedy, reference, stops)):
                results[k] = gen
        return [results[i * n:(i + 1) * n] for i in range(len(encoded))]

    def _generation_inputs(self, prompts: Sequence[Messages | list[int]], temperature: float,
                           greedy: bool) -> tuple[list[list[int]], bool]:
        """The prompts as token ids, and whether to decode greedily (temperature 0 is greedy)."""
        if temperature < 0:
            raise ValueError(f"temperature {temperature}: expected >= 0 (0: greedy)")
        encoded = [p if (p and isinstance(p[0], int)) or not p else self.encode_chat(p) for p in prompts]
        return encoded, greedy or temperature == 0

    def _generation(self, prompt: list[int], tokens: list[int], logprobs: list[float],
                    stops: Stops | None) -> Generation:
        """A sampled row as a Generation: cut after its end token or its stop token (kept: the model learns to
        stop), truncated if it has neither."""
        end = self._end(tokens, stops)
        length = len(tokens) if end is None else end + 1
        completion = tokens[:length]
        self.generated_tokens += length
        return Generation(prompt_ids=list(prompt), completion_ids=completion, logprobs=logprobs[:length],
                          text=self.decode(completion), truncated=end is None)

    def _stop_tokens(self, stop: tuple[str, ...]) -> Stops | None:
        """The tokens whose text holds one of the stop strings and the blank ones (only whitespace), before which a
        completion has not begun: found once per set of stop strings, over the whole logits width (a model's
        vocabulary may be padded past its tokenizer's; those ids are neither)."""
        if not stop:
            return None
        if any(not s for s in stop):
            raise ValueError("generate(stop=...): an empty stop string would end every completion at once")
        if stop not in self._stop_cache:
            pieces = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            holds = {i for i, piece in enumerate(pieces) if any(s in piece for s in stop)}
            blank = {i for i, piece in enumerate(pieces) if not piece.strip()}
            width = max(len(pieces), self.model.get_output_embeddings().out_features)
            masks = [torch.zeros(width, dtype=torch.bool) for _ in range(2)]
            for mask, ids in zip(masks, (holds, blank)):
                mask[sorted(ids)] = True
            self._stop_cache[stop] = Stops(frozenset(holds), frozenset(blank), masks[0].to(self.device),
                                           masks[1].to(self.device))
        return self._stop_cache[stop]

    def _generate_batch(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                        greedy: bool, reference: bool | str,
                        stops: Stops | None) -> list[Generation]:
        """Our own decode loop rather than `model.generate`: each distinct prompt is prefilled once and its KV
        cache gathered to its samples, tokens are drawn by `sample_tokens`, and log p(token) at temperature T is
        recorded as drawn. Tokens and log-probs stay on the device until the end, and "all rows done?" is asked
        every `done_check_every` steps (finished rows keep emitting padding meanwhile): no per-step host sync."""
        t = 1.0 if greedy else temperature
        unique, rows_of = distinct(prompts)
        row_prompt = torch.tensor(rows_of, device=self.device)
        ids, mask = left_pad(unique, self.pad_id, self.device)
        eos = torch.tensor(sorted(self.eos_ids), device=self.device)
        rows = len(prompts)
        tokens = torch.full((rows, max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        logprobs = torch.zeros(rows, max_new_tokens, device=self.device)
        done = torch.zeros(rows, dtype=torch.bool, device=self.device)
        begun = torch.zeros(rows, dtype=torch.bool, device=self.device)  # a non-blank token was drawn
        steps = 0
        with torch.inference_mode(), self._adapter(reference):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                             logits_to_keep=1)
            cache = _cache_of(out)
            if len(unique) < rows:
                cache.batch_select_indices(row_prompt)
            logits = out.logits[:, -1].index_select(0, row_prompt)
            mask = mask.index_select(0, row_prompt)
            position = positions(mask)[:, -1:] + 1
            decoder = None
            if self.packed_decode and max_new_tokens > 1:
                decoder = Decoder(self.model, self._packed_weights(reference), cache, mask, max_new_tokens - 1)
                out = cache = None  # the decoder holds its own copy of the KV cache
            for step in range(max_new_tokens):
                scaled = logits.float() if t == 1.0 else logits.float() / t
                lse = torch.logsumexp(scaled, dim=-1, keepdim=True)
                token = scaled.argmax(-1) if greedy else sample_tokens(scaled, lse, top_p)
                token = token.masked_fill(done, self.pad_id)
                tokens[:, step] = token
                logprobs[:, step] = (scaled.gather(1, token[:, None]) - lse).squeeze(1)
                steps = step + 1
                done |= torch.isin(token, eos)
                if stops is not None:  # a stop string ends a completion once it has begun: blank lines before don't
                    holds, blank = stops.holds_mask[token], stops.blank_mask[token]
                    done |= holds & (begun | ~blank)
                    begun |= ~blank
                if steps == max_new_tokens or (steps % self.done_check_every == 0 and bool(done.all())):
                    break
                if decoder is not None:
                    logits = decoder.step(token, position)
                else:
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    logits = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                                        use_cache=True, **self._cache(cache)).logits[:, -1]
                position = position + 1
        new, new_logprobs = tokens[:, :steps].tolist(), logprobs[:, :steps].tolist()  # one copy each
        return [self._generation(prompt, row_tokens, row_logprobs, stops)
                for prompt, row_tokens, row_logprobs in zip(prompts, new, new_logprobs)]

    def _end(self, tokens: list[int], stops: Stops | None) -> int | None:
        """Where a row's completion ends: its first end token, or its first stop token once it has begun (the
        decode loop's rule, on the host)."""
        begun = False
        for i, tok in enumerate(tokens):
            if tok in self.eos_ids:
                return i
            if stops is not None:
                blank = tok in stops.blank
                if tok in stops.holds and (begun or not blank):
                    return i
                begun |= not blank
        return None

    # -- scoring ------------------------------------------------------------------------------------------------
    def next_token_logprobs(self, prompts: Sequence[list[int]], candidates: Sequence[int], *,
                            reference: bool | str = False) -> torch.Tensor:
        """Judges send many prompts that open with the same long rubric: that shared prefix is run once and its
        KV cache reused by every row, which cuts a self-reward pass to roughly the length of the varying part."""
        if not prompts:
            return torch.zeros(0, len(candidates))
        longest = max(len(p) for p in prompts)
        self._check_context(longest)
        out = []
        step = self._batch_size(len(prompts), longest)
        cand = torch.tensor(list(candidates), device=self.device)
        prefix = common_prefix(prompts) if len(prompts) > 1 else 0
        prefix = min(prefix, min(len(p) for p in prompts) - 1)  # every row keeps a suffix
        with torch.inference_mode(), self._adapter(reference):
            cached = None
            if prefix >= self.options.min_shared_prefix:
                ids = torch.tensor([list(prompts[0][:prefix])], device=self.device)
                cached = _cache_of(self.model(input_ids=ids, use_cache=True, logits_to_keep=1))
            for start in range(0, len(prompts), step):
                rows = prompts[start:start + step]
                if cached is None:
                    ids, mask = left_pad(rows, self.pad_id, self.device)
                    logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                                        logits_to_keep=1).logits[:, -1].float()
                else:
                    ids, mask = left_pad([r[prefix:] for r in rows], self.pad_id, self.device)
                    full = torch.cat([torch.ones(len(rows), prefix, dtype=mask.dtype, device=mask.device), mask], 1)
                    cache = copy.deepcopy(cached)
                    cache.batch_repeat_interleave(len(rows))
                    logits = self.model(input_ids=ids, attention_mask=full, position_ids=positions(full)[:, prefix:],
                                        use_cache=True, logits_to_keep=1, **self._cache(cache)).logits[:, -1].float()
                out.append(torch.log_softmax(logits, dim=-1).index_select(1, cand).cpu())
        return torch.cat(out)

    def sequence_logprobs(self, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], *,
                          temperature: float = 1.0, reference: bool | str = False) -> torch.Tensor:
        """Completions of one prompt (a GRPO group) share its forward pass: each distinct prompt runs once and
        its KV cache is gathered for every row, gradients included (`share_prompts`)."""
        if temperature <= 0:
            raise ValueError(f"temperature {temperature}: log-probs need a temperature > 0 (0 is greedy decoding, "
                             "which has no distribution to train on)")
        longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))
        self._check_context(len(prompt_ids[longest]), len(completion_ids[longest]), "completion tokens")
        width = max(len(c) for c in completion_ids)
        comp = torch.full((len(completion_ids), width), self.pad_id, dtype=torch.long)
        comp_mask = torch.zeros_like(comp)
        for i, c in enumerate(completion_ids):
            comp[i, :len(c)] = torch.tensor(c)
            comp_mask[i, :len(c)] = 1
        comp, comp_mask = comp.to(self.device), comp_mask.to(self.device)
        unique, row_prompt = distinct(prompt_ids)
        share = self.options.share_prompts and len(unique) < len(prompt_ids)
        grad = not reference and torch.is_grad_enabled()
        base = self.model.get_base_model()
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        with (self._adapter(reference), self._lora_dropout(grad),
              contextlib.nullcontext() if grad else torch.no_grad()):
            if share:
                prompt, prompt_mask = left_pad(unique, self.pad_id, self.device)
                first = decoder(input_ids=prompt, attention_mask=prompt_mask, position_ids=positions(prompt_mask),
                                use_cache=True)
                index = torch.tensor(row_prompt, device=self.device)
                cache = _cache_of(first)
                cache.batch_select_indices(index)  # differentiable gather: gradients reach the shared prompt
                prompt_mask = prompt_mask.index_select(0, index)
                mask = torch.cat([prompt_mask, comp_mask], dim=1)
                last = first.last_hidden_state[:, -1:].index_select(0, index)
                if width == 1:
                    hidden = last
                else:
                    rest = decoder(input_ids=comp[:, :width - 1], attention_mask=mask[:, :mask.shape[1] - 1],
                                   position_ids=positions(mask)[:, prompt.shape[1]:prompt.shape[1] + width - 1],
                                   use_cache=True, **self._cache(cache)).last_hidden_state
                    hidden = torch.cat([last, rest], dim=1)  # position t predicts completion token t
            else:
                prompt, prompt_mask = left_pad(prompt_ids, self.pad_id, self.device)
                ids = torch.cat([prompt, comp], dim=1)
                mask = torch.cat([prompt_mask, comp_mask], dim=1)
                p = prompt.shape[1]
                hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
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
        return [p for _, p in self._trained()]

    def freeze_adapter(self, name: str) -> None:
        """Copies of the LoRA weights only (the base is shared): an opponent costs one adapter's memory."""
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"frozen adapter name {name!r}: use letters, digits, '-', '_' and '.' only (it "
                             "names a file in saved checkpoints)")
        self._frozen[name] = {n: p.detach().clone() for n, p in self._trained()}
        self._packed = None

    def frozen_adapters(self) -> list[str]:
        return sorted(self._frozen)

    def drop_adapter(self, name: str) -> None:
        self._frozen_weights(name)  # unknown: the KeyError that lists the names
        del self._frozen[name]
        self._packed = None

    def save(self, path: str) -> None:
        """The adapter, and the frozen adapters in `frozen/` (files of dropped ones removed)."""
        from safetensors.torch import save_file

        self.model.save_pretrained(path)
        folder = Path(path) / FROZEN
        for old in folder.glob("*.safetensors"):
            old.unlink()
        for name, weights in self._frozen.items():
            folder.mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / f"{name}.safetensors"))

    def load(self, path: str) -> None:
        """The checkpoint is the truth: its frozen adapters replace the current ones (none without `frozen/`).
        All files are read and checked before anything changes."""
        from peft.utils import load_peft_weights, set_peft_model_state_dict
        from safetensors.torch import load_file

        params = dict(self._trained())
        frozen = {}
        for file in sorted((Path(path) / FROZEN).glob("*.safetensors")):
            weights = load_file(str(file), device=str(self.device))
            if weights.keys() != params.keys() or any(t.shape != params[k].shape for k, t in weights.items()):
                raise ValueError(f"{file}: a frozen adapter of another LoRA shape than this model's")
            frozen[file.name.removesuffix(".safetensors")] = {k: t.to(params[k].dtype) for k, t in weights.items()}
        set_peft_model_state_dict(self.model, load_peft_weights(path, device=self.device))
        self._frozen = frozen
        self._packed = None


    def export_merged(self, path: str) -> None:
        """The base model with the LoRA adapter merged into its weights (peft's `merge_and_unload`, in place: no
        second copy of the model, and this policy has no adapter afterwards), saved with the tokenizer and the
        standard attention so that `AutoModelForCausalLM.from_pretrained(path)` needs nothing of arena."""
        self._packed = None
        merged = self.model.merge_and_unload()
        merged.set_attn_implementation("sdpa")
        merged.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


@hookimpl
def register_backends(register: Any) -> None:
    register("hf", HFBackend)
