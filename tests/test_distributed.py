"""Runs of several processes, launched as a user launches them (`python -m torch.distributed.run`, which is
`torchrun`), on CPU with gloo and one thread each: the update of two processes equals the update of one, every
built-in game plays whole rounds with one record per iteration and the same state on both processes, and a process
that decides differently is caught. Each launch is checked to have really run two processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from arena.distributed import SOLO, Group
from arena.runstore import RunStore, read_jsonl
from tiny import game_args

TESTS = Path(__file__).parent


def launch(args: list[str], processes: int = 2, env: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N ARGS` (a script path or `-m arena ...`), one thread each."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# -- the split, as arithmetic ---------------------------------------------------------------------------------

def test_shares_cover_every_item_once():
    class Of(Group):
        def __init__(self, rank: int, size: int):
            self.rank, self.size = rank, size

    for size in (1, 2, 3, 5):
        for count in (0, 1, 2, 7, 16):
            contiguous = [i for r in range(size) for i in Of(r, size).share(count)]
            strided = sorted(i for r in range(size) for i in Of(r, size).mine(count))
            assert contiguous == strided == list(range(count))
            sizes = [len(Of(r, size).share(count)) for r in range(size)]
            assert max(sizes) - min(sizes) <= 1
    assert SOLO.size == 1 and SOLO.main and SOLO.gather(lambda xs: [x * 2 for x in xs], [1, 2]) == [2, 4]


# -- one update --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["grpo", "dpo", "mix"])
def test_two_processes_take_the_step_of_one(tiny_model_dir, tmp_path, name):
    """The same samples, one process against two: the gradient summed over the two halves of the micro-batches and
    the weights after AdamW's step equal one process's (float32, to 1e-6), the two processes' weights are
    identical, and so are the metrics."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    script = str(TESTS / "distributed_step.py")
    alone = subprocess.run([sys.executable, script, str(tiny_model_dir), name, str(one)], capture_output=True,
                           text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert alone.returncode == 0, alone.stderr[-3000:]
    both = launch([script, str(tiny_model_dir), name, str(two)])
    assert both.returncode == 0, both.stderr[-3000:]
    want = torch.load(one / "rank0.pt")
    got = [torch.load(two / f"rank{r}.pt") for r in (0, 1)]
    assert want["size"] == 1 and [g["size"] for g in got] == [2, 2]
    assert max(float(g.abs().max()) for g in want["grads"]) > 1e-3  # a real gradient, not zeros
    for g in got:
        for a, b in zip(g["grads"], want["grads"]):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), float((a - b).abs().max())
        for a, b in zip(g["weights"], want["weights"]):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), float((a - b).abs().max())
        assert g["metrics"].keys() == want["metrics"].keys() and g["trained"] == want["trained"]
        for key, value in want["metrics"].items():
            assert g["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert all(torch.equal(a, b) for a, b in zip(got[0]["weights"], got[1]["weights"]))


# -- whole runs ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("game", ["prompts", "lsp", "spin", "azr", "pop"])
def test_every_game_plays_whole_rounds_on_two_processes(tiny_model_dir, tmp_path, game):
    """One run folder written by process 0: one record per iteration, every round whole, checkpoints; the state
    of both processes compared after every round (the loop stops the run if they differ)."""
    run = tmp_path / "run"
    out = launch(["-m", "arena", "play", game, f"model.path={tiny_model_dir}", f"run.dir={run}", "run.iterations=2",
                  "run.loggers=[plain]", "model.lora.r=4", *game_args(game, tmp_path)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"in {run} on 2 processes" in out.stdout and out.stdout.count("run saved in") == 1, out.stdout
    records = list(read_jsonl(run / "metrics.jsonl"))
    assert [r["iteration"] for r in records if r["iteration"] > 0] == [1, 2]
    samples = list(read_jsonl(run / "samples.jsonl"))
    assert {s["iteration"] for s in samples} == {1, 2}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["000001", "000002"]
    assert "arena: error" not in out.stderr and not arena_traceback(out.stderr), out.stderr[-3000:]


DRIFT = '''
import torch
from arena import Game, Role, Sample, hookimpl
from dataclasses import dataclass


@dataclass
class DriftOptions:
    pass


class Drift(Game):
    """A game that decides with torch's generator, which differs per process, instead of ctx.rng."""

    Options = DriftOptions
    role_names = ("player",)

    def __init__(self, options, env):
        super().__init__(options, env)
        self.draws = []

    @property
    def roles(self):
        return {"player": Role("player")}

    def play(self, ctx):
        self.draws.append(float(torch.rand(())))
        (gens,) = ctx.policy.generate([[{"role": "user", "content": "hi"}]], n=2, max_new_tokens=2)
        return [Sample.from_generation(self.roles["player"], [], g, reward=float(i), group="g")
                for i, g in enumerate(gens)]

    def state_dict(self):
        return {"draws": self.draws}


@hookimpl
def register_games(register):
    register("drift", Drift)
'''


def test_processes_that_drift_apart_are_stopped(tiny_model_dir, tmp_path):
    """The state check can fail: a game whose state depends on the process stops the run in one line after the
    first round, reported by process 0, and every process exits 2."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "drift.py").write_text(DRIFT)
    run = tmp_path / "run"
    out = launch(["-m", "arena", "play", "drift", f"model.path={tiny_model_dir}", f"run.dir={run}",
                  "run.iterations=2", "run.loggers=[plain]", "model.lora.r=4", "run.eval_every=0"],
                 env={"ARENA_PLUGINS_DIR": str(plugins)})
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("arena: error:")]
    assert len(errors) == 1 and "after iteration 1 differs between process 0 and process 1" in errors[0], out.stderr
    assert "exitcode  : 2" in out.stderr  # the launcher's report of the first process to stop
    assert not arena_traceback(out.stderr), out.stderr[-3000:]


def arena_traceback(stderr: str) -> bool:
    """Whether a traceback passes through arena's code (the launcher prints its own report of a failure)."""
    return re.search(r'File "[^"]*/(arena|games|plugins)/[^"]*\.py"', stderr) is not None


# -- crashes, resumes and a second launch --------------------------------------------------------------------------

FAST = ["game.dataset=arithmetic", "judge=exact_match", "game.prompts_per_round=4", "game.group_size=2",
        "game.max_new_tokens=4", "game.eval_size=4", "run.eval_every=1", "run.keep_checkpoints=0",
        "run.loggers=[plain]", "model.lora.r=4", "optimizer.lr=0.05"]


def start(args: list[str], processes: int = 2, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={processes}", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            start_new_session=True)


def worker(launcher: int, rank: int) -> int:
    """The pid of the launcher's worker process of `rank` (from /proc: its parent and its RANK)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under launcher {launcher}")


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def records(run: Path) -> tuple[list[dict], list[dict]]:
    return list(read_jsonl(run / "samples.jsonl")), list(read_jsonl(run / "metrics.jsonl"))


@pytest.mark.parametrize("victim", [0, 1])
def test_kill_9_of_one_process_stops_all_and_a_resume_replays_exactly(tiny_model_dir, tmp_path, victim):
    """kill -9 of either process during a run: the launcher and the other process stop within seconds, the folder
    is unlocked, and `--resume` under the same launcher plays exactly what the uninterrupted run played, with no
    round lost or duplicated."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = ["-m", "arena", "play", "prompts", f"model.path={tiny_model_dir}", "run.iterations=12", *FAST]
    exact = {"MKL_CBWR": "AUTO,STRICT"}  # bit-exact float32 products wherever the tensors lie (docs/runs.md)
    assert launch([*args, f"run.dir={whole}"], env=exact).returncode == 0
    proc = start([*args, f"run.dir={cut}"], env=exact)
    wait_for(cut / "checkpoints" / "000002" / "meta.json", proc)
    os.kill(worker(proc.pid, victim), signal.SIGKILL)
    killed = time.time()
    _, err = proc.communicate(timeout=300)
    stopped = time.time() - killed
    assert proc.returncode != 0 and stopped < 60, (proc.returncode, stopped, err[-2000:])
    RunStore(cut).lock().unlock()  # nobody holds the folder
    resumed = launch(["-m", "arena", "play", "prompts", "--resume", str(cut)], env=exact)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at iteration" in resumed.stdout and "on 2 processes" in resumed.stdout
    (want_samples, want_metrics), (got_samples, got_metrics) = records(whole), records(cut)
    assert [m["iteration"] for m in got_metrics] == list(range(13))
    got = [(s["iteration"], s["group"], s["completion_ids"], s["reward"]) for s in got_samples]
    want = [(s["iteration"], s["group"], s["completion_ids"], s["reward"]) for s in want_samples]
    assert got == want, next(((g, w) for g, w in zip(got, want) if g != w), (len(got), len(want)))


def test_a_run_resumes_on_another_number_of_processes(tiny_model_dir, tmp_path):
    """Two processes, then one, then two again: each resume carries on from the last checkpoint, one record per
    iteration, every round whole (the sampled tokens differ from what the first launch would have played)."""
    run = tmp_path / "run"
    base = ["play", "prompts", f"model.path={tiny_model_dir}", f"run.dir={run}", *FAST]
    assert launch(["-m", "arena", *base, "run.iterations=2"]).returncode == 0
    alone = subprocess.run([sys.executable, "-m", "arena", "play", "prompts", "--resume", str(run),
                            "run.iterations=3"], capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    again = launch(["-m", "arena", "play", "prompts", "--resume", str(run), "run.iterations=4"])
    assert again.returncode == 0, again.stderr[-3000:]
    samples, metrics = records(run)
    assert [m["iteration"] for m in metrics] == [0, 1, 2, 3, 4]
    assert [s["iteration"] for s in samples] == [i for i in range(1, 5) for _ in range(8)]


def test_a_second_launch_on_a_running_folder_is_refused(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    proc = start(["-m", "arena", "play", "prompts", f"model.path={tiny_model_dir}", f"run.dir={run}",
                  "run.iterations=200", *FAST])
    try:
        wait_for(run / "checkpoints" / "000001" / "meta.json", proc)
        before = (run / "samples.jsonl").stat().st_size
        second = launch(["-m", "arena", "play", "prompts", "--resume", str(run)])
        errors = [line for line in second.stderr.splitlines() if line.startswith("arena: error:")]
        assert second.returncode != 0 and len(errors) == 1, second.stderr[-3000:]
        assert "another arena process is using this run folder" in errors[0]
        assert not arena_traceback(second.stderr)
        assert proc.poll() is None and (run / "samples.jsonl").stat().st_size >= before  # the first run goes on
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
        proc.communicate()


# -- other launchers ---------------------------------------------------------------------------------------------

def test_accelerate_launch_runs_two_processes(tiny_model_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` starts two processes with gloo where there is no GPU."""
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "arena", "play", "prompts", f"model.path={tiny_model_dir}", f"run.dir={run}",
                          "run.iterations=2", *FAST], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on 2 processes" in out.stdout
    assert [m["iteration"] for m in records(run)[1]] == [0, 1, 2]


@pytest.mark.parametrize("env, words", [
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"}, "DeepSpeed"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "mpirun"),
    ({"ACCELERATE_USE_CPU": "true", "MASTER_ADDR": "127.0.0.1"}, "starts only one"),
])
def test_launches_arena_cannot_serve_are_one_line(env, words):
    from arena.distributed import check_launch
    from arena.errors import ArenaError

    with pytest.raises(ArenaError, match=words):
        check_launch(env)
    check_launch({"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "false", "MASTER_ADDR": "127.0.0.1"})  # a good launch


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_launchers_on_one_address_are_two_machines_of_one_run(tiny_model_dir, tmp_path):
    """`torchrun --nnodes 2 --node_rank R --master_addr ... --master_port ...` twice, as two machines would start
    it: one run, written by the first machine's process. On the resume the second machine is given a folder that
    does not exist there: it needs none, the first sends it the config and the checkpoint."""
    run, port = tmp_path / "run", free_port()

    def machine(rank: int, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                                 "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                                 "-m", "arena", "play", "prompts", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    elsewhere = tmp_path / "not-on-this-machine"
    for args, other in (([f"model.path={tiny_model_dir}", f"run.dir={run}", "run.iterations=2", *FAST], None),
                        (["--resume", str(run), "run.iterations=3"], ["--resume", str(elsewhere), "run.iterations=3"])):
        first, second = machine(0, *args), machine(1, *(other or args))
        for proc in (first, second):
            proc.communicate(timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
        port = free_port()
    samples, metrics = records(run)
    assert [m["iteration"] for m in metrics] == [0, 1, 2, 3]
    assert [s["iteration"] for s in samples] == [i for i in (1, 2, 3) for _ in range(8)]
    assert not elsewhere.exists()


def test_arena_eval_under_a_launcher_scores_as_one_process(tiny_model_dir, tmp_path):
    """The held-out evaluation split across two processes gives one process's greedy answers and scores; process
    0 alone prints the table and writes the results."""
    run = tmp_path / "run"
    assert launch(["-m", "arena", "play", "prompts", f"model.path={tiny_model_dir}", f"run.dir={run}",
                   "run.iterations=2", *FAST, "game.eval_size=6"]).returncode == 0
    alone = subprocess.run([sys.executable, "-m", "arena", "eval", str(run), "--out", str(tmp_path / "one.json")],
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    both = launch(["-m", "arena", "eval", str(run), "--out", str(tmp_path / "two.json")])
    assert both.returncode == 0, both.stderr[-3000:]
    assert both.stdout.count("wrote ") == 1 and both.stdout.count("base: evaluated") == 1, both.stdout
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["answers"] == two["answers"] and len(one["answers"]) == 6
    for label in one["models"]:
        assert one["models"][label]["metrics"] == two["models"][label]["metrics"]


# -- third-party plugins and bad input under a launcher ------------------------------------------------------------

def test_a_plugin_game_with_a_frozen_opponent_plays_unchanged_on_two_processes(tiny_model_dir, tmp_path):
    """The plugin guide's `rival` game, as a user saves it, written against the interfaces with no thought of
    processes: every process freezes the same adapter and plays the same rounds, and the resume restores it."""
    from test_registry import guide_files

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "rival.py").write_text(guide_files()["rival.py"])
    run, env = tmp_path / "run", {"ARENA_PLUGINS_DIR": str(plugins)}
    args = ["-m", "arena", "play", "rival", f"model.path={tiny_model_dir}", f"run.dir={run}", "run.loggers=[plain]",
            "model.lora.r=4", "game.max_new_tokens=4", "game.refresh_every=1", "run.eval_every=0"]
    first = launch([*args, "run.iterations=2"], env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = launch(["-m", "arena", "play", "rival", "--resume", str(run), "run.iterations=3"], env=env)
    assert again.returncode == 0 and "on 2 processes" in again.stdout, again.stderr[-3000:]
    samples = list(read_jsonl(run / "samples.jsonl"))
    assert [s["iteration"] for s in samples if s["role"] == "rival"] == [i for i in (1, 2, 3) for _ in range(4)]
    assert (run / "checkpoints" / "000003" / "adapter" / "frozen" / "rival.safetensors").is_file()


@pytest.mark.parametrize("override, words", [
    ("optimizer.lr=-1", "optimizer.lr"),
    ("game.dataset=/nonexistent/prompts.jsonl", "game.dataset: /nonexistent/prompts.jsonl: no such file"),
])
def test_a_config_or_data_error_is_one_line_and_every_process_exits_2(tiny_model_dir, tmp_path, override, words):
    """Every process finds the error when the config resolves; process 0 alone prints it, and no folder is made."""
    run = tmp_path / "run"
    out = launch(["-m", "arena", "play", "prompts", f"model.path={tiny_model_dir}", f"run.dir={run}", *FAST,
                  override])
    errors = [line for line in out.stderr.splitlines() if line.startswith("arena: error:")]
    assert len(errors) == 1 and words in errors[0], out.stderr[-3000:]
    # the launcher reports the first process to exit (2) and stops any other still running
    assert out.returncode != 0 and "exitcode  : 2" in out.stderr
    assert not arena_traceback(out.stderr) and not run.exists()


def test_a_device_index_under_a_launcher_is_refused(tiny_model_dir, tmp_path):
    """model.device=cuda:0 would put every process on one GPU: refused before any model loads (checked before the
    device is looked for, so on a machine without a GPU too)."""
    out = launch(["-m", "arena", "play", "prompts", f"model.path={tiny_model_dir}", f"run.dir={tmp_path / 'run'}",
                  *FAST, "model.device=cuda:0"])
    errors = [line for line in out.stderr.splitlines() if line.startswith("arena: error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "model.device: cuda:0 would put all 2 processes on one GPU" in errors[0]


@pytest.mark.parametrize("judge", ["llm_judge", "pairwise", "reward_model",
                                   "{name: mix, judges: [{name: self_reward, weight: 1.0}, "
                                   "{name: exact_match, weight: 0.5}]}"])
def test_every_judge_scores_a_split_round(tiny_model_dir, reward_model_dir, tmp_path, judge):
    """The judges the built-in games do not use by default, each judging a round split across two processes (the
    reward model loads its own model on each)."""
    more = [f"judge.path={reward_model_dir}"] if judge == "reward_model" else []
    run = tmp_path / "run"
    out = launch(["-m", "arena", "play", "prompts", f"model.path={tiny_model_dir}", f"run.dir={run}",
                  "run.iterations=1", *FAST, f"judge={judge}", *more])
    assert out.returncode == 0, out.stderr[-3000:]
    samples = list(read_jsonl(run / "samples.jsonl"))
    assert len(samples) == 8 and all(isinstance(s["reward"], float) for s in samples), samples[0]


def test_an_error_every_process_raised_is_printed_by_process_0_only(monkeypatch, capsys):
    """What decides who prints: a marked error (every process raised it) only on process 0, another process's own
    error there, named; a re-raise keeps the mark of its cause."""
    import arena.cli as cli
    from arena.distributed import everywhere
    from arena.errors import ArenaError

    shared = everywhere(ArenaError("the gradient norm is nan"))
    assert shared.arena_process == 0
    assert everywhere(ArenaError("iteration 3: more words"), shared).arena_process == 0
    assert not hasattr(everywhere(ArenaError("x"), ArenaError("a process's own")), "arena_process")

    def failing(error):
        monkeypatch.setattr(cli, "build_parser", lambda registry: (_ for _ in ()).throw(error))

    for rank, error, printed in [(1, shared, ""), (0, shared, "arena: error: the gradient norm is nan"),
                                 (1, ArenaError("disk full"), "arena: error: process 1: disk full")]:
        monkeypatch.setattr(cli, "PROCESS", rank)
        failing(error)
        assert cli._main(["list"]) == 2
        assert capsys.readouterr().err.strip() == printed
