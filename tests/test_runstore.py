"""The run directory: JSONL records that survive a crash, atomic checkpoints, rewinding on resume, pruning."""

from __future__ import annotations

import json
import os

import pytest

from arena.errors import ArenaError
from arena.runstore import META, RunStore, read_jsonl
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
    assert "run.dir" in message and str(root) in message and "--resume" in message
    assert not (root / "config.yaml").exists()


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
                    "metrics_bytes": store.metrics_path.stat().st_size}
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
    assert [p.name for p in store.complete_checkpoints()] == ["000001", "000002"]
    path, meta = store.latest_checkpoint()
    assert path.name == "000002" and meta["iteration"] == 2


def test_checkpoints_sort_numerically(store):
    for it in (9, 10, 100):
        checkpoint(store, it)
    (store.checkpoints / "000011").mkdir()
    assert [p.name for p in store.complete_checkpoints()] == ["000009", "000010", "000100"]
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
