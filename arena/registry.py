"""Plugin discovery and the registry of named components.

Entry points of the `arena` group are loaded one by one (pluggy's own loader stops at the first that raises): a
plugin that fails to import is recorded by name with its error and the others still load. Built-ins come through
the same group. Environment switches:
  ARENA_PLUGINS=a,b        load only these third-party entry points ("" loads none); built-ins always load; a name
                           that matches no installed plugin is warned about (ArenaWarning)
  ARENA_PLUGINS_DIR=dir    also load every *.py file in dir as a plugin (quick experiments, no packaging); a dir
                           that is not a folder is warned about
  ARENA_TRACE_PLUGINS=1    print every hook call and its result to stderr, registration hooks included
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable

import pluggy

from arena import hookspecs
from arena.errors import ArenaError, ArenaWarning, ConfigError

DISTRIBUTION = "arena-selfplay"
KINDS = ("game", "judge", "optimizer", "backend", "logger", "executor")


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
        self.calls_hooks = True  # false on processes other than 0 of a several-process run

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    @property
    def hooks(self) -> "RunHooks":
        """The run's lifecycle hooks (`registry.hooks.arena_run_start(run=...)`), with a plugin's failure turned
        into one error naming the plugin and the hook."""
        return RunHooks(self.pm) if self.calls_hooks else NoHooks()

    def get(self, kind: str, name: Any, path: str | None = None) -> Entry:
        path = path or kind
        if not isinstance(name, str) or name not in self.entries[kind]:
            allowed = ", ".join(self.names(kind)) or "(none registered)"
            raise ConfigError(f"{path}.name" if path else "name",
                              f"unknown {kind} {name!r}; expected one of: {allowed}")
        return self.entries[kind][name]

    def build(self, kind: str, spec: Any, env: Any, path: str | None = None) -> Any:
        """Construct X(options, env) from `spec`: a resolved `Component` (validated once, when the config
        resolved) or a plain {name: X, ...options}, validated here against X's Options."""
        from arena.config import Component, validate_component

        path = path or kind
        if isinstance(spec, Component):
            options, entry = spec.options, self.get(kind, spec.name, path)
        else:
            options, entry = validate_component(self, kind, spec, path)
        try:
            component = entry.obj(options, env)
        except ConfigError as exc:  # a component's own key errors are relative to its section
            if exc.path == path or exc.path.startswith(path + "."):
                raise
            raise ConfigError(f"{path}.{exc.path}" if exc.path else path, exc.detail) from None
        group = getattr(env, "group", None)
        if group is not None and group.size > 1:  # one of several processes: split its calls across them
            from arena.distributed import sharded

            component = sharded(kind, component, group)
        return component

    def _collect(self, plugin_name: str) -> None:
        """Call the registration hooks of one plugin and file what it registers under its name. The hooks are
        called through pluggy (so ARENA_TRACE_PLUGINS traces them), with every other plugin left out: that is
        what attributes each name to its plugin, and one plugin's error cannot stop another's registration."""
        plugin = self.pm.get_plugin(plugin_name)
        _check_hooks(self.pm, plugin, plugin_name)
        others = [p for name, p in self.pm.list_name_plugin() if name != plugin_name]

        def call(hook_name: str, register: Callable[..., None]) -> None:
            if any(impl.plugin is plugin for impl in getattr(self.pm.hook, hook_name).get_hookimpls()):
                register.__qualname__ = f"register for {plugin_name!r}"  # whose call it is, in traces
                self.pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)

        for kind in KINDS:
            def register(name: str, obj: Any, help: str = "", _kind: str = kind) -> None:
                if name in self.entries[_kind]:
                    other = self.entries[_kind][name].plugin
                    raise ArenaError(f"{_kind} {name!r} is registered by both {other!r} and {plugin_name!r}")
                options = getattr(obj, "Options", None)
                if options is None or not is_dataclass(options):
                    raise ArenaError(f"{_kind} {name!r} from plugin {plugin_name!r} needs an `Options` dataclass")
                doc = help or summary(obj.__doc__)
                self.entries[_kind][name] = Entry(name, obj, plugin_name, doc)

            call(f"register_{kind}s", register)

        def register_command(name: str, run: Callable, help: str = "", configure: Callable | None = None) -> None:
            if name in self.commands:
                other = self.commands[name].plugin
                raise ArenaError(f"command {name!r} is registered by both {other!r} and {plugin_name!r}")
            self.commands[name] = Command(name, run, plugin_name, help, configure)

        call("register_commands", register_command)


def _check_hooks(pm: pluggy.PluginManager, plugin: Any, plugin_name: str) -> None:
    """pluggy quietly ignores a hook function without @hookimpl and accepts a misspelt hook name: both would
    leave a plugin doing nothing with no word why, so both fail the plugin instead."""
    specs = [name for name in vars(hookspecs) if hasattr(getattr(hookspecs, name), "arena_spec")]
    for caller in pm.get_hookcallers(plugin) or []:
        if not caller.has_spec():
            raise ArenaError(f"plugin {plugin_name!r} implements {caller.name!r}, which is no arena hook; "
                             f"the hooks are: {', '.join(specs)}")
    for name in specs:
        if callable(getattr(plugin, name, None)) and not any(
                impl.plugin is plugin for impl in getattr(pm.hook, name).get_hookimpls()):
            raise ArenaError(f"plugin {plugin_name!r} defines {name} without @hookimpl (from arena import "
                             "hookimpl), so it would never be called")


def _allowed_third_party(eps: list[importlib.metadata.EntryPoint]) -> set[str] | None:
    """The names ARENA_PLUGINS allows (None: all). A name that matches no installed plugin is most likely a typo
    that would otherwise quietly load nothing, so it is warned about."""
    raw = os.environ.get("ARENA_PLUGINS")
    if raw is None:
        return None
    allowed = {name.strip() for name in raw.split(",") if name.strip()}
    installed = sorted({ep.name for ep in eps if not _builtin(ep)})
    for name in sorted(allowed - {ep.name for ep in eps}):  # a built-in's name is harmless: built-ins always load
        warnings.warn(f"ARENA_PLUGINS names {name!r}, which matches no installed plugin; installed: "
                      f"{', '.join(installed) or '(none)'}", ArenaWarning, stacklevel=3)
    return allowed


class NoHooks:
    """The hooks of a process other than 0 of a several-process run: every call does nothing (loggers and
    plugins observe the run once, on process 0)."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return lambda **kwargs: None


class RunHooks:
    """Calls `pm.hook.<name>(**kwargs)`; an exception from a plugin's implementation (other than ArenaError or
    an interrupt) becomes an ArenaError naming the plugin, the hook and where it raised, not a traceback."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm

    def __getattr__(self, name: str) -> Callable[..., Any]:
        caller = getattr(self.pm.hook, name)

        def call(**kwargs: Any) -> Any:
            try:
                return caller(**kwargs)
            except ArenaError:
                raise
            except Exception as exc:  # noqa: BLE001 - a plugin's bug, reported as the plugin's
                impls = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls()}
                tb, plugin, where = exc.__traceback__, "?", ""
                while tb is not None:
                    code = tb.tb_frame.f_code
                    plugin = impls.get(code, plugin)
                    where = f" at {code.co_filename}:{tb.tb_lineno}"
                    tb = tb.tb_next
                raise ArenaError(f"plugin {plugin!r}: its {name} hook raised {type(exc).__name__}: {exc}{where}") \
                    from None

        return call


def summary(doc: str | None) -> str:
    """A docstring's first paragraph on one line: what `arena list` shows for a component."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def load_registry() -> Registry:
    """Load every plugin and collect what it registers. Failures are kept in `registry.failed`, not raised."""
    pm = pluggy.PluginManager("arena")
    pm.add_hookspecs(hookspecs)
    if os.environ.get("ARENA_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda msg: sys.stderr.write(msg))
        pm.enable_tracing()
    registry = Registry(pm)
    eps = list(importlib.metadata.entry_points(group="arena"))
    allowed = _allowed_third_party(eps)
    for ep in eps:
        if not _builtin(ep) and allowed is not None and ep.name not in allowed:
            continue
        if pm.get_plugin(ep.name) is None:  # else seen twice (an editable install can list a dist twice)
            _add(registry, ep.name, ep.load)
    for path in _plugin_files():
        _add(registry, f"file:{path.name}", lambda path=path: _load_file(path))
    return registry


def _add(registry: Registry, name: str, load: Callable[[], Any]) -> None:
    """Import, register and collect one plugin; a failure is recorded and undone, never raised, so a broken
    plugin cannot take the others down."""
    try:
        registry.pm.register(load(), name=name)
        registry._collect(name)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - sys.exit() on import must not end arena either
        _forget(registry.pm, registry, name)
        registry.failed[name] = f"{type(exc).__name__}: {exc}"


def _load_file(path: Path) -> Any:
    """Import a plugin file as a module that is in sys.modules while it runs, as an imported one is (dataclasses
    look their module up there to read `from __future__ import annotations` types)."""
    name = f"arena_local_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _builtin(ep: importlib.metadata.EntryPoint) -> bool:
    return ep.dist is not None and ep.dist.name == DISTRIBUTION


def _plugin_files() -> list[Path]:
    """The *.py files of ARENA_PLUGINS_DIR. A folder that is not there is warned about: a mistyped path would
    otherwise look like plugins that register nothing."""
    folder = os.environ.get("ARENA_PLUGINS_DIR")
    if not folder:
        return []
    if not Path(folder).is_dir():
        problem = "not a folder" if Path(folder).exists() else "no such folder"
        warnings.warn(f"ARENA_PLUGINS_DIR {folder}: {problem}; no file plugins loaded", ArenaWarning, stacklevel=3)
        return []
    return sorted(Path(folder).glob("*.py"))


def _forget(pm: pluggy.PluginManager, registry: Registry, name: str) -> None:
    """Undo a half-registered plugin so that a failure leaves no trace but its error."""
    if pm.get_plugin(name) is not None:
        pm.unregister(name=name)
    for entries in registry.entries.values():
        for key in [k for k, e in entries.items() if e.plugin == name]:
            del entries[key]
    for key in [k for k, c in registry.commands.items() if c.plugin == name]:
        del registry.commands[key]

