"""Built-in loggers: `console` (a live rich status line plus a line per iteration), `plain` (the lines only, for
logs and CI), `csv` (metrics.csv in the run folder), `tensorboard` (event files, with the `tensorboard` extra) and
`wandb` (offline Weights & Biases files, with the `wandb` extra).
Loggers are plugins registered for the length of a run, so they see every lifecycle hook."""

from __future__ import annotations

import csv
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from arena.errors import ArenaError
from arena.hookspecs import hookimpl
from arena.interfaces import Logger

SUMMARY_KEYS = ("kl", "loss")


def summary_line(run: Any, step: int, metrics: dict[str, float]) -> str:
    """`it 3/10  reward/assistant 2.31  kl 0.0012  loss -0.010  eval/score 3.1  12.3s` (mean reward per role)."""
    parts = [f"it {step}/{run.iterations}"]
    for key in sorted(k for k in metrics if k.startswith("reward/")):
        parts.append(f"{key} {metrics[key]:.3f}")
    for key in sorted(k for k in metrics if k.startswith("invalid/") and metrics[k]):
        parts.append(f"{key} {int(metrics[key])}")
    baseline = getattr(run, "baseline", {}) if step > 0 else {}
    evals = sorted(k for k in metrics if k.startswith("eval/") and k != "eval/valid_frac")
    for key in (*getattr(run.game, "headline_metrics", ()), *SUMMARY_KEYS, *evals):
        if key in metrics:
            change = f" ({metrics[key] - baseline[key]:+.3g} since it 0)" if key in baseline else ""
            parts.append(f"{key} {metrics[key]:.4g}{change}")
    parts.append("before training" if step == 0 else f"{metrics.get('time/iteration', 0.0):.1f}s")
    return "  ".join(parts)


def note_text(text: str, width: int = 110) -> str:
    """One line of at most `width` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


class PlainLogger(Logger):
    """One line per iteration on stdout, no live display."""

    def _print(self, text: str) -> None:
        print(text, flush=True)

    @hookimpl
    def arena_run_start(self, run: Any) -> None:
        first = "starting" if run.start_iteration == 1 else f"resuming at iteration {run.start_iteration}"
        processes = getattr(run, "processes", 1)
        self._print(f"{first}: {run.config.game.name} for {run.iterations} iterations in {run.dir}"
                    f"{f' on {processes} processes' if processes > 1 else ''}")

    @hookimpl
    def arena_metrics(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        self._print(summary_line(run, step, metrics))
        for key, text in getattr(run, "notes", {}).items():
            self._print(f"  {key}: {note_text(text)}")

    @hookimpl
    def arena_run_end(self, run: Any, error: BaseException | None) -> None:
        if error is not None and not run.resumable:
            what = "interrupted" if isinstance(error, KeyboardInterrupt) else "stopped by an error"
            print(f"{what} at iteration {run.iteration}, before the first checkpoint: nothing was kept (the new "
                  f"folder {run.dir} is removed); start the run again", file=sys.stderr, flush=True)
        elif isinstance(error, KeyboardInterrupt):
            print(f"interrupted; continue with: arena play {run.config.game.name} --resume {run.dir}",
                  file=sys.stderr, flush=True)
        elif error is not None:
            print(f"stopped by an error at iteration {run.iteration}; finished rounds are saved; after fixing "
                  f"it: arena play {run.config.game.name} --resume {run.dir}", file=sys.stderr, flush=True)


class ConsoleLogger(PlainLogger):
    """A live status line (iteration, phase, tokens/s) and a rich line per iteration."""

    def __init__(self, options: Any, env: Any):
        super().__init__(options, env)
        from rich.console import Console

        self.console = Console()
        self.status = None
        self.last_rate = ""

    def _print(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)  # model text may hold "[/x]"

    def _show(self, run: Any, phase: str) -> None:
        if self.status is not None:
            self.status.update(f"iteration {run.iteration}/{run.iterations} · {phase}{self.last_rate}")

    @hookimpl
    def arena_run_start(self, run: Any) -> None:
        super().arena_run_start(run)
        if self.console.is_terminal:
            self.status = self.console.status("starting")
            self.status.start()

    @hookimpl
    def arena_phase_start(self, run: Any, phase: str) -> None:
        self._show(run, phase)

    @hookimpl
    def arena_phase_end(self, run: Any, phase: str, seconds: float, tokens: int) -> None:
        if tokens and seconds > 0:
            self.last_rate = f" · {tokens / seconds:.0f} tok/s"

    @hookimpl
    def arena_checkpoint_saved(self, run: Any, iteration: int, path: str) -> None:
        self._show(run, "checkpoint saved")

    @hookimpl
    def arena_run_end(self, run: Any, error: BaseException | None) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None
        super().arena_run_end(run, error)


def write_metrics_csv(metrics_jsonl: Path, out: Path) -> None:
    """metrics.jsonl as a table: one row per iteration, one column per metric (empty where an iteration has none),
    written beside and renamed into place."""
    from arena.runstore import read_jsonl

    records = list(read_jsonl(metrics_jsonl))
    columns = ["iteration", *sorted({k for r in records for k in r} - {"iteration"})]
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in records)
    tmp.replace(out)


class CSVLogger(Logger):
    """metrics.csv in the run folder, for spreadsheets and pandas, always matching metrics.jsonl.

    Rewritten from metrics.jsonl after every iteration, so it holds what the run store holds (a resumed run's
    replayed rounds once)."""

    @hookimpl
    def arena_metrics(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        write_metrics_csv(Path(run.dir) / "metrics.jsonl", Path(run.dir) / "metrics.csv")


TENSORBOARD_INSTALL = "pip install 'arena-selfplay[tensorboard]'"


class TensorBoardLogger(Logger):
    """TensorBoard event files in <run>/tensorboard, a scalar per metric and iteration.

    View them with `tensorboard --logdir runs`. A resumed run drops the steps it replays from the earlier files
    (`purge_step`)."""

    def __init__(self, options: Any, env: Any):
        super().__init__(options, env)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ArenaError(f"run.loggers: tensorboard needs the tensorboard package; run `{TENSORBOARD_INSTALL}`") \
                from None
        self._writer_class = SummaryWriter
        self.writer: Any = None

    @hookimpl
    def arena_run_start(self, run: Any) -> None:
        purge = run.start_iteration if run.start_iteration > 1 else None
        self.writer = self._writer_class(log_dir=str(Path(run.dir) / "tensorboard"), purge_step=purge)

    @hookimpl
    def arena_metrics(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    @hookimpl
    def arena_run_end(self, run: Any, error: BaseException | None) -> None:
        if self.writer is not None:
            self.writer.close()


WANDB_INSTALL = "pip install 'arena-selfplay[wandb]'"


def finite_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers a tracker can plot (metrics.jsonl writes the others as null)."""
    return {k: v for k, v in metrics.items() if k != "iteration" and isinstance(v, (int, float)) and math.isfinite(v)}


class WandbLogger(Logger):
    """An offline Weights & Biases run in <run>/wandb, never the network; `wandb sync` uploads it.

    It holds the resolved config (config.yaml) and a history row per iteration at step = iteration; project
    $WANDB_PROJECT or `arena`, name the run folder's; `wandb sync <run>/wandb/offline-run-*` uploads it, if ever.

    Never the network: besides the run's offline mode, WANDB_MODE=offline and WANDB_ERROR_REPORTING=false are set
    for this process, as W&B's analytics read those (not the run's settings) and would otherwise probe its server.
    W&B cannot drop logged steps, so each start, a resume's too, writes the folder anew under the same run id
    (<run>/wandb/run_id): the iterations metrics.jsonl holds, then the live ones. As with `tensorboard`'s
    purge_step, the files hold what the run store holds: a replayed iteration once, with its new values."""

    def __init__(self, options: Any, env: Any):
        super().__init__(options, env)
        try:
            import wandb
        except ImportError:
            raise ArenaError(f"run.loggers: wandb needs the wandb package; run `{WANDB_INSTALL}`") from None
        os.environ["WANDB_MODE"] = "offline"  # read when W&B sets up; else its analytics would probe the server
        os.environ["WANDB_ERROR_REPORTING"] = "false"
        os.environ["WANDB_SILENT"] = "true"  # also what older versions print before reading their settings
        self._wandb = wandb
        self.wb: Any = None

    @hookimpl
    def arena_run_start(self, run: Any) -> None:
        import yaml

        from arena.runstore import read_jsonl

        root = Path(run.dir).resolve()
        folder, id_file = root / "wandb", root / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        settings = self._wandb.Settings(mode="offline", silent=True, console="off",  # arena's display stays whole
                                        x_disable_stats=True, x_disable_machine_info=True)  # no system probes
        self.wb = self._wandb.init(dir=str(root), id=run_id, project=os.environ.get("WANDB_PROJECT", "arena"),
                                   name=root.name, config=yaml.safe_load((root / "config.yaml").read_text()),
                                   settings=settings)
        id_file.write_text(self.wb.id)
        for record in read_jsonl(root / "metrics.jsonl"):
            self.wb.log(finite_values(record), step=record["iteration"], commit=True)

    @hookimpl
    def arena_metrics(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        self.wb.log(finite_values(metrics), step=step, commit=True)

    @hookimpl
    def arena_run_end(self, run: Any, error: BaseException | None) -> None:
        if self.wb is not None:  # flushes the files and marks the run finished (or failed)
            self.wb.finish(exit_code=0 if error is None else 1)
            self.wb = None


@hookimpl
def register_loggers(register: Any) -> None:
    register("console", ConsoleLogger)
    register("plain", PlainLogger)
    register("csv", CSVLogger)
    register("tensorboard", TensorBoardLogger)
    register("wandb", WandbLogger)
