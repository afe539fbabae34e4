"""`arena export RUN OUT`: the run's base model with its trained adapter merged, as a plain transformers folder
that loads without arena and computes what the run's policy computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from arena.cli import main
from arena.registry import load_registry
from arena.runs import open_run, trained_policy


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory) -> Path:
    """Two rounds at a large learning rate: the adapter moves the logits well away from the base model's."""
    run = tmp_path_factory.mktemp("export") / "run"
    assert main(["play", "prompts", f"model.path={tiny_model_dir}", f"run.dir={run}", "run.iterations=2",
                 "run.loggers=[plain]", "model.lora.r=4", "model.dtype=float32", "optimizer.lr=0.05",
                 "game.dataset=arithmetic", "game.group_size=4", "game.max_new_tokens=4"]) == 0
    return run


def test_the_export_loads_without_arena_and_gives_the_run_policys_logits(trained_run, tiny_model_dir, tmp_path,
                                                                          capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", str(trained_run), str(out)]) == 0
    assert "at iteration 2" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([tokenizer.encode("What is 12 + 30? Answer with the number only.")])

    registry = load_registry()
    policy = trained_policy(open_run(trained_run, registry), registry)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        want = policy.model(input_ids=ids).logits
        before = base(input_ids=ids).logits
    assert float((want - before).abs().max()) > 1e-2  # training moved the logits: the comparison means something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_an_earlier_checkpoint_and_bad_input(trained_run, tmp_path, capsys):
    assert main(["export", str(trained_run), str(tmp_path / "one"), "--checkpoint", "1"]) == 0
    assert "at iteration 1" in capsys.readouterr().out
    cases = [
        (["export", str(trained_run), str(tmp_path / "x"), "--checkpoint", "7"], "--checkpoint 7", "checkpoints 1, 2"),
        (["export", str(tmp_path), str(tmp_path / "y")], "no config.yaml there", "RUN"),
        (["export", str(trained_run), str(tmp_path / "one")], "already exists", "OUT"),
    ]
    for args, *expected in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(e in err for e in expected), err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written folder left behind
