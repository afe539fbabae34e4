"""The `arena` command: list, play, config, and the commands plugins register.

Bad input (a key, a value, a file, a component name) prints one line naming it and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from arena.errors import ArenaError, ArenaWarning

EXIT_USAGE = 2
_default_showwarning = warnings.showwarning
EXIT_INTERRUPTED = 130
PROCESS = int(os.environ.get("RANK", "0") or 0)  # this process's rank in a launched run (0 when alone)


def _registry():
    from arena.registry import load_registry

    registry = load_registry()
    for name, error in registry.failed.items():
        print(f"arena: warning: plugin {name!r} failed to load: {error}", file=sys.stderr)
    return registry


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from arena.registry import KINDS

    registry = _registry()
    table = Table(title="arena components", show_lines=False)
    for col in ("kind", "name", "plugin", "description"):
        table.add_column(col)
    for kind in KINDS:
        for name in registry.names(kind):
            entry = registry.entries[kind][name]
            table.add_row(kind, name, entry.plugin, entry.help)
    for name, command in sorted(registry.commands.items()):
        table.add_row("command", name, command.plugin, command.help)
    for name, error in registry.failed.items():
        table.add_row("[red]failed[/red]", name, name, error)
    Console(width=max(100, Console().width)).print(table)
    return 0


def _resolve(args: argparse.Namespace, registry, base=None):
    from arena.config import resolve

    return resolve(registry, args.game, args.config or [], args.overrides or [], base=base)


def cmd_config(args: argparse.Namespace) -> int:
    from arena.config import flatten

    registry = _registry()
    resolved = _resolve(args, registry)
    if not args.sources:
        print(resolved.to_yaml(), end="")
        return 0
    flat = flatten(resolved.tree)
    width = max(len(k) for k in flat)
    for key, value in flat.items():
        source = resolved.sources.get(key) or _source_of(key, resolved.sources) or "schema default"
        print(f"{key.ljust(width)} = {json.dumps(value)}   # {source}")
    return 0


def _source_of(key: str, sources: dict) -> str | None:
    """The layer that set `key` or its nearest parent (a list or mapping set as a whole)."""
    while "." in key:
        key = key.rsplit(".", 1)[0]
        if key in sources:
            return sources[key]
    return None


def cmd_play(args: argparse.Namespace) -> int:
    from arena.distributed import join

    group = join()  # one of several processes (torchrun, accelerate launch), or alone
    finished = False
    try:
        code = _play(args, group)
        finished = code == 0  # an interrupted process does not wait for the others
        return code
    finally:
        group.close(finished)


def _play(args: argparse.Namespace, group: Any) -> int:
    from arena.config import check_resume_changes, load_file
    from arena.loop import play

    registry = _registry()

    def read_saved() -> dict[str, Any] | None:  # process 0's: the others may be on machines without the folder
        if not args.resume:
            return None
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise ArenaError(f"--resume {args.resume}: no config.yaml there; expected a run directory")
        base = load_file(str(saved), key=f"--resume {args.resume}:")
        played = base.get("game", {}).get("name") if isinstance(base.get("game"), dict) else None
        if played != args.game:
            raise ArenaError(f"--resume {args.resume}: that run plays {played!r}, not {args.game!r}")
        return base
    base = group.on_main(read_saved)

    def resolve() -> Any:  # on every process, so each checks its own data; an error anywhere stops them all
        resolved = _resolve(args, registry, base=base)
        if base is not None:
            check_resume_changes(_resolve(argparse.Namespace(game=args.game, config=[], overrides=[]), registry,
                                          base=base).tree, resolved.tree)
        return resolved
    resolved = group.agree(resolve)
    try:
        run_dir = play(registry, resolved, resume=args.resume, group=group)
    except KeyboardInterrupt:
        print("\narena: interrupted", file=sys.stderr)  # the run's logger says how to resume
        return EXIT_INTERRUPTED
    if group.main:
        print(f"run saved in {run_dir}")
    return 0


def build_parser(registry=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arena", description="Self-play training for language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("list", help="every registered game, judge, optimizer, backend and logger")
    p.set_defaults(func=cmd_list)

    for name, func, help_text in (("play", cmd_play, "play a game: self-play training"),
                                  ("config", cmd_config, "print the resolved config of a game")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("game", help="the game's name (see `arena list`)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optimizer.lr=3e-6")
        p.add_argument("--config", action="append", metavar="FILE", help="a YAML config layer (repeatable)")
        p.set_defaults(func=func)
    sub.choices["play"].add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    sub.choices["config"].add_argument("--sources", action="store_true", help="show which layer set each value")

    if registry is not None:
        for name, command in registry.commands.items():
            if name in sub.choices:
                continue
            p = sub.add_parser(name, help=command.help.replace("%", "%%"))  # argparse formats help with %
            if command.configure:
                command.configure(p)
            p.set_defaults(func=lambda args, _c=command: _c.run(args) or 0)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """ArenaWarnings are for the user: one line each, no source location, said by process 0 of a launched run
    (the others meet the same config and data)."""
    if issubclass(category, ArenaWarning):
        if PROCESS == 0:
            print(f"arena: warning: {message}", file=sys.stderr, flush=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def _quiet_libraries() -> None:
    """Keep transformers' progress bars and advice off the console (ARENA_VERBOSE=1 keeps them)."""
    if os.environ.get("ARENA_VERBOSE"):
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")


def main(argv: list[str] | None = None) -> int:
    from arena.distributed import launched

    code = _main(argv)
    if launched():
        # a launched process leaves now: its work is done and written, and the interpreter's teardown can abort
        # in gloo's threads now and then ("terminate called without an active exception"), which the launcher
        # would report as a failure of a run that finished
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _quiet_libraries()
    warnings.showwarning = _show_warning
    registry = None
    if not argv or argv[0] not in ("list", "play", "config"):
        from arena.registry import load_registry

        registry = load_registry()  # plugin commands: for the other sub-commands and the help that lists them
    try:
        parser = build_parser(registry)
        args, extra = parser.parse_known_args(argv)
        if extra:  # key=value overrides may follow options: `play lsp --resume DIR run.iterations=5`
            if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides = [*(args.overrides or []), *extra]
        return args.func(args) or 0
    except ArenaError as exc:
        origin = getattr(exc, "arena_process", None)  # an error every process of a launched run raised
        if PROCESS == 0:  # ... is reported once, by process 0; another's own error by it, named
            print(f"arena: error: {f'process {origin}: ' if origin else ''}{exc}", file=sys.stderr)
        elif origin is None:
            print(f"arena: error: process {PROCESS}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a full disk, a read-only folder, a path under /proc: one line naming the file
        if exc.strerror is None:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"arena: error: {where}{exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug: its traceback, once, from process 0 when every process raised it
        if PROCESS != 0 and getattr(exc, "arena_process", None) is not None:
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
