"""No held-out item occurs in training, for every built-in data source as the games split it: ShareGPT has duplicate
records and pydoc has topics with the same text, so a split that only shuffles would hold an item out and train on
its copy."""

from __future__ import annotations

import pytest

from arena.config import resolve
from arena.games.data import distinct, held_out_split
from arena.interfaces import Env
from arena.registry import load_registry

PAPER_SPIN = "examples/configs/spin-paper.yaml"


def normal(text: str) -> str:
    return " ".join(text.split())


def built(game: str, overrides: list[str], files: list[str] = ()):
    registry = load_registry()
    resolved = resolve(registry, game, list(files), ["model.path=org/unused", *overrides])
    return registry.build("game", resolved.config.game, Env(config=resolved.config, registry=registry))


def assert_disjoint(held: list[dict], train: list[dict], field: str) -> None:
    held_texts = [normal(r[field]) for r in held]
    assert len(set(held_texts)) == len(held_texts), "a held-out item is counted twice"
    assert not set(held_texts) & {normal(r[field]) for r in train}


@pytest.mark.parametrize("game, overrides, files", [
    ("prompts", [], []),
    ("prompts", ["game.dataset=arithmetic", "game.eval_size=64"], []),
    ("spin", [], []),
    ("spin", [], [PAPER_SPIN]),
    *[("pop", [f"run.seed={seed}"], []) for seed in range(8)],
])
def test_no_held_out_item_occurs_in_training(game, overrides, files):
    g = built(game, overrides, files)
    if game == "pop":
        assert_disjoint(g.eval_documents, g.train_documents, "text")
    else:
        assert_disjoint(g.eval_records, g.train_records, "prompt")


def test_the_built_in_sources_do_hold_duplicates():
    """Why the split removes them: without it, the cases above would fail (pydoc's `if` and `else` topics share
    their text on the Pythons this runs on; ShareGPT repeats prompts word for word)."""
    from arena.games.data import load_documents, load_records

    docs = load_documents("pydoc")
    assert len(distinct(docs, "text")) < len(docs)
    prompts = load_records("sharegpt")
    assert len(prompts) - len(distinct(prompts, "prompt")) > 100


def test_the_split_by_hand():
    records = [{"prompt": p} for p in ["a", "b", " a ", "c", "b", "d\n"]]
    held, train = held_out_split(records, 2, 0, "x", "prompts")
    assert sorted(normal(r["prompt"]) for r in held + train) == ["a", "b", "c", "d"]
    assert_disjoint(held, train, "prompt")
    with pytest.raises(Exception, match="4 distinct prompts, but eval_size is 4"):
        held_out_split(records, 4, 0, "x", "prompts")


def test_lsp_holds_out_distinct_prompts_and_refuses_too_many(tmp_path):
    from arena.errors import ConfigError

    data = tmp_path / "eval.jsonl"
    data.write_text('{"prompt": "one"}\n{"prompt": "one"}\n{"prompt": "two"}\n')
    g = built("lsp", [f"game.eval_dataset={data}", "game.eval_size=2", "game.quality_reward=false"])
    assert sorted(r["prompt"] for r in g.eval_records) == ["one", "two"]
    with pytest.raises(ConfigError, match="eval_size: 3, but .* holds 2 distinct prompts"):
        built("lsp", [f"game.eval_dataset={data}", "game.eval_size=3", "game.quality_reward=false"])
