"""Built-in commands that work on runs, registered through the same `register_commands` hook a plugin's commands
use: `arena eval RUN [RUN ...]` (held-out scores with intervals and win rates against the base model),
`arena export RUN OUT` (the trained model as a plain transformers folder) and `arena report RUN [RUN ...]` (plots,
a summary and the best and worst samples)."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from arena.config import folder_problem
from arena.errors import ArenaError
from arena.hookspecs import hookimpl


def configure_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("targets", nargs="+", metavar="RUN_OR_CHECKPOINT [key=value]",
                        help="run folders, checkpoint folders (RUN/checkpoints/000010) or their adapter folders; "
                             "then config overrides for every run (judge=llm_judge judge.model=...) and the win "
                             "rate's judge (compare=exact_match, compare.model=...; default: pairwise)")
    parser.add_argument("--checkpoint", type=int, metavar="ITERATION",
                        help="the checkpoint of each run folder (default: the newest complete one)")
    parser.add_argument("--prompts", metavar="FILE",
                        help="a JSONL of {\"prompt\", \"answer\"} to use as the held-out set, scored by the "
                             "run's judge, instead of the game's own")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="answer length for --prompts (default 128)")
    parser.add_argument("--out", metavar="FILE",
                        help="write the results JSON here instead of into each run's evals/ folder")
    parser.set_defaults(overrides=[])  # key=value items after an option land here (arena.cli.main)


def split_eval_args(targets: list[str]) -> tuple[list[str], list[str], dict[str, Any]]:
    """Run paths, run-config overrides and the compare judge's spec from `arena eval`'s positional arguments."""
    from arena.config import parse_dotlist

    paths = [t for t in targets if "=" not in t]
    overrides = [t for t in targets if "=" in t and not t.split("=", 1)[0].split(".")[0] == "compare"]
    compare: dict[str, Any] = {"name": "pairwise"}
    for item in targets:
        if "=" in item and item.split("=", 1)[0].split(".")[0] == "compare":
            value = parse_dotlist([item])["compare"]
            compare = {"name": value} if isinstance(value, str) else {**compare, **value}
    if not paths:
        raise ArenaError("arena eval: name at least one run folder or checkpoint")
    return paths, overrides, compare


def run_eval(args: argparse.Namespace) -> int:
    """Score the runs and the base on one held-out set, print the table and write the results beside each run.
    Under a launcher the held-out items are split across the processes; process 0 prints and writes."""
    from arena.distributed import join

    group = join()
    finished = False
    try:
        code = _eval(args, group)
        finished = True
        return code
    finally:
        group.close(finished)


def _eval(args: argparse.Namespace, group: Any) -> int:
    from rich.console import Console
    from rich.table import Table

    from arena.config import validate_component
    from arena.evaluate import INTERVAL, PromptFile, check_overrides, evaluate_runs, table_rows, write_results
    from arena.registry import load_registry
    from arena.runs import open_target

    def prepare() -> tuple[Any, ...]:  # on every process; an error on any of them is reported once
        paths, overrides, compare = split_eval_args([*args.targets, *args.overrides])
        if args.max_new_tokens is not None and not args.prompts:
            raise ArenaError(f"--max-new-tokens {args.max_new_tokens}: sets the answer length for --prompts only; "
                             "the game's own held-out set uses the run's settings")
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise ArenaError(f"--max-new-tokens {args.max_new_tokens}: expected a positive number of tokens")
        prompts = (PromptFile(args.prompts, args.max_new_tokens or 128) if args.prompts
                   else None)  # read before any model loads
        check_overrides(overrides)
        registry = load_registry()
        validate_component(registry, "judge", compare, "compare")
        return registry, compare, prompts, [open_target(p, registry, args.checkpoint, overrides) for p in paths]
    registry, compare, prompts, runs = group.agree(prepare)
    out = Path(args.out) if args.out else None

    def check_writable() -> None:  # process 0 writes the results
        if out is not None and out.is_dir():
            raise ArenaError(f"--out {out}: is a folder; expected the path of a JSON file to write")
        for folder, key in ([(out.parent, "--out")] if out else
                            [(run.dir / "evals", f"RUN {run.dir}") for run in runs]):
            problem = folder_problem(folder)  # before minutes of evaluation whose results would then be lost
            if problem:
                raise ArenaError(f"{key}: cannot write the results to {folder}: {problem}"
                                 + ("" if out else "; give --out FILE to write them elsewhere"))
    group.on_main(check_writable)
    say = (lambda line: print(line, flush=True)) if group.main else (lambda line: None)
    results = evaluate_runs(runs, registry, compare, prompts, say=say, group=group)
    if not group.main:
        return 0
    header, rows = table_rows(results)
    table = Table(title=f"{results['held_out']} ({INTERVAL})")
    for col in header:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console(width=max(100, Console().width)).print(table)
    print("wrote " + ", ".join(str(p) for p in write_results(results, runs, out)))
    return 0


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
    problem = folder_problem(out)  # before the model loads
    if problem:
        raise ArenaError(f"OUT {out}: {problem}")
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
    except Exception as exc:  # noqa: BLE001 - writing the model failed (a full disk: an OSError, or safetensors')
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ArenaError(f"OUT {out}: cannot write the model there ({reason}); nothing was left behind") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        policy.close()
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
    problem = args.out and folder_problem(args.out)
    if problem:
        raise ArenaError(f"--out {args.out}: {problem}")
    files, lines = report(args.runs, args.out, iterations, load_registry())
    print("\n".join(lines))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


@hookimpl
def register_commands(register: Any) -> None:
    register("eval", run_eval, help="Score trained runs and the base model on held-out work, with 95% intervals "
                                    "and win rates against the base.", configure=configure_eval)
    register("report", run_report, help="Plot runs per iteration, summarise them and show their best and worst "
                                        "samples.", configure=configure_report)
    register("export", run_export, help="Save a run's model with its adapter merged, as a plain transformers "
                                        "folder.", configure=configure_export)
