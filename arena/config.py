"""Configuration: layered OmegaConf with one canonical form per component.

Layers, later wins: core defaults < the game's `defaults` < each `--config FILE` < the command-line dotlist.
A component (`game`, `judge`, `optimizer`, `backend`) is written `{name: X, ...X's options}`; a bare string is
shorthand for `{name: X}` and is expanded *before* layers merge, so `optimizer.lr=3e-6` on top of
`optimizer: grpo` keeps the name. A layer that names a different component replaces the whole section: the
old component's options do not leak into the new one. Each component's options are then validated against the
`Options` dataclass it registered; `model` and `run` against the core dataclasses below.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from arena.errors import ArenaError, ConfigError

COMPONENTS = ("game", "judge", "optimizer", "backend")


@dataclass
class LoraOptions:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelOptions:
    path: Optional[str] = None  # a folder, a .gguf file or a cached hub name; None: the embedded SmolLM2-135M
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16  (auto: bfloat16 on GPU, float32 on CPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    lora: LoraOptions = field(default_factory=LoraOptions)


@dataclass
class RunOptions:
    iterations: int = 10
    dir: Optional[str] = None  # default: runs/<game>-<UTC time>
    seed: int = 0
    eval_every: int = 5  # 0: never; the last iteration is always evaluated when > 0
    checkpoint_every: int = 1
    keep_checkpoints: int = 2  # older complete checkpoints are deleted
    threads: int = 0  # torch CPU threads; 0 keeps torch's choice
    loggers: list[str] = field(default_factory=lambda: ["console"])


@dataclass
class CoreOptions:
    model: ModelOptions = field(default_factory=ModelOptions)
    run: RunOptions = field(default_factory=RunOptions)


def core_defaults(game: str) -> dict[str, Any]:
    return {
        "model": dataclasses.asdict(ModelOptions()),
        "run": dataclasses.asdict(RunOptions()),
        "game": {"name": game},
        "judge": {"name": "self_reward"},
        "optimizer": {"name": "grpo"},
        "backend": {"name": "hf"},
    }


def canonical(spec: Any) -> Any:
    """`"X"` -> `{"name": "X"}`; mappings are copied; anything else is returned for validation to reject."""
    if isinstance(spec, str):
        return {"name": spec}
    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec, resolve=False)
    return copy.deepcopy(spec)


def _canonical_layer(layer: dict[str, Any]) -> dict[str, Any]:
    layer = copy.deepcopy(layer)
    for key in COMPONENTS:
        if key in layer:
            layer[key] = canonical(layer[key])
    return layer


def _deep_merge(base: dict, over: dict) -> dict:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _leaves(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict) and tree:
        out = []
        for key, value in tree.items():
            out += _leaves(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [prefix]


def merge_layers(layers: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge (source, dict) layers in order. Returns the merged tree and, for every leaf, the layer that set it."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, layer in layers:
        layer = _canonical_layer(layer)
        for key in COMPONENTS:
            new = layer.get(key)
            old = merged.get(key)
            if (isinstance(new, dict) and isinstance(old, dict) and "name" in new
                    and new["name"] != old.get("name")):
                del merged[key]  # a different component: start its section afresh
                for leaf in [s for s in sources if s == key or s.startswith(key + ".")]:
                    del sources[leaf]
        _deep_merge(merged, layer)
        for leaf in _leaves(layer):
            for stale in [s for s in sources if s.startswith(leaf + ".")]:
                del sources[stale]  # a whole subtree replaced by a scalar or list
            sources[leaf] = source
    return merged, sources


def load_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ArenaError(f"--config {path}: no such file")
    try:
        data = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except Exception as exc:  # noqa: BLE001 - a YAML error of any kind is the user's to fix
        detail = " ".join(str(exc).split())  # YAML messages span lines; the CLI prints one
        raise ArenaError(f"--config {path}: not valid YAML ({detail})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArenaError(f"--config {path}: expected a mapping of keys at the top level")
    return data


def parse_dotlist(overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ArenaError(f"override {item!r}: expected key=value, e.g. optimizer.lr=3e-6")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(overrides), resolve=False)
    except OmegaConfBaseException as exc:
        raise ArenaError(f"overrides: {exc}") from None


def _omegaconf_error(path: str, exc: Exception, schema: Any) -> ConfigError:
    key = str(getattr(exc, "full_key", None) or getattr(exc, "key", None) or "")
    full = f"{path}.{key}" if path and key else (key or path)
    if isinstance(exc, ConfigKeyError):
        parent = full.rsplit(".", 1)[0]
        allowed = ", ".join(k for k in _allowed_keys(schema, key) if k != "name")
        return ConfigError(full, f"unknown key under {parent}; allowed keys: {allowed or '(none)'}")
    msg = str(exc).splitlines()[0]
    return ConfigError(full, f"bad value ({msg})")


def _allowed_keys(schema: DictConfig, key: str) -> list[str]:
    """The keys allowed beside `key` (a dotted path in `schema`). Under a `dict[str, SomeDataclass]` field, whose
    schema node has no entries yet, they are the fields of the element dataclass."""
    parts = key.split(".")[:-1]
    node: Any = schema
    for part in parts:
        child = node._get_node(part) if isinstance(node, DictConfig) else None
        if child is None and isinstance(node, DictConfig):
            element = node._metadata.element_type
            return [f.name for f in dataclasses.fields(element)] if dataclasses.is_dataclass(element) else []
        node = child
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def validate(schema_cls: type, data: Any, path: str) -> Any:
    """Validate `data` against a dataclass; return an instance. Errors name the full key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__} {data!r}")
    schema = OmegaConf.structured(schema_cls)
    try:
        merged = OmegaConf.merge(schema, data)
        return OmegaConf.to_object(merged)
    except (ConfigKeyError, ValidationError) as exc:
        raise _omegaconf_error(path, exc, schema) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(path, str(exc).splitlines()[0]) from None


def validate_component(registry: Any, kind: str, spec: Any, path: str) -> tuple[Any, Any]:
    spec = canonical(spec)
    if not isinstance(spec, dict):
        raise ConfigError(path, f"expected a {kind} name or {{name: ..., options}}, got {spec!r}")
    if "name" not in spec:
        raise ConfigError(f"{path}.name", f"missing; expected one of: {', '.join(registry.names(kind))}")
    entry = registry.get(kind, spec["name"], path)
    options = validate(entry.obj.Options, {k: v for k, v in spec.items() if k != "name"}, path)
    check = getattr(entry.obj, "check_options", None)
    if check is not None:  # a component holding components (a mix) validates them here, before any model loads
        check(options, registry, path)
    return options, entry


@dataclass
class Resolved:
    """A resolved config: `tree` is the plain merged dict, `sources` the layer that set each leaf."""

    tree: dict[str, Any]
    sources: dict[str, str]

    @property
    def cfg(self) -> DictConfig:
        return OmegaConf.create(self.tree)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.tree))


def resolve(registry: Any, game: str, config_files: list[str] = (), overrides: list[str] = (),
            base: dict[str, Any] | None = None) -> Resolved:
    """Build and validate the config for `game`. `base` replaces the default layers (used by --resume, whose
    base is the run's saved config.yaml)."""
    if base is None:
        entry = registry.get("game", game, "game")
        layers = [("core defaults", core_defaults(game)), (f"game {game} defaults", dict(entry.obj.defaults))]
    else:
        layers = [("run config", base)]
    layers += [(f"--config {f}", load_file(f)) for f in config_files]
    # one layer per item, so `judge=exact_match judge.mode=string` names the judge before setting its option
    layers += [("command line", parse_dotlist([item])) for item in overrides]
    tree, sources = merge_layers(layers)

    unknown = sorted(set(tree) - {"model", "run", *COMPONENTS})
    if unknown:
        allowed = ", ".join(["model", "run", *COMPONENTS])
        raise ConfigError(unknown[0], f"unknown top-level key; allowed: {allowed}")
    if not isinstance(tree.get("game"), dict):
        raise ConfigError("game", f"expected {{name: {game}, ...options}}, got {tree.get('game')!r}")
    if tree["game"].get("name") != game:
        raise ConfigError("game.name", f"is {tree['game'].get('name')!r} but the command plays {game!r}")
    tree["model"] = dataclasses.asdict(validate(ModelOptions, tree.get("model"), "model"))
    tree["run"] = dataclasses.asdict(validate(RunOptions, tree.get("run"), "run"))
    for kind in COMPONENTS:
        options, entry = validate_component(registry, kind, tree.get(kind), kind)
        tree[kind] = {"name": entry.name, **dataclasses.asdict(options)}
    for i, logger in enumerate(tree["run"]["loggers"]):
        registry.get("logger", logger, f"run.loggers.{i}")
    return Resolved(tree, sources)
