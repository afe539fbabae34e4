"""Plugin discovery and the registry of named components.

Entry points of the `arena` group are loaded one by one (pluggy's own loader stops at the first that raises): a
plugin that fails to import is recorded by name with its error and the others still load. Built-ins come through
the same group. Environment switches:
  ARENA_PLUGINS=a,b        load only these third-party entry points ("" loads none); built-ins always load
  ARENA_PLUGINS_DIR=dir    also load every *.py file in dir as a plugin (quick experiments, no packaging)
  ARENA_TRACE_PLUGINS=1    print every hook call and its result to stderr
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable

import pluggy

from arena import hookspecs
from arena.errors import ArenaError, ConfigError

DISTRIBUTION = "arena-selfplay"
KINDS = ("game", "judge", "optimizer", "backend", "logger")


@dataclass
class Entry:
    name: str
    obj: Any
    plugin: str
    help: str = ""


@dataclass
class Command:
    name: str
    run: Callable[[Any], int | None]
    plugin: str
    help: str = ""
    configure: Callable[[Any], None] | None = None


class Registry:
    """Named components by kind, each remembering the plugin that registered it."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self.commands: dict[str, Command] = {}
        self.failed: dict[str, str] = {}  # plugin name -> error

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: Any, path: str | None = None) -> Entry:
        path = path or kind
        if not isinstance(name, str) or name not in self.entries[kind]:
            allowed = ", ".join(self.names(kind)) or "(none registered)"
            raise ConfigError(f"{path}.name" if path else "name",
                              f"unknown {kind} {name!r}; expected one of: {allowed}")
        return self.entries[kind][name]

    def build(self, kind: str, spec: Any, env: Any, path: str | None = None) -> Any:
        """Validate `spec` ({name: X, ...options}) against X's Options and construct X(options, env)."""
        from arena.config import validate_component

        path = path or kind
        options, entry = validate_component(self, kind, spec, path)
        try:
            return entry.obj(options, env)
        except ConfigError as exc:  # a component's own key errors are relative to its section
            if exc.path == path or exc.path.startswith(path + "."):
                raise
            raise ConfigError(f"{path}.{exc.path}" if exc.path else path, exc.detail) from None

    def _collect(self, plugin_name: str) -> None:
        """Call the registration hooks of one plugin and file what it registers under its name."""
        plugin = self.pm.get_plugin(plugin_name)
        for kind in KINDS:
            hook_name = f"register_{kind}s"
            impl = getattr(plugin, hook_name, None)
            if impl is None:
                continue

            def register(name: str, obj: Any, help: str = "", _kind: str = kind) -> None:
                if name in self.entries[_kind]:
                    other = self.entries[_kind][name].plugin
                    raise ArenaError(f"{_kind} {name!r} is registered by both {other!r} and {plugin_name!r}")
                options = getattr(obj, "Options", None)
                if options is None or not is_dataclass(options):
                    raise ArenaError(f"{_kind} {name!r} from plugin {plugin_name!r} needs an `Options` dataclass")
                doc = help or next(iter((obj.__doc__ or "").strip().splitlines()), "")
                self.entries[_kind][name] = Entry(name, obj, plugin_name, doc)

            impl(register=register)
        impl = getattr(plugin, "register_commands", None)
        if impl is not None:
            def register_command(name: str, run: Callable, help: str = "", configure: Callable | None = None):
                if name in self.commands:
                    other = self.commands[name].plugin
                    raise ArenaError(f"command {name!r} is registered by both {other!r} and {plugin_name!r}")
                self.commands[name] = Command(name, run, plugin_name, help, configure)

            impl(register=register_command)


def _allowed_third_party() -> set[str] | None:
    raw = os.environ.get("ARENA_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def load_registry() -> Registry:
    """Load every plugin and collect what it registers. Failures are kept in `registry.failed`, not raised."""
    pm = pluggy.PluginManager("arena")
    pm.add_hookspecs(hookspecs)
    if os.environ.get("ARENA_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda msg: sys.stderr.write(msg))
        pm.enable_tracing()
    registry = Registry(pm)
    allowed = _allowed_third_party()
    for ep in importlib.metadata.entry_points(group="arena"):
        builtin = ep.dist is not None and ep.dist.name == DISTRIBUTION
        if not builtin and allowed is not None and ep.name not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue  # the same entry point seen twice (an editable install can list a dist twice)
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
            registry._collect(ep.name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the others down
            _forget(pm, registry, ep.name)
            registry.failed[ep.name] = f"{type(exc).__name__}: {exc}"
    plugins_dir = os.environ.get("ARENA_PLUGINS_DIR")
    if plugins_dir:
        for path in sorted(Path(plugins_dir).glob("*.py")):
            name = f"file:{path.name}"
            try:
                spec = importlib.util.spec_from_file_location(f"arena_local_plugin_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                pm.register(module, name=name)
                registry._collect(name)
            except Exception as exc:  # noqa: BLE001
                _forget(pm, registry, name)
                registry.failed[name] = f"{type(exc).__name__}: {exc}"
    return registry


def _forget(pm: pluggy.PluginManager, registry: Registry, name: str) -> None:
    """Undo a half-registered plugin so that a failure leaves no trace but its error."""
    if pm.get_plugin(name) is not None:
        pm.unregister(name=name)
    for entries in registry.entries.values():
        for key in [k for k, e in entries.items() if e.plugin == name]:
            del entries[key]
    for key in [k for k, c in registry.commands.items() if c.plugin == name]:
        del registry.commands[key]

