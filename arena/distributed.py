"""Data-parallel runs: several processes, started by `torchrun` or `accelerate launch` (gloo on CPU, NCCL on GPU,
one device per process), play one run.

Every process runs the same loop on the same config and holds the same state: the game, the weights, the
iteration. What is split is the work inside a round. Each call that generates, judges or executes is divided by
item across the processes, and the results are gathered, so that every process sees the whole round in the order
one process would (`Sharded*` below): games never see ranks. The optimizer gives each process a share of the
round's micro-batches and sums the gradients and its metric sums over all of them before one identical AdamW step.
Process 0 alone writes the run folder and calls the lifecycle hooks.

An error in a shared step is raised on every process (the first by rank), so that all of them stop together and
process 0 alone reports it; a process that dies makes the others' next collective fail, within the collective
timeout at most (`ARENA_DIST_TIMEOUT`, seconds, default 1800; a closed connection is noticed at once).

A plain process is `SOLO`, a group of one whose methods are the plain computation, with no torch.distributed call.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from arena.errors import ArenaError

TIMEOUT_ENV = "ARENA_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0


class PeerStopped(ArenaError):
    """A collective failed because another process of the run stopped (killed, or it raised on its own)."""


class Group:
    """The processes of one run; this one is a group of one."""

    rank = 0
    size = 1

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder (and reports errors)."""
        return self.rank == 0

    def share(self, count: int) -> range:
        """This process's contiguous share of `count` items (sizes differ by at most one)."""
        return range(count * self.rank // self.size, count * (self.rank + 1) // self.size)

    def mine(self, count: int) -> list[int]:
        """This process's strided share of `count` items: for micro-batches, which vary in cost along a list."""
        return list(range(self.rank, count, self.size))

    def gather(self, fn: Callable[[list[Any]], list[Any]], items: Sequence[Any]) -> list[Any]:
        """`fn` of every item, in order: each process runs `fn` on its share and the results are gathered."""
        return fn(list(items))

    @property
    def splitting(self) -> bool:
        """Whether a sharded component's call is split now (not within `local`)."""
        return False

    def smallest(self, value: int) -> int:
        """The smallest of every process's `value`: a setting each derives from its own device, made one."""
        return value

    def agree(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on every process; an error on any of them is raised on all of them."""
        return fn()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on process 0 only and hand its result (or its error) to every process."""
        return fn()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the processes."""
        return list(values)

    def sum_gradients(self, params: Sequence[Any]) -> None:
        """Every parameter's gradient summed over the processes (a missing one counts as zeros)."""

    def check_same(self, what: str, digest: str) -> None:
        """Raise unless every process has the same `digest` of `what`."""

    def check_device(self, device: str) -> None:
        """Refuse a `model.device` that would put every process of a run on one GPU."""

    @contextlib.contextmanager
    def local(self) -> Iterator[None]:
        """Within: sharded components run on this process's items only (a share being worked on, a training
        pass), so a call nested in a sharded one is not split again."""
        yield

    def close(self, finished: bool = True) -> None:
        """Leave the group; `finished`: every process got here without an error, so wait for all of them first."""


SOLO = Group()


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def join(device: str = "auto") -> Group:
    """The group this process belongs to: SOLO unless launched as one of several, else it joins them (the
    rendezvous address and ranks come from the launcher's environment). `device`: the model's device setting."""
    check_launch(os.environ)
    if not launched():
        return SOLO
    return Processes(device)


def check_launch(env: Any) -> None:
    """Refuse, in one line, the launches arena cannot serve: a model sharded over the processes (FSDP, DeepSpeed),
    processes started by mpirun, and accelerate's `--cpu` with several processes, which starts only one."""
    for flag, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if env.get(flag, "").lower() in ("1", "true", "yes"):
            raise ArenaError(f"{what} (accelerate's {flag}) is not supported yet: each process holds the whole "
                             "model; launch without it (data-parallel) or use a model that fits one device")
    if int(env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", "1")) or 1) > 1 and "WORLD_SIZE" not in env:
        raise ArenaError("started by mpirun, which arena does not join; launch with torchrun or accelerate launch "
                         "--multi_gpu --num_processes N (on a CPU too: gloo)")
    if env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        raise ArenaError("accelerate launch --cpu with several processes starts only one (it expects mpirun); "
                         "use accelerate launch --multi_gpu --num_processes N, which starts N CPU processes with gloo "
                         "where there is no GPU, or torchrun")


class Processes(Group):
    """One of several processes of a run, over torch.distributed."""

    def __init__(self, device: str = "auto"):
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        raw = os.environ.get(TIMEOUT_ENV, "")
        try:
            timeout = float(raw) if raw else DEFAULT_TIMEOUT
        except ValueError:
            timeout = -1.0
        if not timeout > 0:
            raise ArenaError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
        cuda = torch.cuda.is_available()
        if cuda:  # one device per process: "cuda" below means this process's own
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():  # CPU tensors go over gloo, GPU tensors over NCCL (a CPU model on a GPU host)
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
        self.dist = dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self._local = 0

    # -- the collectives, each failure of a peer turned into PeerStopped ------------------------------------

    def _collective(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RuntimeError as exc:  # gloo and NCCL report a peer's death as RuntimeError (DistBackendError)
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise PeerStopped(f"another process of this run stopped during {what} ({first})") from None

    def _all_objects(self, value: Any, what: str) -> list[Any]:
        out: list[Any] = [None] * self.size
        self._collective(what, lambda: self.dist.all_gather_object(out, value))
        return out

    def _outcome(self, fn: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            return True, fn()
        except Exception as exc:  # noqa: BLE001 - handed to every process, raised there
            return False, _portable(exc, self.rank)

    @staticmethod
    def _raise_first(outcomes: list[tuple[bool, Any]]) -> None:
        for ok, value in outcomes:
            if not ok:
                raise value

    @property
    def splitting(self) -> bool:
        return self._local == 0

    def smallest(self, value: int) -> int:
        return min(self._all_objects(value, "a shared setting"))

    def gather(self, fn: Callable[[list[Any]], list[Any]], items: Sequence[Any]) -> list[Any]:
        if self._local:
            return fn(list(items))
        items = list(items)
        share = items[self.share(len(items)).start:self.share(len(items)).stop]

        def run() -> list[Any]:
            with self.local():
                return fn(share) if share else []
        outcomes = self._all_objects(self._outcome(run), "a sharded call")
        self._raise_first(outcomes)
        return [x for _, part in outcomes for x in part]

    def agree(self, fn: Callable[[], Any]) -> Any:
        outcome = self._outcome(fn)
        self._raise_first(self._all_objects((outcome[0], None if outcome[0] else outcome[1]), "a shared step"))
        return outcome[1]

    def on_main(self, fn: Callable[[], Any]) -> Any:
        box = [self._outcome(fn) if self.main else None]
        self._collective("a step of process 0", lambda: self.dist.broadcast_object_list(box, src=0))
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def sum(self, values: Sequence[float]) -> list[float]:
        import torch

        if not values:
            return []
        t = torch.tensor(list(values), dtype=torch.float64)
        self._collective("a metric sum", lambda: self.dist.all_reduce(t))
        return t.tolist()

    def sum_gradients(self, params: Sequence[Any]) -> None:
        import torch

        if not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=params[0].dtype, device=params[0].device)
        flat = torch.cat([*((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params),
                          has])
        self._collective("the gradient sum", lambda: self.dist.all_reduce(flat))
        offset = 0
        for p, anyone in zip(params, flat[-len(params):].tolist()):
            n = p.numel()  # a parameter no process has a gradient for stays without one, as AdamW expects
            p.grad = flat[offset:offset + n].view_as(p).clone() if anyone else None
            offset += n

    def check_device(self, device: str) -> None:
        if device.startswith("cuda:"):
            raise _from(0, ArenaError(f"model.device: {device} would put all {self.size} processes on one GPU; write "
                                      "model.device=cuda (or auto): each process then uses its own GPU, LOCAL_RANK"))

    def check_same(self, what: str, digest: str) -> None:
        digests = self._all_objects(digest, f"the check of {what}")
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:  # found by every process: reported once, by process 0
            raise _from(0, ArenaError(f"{what} differs between process 0 and process {differ[0]}: the processes of "
                                      "a run must hold the same state (a game that decides with its own randomness "
                                      "instead of ctx.rng, or keeps state in a hook, which runs on process 0 "
                                      "only?)"))

    @contextlib.contextmanager
    def local(self) -> Iterator[None]:
        self._local += 1
        try:
            yield
        finally:
            self._local -= 1

    def close(self, finished: bool = True) -> None:
        if not self.dist.is_initialized():
            return
        if finished:  # none leaves while another still works (process 0 writing the last checkpoint)
            self._collective("the end of the run", self.dist.barrier)
        self.dist.destroy_process_group()


def _portable(exc: Exception, rank: int) -> Exception:
    """An exception as another process can receive it: itself when it pickles, else an ArenaError with its text;
    marked with the process it came from (`arena_process`), so that only process 0 reports it."""
    try:
        pickle.loads(pickle.dumps(exc))
        portable = exc
    except Exception:  # noqa: BLE001 - an exception holding something unpicklable, or one built from other args
        portable = ArenaError(str(exc) if isinstance(exc, ArenaError) else f"{type(exc).__name__}: {exc}")
    return _from(rank, portable)


def _from(rank: int, exc: Exception) -> Exception:
    """Mark an error that every process raises with the process it came from; only process 0 reports it."""
    exc.arena_process = rank  # type: ignore[attr-defined]
    return exc


def everywhere(exc: Exception, cause: BaseException | None = None) -> Exception:
    """`exc`, marked as raised by every process: as `cause` was (an error re-raised with more words), or, with no
    cause, because every process computed it from the same values (a step's non-finite gradient)."""
    origin = getattr(cause, "arena_process", None) if cause is not None else 0
    if origin is not None:
        exc.arena_process = origin  # type: ignore[attr-defined]
    return exc


def digest(*parts: Any) -> str:
    """A short fingerprint of JSON-able values and tensors, for `check_same`."""
    import json

    import torch

    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# -- components whose calls are split across the processes -------------------------------------------------------

def sharded(kind: str, component: Any, group: Group) -> Any:
    """`component` with its per-item calls split across the group's processes (itself in a plain process)."""
    if group.size == 1:
        return component
    wrapper = {"backend": ShardedPolicy, "judge": ShardedJudge, "executor": ShardedExecutor}.get(kind)
    return wrapper(component, group) if wrapper else component


class _Sharded:
    """Delegates everything it does not split to the component it wraps."""

    def __init__(self, inner: Any, group: Group):
        self.__dict__["inner"], self.__dict__["group"] = inner, group

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # what a game asks of a component's class (isinstance, __class__) is the component's
        return type(self.inner)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)


class ShardedPolicy(_Sharded):
    """Generation and scoring split by sample: the round's (prompt, copy) slots are divided into contiguous
    ranges, so that one prompt with many samples (a Challenger's queries) is shared out too."""

    def generate(self, prompts: Sequence[Any], *, n: int = 1, **kwargs: Any) -> list[list[Any]]:
        if not self.group.splitting:
            return self.inner.generate(prompts, n=n, **kwargs)
        slots = [i for i in range(len(prompts)) for _ in range(n)]
        before = self.inner.generated_tokens
        flat = self.group.gather(
            lambda mine: [g for (g,) in self.inner.generate([prompts[i] for i in mine], n=1, **kwargs)], slots)
        mine = self.inner.generated_tokens - before  # the progress line counts every process's tokens
        self.inner.generated_tokens += sum(len(g.completion_ids) for g in flat) - mine
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def next_token_logprobs(self, prompts: Sequence[list[int]], candidates: Sequence[int], **kwargs: Any) -> Any:
        import torch

        if not self.group.splitting:
            return self.inner.next_token_logprobs(prompts, candidates, **kwargs)
        rows = self.group.gather(lambda mine: [(row.cpu(), str(row.device)) for row in
                                               self.inner.next_token_logprobs(mine, candidates, **kwargs)],
                                 list(prompts))
        if not rows:
            return self.inner.next_token_logprobs([], candidates, **kwargs)
        return torch.stack([row for row, _ in rows]).to(rows[0][1])  # where the backend returns it

    def sequence_logprobs(self, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]],
                          **kwargs: Any) -> Any:
        import torch

        if not self.group.splitting or (torch.is_grad_enabled() and not kwargs.get("reference")):
            return self.inner.sequence_logprobs(prompt_ids, completion_ids, **kwargs)  # never split: training

        def score(mine: list[tuple[list[int], list[int]]]) -> list[Any]:
            out = self.inner.sequence_logprobs([p for p, _ in mine], [c for _, c in mine], **kwargs).cpu()
            return [row[:len(c)] for row, (_, c) in zip(out, mine)]
        rows = self.group.gather(score, list(zip(prompt_ids, completion_ids)))
        width = max((len(c) for c in completion_ids), default=0)
        out = torch.zeros(len(rows), width)
        for i, row in enumerate(rows):
            out[i, :len(row)] = row
        return _on_device(out.to(rows[0].dtype) if rows else out, self.inner)


class ShardedJudge(_Sharded):
    """Verdicts split by item; a judge that asks the policy runs its share locally."""

    def judge(self, items: Sequence[Any]) -> list[Any]:
        return self.group.gather(self.inner.judge, list(items))

    def compare(self, comparisons: Sequence[Any]) -> list[Any]:
        return self.group.gather(self.inner.compare, list(comparisons))


class ShardedExecutor(_Sharded):
    """Jobs split across the processes: each program runs once, and every process sees the same result."""

    def run(self, jobs: Sequence[Any]) -> list[Any]:
        return self.group.gather(self.inner.run, list(jobs))


def _on_device(tensor: Any, policy: Any) -> Any:
    device = getattr(policy, "device", None)
    return tensor.to(device) if isinstance(device, str) else tensor
