"""Built-in commands that work on runs, registered through the same `register_commands` hook a plugin's commands
use: `arena export RUN OUT` (the trained model as a plain transformers folder) and `arena report RUN [RUN ...]`
(plots, a summary and the best and worst samples)."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from arena.errors import ArenaError
from arena.hookspecs import hookimpl


def configure_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run folder (runs/<game>-<time>)")
    parser.add_argument("out", metavar="OUT", help="the folder to write; it must not exist or be empty")
    parser.add_argument("--checkpoint", type=int, metavar="ITERATION",
                        help="the checkpoint to export (default: the newest complete one)")


def run_export(args: argparse.Namespace) -> int:
    """Merge the checkpoint's adapter into the base model and save it where `from_pretrained(OUT)` loads it. The
    folder is written beside OUT and renamed into place, so OUT is either whole or absent."""
    from arena.registry import load_registry
    from arena.runs import open_run, trained_policy

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArenaError(f"OUT {out}: already exists and is not an empty folder; choose a new one")
    registry = load_registry()
    run = open_run(args.run, registry, args.checkpoint)
    policy = trained_policy(run, registry)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        policy.export_merged(str(tmp))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except NotImplementedError as exc:
        raise ArenaError(f"backend {run.resolved.config.backend.name}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {run.dir} at iteration {run.iteration} to {out} (load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def configure_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders; several are overlaid in each plot")
    parser.add_argument("--out", metavar="DIR", help="where to write the report (default: <first RUN>/report)")
    parser.add_argument("--iterations", metavar="I,J", help="iterations whose best and worst samples to show "
                                                             "(default: the first and the last)")


def run_report(args: argparse.Namespace) -> int:
    from arena.registry import load_registry
    from arena.report import report

    iterations = None
    if args.iterations:
        try:
            iterations = [int(x) for x in args.iterations.split(",") if x.strip()]
        except ValueError:
            raise ArenaError(f"--iterations {args.iterations}: expected iteration numbers separated by commas, "
                             "e.g. 1,10") from None
    files, lines = report(args.runs, args.out, iterations, load_registry())
    print("\n".join(lines))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


@hookimpl
def register_commands(register: Any) -> None:
    register("report", run_report, help="plot runs per iteration, summarise them and show their best and worst "
                                        "samples", configure=configure_report)
    register("export", run_export, help="save a run's model with its adapter merged, as a plain transformers "
                                        "folder", configure=configure_export)
