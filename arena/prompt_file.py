"""Reading a user's JSONL files: prompt files (`{"prompt": ..., "answer": ...}` per line) for the games that take
them and for `arena eval --prompts`, with every problem reported as one line naming the key, the file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from arena.errors import ArenaError


def jsonl_records(path: Path, key: str) -> Iterator[tuple[int, Any]]:
    """(line number, decoded value) of each non-blank line of a user's JSONL file; an unreadable file or a line
    that is not JSON is one line naming the config key, the file and the line."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 may sit inside a string
    except (OSError, UnicodeDecodeError) as exc:
        raise ArenaError(f"{key} {path}: cannot read it ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ArenaError(f"{key} {path}:{number}: not valid JSON ({exc.msg})") from None


def load_prompt_file(path: str, key: str = "game.dataset") -> list[dict[str, Any]]:
    """Records of a JSONL file with a string `prompt` and an optional `answer` (or `response`) per line."""
    p = Path(path)
    if not p.is_file():
        what = "a folder" if p.is_dir() else "no such file"
        raise ArenaError(f"{key} {path}: {what}; expected a JSONL file of {{\"prompt\": ...}} lines")
    records = []
    for number, record in jsonl_records(p, key):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise ArenaError(f"{key} {path}:{number}: expected an object with a non-empty string \"prompt\"")
        answer = record.get("answer", record.get("response"))
        records.append({"prompt": record["prompt"], "answer": None if answer is None else str(answer)})
    if not records:
        raise ArenaError(f"{key} {path}: holds no records")
    return records
