"""Arena's own decode step (plugins/backends/hf/decode.py) against the plain computation: transformers' forward
with peft's LoRA layers and a growing cache, on the tiny model in float32. Every adapter a generation can run on
(the trained one, the base, a frozen one), the packing's lifetime (rebuilt when the weights change, dropped for
the optimizer step) and the models it refuses."""

from __future__ import annotations

import copy

import pytest
import torch

from arena.errors import ConfigError
from arena.plugins.backends.hf.backend import HFBackend, HFOptions, _cache_of
from arena.plugins.backends.hf.decode import Decoder, PackedWeights, unsupported
from arena.plugins.backends.hf.kernels import left_pad, positions

from tiny import make_backend, make_env, save_tiny_llama

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [11, 12, 13], [20, 21, 22, 23, 24]]  # left padding of 0, 4 and 2
CHATS = [[{"role": "user", "content": t}] for t in ("Hi", "What is 12 + 30?", "Name a colour, please.")]


@pytest.fixture()
def policy(tiny_model_dir):
    return make_backend(tiny_model_dir)


@pytest.fixture(scope="module")
def grouped_model_dir(tiny_model_dir, tmp_path_factory):
    """A random Llama of 4 query heads over 2 KV heads (the tiny model has 2 over 1)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("grouped-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def steps_both_ways(policy, reference=False, steps=6):
    """Logits of `steps` decode steps from the model's own forward and from `Decoder`, fed the same tokens."""
    ids, mask = left_pad(PROMPTS, policy.pad_id, "cpu")
    plain, packed = [], []
    with torch.inference_mode(), policy._adapter(reference):
        out = policy.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        cache = _cache_of(out)
        decoder = Decoder(policy.model, PackedWeights(policy.model), copy.deepcopy(cache), mask, steps)
        token, position = out.logits[:, -1].argmax(-1), positions(mask)[:, -1:] + 1
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            plain.append(policy.model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                                      use_cache=True, **policy._cache(cache)).logits[:, -1])
            packed.append(decoder.step(token, position))
            token, position = plain[-1].argmax(-1), position + 1
    return torch.stack(plain), torch.stack(packed)


@pytest.mark.parametrize("reference", [False, True, "v0"], ids=["trained", "base", "frozen"])
def test_decode_step_equals_the_models_forward(policy, reference):
    if reference == "v0":
        policy.freeze_adapter("v0")
        with torch.no_grad():  # the trained adapter moves on: the frozen one must be what runs
            for p in policy.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.3)
    plain, packed = steps_both_ways(policy, reference)
    assert torch.allclose(plain, packed, atol=1e-4), (plain - packed).abs().max()
    if reference is not True:  # the adapter is in the packed weights: without it the logits differ
        with policy._adapter(True):
            base = steps_both_ways(policy, True)[1]
        assert (base - packed).abs().max() > 1e-2


@pytest.mark.parametrize("targets", ["[q_proj,v_proj]", "[k_proj]", "[o_proj,gate_proj,down_proj]",
                                     "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"])
def test_decode_step_with_other_lora_targets_and_grouped_heads(grouped_model_dir, targets):
    """Adapters on some of q, k, v (the block-diagonal B's gaps), on o and the MLP (the model's own modules), on
    a model of 4 query heads over 2 KV heads (the heads' order in the packed product and the cache)."""
    policy = HFBackend(HFOptions(), make_env(grouped_model_dir, target_modules=targets))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    plain, packed = steps_both_ways(policy)
    assert torch.allclose(plain, packed, atol=1e-4), (plain - packed).abs().max()
    with policy._adapter(True):
        base = steps_both_ways(policy, True)[1]
    assert (base - packed).abs().max() > 1e-2


def test_generation_is_the_same_with_and_without_the_packed_step(policy):
    """Greedy completions are the same token for token with the step on and off. Sampled ones are held to the
    training forward instead: on the random tiny model every token is nearly as likely as the next, so a 1e-7
    difference in a sum can move an inverse-CDF draw to the neighbouring token; what must hold is that each
    recorded log-prob is the policy's log-prob of the token drawn, with stops and n as asked."""
    runs = []
    for packed in (False, True):
        policy.packed_decode = packed
        runs.append([g for gs in policy.generate(CHATS, n=2, max_new_tokens=12, greedy=True) for g in gs])
    for plain, packed in zip(*runs):
        assert (packed.completion_ids, packed.text) == (plain.completion_ids, plain.text)
        assert torch.allclose(torch.tensor(packed.logprobs), torch.tensor(plain.logprobs), atol=1e-4)
    policy.packed_decode = True
    for kind in (dict(temperature=1.0), dict(temperature=0.7, top_p=0.9, stop=(" ",))):
        torch.manual_seed(4)
        groups = policy.generate(CHATS, n=3, max_new_tokens=12, **kind)
        assert [len(group) for group in groups] == [3, 3, 3]
        gens = [g for group in groups for g in group]
        if "stop" in kind:  # each ends at its first token holding a space once begun, or runs to the limit
            assert all(g.truncated or " " in policy.decode(g.completion_ids[-1:]) for g in gens)
        with torch.no_grad():
            logp = policy.sequence_logprobs([g.prompt_ids for g in gens], [g.completion_ids for g in gens],
                                            temperature=kind["temperature"])
        for row, g in enumerate(gens):
            assert torch.allclose(logp[row, :len(g.logprobs)], torch.tensor(g.logprobs), atol=1e-4)


def test_packed_weights_follow_the_adapter(policy):
    """After an in-place update (an optimizer step, in updating() or not), a re-freeze: the next generation runs on the new
    weights, never on a stale packing; the packing is dropped for the optimizer step."""
    def greedy(packed, reference=False):
        policy.packed_decode = packed
        return [g.completion_ids for gs in policy.generate(CHATS, max_new_tokens=10, greedy=True,
                                                           reference=reference) for g in gs]

    before = greedy(True)
    assert policy._packed is not None
    with policy.updating():
        assert policy._packed is None
        with torch.no_grad():
            for p in policy.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.5)
    after = greedy(True)
    assert after == greedy(False) and after != before
    policy.freeze_adapter("v0")
    assert greedy(True, "v0") == greedy(False, "v0") == after
    assert greedy(True) == after  # packed for the trained adapter again
    with torch.no_grad():  # a change outside updating() (a step of the user's own): the versions tell
        for p in policy.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert greedy(True) == greedy(False) != after
    policy.freeze_adapter("v0")  # the same name, new weights
    assert greedy(True, "v0") == greedy(False, "v0") != after


def test_bfloat16_packed_step_agrees_with_the_training_forward(tiny_model_dir):
    """In bfloat16 (the CPU default where bf16 is native) the packed step's recorded log-probs agree with the
    training forward to bf16 precision, as the plain path's do."""
    env = make_env(tiny_model_dir)
    env.config.model.dtype = "bfloat16"
    policy = HFBackend(HFOptions(), env)
    assert policy.packed_decode
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    gens = [g for gs in policy.generate(CHATS, n=2, max_new_tokens=8) for g in gs]
    logp = policy.sequence_logprobs([g.prompt_ids for g in gens], [g.completion_ids for g in gens])
    for row, g in enumerate(gens):
        assert torch.allclose(logp[row, :len(g.logprobs)].float(), torch.tensor(g.logprobs), atol=0.1)


def test_models_the_step_does_not_reproduce_are_refused_or_left_on_the_plain_path(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_llama(tmp_path / "biased", hidden_size=32)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.config.attention_bias = True  # a config flag is enough: the step would skip the biases
    model.save_pretrained(folder)
    assert unsupported(make_backend(tiny_model_dir).model) is None
    auto = make_backend(folder)
    assert "biases" in unsupported(auto.model) and not auto.packed_decode
    with pytest.raises(ConfigError, match="backend.packed_decode.*biases"):
        make_backend(folder, packed_decode=True)
    assert not make_backend(tiny_model_dir, packed_decode=False).packed_decode
