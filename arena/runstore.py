"""The run directory: config.yaml, samples.jsonl, metrics.jsonl and checkpoints/<iteration>/.

Each round's lines are appended and flushed to disk before the round's checkpoint is written, and every
checkpoint records the byte lengths of both JSONL files at that moment. A checkpoint is written under a temporary
name and renamed into place, so a directory named like an iteration is always complete. `--resume` cuts the JSONL
files back to the recorded lengths: lines past them belong to a round that will be played again, so a kill -9 at
any moment neither loses nor duplicates a round. A partial last line from a crash is never parsed as a record.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from arena.errors import ArenaError

CHECKPOINTS = "checkpoints"
META = "meta.json"


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file; a last line without its newline (a write cut short) is skipped."""
    p = Path(path)
    if not p.exists():
        return
    with p.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            if raw.strip():
                yield json.loads(raw)


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.samples_path = self.root / "samples.jsonl"
        self.metrics_path = self.root / "metrics.jsonl"
        self.config_path = self.root / "config.yaml"
        self.checkpoints = self.root / CHECKPOINTS

    def check_new(self) -> None:
        """Refuse to start a run in a folder that holds anything: nothing written before is ever overwritten."""
        if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise ArenaError(f"run.dir {self.root}: already holds a run; use --resume {self.root} to continue "
                             "it, or choose another run.dir")

    def create(self, config_yaml: str) -> None:
        self.check_new()
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config(config_yaml)

    def write_config(self, config_yaml: str) -> None:
        tmp = self.config_path.with_suffix(".yaml.tmp")
        tmp.write_text(config_yaml)
        tmp.replace(self.config_path)

    def _append(self, path: Path, records: Iterable[dict[str, Any]]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with path.open("a", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def append_samples(self, iteration: int, samples: Iterable[Any]) -> None:
        self._append(self.samples_path, ({"iteration": iteration, **s.to_json()} for s in samples))

    def append_metrics(self, record: dict[str, Any]) -> None:
        self._append(self.metrics_path, [record])

    def _size(self, path: Path) -> int:
        return path.stat().st_size if path.exists() else 0

    def checkpoint_dir(self, iteration: int) -> Path:
        return self.checkpoints / f"{iteration:06d}"

    def begin_checkpoint(self, iteration: int) -> Path:
        """A fresh temporary folder to write checkpoint contents into; `commit_checkpoint` publishes it."""
        tmp = self.checkpoints / f".tmp-{iteration:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, iteration: int, tmp: Path, keep: int = 2) -> Path:
        meta = {"iteration": iteration, "samples_bytes": self._size(self.samples_path),
                "metrics_bytes": self._size(self.metrics_path)}
        (tmp / META).write_text(json.dumps(meta))
        final = self.checkpoint_dir(iteration)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.checkpoints)
        if keep > 0:
            for old in self.complete_checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def complete_checkpoints(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        done = [p for p in self.checkpoints.iterdir()
                if p.is_dir() and p.name.isdigit() and (p / META).is_file()]
        return sorted(done, key=lambda p: int(p.name))

    def latest_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        done = self.complete_checkpoints()
        if not done:
            return None
        return done[-1], json.loads((done[-1] / META).read_text())

    def rewind(self, meta: dict[str, Any] | None) -> None:
        """Cut the JSONL files back to a checkpoint's recorded lengths (to empty with no checkpoint)."""
        for path, key in ((self.samples_path, "samples_bytes"), (self.metrics_path, "metrics_bytes")):
            size = meta[key] if meta else 0
            if path.exists():
                if path.stat().st_size < size:
                    raise ArenaError(f"{path}: shorter than its checkpoint recorded ({size} bytes); the run "
                                     "directory was changed by hand")
                with path.open("r+b") as f:
                    f.truncate(size)
        for tmp in self.checkpoints.glob(".tmp-*") if self.checkpoints.is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
