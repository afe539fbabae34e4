"""The hf backend on the tiny model: batched generation, the sampling log-probs it records, the reference (adapter
disabled), chunked log-probs, next-token scoring and adapter save/load, each checked against a direct computation;
then temperature 0, LoRA dropout, the model's context, batch sizes per device and loading the right kind of model."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arena.errors import ArenaError, ConfigError
from arena.plugins.backends.hf.kernels import left_pad, positions

from tiny import make_backend, make_env

ATOL = 1e-4


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return make_backend(tiny_model_dir)


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def chats(k: int = 4) -> list[list[dict[str, str]]]:
    texts = ["Hi", "What is 12 + 30? Answer with the number only.", "Name a colour.",
             "Write one sentence about the sea, please, and keep it short and simple."]
    return [[{"role": "user", "content": t}] for t in texts[:k]]


def manual_logprobs(model, prompt, completion, temperature=1.0) -> torch.Tensor:
    """Per-token log-probs of `completion` after `prompt`: one unpadded forward pass, log-softmax(logits / T)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    positions = range(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return torch.stack([logp[p, t] for p, t in zip(positions, completion)])


def check_generation(policy, gen, prompt_ids, max_new_tokens):
    assert gen.prompt_ids == prompt_ids
    assert 1 <= len(gen.completion_ids) <= max_new_tokens
    assert len(gen.logprobs) == len(gen.completion_ids)
    assert all(lp <= 0.0 for lp in gen.logprobs)
    ends = [i for i, t in enumerate(gen.completion_ids) if t in policy.eos_ids]
    if gen.truncated:
        assert ends == [] and len(gen.completion_ids) == max_new_tokens
    else:
        assert ends == [len(gen.completion_ids) - 1]  # ends at its first EOS, which is kept
    assert gen.text == policy.decode(gen.completion_ids)


# -- generation -----------------------------------------------------------------------------------------------

def test_generate_returns_n_completions_per_prompt_in_order(tiny_model_dir):
    policy = make_backend(tiny_model_dir, generation_batch_size=5)  # 12 sequences: batches of mixed lengths
    prompts = [*chats(3), policy.encode("plain token ids as a prompt")]
    encoded = [policy.encode_chat(p) for p in prompts[:3]] + [prompts[3]]
    assert len({len(e) for e in encoded}) == 4
    torch.manual_seed(0)
    before = policy.generated_tokens
    out = policy.generate(prompts, n=3, max_new_tokens=6, temperature=1.0)
    assert len(out) == 4 and all(len(gens) == 3 for gens in out)
    for ids, gens in zip(encoded, out):
        for gen in gens:
            check_generation(policy, gen, ids, 6)
    assert policy.generated_tokens - before == sum(len(g.completion_ids) for gens in out for g in gens)
    # sampling: the completions of one prompt are not copies of each other
    assert len({tuple(g.completion_ids) for g in out[1]}) > 1


def test_batched_greedy_equals_one_prompt_at_a_time(policy):
    prompts = chats(4)
    together = policy.generate(prompts, n=1, max_new_tokens=6, greedy=True)
    for prompt, (gen,) in zip(prompts, together):
        (alone,), = policy.generate([prompt], n=1, max_new_tokens=6, greedy=True)
        assert alone.completion_ids == gen.completion_ids
        torch.testing.assert_close(torch.tensor(gen.logprobs), torch.tensor(alone.logprobs), atol=ATOL, rtol=0)


def with_eos_bias(backend, bias: float, token: int | None = None):
    """Add `bias` to the EOS logit, or `token`'s (a biased copy of the tied head): the tiny model's logits are
    otherwise nearly uniform over 49k tokens, so it would never stop."""
    base = backend.model.get_base_model()
    old = base.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight = old.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[backend.tokenizer.eos_token_id if token is None else token] = bias
    head.bias.requires_grad_(False)
    base.lm_head = head
    return backend


@pytest.fixture(scope="module")
def eos_policy(tiny_model_dir):
    """EOS has probability about 0.1 at every step."""
    return with_eos_bias(make_backend(tiny_model_dir), 8.6)


def test_completion_ends_at_eos_or_is_marked_truncated(eos_policy, policy):
    torch.manual_seed(0)
    prompts = chats(2)
    stopping = eos_policy.generate(prompts, n=8, max_new_tokens=10)
    running = policy.generate(prompts, n=2, max_new_tokens=4)  # no bias: EOS is practically never sampled
    for out, backend, limit in ((stopping, eos_policy, 10), (running, policy, 4)):
        for ids, gens in zip([backend.encode_chat(c) for c in prompts], out):
            for g in gens:
                check_generation(backend, g, ids, limit)
    assert any(not g.truncated and len(g.completion_ids) < 10 for gens in stopping for g in gens)
    assert all(g.truncated and len(g.completion_ids) == 4 for gens in running for g in gens)


def test_sampling_follows_the_recorded_distribution(eos_policy):
    torch.manual_seed(0)
    (gens,) = eos_policy.generate(chats(1), n=64, max_new_tokens=1)
    eos = eos_policy.tokenizer.eos_token_id
    ((lp_eos,),) = eos_policy.next_token_logprobs([gens[0].prompt_ids], [eos]).tolist()
    p = float(torch.tensor(lp_eos).exp())
    assert 0.05 < p < 0.2
    count = sum(g.completion_ids == [eos] for g in gens)
    sigma = (64 * p * (1 - p)) ** 0.5
    assert abs(count - 64 * p) < 5 * sigma + 1, f"EOS sampled {count}/64 times; its probability is {p:.3f}"


def test_top_p_samples_only_inside_the_nucleus(eos_policy):
    """EOS (p ~ 0.1) is the most likely token and the rest are nearly uniform: a nucleus of 0.05 is EOS alone, so
    every sample must be EOS, while its recorded log-prob stays the unfiltered one."""
    torch.manual_seed(0)
    (gens,) = eos_policy.generate(chats(1), n=16, max_new_tokens=3, top_p=0.05)
    eos = eos_policy.tokenizer.eos_token_id
    assert all(g.completion_ids == [eos] for g in gens)
    assert all(-3.5 < g.logprobs[0] < -1.5 for g in gens)  # log(~0.1), not log(1)
    (wide,) = eos_policy.generate(chats(1), n=16, max_new_tokens=3, top_p=0.9)
    assert len({tuple(g.completion_ids) for g in wide}) > 1


# -- sampling log-probs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9)])
def test_sampling_logprobs_equal_sequence_logprobs(eos_policy, temperature, top_p):
    policy = eos_policy  # completions of different lengths, so the training batch pads differently
    torch.manual_seed(1)
    out = policy.generate(chats(4), n=2, max_new_tokens=8, temperature=temperature, top_p=top_p)
    gens = [g for gs in out for g in gs]
    with torch.no_grad():
        logp = policy.sequence_logprobs([g.prompt_ids for g in gens], [g.completion_ids for g in gens],
                                        temperature=temperature)
    assert logp.shape == (len(gens), max(len(g.completion_ids) for g in gens))
    for row, g in zip(logp, gens):
        n = len(g.completion_ids)
        torch.testing.assert_close(row[:n], torch.tensor(g.logprobs), atol=ATOL, rtol=0)
        assert torch.all(row[n:] == 0)  # right padding is 0
    # at another temperature they differ: the temperature is part of the quantity
    with torch.no_grad():
        other = policy.sequence_logprobs([gens[0].prompt_ids], [gens[0].completion_ids],
                                         temperature=temperature + 0.5)
    assert not torch.allclose(other[0], torch.tensor(gens[0].logprobs), atol=1e-2)


def test_reference_generation_records_reference_logprobs(policy):
    torch.manual_seed(2)
    out = policy.generate(chats(2), n=2, max_new_tokens=5, reference=True)
    gens = [g for gs in out for g in gs]
    with torch.no_grad():
        ref = policy.sequence_logprobs([g.prompt_ids for g in gens], [g.completion_ids for g in gens],
                                       reference=True)
    for row, g in zip(ref, gens):
        torch.testing.assert_close(row[:len(g.logprobs)], torch.tensor(g.logprobs), atol=ATOL, rtol=0)


def test_reference_is_the_base_model(policy, base_model):
    torch.manual_seed(4)
    prompts = [policy.encode_chat(c) for c in chats(3)]
    prompts = [prompts[0], prompts[1], prompts[0], prompts[2]]  # a prompt shared by two completions, as in a group
    completions = [torch.randint(50, 3000, (k,)).tolist() for k in (3, 7, 5, 1)]
    with torch.no_grad():
        ref = policy.sequence_logprobs(prompts, completions, reference=True, temperature=0.8)
        pol = policy.sequence_logprobs(prompts, completions, temperature=0.8)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        want = manual_logprobs(base_model, p, c, temperature=0.8)
        torch.testing.assert_close(ref[i, :len(c)], want, atol=ATOL, rtol=0)
        assert (pol[i, :len(c)] - want).abs().max() > 1e-2  # the adapter is on otherwise
        torch.testing.assert_close(pol[i, :len(c)], manual_logprobs(policy.model, p, c, temperature=0.8),
                                   atol=ATOL, rtol=0)
    assert not ref.requires_grad
    assert pol.requires_grad is False  # computed under no_grad
    assert policy.sequence_logprobs(prompts[:1], completions[:1]).requires_grad  # differentiable by default


# -- chunked log-probs ----------------------------------------------------------------------------------------

def test_chunked_logits_path_gives_the_same_values_and_gradients(policy):
    torch.manual_seed(5)
    prompts = [policy.encode_chat(c) for c in chats(3)]
    prompts = [prompts[0], prompts[1], prompts[2], prompts[1]]
    completions = [torch.randint(50, 3000, (k,)).tolist() for k in (4, 9, 1, 6)]
    weights = torch.randn(4, 9)

    def run(budget_mb):
        policy.options.logits_budget_mb = budget_mb
        params = policy.trainable_parameters()
        for p in params:
            p.grad = None
        logp = policy.sequence_logprobs(prompts, completions, temperature=0.9)
        (logp * weights).sum().backward()
        grads = [p.grad.detach().clone() for p in params]
        for p in params:
            p.grad = None
        return logp.detach(), grads

    saved = policy.options.logits_budget_mb
    try:
        whole, whole_grads = run(10_000)
        chunked, chunked_grads = run(0)  # one row per chunk, recomputed in backward
    finally:
        policy.options.logits_budget_mb = saved
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    assert any(g.abs().max() > 0 for g in whole_grads)
    a, b = torch.cat([g.flatten() for g in chunked_grads]), torch.cat([g.flatten() for g in whole_grads])
    assert float((a - b).norm()) < 1e-5 * float(b.norm())


# -- next-token scoring ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shared_prefix", [False, True])
@pytest.mark.parametrize("reference", [False, True])
def test_next_token_logprobs_match_a_manual_forward(tiny_model_dir, base_model, shared_prefix, reference):
    policy = make_backend(tiny_model_dir, generation_batch_size=2)
    rubric = policy.encode("Score the answer below from 0 to 7 with care, reading every word of it twice. " * 2)
    assert len(rubric) >= 32
    tails = [policy.encode(t) for t in ("Paris.", "It is a city in France, I think.", "No idea", "7")]
    prompts = [rubric + t for t in tails] if shared_prefix else [t + rubric[:k] for t, k in zip(tails, (3, 9, 1, 5))]
    candidates = [policy.token_id(str(k)) for k in range(8)] + [policy.tokenizer.eos_token_id]
    got = policy.next_token_logprobs(prompts, candidates, reference=reference)
    assert got.shape == (4, 9)
    model = base_model if reference else policy.model
    for row, prompt in zip(got, prompts):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
        want = torch.log_softmax(logits, dim=-1)[candidates]
        torch.testing.assert_close(row, want, atol=ATOL, rtol=0)
    if not reference:
        ref = policy.next_token_logprobs(prompts, candidates, reference=True)
        assert (ref - got).abs().max() > 1e-3


def test_next_token_logprobs_single_prompt_and_empty(policy):
    prompt = policy.encode_chat(chats(1)[0])
    got = policy.next_token_logprobs([prompt], [policy.token_id("3")])
    with torch.no_grad():
        want = torch.log_softmax(policy.model(input_ids=torch.tensor([prompt])).logits[0, -1], -1)[
            policy.token_id("3")]
    assert got.shape == (1, 1) and abs(float(got[0, 0]) - float(want)) < ATOL
    assert policy.next_token_logprobs([], [1, 2]).shape == (0, 2)


# -- text helpers ---------------------------------------------------------------------------------------------

def test_text_helpers(policy):
    assert policy.decode(policy.encode("Hello there")) == "Hello there"
    assert isinstance(policy.token_id("7"), int)
    with pytest.raises(ValueError):
        policy.token_id("hello world")
    ids = policy.encode_chat(chats(1)[0])
    assert policy.decode(ids[-3:]).strip().endswith("assistant")  # ends with the generation prompt
    assert policy.encode_chat(chats(1)[0], add_generation_prompt=False) != ids


def test_unknown_lora_target_names_the_key(tiny_model_dir):
    from arena.plugins.backends.hf.backend import HFBackend, HFOptions

    with pytest.raises(ArenaError) as exc:
        HFBackend(HFOptions(), make_env(tiny_model_dir, target_modules=["q_proj", "qkv"]))
    assert str(exc.value).startswith("model.lora.target_modules: ")
    assert "qkv" in str(exc.value) and "o_proj" in str(exc.value) and "lm_head" not in str(exc.value)


def test_lora_targets_listed_for_a_conv1d_model(tmp_path, capsys):
    """GPT-2's projections are Conv1D: the error lists them (not just lm_head), under the key the user typed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from arena.cli import main
    from arena.plugins.backends.hf.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(None))
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2,
                               n_positions=64)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    assert main(["play", "prompts", f"model.path={tmp_path / 'gpt2'}", f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("arena: error: model.lora.target_modules: ") and len(err.splitlines()) == 1
    assert "c_attn, c_fc, c_proj" in err and "lm_head" not in err
    assert not (tmp_path / "run").exists()


# -- save / load ----------------------------------------------------------------------------------------------

def test_save_load_round_trips_the_adapter(tiny_model_dir, tmp_path):
    policy = make_backend(tiny_model_dir)
    prompts = [policy.encode_chat(c) for c in chats(2)]
    completions = [[100, 200, 300], [400, 500]]
    with torch.no_grad():
        saved = policy.sequence_logprobs(prompts, completions)
    policy.save(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    with torch.no_grad():  # train-like drift
        for p in policy.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.3)
        drifted = policy.sequence_logprobs(prompts, completions)
    assert (drifted - saved).abs().max() > 1e-3
    policy.load(str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(policy.sequence_logprobs(prompts, completions), saved, atol=1e-6, rtol=0)

    fresh = make_backend(tiny_model_dir, perturb=False)  # a new process resuming the run
    with torch.no_grad():
        assert (fresh.sequence_logprobs(prompts, completions) - saved).abs().max() > 1e-3
        fresh.load(str(tmp_path / "adapter"))
        torch.testing.assert_close(fresh.sequence_logprobs(prompts, completions), saved, atol=1e-6, rtol=0)
        torch.testing.assert_close(fresh.sequence_logprobs(prompts, completions, reference=True),
                                   policy.sequence_logprobs(prompts, completions, reference=True), atol=1e-6,
                                   rtol=0)


def test_bfloat16_backend_samples_and_trains(tiny_model_dir):
    """model.dtype=bfloat16 (the CPU default where bf16 is native): sampling log-probs agree with the training
    forward to bf16 precision, and a backward pass reaches the float32 adapter."""
    from arena.plugins.backends.hf.backend import HFBackend, HFOptions

    env = make_env(tiny_model_dir)
    env.config.model.dtype = "bfloat16"
    policy = HFBackend(HFOptions(), env)
    assert policy.model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    (gens,) = policy.generate(chats(1), n=3, max_new_tokens=5)
    logp = policy.sequence_logprobs([g.prompt_ids for g in gens], [g.completion_ids for g in gens])
    for row, g in enumerate(gens):
        assert torch.allclose(logp[row, :len(g.logprobs)].float(), torch.tensor(g.logprobs), atol=0.1)
    logp.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


def test_bf16_lora_saving_its_bf16_input_gives_peft_gradients(tiny_model_dir):
    """With a bf16 base and float32 adapters, each LoRA A keeps the bf16 input for backward instead of peft's
    float32 copies: the gradients must be the ones peft's own path gives, and fewer bytes are saved."""
    from arena.plugins.backends.hf.backend import HFBackend, HFOptions

    env = make_env(tiny_model_dir)
    env.config.model.dtype = "bfloat16"
    prompts = [make_backend(tiny_model_dir, perturb=False).encode_chat(c) for c in chats(3)]
    completions = [[100 + i, 200 + i, 300 + i] for i in range(3)]

    def grads_and_saved(patched):
        torch.manual_seed(0)
        policy = HFBackend(HFOptions(), env)
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        if not patched:  # undo: peft's cast, and the plain nn.Linear forward of each A
            for module in policy.model.modules():
                if getattr(module, "cast_input_dtype_enabled", True) is False:
                    module.cast_input_dtype_enabled = True
                    for a in module.lora_A.values():
                        del a.forward
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logp = policy.sequence_logprobs(prompts, completions)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        return [p.grad.clone() for p in policy.trainable_parameters()], sum(saved.values())

    (ours, ours_bytes), (peft, peft_bytes) = grads_and_saved(True), grads_and_saved(False)
    assert any(g.abs().sum() > 0 for g in peft)
    for a, b in zip(ours, peft):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert ours_bytes < peft_bytes


def test_cpu_gqa_attention_equals_transformers_sdpa(policy, base_model):
    """The backend swaps in masked grouped-query SDPA (no K/V copies kept for backward); logits and gradients
    on a left-padded batch must equal transformers' own `sdpa`, which repeats K/V per head."""
    assert policy.model.get_base_model().config._attn_implementation == "arena_cpu_sdpa"
    assert base_model.config._attn_implementation == "sdpa" and base_model.config.num_key_value_heads > 0
    prompts = [policy.encode_chat(c) for c in chats(3)]
    ids, mask = left_pad(prompts, policy.pad_id, "cpu")
    grouped = policy.model.get_base_model()

    def run(model):
        model.zero_grad()
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask)).logits
        (logits[mask.bool()] ** 2).mean().backward()
        return logits[mask.bool()].detach(), embeds.grad

    with policy.model.disable_adapter():
        got, got_grad = run(grouped)
    want, want_grad = run(base_model)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-4)


# -- temperature ----------------------------------------------------------------------------------------------

def test_temperature_zero_is_greedy(policy):
    prompts = chats(3)
    greedy = policy.generate(prompts, n=2, max_new_tokens=5, greedy=True)
    zero = policy.generate(prompts, n=2, max_new_tokens=5, temperature=0)
    assert [[g.completion_ids for g in gs] for gs in zero] == [[g.completion_ids for g in gs] for gs in greedy]
    assert [[g.logprobs for g in gs] for gs in zero] == [[g.logprobs for g in gs] for gs in greedy]
    with pytest.raises(ValueError, match="temperature"):
        policy.generate(prompts, temperature=-0.5)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_training_logprobs_refuse_a_temperature_of_zero_or_less(policy, temperature):
    prompt = policy.encode_chat(chats(1)[0])
    with pytest.raises(ValueError, match="temperature"):
        policy.sequence_logprobs([prompt], [[5, 6]], temperature=temperature)


# -- LoRA dropout ---------------------------------------------------------------------------------------------

def backend_with_dropout(model_dir, dropout: float):
    """The same perturbed adapter whatever the dropout: built and perturbed from one seed."""
    from arena.plugins.backends.hf.backend import HFBackend, HFOptions

    torch.manual_seed(0)
    backend = HFBackend(HFOptions(), make_env(model_dir, dropout=dropout))
    with torch.no_grad():
        for name, p in backend.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return backend


def test_lora_dropout_acts_in_the_training_forward_only(tiny_model_dir):
    dropped, plain = backend_with_dropout(tiny_model_dir, 0.5), backend_with_dropout(tiny_model_dir, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(dropped.trainable_parameters(), plain.trainable_parameters()))
    prompts = [plain.encode_chat(c) for c in chats(3)]
    prompts = [prompts[0], prompts[1], prompts[0], prompts[2]]  # the shared-prompt path too
    completions = [[100, 200, 300], [400, 500], [600], [700, 800, 900, 1000]]

    first = dropped.sequence_logprobs(prompts, completions)
    second = dropped.sequence_logprobs(prompts, completions)
    assert first.requires_grad and (first - second).abs().max() > 1e-3  # fresh dropout masks each call
    first.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dropped.trainable_parameters())
    assert not any(m.training for m in dropped.model.modules())  # eval mode again, LoRA's dropout included

    with torch.no_grad():
        torch.testing.assert_close(dropped.sequence_logprobs(prompts, completions),
                                   plain.sequence_logprobs(prompts, completions), atol=1e-6, rtol=0)
    torch.testing.assert_close(dropped.sequence_logprobs(prompts, completions, reference=True),
                               plain.sequence_logprobs(prompts, completions, reference=True), atol=1e-6, rtol=0)
    candidates = [plain.token_id(str(k)) for k in range(8)]
    torch.testing.assert_close(dropped.next_token_logprobs(prompts, candidates),
                               plain.next_token_logprobs(prompts, candidates), atol=1e-6, rtol=0)
    out = []
    for backend in (dropped, plain):
        torch.manual_seed(7)
        out.append([(g.completion_ids, g.logprobs) for gs in backend.generate(chats(2), n=2, max_new_tokens=5)
                    for g in gs])
    assert out[0] == out[1]

    with pytest.raises(IndexError):  # a token outside the vocabulary fails inside the training forward
        dropped.sequence_logprobs(prompts[:1], [[10**8]])
    assert not any(m.training for m in dropped.model.modules())


# -- transformers API -----------------------------------------------------------------------------------------

def test_no_deprecation_warnings_from_transformers(tiny_model_dir):
    """Loading and every forward path (decode loop, shared prompts, shared judge prefix) use transformers' current
    API: a run prints no FutureWarning."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = make_backend(tiny_model_dir)
        rubric = policy.encode("Score the answer below from 0 to 7 with care, reading every word of it twice. " * 2)
        judged = [rubric + policy.encode(t) for t in ("Paris.", "No idea")]
        prompt = policy.encode_chat(chats(1)[0])
        policy.generate(chats(2), n=2, max_new_tokens=3)
        policy.sequence_logprobs([prompt, prompt], [[5, 6, 7], [8, 9]])
        with torch.no_grad():
            policy.sequence_logprobs([prompt, prompt], [[5, 6, 7], [8, 9]], reference=True)
        policy.next_token_logprobs(judged, [policy.token_id("3")])
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == []


# -- the model's context --------------------------------------------------------------------------------------

def test_prompts_longer_than_the_context_are_refused(policy):
    limit = policy.model.config.max_position_embeddings
    long = [100] * (limit - 4)
    with pytest.raises(ArenaError, match=rf"{limit - 4} tokens \+ 8 max_new_tokens .* context length of {limit}"):
        policy.generate([long], max_new_tokens=8)
    with pytest.raises(ArenaError, match=rf"{limit + 1} tokens is longer .* context length of {limit}"):
        policy.next_token_logprobs([[100] * 3, [100] * (limit + 1)], [1])
    with pytest.raises(ArenaError, match=rf"{limit - 4} tokens \+ 10 completion tokens .* {limit}"):
        policy.sequence_logprobs([[100] * 3, long], [[5] * 20, [5] * 10])
    assert policy.next_token_logprobs([[100] * limit], [1]).shape == (1, 1)  # exactly the context is fine


# -- sizing for the device and the decode loop ----------------------------------------------------------------

SMOL = dict(layers=30, kv_heads=3, head_dim=64, vocab=49152, dtype_bytes=2)  # SmolLM2-135M in bf16


def test_generation_rows_follow_free_memory():
    from arena.plugins.backends.hf.backend import generation_rows

    per_row = 2 * 30 * 3 * 64 * 80 * 2 + 4 * 49152 * 4  # K and V of 80 tokens, plus four float32 logits rows
    assert generation_rows(2 * 300 * per_row, 80, **SMOL) == 300  # half the free memory
    assert generation_rows(2 * 300 * per_row, 160, **SMOL) < 300
    assert generation_rows(0, 80, **SMOL) == 1


def test_micro_batch_rule():
    from arena.plugins.backends.hf.backend import micro_batch_for

    assert micro_batch_for("cpu", 10**12, 1) == 8  # the measured CPU optimum, whatever the memory
    assert micro_batch_for("cuda", 2 * 1000 * 10**6, 10**6) == 64  # capped
    assert micro_batch_for("cuda", 2 * 40 * 10**6, 10**6) == 32  # a power of two that fits
    assert micro_batch_for("cuda", 2 * 40 * 10**6, 10**6, cap=16) == 16
    assert micro_batch_for("cuda", 10, 10**6) == 1


def test_batch_sizes_by_device(tiny_model_dir, monkeypatch):
    from arena.plugins.backends.hf.backend import generation_rows, micro_batch_for

    backend = make_backend(tiny_model_dir, perturb=False)
    assert backend.options.generation_batch_size is None
    assert backend._batch_size(1000, 100) == 64 and backend.suggested_micro_batch() == 8
    backend.options.generation_batch_size = 5
    assert backend._batch_size(1000, 100) == 5
    backend.options.generation_batch_size = None
    # on a GPU (faked): all of a call's rows when they fit, else what free memory holds
    monkeypatch.setattr(backend, "device", "cuda")
    monkeypatch.setattr(backend, "_free_gpu_bytes", lambda: 10**9)
    tiny = dict(layers=2, kv_heads=1, head_dim=16, vocab=backend.model.config.vocab_size, dtype_bytes=4)
    fit = generation_rows(10**9, 100, **tiny)
    assert backend._batch_size(256, 100) == min(256, fit) and backend._batch_size(10**6, 100) == fit
    assert backend.suggested_micro_batch() == micro_batch_for("cuda", 10**9, 2 * (12 * 32 + 4 * 64) * 4 * 512)


@pytest.mark.parametrize("key,value", [("generation_batch_size", 0), ("logits_budget_mb", 0),
                                       ("min_shared_prefix", 0)])
def test_backend_option_rules(key, value):
    from arena.config import resolve
    from arena.registry import load_registry

    with pytest.raises(ConfigError) as exc:
        resolve(load_registry(), "prompts", overrides=[f"backend.{key}={value}"])
    assert exc.value.path == f"backend.{key}"


def test_checking_for_the_end_every_k_steps_gives_the_same_generations(tiny_model_dir):
    """Rows that stop early keep emitting padding until the next check: the results are those of a check every
    step, both when all rows stop before max_new_tokens and when some run to it."""
    backend = with_eos_bias(make_backend(tiny_model_dir), 11.0)  # EOS about 0.5 a step
    runs = []
    for every in (1, 7):
        backend.done_check_every = every
        torch.manual_seed(0)  # seeded per call: the extra steps draw random numbers a later call would get
        early = backend.generate(chats(2), n=4, max_new_tokens=20)
        torch.manual_seed(1)
        late = backend.generate(chats(2), n=4, max_new_tokens=3)
        runs.append([(g.completion_ids, g.logprobs, g.truncated) for out in (early, late) for gs in out for g in gs])
    assert runs[0] == runs[1]
    assert all(not truncated for _, _, truncated in runs[0][:8])  # all stopped before 20 tokens
    assert any(truncated for _, _, truncated in runs[0][8:])


# -- loading the right kind of model --------------------------------------------------------------------------

def test_a_sequence_classifier_as_model_path_is_refused(reward_model_dir, tmp_path):
    import json
    import shutil

    from arena.plugins.backends.hf.models import load_causal_lm

    with pytest.raises(ArenaError, match=rf"model.path {reward_model_dir}: a sequence-classification model "
                                         r"\(LlamaForSequenceClassification\).*name: reward_model"):
        load_causal_lm(str(reward_model_dir), "float32", "cpu")
    unnamed = tmp_path / "rm"  # no `architectures` in its config: the missing LM head gives it away
    shutil.copytree(reward_model_dir, unnamed)
    config = json.loads((unnamed / "config.json").read_text())
    del config["architectures"]
    (unnamed / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArenaError, match=rf"model.path {unnamed}: a sequence-classification model, not a causal"):
        load_causal_lm(str(unnamed), "float32", "cpu")


def test_load_sequence_classifier(reward_model_dir, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from arena.plugins.backends.hf.models import load_sequence_classifier, resolve_model_path

    model, tokenizer, device = load_sequence_classifier(str(reward_model_dir), "judge.path", "cpu", "float32")
    assert device == "cpu" and not model.training and model.config.pad_token_id is not None
    ids = torch.tensor([tokenizer.encode("a fine answer")])
    plain = AutoModelForSequenceClassification.from_pretrained(str(reward_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)

    with pytest.raises(ArenaError, match=rf"judge.path {tiny_model_dir}: config.json names LlamaForCausalLM; "
                                         r"expected a sequence classifier"):
        load_sequence_classifier(str(tiny_model_dir), "judge.path", "cpu")
    unnamed = tmp_path / "unnamed"  # a config.json without architectures: the loaded head tells
    shutil.copytree(tiny_model_dir, unnamed)
    config = json.loads((unnamed / "config.json").read_text())
    del config["architectures"]
    (unnamed / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArenaError, match=rf"judge.path {unnamed}: a causal language model, not a "
                                         "sequence-classification reward model: its score head would be random"):
        load_sequence_classifier(str(unnamed), "judge.path", "cpu")
    missing = str(tmp_path / "missing")
    with pytest.raises(ArenaError, match=rf"^judge.judges.0.path {missing}: no such file or folder"):
        load_sequence_classifier(missing, "judge.judges.0.path")
    with pytest.raises(ArenaError, match="^judge.path is unset"):
        load_sequence_classifier(None)
    with pytest.raises(ArenaError, match=rf"^judge.path {tmp_path}: folder has no config.json"):
        resolve_model_path(str(tmp_path), key="judge.path")


@pytest.mark.parametrize("greedy", [True, False])
def test_stop_strings_end_a_completion_where_the_plain_one_first_shows_them(policy, greedy):
    """generate(stop=...) is the plain generation cut after the first token whose text holds a stop string, once
    the completion has begun (a blank token before any text does not stop it): the same tokens and log-probs up
    to it (sampling too: the rows draw the same random numbers), that token kept, not marked truncated. Without
    a stop token in reach, it is the plain generation."""
    stop = ("e", " ")  # " " holds a blank token that may come first: stops only after some text
    torch.manual_seed(5)
    plain = policy.generate(chats(4), n=3, max_new_tokens=12, greedy=greedy)
    torch.manual_seed(5)
    stopped = policy.generate(chats(4), n=3, max_new_tokens=12, greedy=greedy, stop=stop)
    cut = 0
    for plain_gens, stopped_gens in zip(plain, stopped):
        for p, s in zip(plain_gens, stopped_gens):
            pieces = [policy.decode([t]) for t in p.completion_ids]
            begun = [any(x.strip() for x in pieces[:i + 1]) for i in range(len(pieces))]
            end = next((i for i, piece in enumerate(pieces) if any(x in piece for x in stop) and begun[i]), None)
            if end is None or (not p.truncated and end == len(p.completion_ids) - 1):
                assert (s.completion_ids, s.truncated) == (p.completion_ids, p.truncated)
                continue
            cut += 1
            assert s.completion_ids == p.completion_ids[:end + 1]
            assert s.logprobs == pytest.approx(p.logprobs[:end + 1], abs=1e-6)
            assert not s.truncated and s.text == policy.decode(s.completion_ids)
            assert any(x in s.text for x in stop)
    assert cut > 0  # the stop strings did end some completions early


def test_an_empty_stop_string_is_refused(policy):
    with pytest.raises(ValueError, match="empty stop string"):
        policy.generate(chats(1), max_new_tokens=2, stop=("",))


def test_a_line_break_before_any_text_does_not_stop_a_line(tiny_model_dir):
    """With "\n" about half of all draws, many completions start with line breaks: those run on to their first
    text and stop at the line break after it; a blank start never ends a completion empty."""
    backend = make_backend(tiny_model_dir)
    newline = backend.token_id("\n")
    with_eos_bias(backend, 11.0, token=newline)
    torch.manual_seed(0)
    gens = [g for gs in backend.generate(chats(2), n=16, max_new_tokens=12, stop=("\n",)) for g in gs]
    blank_start = [g for g in gens if g.completion_ids[0] == newline]
    assert blank_start  # the case is exercised
    for g in gens:
        text = g.text.lstrip()
        assert text.strip() or g.truncated  # never ended while still blank
        if not g.truncated:
            assert g.completion_ids[-1] == newline and "\n" not in text[:-1]  # ended at the break after its text


MEMORY_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from tiny import make_env
from arena.plugins.backends.hf import backend, models
if sys.argv[1] == "unbounded":
    models.cap_cpu_kernel_caches = backend.release_free_heap = lambda: None
env = make_env({model!r})
env.config.model.dtype = "bfloat16"
policy = backend.HFBackend(backend.HFOptions(), env)
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024
seen = []
for length in range(1, 301):  # a round for every prompt length: a new shape for every product
    policy.generate([[7] * length], max_new_tokens=1)
    with policy.updating():
        pass
    if length in (100, 300):
        seen.append(rss())
print(seen[1] - seen[0])
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc"
                    or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="reads /proc; the heap trim is glibc's; the kernel caches are oneDNN's bf16 products'")
def test_cpu_memory_stays_flat_over_prompts_of_many_lengths(tiny_model_dir, tmp_path):
    """A run meets a new product shape with nearly every prompt length: oneDNN's and ideep's per-shape kernel
    caches and the holes such blocks leave in glibc's heap made memory grow with each (about 2 MiB a length on the
    tiny model in bfloat16). With the caches capped and the heap trimmed after each round's step, 200 new lengths
    add almost nothing; without them (the control, in the same code) the same rounds add over 100 MiB, so the
    measure is not blind."""
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT.format(tests=str(Path(__file__).parent), model=str(tiny_model_dir)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    growth = {}
    for kind in ("bounded", "unbounded"):
        done = subprocess.run([sys.executable, str(script), kind], env={**env, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        growth[kind] = float(done.stdout.split()[-1])
    assert growth["unbounded"] > 100, growth
    assert growth["bounded"] < 20, growth


def test_the_heap_is_trimmed_once_a_round_after_the_step(policy, monkeypatch):
    """On a CPU, `updating()` hands freed heap pages back once, after the step inside it has run (the memory test
    above is dominated by the kernel caches, so it would not notice a missing trim)."""
    from arena.plugins.backends.hf import backend

    events = []
    monkeypatch.setattr(backend, "release_free_heap", lambda: events.append("trim"))
    with policy.updating():
        events.append("step")
    assert events == ["step", "trim"]
    with pytest.raises(RuntimeError), policy.updating():  # a failed step still trims
        raise RuntimeError("step failed")
    assert events == ["step", "trim", "trim"]
