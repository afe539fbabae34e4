"""The run directory: JSONL records that survive a crash (strict JSON), atomic durable checkpoints, restoring
with a fallback past damaged ones, rewinding on resume, pruning."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from arena.errors import ArenaError, ArenaWarning
from arena.runstore import META, RunStore, finite_json, read_jsonl
from arena.types import Sample


def sample(i: int, text: str = "answer") -> Sample:
    return Sample(role="assistant", prompt=[{"role": "user", "content": f"q{i} é"}], completion=text,
                  prompt_ids=[1, 2, i], completion_ids=[i, 2], logprobs=[-0.5, -1.25], reward=float(i),
                  group=f"g{i}", metadata={"truncated": False})


@pytest.fixture()
def store(tmp_path) -> RunStore:
    s = RunStore(tmp_path / "run")
    s.create("game: {name: prompts}\n")
    return s


def play_round(store: RunStore, iteration: int, n: int = 2) -> None:
    store.append_samples(iteration, [sample(iteration * 10 + k) for k in range(n)])
    store.append_metrics({"iteration": iteration, "loss": 0.5 * iteration})


def checkpoint(store: RunStore, iteration: int, keep: int = 0):
    tmp = store.begin_checkpoint(iteration)
    (tmp / "state.json").write_text(json.dumps({"iteration": iteration}))
    return store.commit_checkpoint(iteration, tmp, keep=keep)


# -- read_jsonl -----------------------------------------------------------------------------------------------

def test_read_jsonl_skips_a_partial_last_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n{"a": 3, "b": "cut sh')
    assert list(read_jsonl(path)) == [{"a": 1}, {"a": 2}]
    # a final record that happens to be valid JSON but lacks its newline was still cut short: not a record
    path.write_bytes(b'{"a": 1}\n{"a": 2}')
    assert list(read_jsonl(path)) == [{"a": 1}]
    path.write_bytes('{"t": "é"}\n'.encode())
    assert list(read_jsonl(path)) == [{"t": "é"}]
    assert list(read_jsonl(tmp_path / "missing.jsonl")) == []


def test_samples_round_trip(store):
    play_round(store, 1)
    records = list(read_jsonl(store.samples_path))
    assert [r["iteration"] for r in records] == [1, 1]
    back = [Sample.from_json({k: v for k, v in r.items() if k != "iteration"}) for r in records]
    assert back == [sample(10), sample(11)]
    assert list(read_jsonl(store.metrics_path)) == [{"iteration": 1, "loss": 0.5}]


# -- create ---------------------------------------------------------------------------------------------------

def test_create_writes_config(store):
    assert store.config_path.read_text() == "game: {name: prompts}\n"
    assert not list(store.root.glob("*.tmp"))


def test_create_in_a_non_empty_dir_names_run_dir(tmp_path):
    root = tmp_path / "busy"
    root.mkdir()
    (root / "something").write_text("x")
    with pytest.raises(ArenaError) as exc:
        RunStore(root).create("a: 1\n")
    message = str(exc.value)
    # not a run (no config.yaml): named for what it holds, with no --resume advice that would fail
    assert "run.dir" in message and str(root) in message and "holds something" in message
    assert "--resume" not in message
    assert not (root / "config.yaml").exists()
    (root / "config.yaml").write_text("game: {name: prompts}\n")
    with pytest.raises(ArenaError, match="already holds a run; use --resume"):
        RunStore(root).create("a: 1\n")


def test_run_dir_that_is_a_file(tmp_path):
    path = tmp_path / "run"
    path.write_text("not a folder")
    with pytest.raises(ArenaError, match="run.dir"):
        RunStore(path).create("a: 1\n")
    assert path.read_text() == "not a folder"


def test_create_in_an_empty_existing_dir(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    RunStore(root).create("a: 1\n")
    assert (root / "config.yaml").read_text() == "a: 1\n"


# -- checkpoints ----------------------------------------------------------------------------------------------

def test_checkpoint_is_written_under_a_temporary_name_then_renamed(store):
    play_round(store, 1)
    tmp = store.begin_checkpoint(1)
    assert tmp.parent == store.checkpoints and not tmp.name.isdigit()
    (tmp / "adapter.bin").write_bytes(b"weights")
    inode = os.stat(tmp / "adapter.bin").st_ino
    assert store.complete_checkpoints() == []  # still being written: not a checkpoint
    assert store.latest_checkpoint() is None
    final = store.commit_checkpoint(1, tmp)
    assert final == store.checkpoint_dir(1) and final.name == "000001"
    assert not tmp.exists()
    assert os.stat(final / "adapter.bin").st_ino == inode  # moved, not copied
    meta = json.loads((final / META).read_text())
    assert meta == {"iteration": 1, "samples_bytes": store.samples_path.stat().st_size,
                    "metrics_bytes": store.metrics_path.stat().st_size, "files": {"adapter.bin": 7},
                    "sha256": {"adapter.bin": hashlib.sha256(b"weights").hexdigest()}}
    assert meta["samples_bytes"] > 0 and meta["metrics_bytes"] > 0


def test_begin_checkpoint_discards_a_stale_temporary(store):
    tmp = store.begin_checkpoint(3)
    (tmp / "half-written").write_text("x")
    tmp2 = store.begin_checkpoint(3)
    assert tmp2 == tmp and list(tmp2.iterdir()) == []


def test_only_complete_checkpoints_count(store):
    play_round(store, 1)
    checkpoint(store, 1)
    play_round(store, 2)
    checkpoint(store, 2)
    (store.checkpoints / "000007").mkdir()  # an iteration-named folder without meta.json
    (store.checkpoints / "000007" / "adapter.bin").write_bytes(b"x")
    tmp = store.begin_checkpoint(8)  # a checkpoint cut short before its rename
    (tmp / META).write_text(json.dumps({"iteration": 8, "samples_bytes": 0, "metrics_bytes": 0}))
    (store.checkpoints / "000009").write_text("a file, not a folder")
    # a renamed folder always had its meta.json: one without it was damaged later, and restore must name it
    assert [p.name for p in store.complete_checkpoints()] == ["000001", "000002", "000007"]
    path, meta = store.latest_checkpoint()
    assert path.name == "000002" and meta["iteration"] == 2


def test_checkpoints_sort_numerically(store):
    for it in (9, 10, 100):
        checkpoint(store, it)
    (store.checkpoints / "000011").mkdir()  # numbered but without meta.json: listed (restore names it damaged)
    assert [p.name for p in store.complete_checkpoints()] == ["000009", "000010", "000011", "000100"]
    assert store.latest_checkpoint()[1]["iteration"] == 100


def test_keep_checkpoints_prunes_old_ones(store):
    for it in range(1, 6):
        play_round(store, it)
        checkpoint(store, it, keep=2)
        assert len(store.complete_checkpoints()) == min(it, 2)
    assert [p.name for p in store.complete_checkpoints()] == ["000004", "000005"]
    assert sorted(p.name for p in store.checkpoints.iterdir()) == ["000004", "000005"]
    checkpoint(store, 6, keep=0)  # 0 keeps every checkpoint
    checkpoint(store, 7, keep=0)
    assert [p.name for p in store.complete_checkpoints()] == ["000004", "000005", "000006", "000007"]
    checkpoint(store, 8, keep=1)
    assert [p.name for p in store.complete_checkpoints()] == ["000008"]


# -- rewind ---------------------------------------------------------------------------------------------------

def test_rewind_cuts_the_jsonl_files_to_the_recorded_lengths(store):
    play_round(store, 1)
    checkpoint(store, 1)
    play_round(store, 2)
    checkpoint(store, 2)
    sizes = store.samples_path.stat().st_size, store.metrics_path.stat().st_size
    # iteration 3 is cut off by a kill -9: its samples were written, its metrics half written, no checkpoint
    play_round(store, 3)
    with store.metrics_path.open("a") as f:
        f.write('{"iteration": 3, "lo')
    store.begin_checkpoint(3)

    _, meta = store.latest_checkpoint()
    store.rewind(meta)
    assert (store.samples_path.stat().st_size, store.metrics_path.stat().st_size) == sizes
    assert [r["iteration"] for r in read_jsonl(store.samples_path)] == [1, 1, 2, 2]
    assert [r["iteration"] for r in read_jsonl(store.metrics_path)] == [1, 2]
    assert not list(store.checkpoints.glob(".tmp-*"))

    # replaying iteration 3 neither loses nor duplicates a round
    play_round(store, 3)
    assert [r["iteration"] for r in read_jsonl(store.samples_path)] == [1, 1, 2, 2, 3, 3]
    assert [r["iteration"] for r in read_jsonl(store.metrics_path)] == [1, 2, 3]


def test_rewind_to_an_older_checkpoint_and_to_nothing(store):
    play_round(store, 1)
    checkpoint(store, 1)
    meta1 = json.loads((store.checkpoint_dir(1) / META).read_text())
    play_round(store, 2)
    checkpoint(store, 2)
    store.rewind(meta1)
    assert [r["iteration"] for r in read_jsonl(store.samples_path)] == [1, 1]
    store.rewind(None)  # no checkpoint at all: every round is replayed
    assert store.samples_path.stat().st_size == 0 and store.metrics_path.stat().st_size == 0


def test_rewind_refuses_files_shorter_than_recorded(store):
    play_round(store, 1)
    checkpoint(store, 1)
    _, meta = store.latest_checkpoint()
    store.samples_path.write_text("")
    with pytest.raises(ArenaError, match="shorter than"):
        store.rewind(meta)


def test_rewind_without_jsonl_files(tmp_path):
    store = RunStore(tmp_path / "run")
    store.create("a: 1\n")
    store.rewind(None)  # nothing written yet: nothing to cut, no error
    assert not store.samples_path.exists()


def test_check_new_ignores_a_lock_file(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / ".lock").write_text("123\n")
    RunStore(root).create("a: 1\n")
    assert (root / "config.yaml").is_file()


# -- strict JSON ----------------------------------------------------------------------------------------------

def strict_loads(line: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null(store):
    nan, inf = float("nan"), float("inf")
    store.append_metrics({"iteration": 1, "loss": nan, "kl": inf, "nested": {"a": [-inf, 1.5, (nan, 2)]},
                          "ok": 2.5, "n": 3, "s": "NaN"})
    store.append_samples(1, [sample(1), sample(2)])
    bad = sample(3)
    bad.reward, bad.logprobs = nan, [-0.5, -inf]
    store.append_samples(1, [bad])
    lines = store.metrics_path.read_text().splitlines() + store.samples_path.read_text().splitlines()
    records = [strict_loads(line) for line in lines]
    assert records[0] == {"iteration": 1, "loss": None, "kl": None, "nested": {"a": [None, 1.5, [None, 2]]},
                          "ok": 2.5, "n": 3, "s": "NaN"}
    assert records[-1]["reward"] is None and records[-1]["logprobs"] == [-0.5, None]
    assert records[1]["reward"] == 1.0


def test_finite_json_leaves_finite_values_alone():
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": -0.0}}
    assert finite_json(value) == value


# -- save_checkpoint / restore --------------------------------------------------------------------------------

class FakePolicy:
    """Saves its weight as a real safetensors file, like a LoRA adapter folder."""

    def __init__(self, value: float, shape=(4, 3)):
        self.weight = torch.full(shape, value)

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        save_file({"lora_A.weight": self.weight}, os.path.join(path, ADAPTER_FILE))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"r": 4}, f)

    def load(self, path: str) -> None:
        weight = load_file(os.path.join(path, ADAPTER_FILE))["lora_A.weight"]
        if weight.shape != self.weight.shape:  # what a LoRA rank change looks like
            raise RuntimeError(f"size mismatch for lora_A.weight: {tuple(weight.shape)} vs "
                               f"{tuple(self.weight.shape)}")
        self.weight = weight


class FakeGame:
    def __init__(self, state=None):
        self.state = state or {}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


ADAPTER_FILE = "adapter_model.safetensors"


def make_optimizer(steps: int = 0) -> torch.optim.AdamW:
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    for k in range(steps):
        param.grad = torch.full((3,), float(k + 1))
        opt.step()
    return opt


def save(store: RunStore, iteration: int, keep: int = 0) -> Path:
    return store.save_checkpoint(iteration, policy=FakePolicy(float(iteration)), optimizer=make_optimizer(iteration),
                                 game=FakeGame({"seen": iteration, "pool": ["a", "é"]}), keep=keep)


def fresh():
    return {"policy": FakePolicy(-1.0), "optimizer": make_optimizer(0), "game": FakeGame()}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_save_and_restore_round_trip(store):
    play_round(store, 1)
    final = save(store, 1)
    assert final == store.checkpoint_dir(1)
    assert sorted(p.name for p in final.iterdir()) == ["adapter", "game_state.json", "meta.json", "optimizer.pt"]
    assert not list(store.checkpoints.glob(".tmp-*"))
    sizes = store.samples_path.stat().st_size, store.metrics_path.stat().st_size
    play_round(store, 2)  # played, then killed before its checkpoint

    parts = fresh()
    meta = store.restore(**parts)
    assert meta["iteration"] == 1
    assert (meta["samples_bytes"], meta["metrics_bytes"]) == sizes
    assert (store.samples_path.stat().st_size, store.metrics_path.stat().st_size) == sizes
    assert torch.equal(parts["policy"].weight, torch.full((4, 3), 1.0))
    assert parts["game"].state == {"seen": 1, "pool": ["a", "é"]}
    want = make_optimizer(1).state_dict()
    got = parts["optimizer"].state_dict()
    assert got["param_groups"] == want["param_groups"]
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(got["state"][0][key], want["state"][0][key])


def test_restore_picks_the_newest_and_prunes_with_keep(store):
    for it in range(1, 5):
        play_round(store, it)
        save(store, it, keep=2)
    assert [p.name for p in store.complete_checkpoints()] == ["000003", "000004"]
    parts = fresh()
    assert store.restore(**parts)["iteration"] == 4
    assert parts["game"].state["seen"] == 4


def test_restore_without_a_checkpoint_starts_over(store):
    play_round(store, 1)
    assert store.restore(**fresh()) is None
    assert store.samples_path.stat().st_size == 0 and store.metrics_path.stat().st_size == 0


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def scramble(path: Path) -> None:
    """Same length, wrong bytes: only reading the file can tell."""
    path.write_bytes(bytes(b ^ 0x5A for b in path.read_bytes()))




DAMAGE = [
    ("optimizer.pt", truncate, None), ("optimizer.pt", scramble, None), ("optimizer.pt", Path.unlink, None),
    (f"adapter/{ADAPTER_FILE}", truncate, None), (f"adapter/{ADAPTER_FILE}", scramble, None),
    (f"adapter/{ADAPTER_FILE}", Path.unlink, None), ("adapter", shutil.rmtree, "adapter/adapter_config.json"),
    ("game_state.json", truncate, None), ("game_state.json", scramble, None), ("game_state.json", Path.unlink, None),
    ("meta.json", truncate, None), ("meta.json", scramble, None),
]


@pytest.mark.parametrize("name,damage,named", DAMAGE, ids=[f"{n}-{d.__name__}" for n, d, _ in DAMAGE])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(store, name, damage, named):
    play_round(store, 1)
    save(store, 1)
    sizes1 = store.samples_path.stat().st_size, store.metrics_path.stat().st_size
    play_round(store, 2)
    save(store, 2)
    damage(store.checkpoint_dir(2) / name)
    before = snapshot(store.checkpoint_dir(2))

    parts = fresh()
    with pytest.warns(ArenaWarning) as record:
        meta = store.restore(**parts)
    assert meta["iteration"] == 1
    assert parts["game"].state["seen"] == 1 and torch.equal(parts["policy"].weight, torch.full((4, 3), 1.0))
    assert (store.samples_path.stat().st_size, store.metrics_path.stat().st_size) == sizes1
    [warning] = [str(w.message) for w in record]
    assert warning.startswith(f"{store.checkpoint_dir(2) / (named or name)}: damaged checkpoint (")
    assert warning.endswith("; using the previous one") and "\n" not in warning
    aside = store.checkpoints / ".damaged-000002"
    assert not store.checkpoint_dir(2).exists() and snapshot(aside) == before  # set aside, untouched

    # the replayed round's checkpoint replaces the damaged one
    play_round(store, 2)
    save(store, 2)
    assert store.restore(**fresh())["iteration"] == 2


def test_a_damaged_newer_checkpoint_never_takes_a_good_ones_place(store):
    """Restored from 5 past a damaged 10, the run saves 6 with keep=1: 6 must survive (a damaged 10 still counted
    as the newest would have pruned it), and 10 must never be restored over the rounds played since."""
    for it in (5, 10):
        play_round(store, it)
        save(store, it)
    truncate(store.checkpoint_dir(10) / "optimizer.pt")
    with pytest.warns(ArenaWarning):
        assert store.restore(**fresh())["iteration"] == 5
    play_round(store, 6)
    assert save(store, 6, keep=1).is_dir()
    assert [p.name for p in store.complete_checkpoints()] == ["000006"]
    assert (store.checkpoints / ".damaged-000010" / "optimizer.pt").is_file()  # kept for a look, out of the way
    assert store.restore(**fresh())["iteration"] == 6


@pytest.mark.parametrize("name,reason", [("optimizer.pt", "RuntimeError: PytorchStreamReader failed"),
                                         (f"adapter/{ADAPTER_FILE}", "SafetensorError: "),
                                         ("game_state.json", "JSONDecodeError: ")])
def test_damage_is_found_by_reading_when_meta_has_no_file_list(store, name, reason):
    """Checkpoints written before meta.json listed file sizes and checksums: a cut-off file shows when it is
    parsed."""
    save(store, 1)
    save(store, 2)
    meta = json.loads((store.checkpoint_dir(2) / META).read_text())
    del meta["files"], meta["sha256"]
    (store.checkpoint_dir(2) / META).write_text(json.dumps(meta))
    truncate(store.checkpoint_dir(2) / name)
    named = "adapter" if name.startswith("adapter") else name
    with pytest.warns(ArenaWarning, match=re.escape(f"{store.checkpoint_dir(2) / named}: damaged checkpoint "
                                                    f"({reason}")):
        assert store.restore(**fresh())["iteration"] == 1


def test_every_checkpoint_damaged_stops_and_changes_nothing(store):
    play_round(store, 1)
    save(store, 1)
    play_round(store, 2)
    save(store, 2)
    play_round(store, 3)
    truncate(store.checkpoint_dir(1) / "optimizer.pt")
    (store.checkpoint_dir(2) / "game_state.json").unlink()
    before = snapshot(store.root)
    parts = fresh()
    with warnings.catch_warnings(), pytest.raises(ArenaError) as exc:
        warnings.simplefilter("error")  # no "using the previous one" when there is none: the error says it all
        store.restore(**parts)
    message = str(exc.value)
    assert "\n" not in message and f"run.dir {store.root}" in message
    assert str(store.checkpoint_dir(1) / "optimizer.pt") in message
    assert str(store.checkpoint_dir(2) / "game_state.json") in message
    assert snapshot(store.root) == before
    assert parts["game"].state == {}


def test_a_checkpoint_that_does_not_fit_is_an_error_not_damage(store):
    save(store, 1)
    save(store, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # one line naming the checkpoint and the cause, not a traceback from deep inside torch
        with pytest.raises(ArenaError, match=r"000002/adapter: does not fit the run's model \(RuntimeError"):
            store.restore(policy=FakePolicy(0.0, shape=(8, 3)), optimizer=make_optimizer(), game=FakeGame())
        two_groups = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(3))]},
                                        {"params": [torch.nn.Parameter(torch.zeros(3))]}])
        with pytest.raises(ArenaError, match=r"000002: this checkpoint does not fit the run's components "
                                             r"\(ValueError: .*parameter groups"):
            store.restore(policy=FakePolicy(0.0), optimizer=two_groups, game=FakeGame())
    assert [p.name for p in store.complete_checkpoints()] == ["000001", "000002"]  # nothing was set aside


def test_checkpoint_files_are_fsynced_before_the_rename(store, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    play_round(store, 1)
    events.clear()
    final = save(store, 1)

    [moved] = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    tmp = Path(events[moved][1]).resolve()
    assert tmp.name == ".tmp-000001"
    synced_before = {path for kind, path in events[:moved] if kind == "fsync"}
    # every file and folder of the checkpoint, under its name before the rename
    wanted = {str(tmp)} | {str(tmp / p.relative_to(final)) for p in final.rglob("*")}
    assert len(wanted) == 7  # the folder, adapter/ and its 2 files, optimizer.pt, game_state.json, meta.json
    assert wanted <= synced_before, wanted - synced_before
    assert ("fsync", str(store.checkpoints.resolve())) in events[moved:]
