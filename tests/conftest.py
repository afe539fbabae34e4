"""Shared fixtures. `tiny_model_dir` is a random-weight Llama with the embedded model's tokenizer: real code paths,
fast enough for unit tests. `embedded_model` tests run the real SmolLM2-135M and are marked slow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 32) saved with the embedded model's tokenizer and chat template."""
    from tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=32)


@pytest.fixture(scope="session")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """A tiny random sequence-classification reward model (one label) with the embedded tokenizer."""
    import torch

    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # scores well apart
    path = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def tiny_config(tiny_model_dir, tmp_path):
    """Overrides that make a run of any game take seconds on the tiny model."""
    return [f"model.path={tiny_model_dir}", f"run.dir={tmp_path / 'run'}", "run.iterations=2",
            "run.loggers=[plain]", "model.lora.r=4"]


@pytest.fixture(scope="module")
def trained_policy(tiny_model_dir):
    """A tiny backend whose LoRA B is non-zero (policy != reference, and lora_A receives gradients); one per
    module. Tests that change its weights take `fresh_policy`, which restores them."""
    import torch

    from tiny import make_backend

    backend = make_backend(tiny_model_dir, perturb=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in backend.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return backend


@pytest.fixture()
def fresh_policy(trained_policy):
    """`trained_policy`, with its LoRA weights and gradients restored after the test."""
    import torch

    saved = {n: p.detach().clone() for n, p in trained_policy.model.named_parameters() if p.requires_grad}
    yield trained_policy
    with torch.no_grad():
        for n, p in trained_policy.model.named_parameters():
            if n in saved:
                p.copy_(saved[n])
            p.grad = None
