"""Fixtures for the plugin's own tests. They need the plugin installed next to arena (`pip install -e .` in this
folder), because the tests also check that its entry point is found."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest

try:
    importlib.metadata.distribution("arena-example-game")
except importlib.metadata.PackageNotFoundError:
    raise pytest.UsageError("arena-example-game is not installed: run `pip install -e examples/arena-example-game` "
                            "(or put a `pip install --target` folder on PYTHONPATH) before its tests") from None


@pytest.fixture(scope="session", autouse=True)
def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 32) with the embedded model's tokenizer and chat template: the real code
    paths of the hf backend in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from arena.plugins.backends.hf.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(None))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def registry():
    from arena.registry import load_registry

    return load_registry()
