"""The run folder: config.yaml, samples.jsonl, metrics.jsonl, checkpoints/<iteration>/ and a .lock file.

Layout of a checkpoint, `checkpoints/000012/`: `adapter/` (what `policy.save` writes), `optimizer.pt`,
`game_state.json` and `meta.json`: the iteration, the byte lengths of both JSONL files at that moment, the size
and sha256 of every other file in the checkpoint, and the resolved config it was made with.

Lock: a running run holds an exclusive `flock` on `<run>/.lock` (its pid written inside for the message), so a
second arena process on the same folder stops with one line instead of interleaving records. The kernel drops the
lock with the process, so a kill -9 never leaves a stale lock behind.

Durability: each round's lines are appended and fsynced before the round's checkpoint is written. A checkpoint
is written into `checkpoints/.tmp-<iteration>/`, every file and folder in it is fsynced, and only then is it
renamed into place (and the parent folder fsynced): a folder named like an iteration is complete on disk even
after a power cut. Lines are strict JSON: a NaN or infinite number is written as null.

Resume: `restore` loads the newest checkpoint that reads back whole. A damaged one (a missing meta.json or other
file, a size or checksum that differs from meta.json's, unparsable JSON, a torch or safetensors file that does not
load, weights that are NaN or infinite) is named in an ArenaWarning and set aside as `.damaged-<iteration>`, and
the previous one is used; the records that rewinding past it cuts are kept in `.rewound-<iteration>/`. The JSONL
files are then cut back to the lengths that checkpoint recorded: lines past them belong to a round that will be
played again, so a kill -9 at any moment neither loses nor duplicates a round. A partial last line from a crash
is never parsed as a record. What only a hand can do is refused with nothing changed: a JSONL file missing or
shorter than recorded, every checkpoint damaged, or checkpoints gone that metrics.jsonl proves were written.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import fcntl
import json
import math
import os
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from arena.errors import ArenaError, ArenaWarning

CHECKPOINTS = "checkpoints"
META = "meta.json"
ADAPTER = "adapter"
OPTIMIZER = "optimizer.pt"
GAME_STATE = "game_state.json"
LOCK = ".lock"


def read_jsonl(path: str | Path, skip_bad: bool = False) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file; a last line without its newline (a write cut short) is skipped. `skip_bad`: so is
    a line that is not a JSON object (a hand-edited file), where it would otherwise raise."""
    p = Path(path)
    if not p.exists():
        return
    with p.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            if not raw.strip():
                continue
            if not skip_bad:
                yield json.loads(raw)
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def finite_json(value: Any) -> Any:
    """`value` with every NaN or infinite float (nested in dicts, lists, tuples) replaced by None: NaN is not
    JSON, and a strict reader (jq, JavaScript, pandas with some engines) rejects the whole file over one."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _writer_only(method: Callable[..., Any]) -> Callable[..., Any]:
    """A method that touches the run folder: it does nothing in a store that does not write (a process other
    than 0 of a several-process run, where process 0 alone writes)."""
    @functools.wraps(method)
    def wrapped(self: "RunStore", *args: Any, **kwargs: Any) -> Any:
        return method(self, *args, **kwargs) if self.writer else None
    return wrapped


class RunStore:
    def __init__(self, root: str | Path, writer: bool = True):
        self.root = Path(root)
        self.writer = writer
        self.samples_path = self.root / "samples.jsonl"
        self.metrics_path = self.root / "metrics.jsonl"
        self.config_path = self.root / "config.yaml"
        self.checkpoints = self.root / CHECKPOINTS
        self.lock_path = self.root / LOCK
        self._lock_fd: int | None = None

    # -- the folder -------------------------------------------------------------------------------------------
    @_writer_only
    def check_new(self) -> None:
        """Refuse to start a run in a folder that holds anything: nothing written before is ever overwritten."""
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise ArenaError(f"run.dir {self.root}: is a file; choose a new or empty folder")
        held = sorted(p.name for p in self.root.iterdir() if p.name != LOCK)
        if self.config_path.is_file():
            raise ArenaError(f"run.dir {self.root}: already holds a run; use --resume {self.root} to continue "
                             "it, or choose another run.dir")
        if held:
            raise ArenaError(f"run.dir {self.root}: not empty (holds {', '.join(held[:3])}"
                             f"{', ...' if len(held) > 3 else ''}) and no run; choose a new or empty folder")

    @_writer_only
    def create(self, config_yaml: str) -> None:
        """Make the folder, take its lock, and only then check that it is empty and write the config: two new
        runs given the same run.dir cannot both pass the check."""
        self.check_new()
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock()
        try:
            self.check_new()
        except ArenaError:
            self.unlock()
            raise
        self.write_config(config_yaml)

    @_writer_only
    def discard(self, made_folder: bool) -> None:
        """Remove a new run that stopped before its first checkpoint: what it wrote, and the folder if it made it
        (an empty run.dir given by the user stays). Call unlocked; `check_new` made sure nothing else was there."""
        if made_folder:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for path in self.root.iterdir() if self.root.is_dir() else []:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    @_writer_only
    def write_config(self, config_yaml: str) -> None:
        tmp = self.config_path.with_suffix(".yaml.tmp")
        with _writing(self.config_path):
            try:
                tmp.write_text(config_yaml)
                tmp.replace(self.config_path)
            finally:
                tmp.unlink(missing_ok=True)

    # -- the lock ---------------------------------------------------------------------------------------------
    @_writer_only
    def lock(self) -> RunStore:
        """Take the run folder for this process until `unlock` or exit; two processes appending to the same
        files would interleave rounds. Also `with store.lock(): ...`."""
        if self._lock_fd is not None:
            return self
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ArenaError(f"run.dir {self.root}: cannot open {LOCK} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise ArenaError(f"run.dir {self.root}: another arena process is using this run folder"
                             f"{f' (pid {holder})' if holder else ''}; wait for it to finish or stop it") from None
        except OSError as exc:  # a file system without locks
            os.close(fd)
            raise ArenaError(f"run.dir {self.root}: cannot lock {LOCK} ({exc.strerror})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return self

    @_writer_only
    def unlock(self) -> None:
        """Release the lock; the file stays (removing it would let two processes lock different files)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    # -- records ----------------------------------------------------------------------------------------------
    def _append(self, path: Path, records: Iterable[dict[str, Any]]) -> None:
        data = "".join(json.dumps(finite_json(r), ensure_ascii=False, allow_nan=False) + "\n" for r in records)
        with _writing(path), path.open("a", encoding="utf-8") as f:  # a line cut short is never read as a record
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    @_writer_only
    def append_samples(self, iteration: int, samples: Iterable[Any]) -> None:
        self._append(self.samples_path, ({"iteration": iteration, **s.to_json()} for s in samples))

    @_writer_only
    def append_metrics(self, record: dict[str, Any]) -> None:
        self._append(self.metrics_path, [record])

    def _size(self, path: Path) -> int:
        return path.stat().st_size if path.exists() else 0

    # -- checkpoints ------------------------------------------------------------------------------------------
    def checkpoint_dir(self, iteration: int) -> Path:
        return self.checkpoints / f"{iteration:06d}"

    @_writer_only
    def save_checkpoint(self, iteration: int, *, policy: Any, optimizer: Any, game: Any, keep: int = 2,
                        config: dict[str, Any] | None = None) -> Path:
        """Write the adapter, optimizer state and game state as one checkpoint, durable before it is visible;
        keep the newest `keep` checkpoints (0: all). `config`, the resolved config it was made with, is kept in
        its meta.json, so a resume can hold config.yaml to it."""
        import torch

        with _writing(self.checkpoint_dir(iteration)):  # the previous checkpoints stay whole
            tmp = self.begin_checkpoint(iteration)
            policy.save(str(tmp / ADAPTER))
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
            (tmp / GAME_STATE).write_text(json.dumps(game.state_dict()))
            return self.commit_checkpoint(iteration, tmp, keep=keep, config=config)

    def begin_checkpoint(self, iteration: int) -> Path:
        """A fresh temporary folder to write checkpoint contents into; `commit_checkpoint` publishes it."""
        tmp = self.checkpoints / f".tmp-{iteration:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, iteration: int, tmp: Path, keep: int = 2, config: dict[str, Any] | None = None) -> Path:
        """Add meta.json, fsync everything, rename into place, prune."""
        written = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        meta = {"iteration": iteration, "samples_bytes": self._size(self.samples_path),
                "metrics_bytes": self._size(self.metrics_path),
                "files": {p.relative_to(tmp).as_posix(): p.stat().st_size for p in written},
                "sha256": {p.relative_to(tmp).as_posix(): _sha256(p) for p in written}}
        if config is not None:
            meta["config"] = config
        (tmp / META).write_text(json.dumps(meta))
        _fsync_tree(tmp)
        final = self.checkpoint_dir(iteration)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.checkpoints)
        _fsync_dir(self.root)  # the first checkpoint also created checkpoints/ itself
        if keep > 0:
            for old in self.complete_checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def complete_checkpoints(self) -> list[Path]:
        """Renamed checkpoint folders, oldest first (a `.tmp-` folder is not one). A folder is renamed into place
        only after its meta.json is on disk, so one without it was damaged after the fact: `restore` names it."""
        if not self.checkpoints.is_dir():
            return []
        done = [p for p in self.checkpoints.iterdir() if p.is_dir() and p.name.isdigit()]
        return sorted(done, key=lambda p: int(p.name))

    def latest_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        done = [p for p in self.complete_checkpoints() if (p / META).is_file()]
        if not done:
            return None
        return done[-1], json.loads((done[-1] / META).read_text())

    def restore(self, *, policy: Any, optimizer: Any, game: Any,
                check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
        """Load the newest checkpoint that reads back whole into policy, optimizer and game, rewind the JSONL
        files to it and return its meta (None: no checkpoint, start over). `check(meta)` runs first, before
        anything is loaded or cut (a resume's config against the checkpoint's). A damaged checkpoint is warned
        about and set aside, never deleted, and the records cut back past it are kept beside it; if every one is
        damaged, or a checkpoint the records prove was written is gone, stop and change nothing."""
        damaged: list[tuple[Path, str]] = []
        done = self.complete_checkpoints()
        for path in reversed(done):
            try:
                meta, opt_state, game_state = _read_checkpoint(path)
                if check is not None:
                    check(meta)
                _load_adapter(policy, path)
            except _Damage as d:
                damaged.append((path, f"{d.file}: damaged checkpoint ({d.reason})"))
                continue
            self._record_files(meta)  # a record file missing or short: refused before anything is set aside or cut
            for _, text in damaged:  # said once a good one is found: with none, the error says it all
                warnings.warn(f"{text}; using the previous one", ArenaWarning, stacklevel=2)
            if not damaged:
                self._check_none_missing(meta["iteration"])
            try:
                optimizer.load_state_dict(opt_state)
                game.load_state_dict(game_state)
            except Exception as exc:  # noqa: BLE001 - the files read fine: the run's config no longer fits them
                raise ArenaError(f"{path}: this checkpoint does not fit the run's components "
                                 f"({_reason(exc)})") from None
            self._keep_tail(meta, damaged)
            for bad, _ in damaged:  # set aside, kept: an abandoned future that must not be pruned in place of
                _set_aside(bad)     # a good checkpoint, nor restored over rounds played since
            self.rewind(meta)
            return meta
        if damaged:
            raise ArenaError(f"run.dir {self.root}: every checkpoint is damaged: "
                             f"{'; '.join(text.replace(': damaged checkpoint', '') for _, text in damaged)}; "
                             "nothing was changed")
        self._check_none_missing(0)
        self.rewind(None)
        return None

    def _check_none_missing(self, restored: int) -> None:
        """Refuse to rewind past a checkpoint that metrics.jsonl proves was written: a round's record comes after
        the previous round's checkpoint, so a record of iteration L after a checkpoint-due iteration i < L means
        checkpoint i existed (pruning keeps the newest). Cutting back to `restored` would then drop trained
        rounds; checkpoints/ was deleted or emptied by hand."""
        every = self._saved_checkpoint_every()
        iterations = [r.get("iteration") for r in read_jsonl(self.metrics_path, skip_bad=True)]
        later = [i for i in iterations if isinstance(i, int) and i > restored]
        if not later:
            return
        last = max(later)
        due = [i for i in later if i < last and i % every == 0]
        if due:
            had = f"checkpoint {restored}" if restored else "no checkpoint"
            raise ArenaError(f"run.dir {self.root}: metrics.jsonl records iterations up to {last}, so checkpoint "
                             f"{max(due)} was written, but {self.checkpoints} holds {had} after it (deleted or "
                             "moved by hand?); resuming would cut the trained rounds. Nothing was changed: put the "
                             "checkpoints back, or start a new run")

    def _saved_checkpoint_every(self) -> int:
        """run.checkpoint_every of the run as it was played (config.yaml before this resume rewrites it)."""
        import yaml

        try:
            every = (yaml.safe_load(self.config_path.read_text()) or {}).get("run", {}).get("checkpoint_every", 1)
        except (OSError, yaml.YAMLError, AttributeError):
            return 1
        return every if isinstance(every, int) and every > 0 else 1

    def _keep_tail(self, meta: dict[str, Any], damaged: list[tuple[Path, str]]) -> None:
        """Before a rewind past a damaged checkpoint: the records it cuts (rounds the damaged checkpoints had
        trained) are copied to checkpoints/.rewound-<iteration>/, so nothing written is lost."""
        if not damaged:
            return
        target, n = self.checkpoints / f".rewound-{meta['iteration']:06d}", 1
        while target.exists():
            target, n = self.checkpoints / f".rewound-{meta['iteration']:06d}-{n}", n + 1
        target.mkdir()
        for path, key in ((self.samples_path, "samples_bytes"), (self.metrics_path, "metrics_bytes")):
            if path.exists():
                with path.open("rb") as f:
                    f.seek(meta[key])
                    (target / path.name).write_bytes(f.read())
        _fsync_tree(target)

    def _record_files(self, meta: dict[str, Any] | None) -> list[tuple[Path, int]]:
        """Each JSONL file with the length a checkpoint recorded (0 with no checkpoint); a file missing or shorter
        than that is an error, found before either file is cut."""
        files = [(path, meta[key] if meta else 0)
                 for path, key in ((self.samples_path, "samples_bytes"), (self.metrics_path, "metrics_bytes"))]
        for path, size in files:
            if not path.exists() and size:
                raise ArenaError(f"{path}: missing, but its checkpoint recorded {size} bytes of it; the run folder "
                                 "was changed by hand. Nothing was changed: put the file back, or start a new run")
            if path.exists() and path.stat().st_size < size:
                raise ArenaError(f"{path}: shorter than its checkpoint recorded ({size} bytes); the run folder "
                                 "was changed by hand. Nothing was changed: put it back, or start a new run")
        return files

    def rewind(self, meta: dict[str, Any] | None) -> None:
        """Cut the JSONL files back to a checkpoint's recorded lengths (to empty with no checkpoint)."""
        for path, size in self._record_files(meta):
            if path.exists():
                with path.open("r+b") as f:
                    f.truncate(size)
        for tmp in self.checkpoints.glob(".tmp-*") if self.checkpoints.is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A write that fails (a full disk, a read-only folder) is one error naming the file; what was written
    before it (records, complete checkpoints) stays whole."""
    try:
        yield
    except OSError as exc:
        raise ArenaError(f"{path}: cannot write it ({exc.strerror or exc})") from None
    except RuntimeError as exc:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if "file write failed" not in str(exc) and "unexpected pos" not in str(exc):
            raise
        raise ArenaError(f"{path}: cannot write it ({_reason(exc)})") from None


class _Damage(Exception):
    """A checkpoint file that does not read back: `file` is its path, `reason` one short line."""

    def __init__(self, file: Path, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


def _is_damage(exc: BaseException) -> bool:
    """Errors that mean a file's bytes are missing or wrong, as opposed to a checkpoint that does not fit."""
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, EOFError, json.JSONDecodeError,
                        UnicodeDecodeError, pickle.UnpicklingError)):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.EIO:  # the disk could not read it back
        return True
    if isinstance(exc, RuntimeError) and "PytorchStreamReader" in str(exc):  # a cut-off torch zip file
        return True
    return type(exc).__name__ == "SafetensorError"  # safetensors has no stable import path for it


def _reason(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 100 else text[:97] + "..."


def checkpoint_files(path: Path) -> dict[str, bytes]:
    """Every file of a checkpoint folder, by relative path: what process 0 sends the others once it has restored
    the checkpoint, so that they need no access to the run folder (another machine)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def load_checkpoint_files(files: dict[str, bytes], *, policy: Any, optimizer: Any, game: Any) -> None:
    """Load a checkpoint sent as `checkpoint_files` into the components (in a temporary folder, removed after)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="arena-checkpoint-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_bytes(data)
        _, opt_state, game_state = _read_checkpoint(Path(tmp))
        _load_adapter(policy, Path(tmp))
        optimizer.load_state_dict(opt_state)
        game.load_state_dict(game_state)


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """meta, optimizer state and game state of a checkpoint, all read before anything is loaded into the run."""
    import torch

    def read(name: str, load: Any) -> Any:
        try:
            return load(path / name)
        except Exception as exc:
            if _is_damage(exc):
                raise _Damage(path / name, _reason(exc)) from exc
            raise

    if not (path / META).is_file():
        raise _Damage(path / META, "missing")
    meta = read(META, lambda p: json.loads(p.read_bytes()))
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int)
                                             for k in ("iteration", "samples_bytes", "metrics_bytes")):
        raise _Damage(path / META, "not a checkpoint record")
    for name, size in (meta.get("files") or {}).items():  # older checkpoints have no file list
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            raise _Damage(path / name, "missing" if actual is None else f"{actual} bytes, {size} written")
    for name, digest in (meta.get("sha256") or {}).items():  # nor checksums
        if _sha256(path / name) != digest:
            raise _Damage(path / name, "its bytes changed since it was written (sha256)")
    opt_state = read(OPTIMIZER, lambda p: torch.load(p, map_location="cpu", weights_only=False))
    game_state = read(GAME_STATE, lambda p: json.loads(p.read_bytes()))
    return meta, opt_state, game_state


def all_finite(tensors: Iterable[Any]) -> bool:
    """Whether every value of every tensor is finite: weights with a NaN or an infinity are never saved, restored
    or exported (one device sync for all of them)."""
    import torch

    checks = [torch.isfinite(t.detach()).all() for t in tensors]
    return bool(torch.stack(checks).all()) if checks else True


def _load_adapter(policy: Any, path: Path) -> None:
    adapter = path / ADAPTER
    if not adapter.is_dir():  # a backend might take a missing local folder for a Hub model id
        raise _Damage(adapter, "missing")
    try:
        policy.load(str(adapter))
    except Exception as exc:
        if _is_damage(exc):
            raise _Damage(adapter, _reason(exc)) from exc
        # a shape mismatch is no damage: the run's config (its LoRA shape, its model) no longer fits the files
        raise ArenaError(f"{adapter}: does not fit the run's model ({_reason(exc)})") from None
    trainable = getattr(policy, "trainable_parameters", None)
    if trainable is not None and not all_finite(trainable()):
        raise _Damage(adapter, "its weights hold NaN or infinite values")


def _set_aside(path: Path) -> None:
    """Rename a checkpoint folder to `.damaged-<name>` (with a number if that is taken): out of every listing."""
    target, n = path.with_name(f".damaged-{path.name}"), 1
    while target.exists():
        target, n = path.with_name(f".damaged-{path.name}-{n}"), n + 1
    os.replace(path, target)


def _read_pid(fd: int) -> str:
    """The pid the lock holder wrote, or '' (best effort: it may be mid-write)."""
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return text if text.isdigit() else ""


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder bottom-up, so a rename cannot become visible before its contents."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
