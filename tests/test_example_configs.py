"""The YAML configs in examples/configs/: each resolves through arena.config.resolve, says in its header what it is
for and how to run it, and builds every component `arena play` builds (dataset files, nested judges) on a tiny
model, so a config that would fail at start-up fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from arena.config import resolve, validate_component
from arena.interfaces import Env
from arena.registry import load_registry

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
EXPECTED = {  # file -> (game, judge, what sets it apart)
    "prompts-arithmetic.yaml": ("prompts", "exact_match", {"game.dataset": "arithmetic", "judge.mode": "number"}),
    "prompts-jsonl.yaml": ("prompts", "exact_match", {"game.dataset": "examples/data/prompts.jsonl",
                                                      "judge.mode": "regex"}),
    "mix-judges.yaml": ("prompts", "mix", {"game.dataset": "arithmetic"}),
    "lsp-paper.yaml": ("lsp", "reward_model", {"game.queries": 8, "game.quality_reward": True,
                                               "optimizer.lr": 3e-6, "optimizer.beta": 0.05}),
    "lsp-zero.yaml": ("lsp", "llm_judge", {"game.quality_reward": False}),
    # one SPIN iteration: two passes over ~50k prompts in rounds of 64 (optimizer.epochs is not the paper's epochs)
    "spin-paper.yaml": ("spin", "self_reward", {"optimizer.beta": 0.1, "optimizer.lr": 5e-7, "optimizer.epochs": 1,
                                                "run.iterations": 1564, "game.rounds_per_iteration": 1564,
                                                "game.prompts_per_round": 64}),
    "azr-paper.yaml": ("azr", "self_reward", {"game.proposals": 64, "game.solves": 8, "game.references": 6,
                                              "optimizer.lr": 1e-6, "game.executor.require": ["network",
                                                                                          "filesystem",
                                                                                          "processes"]}),
    "pop-paper-pairs.yaml": ("pop", "rubric", {"game.variant": "pairs", "optimizer.name": "dpo",
                                               "optimizer.beta": 0.01, "optimizer.lr": 1e-6,
                                               "game.max_document_words": 1024, "game.structure": "json"}),
    "pop-paper-online.yaml": ("pop", "rubric", {"game.variant": "online", "game.train_writers": True,
                                                "optimizer.lr": 1e-6, "game.max_document_words": 1024}),
}


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[:next(i for i, l in enumerate(lines) if not l.startswith("#"))])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_resolves_and_documents_its_command(registry, path, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths in the configs are relative to the repository root
    game, judge, values = EXPECTED[path.name]
    text = header(path)
    assert len(text.splitlines()) >= 3, "a comment at the top says what the config is for"
    assert re.search(rf"^#\s+arena play {game} --config examples/configs/{re.escape(path.name)}\s*$", text, re.M)
    resolved = resolve(registry, game, [str(path)])
    tree = resolved.tree
    assert tree["game"]["name"] == game and tree["judge"]["name"] == judge
    for key, value in values.items():
        assert OmegaConf.select(OmegaConf.create(tree), key) == value
        assert resolved.sources[key] == f"--config {path}"
    # command-line overrides still win over the file
    assert resolve(registry, game, [str(path)], ["run.iterations=3"]).tree["run"]["iterations"] == 3


def test_mix_config_weights_and_parts_are_valid(registry):
    tree = resolve(registry, "prompts", [str(ROOT / "examples/configs/mix-judges.yaml")]).tree
    parts = tree["judge"]["judges"]
    assert [(p["name"], p["weight"]) for p in parts] == [("exact_match", 1.0), ("self_reward", 0.05)]
    # resolve checks only the mix's own options; check each part against its judge's schema as the mix will
    for i, part in enumerate(parts):
        validate_component(registry, "judge", {k: v for k, v in part.items() if k != "weight"}, f"judge.judges.{i}")


def test_prompts_file_is_well_formed():
    from arena.prompt_file import load_prompt_file

    records = load_prompt_file(str(ROOT / "examples" / "data" / "prompts.jsonl"))
    assert 25 <= len(records) <= 40
    assert all(r["answer"] for r in records)
    assert len({r["prompt"] for r in records}) == len(records)


def test_configs_build_what_play_builds(registry, tiny_model_dir, monkeypatch):
    """Backend, judge, game and optimizer of every config, as arena.loop.play builds them (on a tiny model): the
    dataset file is read, the regex compiles, the mix builds its parts; then each judge scores a right and a
    wrong answer to a real record of its game."""
    from arena.types import JudgeItem

    monkeypatch.chdir(ROOT)
    policy = None
    for path in (p for p in CONFIGS if EXPECTED[p.name][0] == "prompts"):
        game_name = EXPECTED[path.name][0]
        cfg = resolve(registry, game_name, [str(path)], [f"model.path={tiny_model_dir}", "model.lora.r=4"]).config
        env = Env(config=cfg, registry=registry)
        env.policy = policy = policy or registry.build("backend", cfg.backend, env)
        judge = registry.build("judge", cfg.judge, env)
        game = registry.build("game", cfg.game, env)
        registry.build("optimizer", cfg.optimizer, env)
        record = game.train_records[0]
        prompt = game.messages(record)
        right, wrong = judge.judge([JudgeItem(prompt, f"The answer is {record['answer']}.", record["answer"]),
                                    JudgeItem(prompt, "I do not know, sorry.", record["answer"])])
        assert right.valid and wrong.valid, path.name
        assert right.score - wrong.score >= 0.5, (path.name, right, wrong)  # correctness dominates, mix included


@pytest.mark.parametrize("name", ["lsp-paper.yaml", "lsp-zero.yaml"])
def test_lsp_configs_play_a_round(registry, tiny_model_dir, reward_model_dir, name, tmp_path, monkeypatch):
    """Each LSP config plays one round as written, except for the models: the tiny model, and for the paper's
    config a tiny reward model in place of Skywork-Reward-V2 (not downloadable here), with short outputs."""
    from arena.cli import main
    from arena.runstore import read_jsonl

    monkeypatch.chdir(ROOT)
    small = [f"model.path={tiny_model_dir}", "model.lora.r=4", f"run.dir={tmp_path / 'run'}", "run.iterations=1",
             "run.loggers=[plain]", "game.queries=2", "game.answers=2", "game.challenger_max_new_tokens=6",
             "game.solver_max_new_tokens=4", "game.eval_size=1"]
    if name == "lsp-paper.yaml":
        small.append(f"judge.path={reward_model_dir}")
    assert main(["play", "lsp", "--config", str(ROOT / "examples" / "configs" / name), *small]) == 0
    samples = list(read_jsonl(tmp_path / "run" / "samples.jsonl"))
    assert {s["role"] for s in samples} == {"challenger", "solver"}
    quality = EXPECTED[name][2]["game.quality_reward"]
    assert all((s["metadata"]["R_Q"] is not None) == quality for s in samples if s["role"] == "solver")


def test_spin_paper_config_plays_a_round(tiny_model_dir, tmp_path, monkeypatch):
    """The paper's SPIN settings as written (beta 0.1, lr 5e-7), on the tiny model with short outputs."""
    from arena.cli import main
    from arena.runstore import read_jsonl

    monkeypatch.chdir(ROOT)
    small = [f"model.path={tiny_model_dir}", "model.lora.r=4", f"run.dir={tmp_path / 'run'}", "run.iterations=1",
             "run.loggers=[plain]", "game.prompts_per_round=2", "game.max_new_tokens=4", "game.eval_size=1",
             "game.max_prompt_chars=400"]
    assert main(["play", "spin", "--config", str(ROOT / "examples" / "configs" / "spin-paper.yaml"), *small]) == 0
    samples = list(read_jsonl(tmp_path / "run" / "samples.jsonl"))
    assert sorted(s["metadata"]["pair"] for s in samples) == ["chosen", "chosen", "rejected", "rejected"]
    assert all(s["trained"] for s in samples)
