"""Configuration: layered OmegaConf with one canonical form per component.

Layers, later wins: core defaults < the game's `defaults` < each `--config FILE` < the command-line dotlist.
A component (`game`, `judge`, `optimizer`, `backend`) is written `{name: X, ...X's options}`; a bare string is
shorthand for `{name: X}` and is expanded *before* layers merge, so `optimizer.lr=3e-6` on top of
`optimizer: grpo` keeps the name. A layer that names a different component replaces the whole section: the
old component's options do not leak into the new one. Each component's options are then validated against the
`Options` dataclass it registered; `model` and `run` against the core dataclasses below.

Options classes are the single home of their settings: types come from the annotations, value rules from
`option(...)` (`ge`, `gt`, `le`, `choices`) and, for rules that span fields, an optional `check(self)` method
that raises ConfigError with the key relative to the section. All of it runs when the config resolves, so
`arena config` rejects every value that `arena play` would, before any model loads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from arena.errors import ArenaError, ConfigError

COMPONENTS = ("game", "judge", "optimizer", "backend")
_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, factory: Callable[[], Any] | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, choices: tuple[Any, ...] | None = None,
           hint: str | None = None) -> Any:
    """A dataclass field with value rules, checked when the config resolves: `ge`/`gt`/`le` bounds for numbers,
    `choices` for an enumeration; `hint` is added to the error. None (an unset Optional) passes every rule."""
    rules = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "choices": choices, "hint": hint}.items()
             if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


def _rule_error(value: Any, rules: dict[str, Any]) -> str | None:
    if "choices" in rules and value not in rules["choices"]:
        return f"{value!r}; expected one of: {', '.join(map(str, rules['choices']))}"
    if "ge" in rules and value < rules["ge"]:
        return f"{value!r}; expected at least {rules['ge']}"
    if "gt" in rules and value <= rules["gt"]:
        return f"{value!r}; expected more than {rules['gt']}"
    if "le" in rules and value > rules["le"]:
        return f"{value!r}; expected at most {rules['le']}"
    return None


def number(key: str, value: Any, ge: float | None = None, gt: float | None = None, nonzero: bool = False) -> float:
    """`value` as a float if it is a finite number within the bounds (and not 0 with `nonzero`), else a
    ConfigError naming `key`: for the numbers a schema cannot type (a mix part's weight)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(key, f"expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(key, f"{value!r}; expected a finite number")
    problem = _rule_error(value, {k: v for k, v in (("ge", ge), ("gt", gt)) if v is not None})
    if problem or (nonzero and value == 0):
        raise ConfigError(key, problem or f"{value!r}; a part of weight 0 does nothing: leave it out")
    return float(value)


def _finite_problem(value: Any) -> str | None:
    """Why a float option's value (or a float in its list) is not finite: NaN passes every bound comparison."""
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        return f"{value!r}; expected {'finite numbers' if isinstance(value, list) else 'a finite number'}"
    return None


def check_rules(options: Any, path: str) -> None:
    """Apply every `option(...)` rule and `check()` method of a validated options object, nested dataclasses
    (and dicts of them) included; every float is finite (NaN passes any bound). Errors name the full key."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        key = f"{path}.{f.name}" if path else f.name
        problem = _finite_problem(value)
        if problem:
            raise ConfigError(key, problem)
        if value is not None and f.metadata:
            problem = _rule_error(value, f.metadata)
            if problem:
                hint = f.metadata.get("hint")
                raise ConfigError(key, f"{problem} ({hint})" if hint else problem)
        if dataclasses.is_dataclass(value):
            check_rules(value, key)
        elif isinstance(value, dict):
            for name, item in value.items():
                if dataclasses.is_dataclass(item):
                    check_rules(item, f"{key}.{name}")
    check = getattr(options, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(f"{path}.{exc.path}" if path and exc.path else (exc.path or path), exc.detail) from None


def check_template(key: str, template: str | None, fields: tuple[str, ...], required: tuple[str, ...]) -> None:
    """A prompt template given as an option must be a format string over `fields` that uses every one of
    `required` (a judge template without {response} would rate every answer alike), or it fails on the first
    prompt, or trains on nonsense."""
    if template is None:
        return
    import string

    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        template.format(**{f: "" for f in fields})
    except (KeyError, IndexError, ValueError) as exc:
        why = (f"unknown placeholder {{{exc.args[0]}}}" if isinstance(exc, KeyError) else
               f"{exc}; write a literal brace as {{{{ or }}}}")
        raise ConfigError(key, f"not a format string over {', '.join('{' + f + '}' for f in fields)} "
                               f"({why})") from None
    missing = [f for f in required if f not in used]
    if missing:
        raise ConfigError(key, f"has no {{{missing[0]}}}; it must use {', '.join('{' + f + '}' for f in required)}")


def cache_dir() -> Path:
    """Where arena keeps what it derives once (the converted embedded model, extracted data): `ARENA_CACHE`, else
    `$XDG_CACHE_HOME/arena`, else ~/.cache/arena."""
    root = os.environ.get("ARENA_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "arena"


# what a model folder's config.json `architectures` must name for each use: the policy and judge models generate,
# a reward model classifies
MODEL_KINDS = {"causal": (("ForCausalLM", "LMHeadModel"), "a causal language model (AutoModelForCausalLM)"),
               "classifier": (("ForSequenceClassification",),
                              "a sequence classifier (AutoModelForSequenceClassification)")}


def model_path_problem(path: str, kind: str = "causal") -> str | None:
    """What is wrong with a model path as a config value, or None: a folder with a config.json whose
    architectures fit `kind`, a .gguf file (causal), or a hub name (`org/name`, loaded only from the local cache)
    are fine. Read from config.json alone, so `arena config` refuses before any weights load."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            return "folder has no config.json; expected a transformers model folder"
        try:
            architectures = json.loads((p / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError, AttributeError) as exc:
            return f"its config.json cannot be read ({exc})"
        suffixes, wanted = MODEL_KINDS[kind]
        if architectures and not any(str(a).endswith(suffixes) for a in architectures):
            named = ", ".join(map(str, architectures))
            if kind == "causal" and named.endswith("ForSequenceClassification"):
                return (f"a sequence-classification model ({named}), not {wanted}; to score with it as a reward "
                        f"model: judge: {{name: reward_model, path: {path}}}")
            return f"config.json names {named}; expected {wanted}"
        return None
    if kind == "classifier" and p.is_file():
        return f"a file; expected a folder holding {MODEL_KINDS[kind][1]}"
    if p.is_file():
        return None if p.suffix == ".gguf" else "expected a model folder or a .gguf file"
    if path.count("/") <= 1 and not path.startswith((".", "/", "~")):
        return None
    return "no such file or folder"


@dataclass
class LoraOptions:
    r: int = option(16, ge=1)
    alpha: int = option(32, gt=0)
    dropout: float = option(0.0, ge=0.0, le=0.99)  # on LoRA's input in the training forward only
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def check(self) -> None:
        if not self.target_modules:
            raise ConfigError("target_modules", "empty; name the layers LoRA adapts, e.g. [q_proj, v_proj]")


@dataclass
class ModelOptions:
    path: Optional[str] = None  # a folder, a .gguf file or a cached hub name; None: the embedded SmolLM2-135M
    # auto: bfloat16 on a GPU and on CPUs with native bf16 (AVX512-BF16, AMX), else float32
    dtype: str = option("auto", choices=("auto", "float32", "bfloat16", "float16"))
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    lora: LoraOptions = field(default_factory=LoraOptions)

    def check(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError("device", f"{self.device!r}; expected auto, cpu, cuda or cuda:N")
        problem = self.path and model_path_problem(self.path)
        if problem:
            raise ConfigError("path", f"{self.path}: {problem}")


@dataclass
class RunOptions:
    iterations: int = option(10, ge=1)
    dir: Optional[str] = None  # default: runs/<game>-<UTC time>
    seed: int = 0
    eval_every: int = option(5, ge=0)  # 0: never; else at iteration 0, every k, and the last
    checkpoint_every: int = option(1, ge=1)
    keep_checkpoints: int = option(2, ge=0)  # older complete checkpoints are deleted; 0 keeps all
    threads: int = option(0, ge=0)  # torch CPU threads; 0 keeps torch's choice
    loggers: list[str] = field(default_factory=lambda: ["console"])

    def check(self) -> None:
        problem = self.dir is not None and folder_problem(self.dir)
        if problem:
            raise ConfigError("dir", f"{self.dir}: {problem}")


def folder_problem(folder: str | Path) -> str | None:
    """Why `folder` cannot be made or written (it is a file, sits under one, or its file system refuses), or
    None: checked before work whose output would go there, so that nothing produced is lost to a bad path."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        return "is a file; expected a folder"
    parent = next(p for p in (path, *path.parents) if p.exists())
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    try:  # the only sure test that it can be written there (root may write anywhere but /proc)
        os.rmdir(tempfile.mkdtemp(prefix=".arena-probe-", dir=parent))
    except OSError as exc:
        return f"cannot create a folder in {parent} ({exc.strerror})"
    return None


@dataclass
class Component:
    """A selected component: its registered name and its validated options."""

    name: str
    options: Any


@dataclass
class Config:
    """A resolved, validated config: what components read as `env.config`."""

    model: ModelOptions
    run: RunOptions
    game: Component
    judge: Component
    optimizer: Component
    backend: Component


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


def _deep_merge(base: dict, over: dict, path: str = "") -> dict:
    for key, value in over.items():
        where = f"{path}.{key}" if path else str(key)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value, where)
        elif isinstance(value, dict) and isinstance(base.get(key), list) and value:
            _merge_items(base[key], value, where)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _merge_items(items: list, over: dict, path: str) -> None:
    """`key.N.x=v` on a list: the dotlist parser reads N as a mapping key; it sets item N of the list. An item
    given a different `name` (another component) starts afresh, as a section does."""
    for index, value in over.items():
        if not re.fullmatch(r"\d+", str(index)):
            raise ConfigError(f"{path}.{index}", f"{path} is a list; address its items by number ({path}.0.KEY=...) "
                                                 "or give the whole list")
        i = int(index)
        if i >= len(items):
            raise ConfigError(f"{path}.{i}", f"{path} has {len(items)} item(s), numbered from 0; to add one, give "
                                             "the whole list")
        if isinstance(value, dict) and isinstance(items[i], str):
            items[i] = {"name": items[i]}  # a bare component name, as in `judges: [self_reward]`
        if isinstance(value, dict) and isinstance(items[i], dict):
            if "name" in value and value["name"] != items[i].get("name"):
                items[i] = {}
            _deep_merge(items[i], value, f"{path}.{i}")
        else:
            items[i] = copy.deepcopy(value)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of every leaf of a nested dict; an empty mapping is a leaf."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


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
        for leaf in flatten(layer):
            for stale in [s for s in sources if s.startswith(leaf + ".")]:
                del sources[stale]  # a whole subtree replaced by a scalar or list
            sources[leaf] = source
    return merged, sources


def load_file(path: str, key: str = "--config") -> dict[str, Any]:
    """A YAML config layer as a dict; errors are one line that starts with `key` and the file."""
    p = Path(path)
    if not p.is_file():
        raise ArenaError(f"{key} {path}: {'a folder; expected a YAML file' if p.is_dir() else 'no such file'}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except Exception as exc:  # noqa: BLE001 - a YAML error of any kind is the user's to fix
        detail = " ".join(str(exc).split())  # YAML messages span lines; the CLI prints one
        raise ArenaError(f"{key} {path}: not valid YAML ({detail})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArenaError(f"{key} {path}: expected a mapping of keys at the top level")
    return data


def parse_dotlist(overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ArenaError(f"override {item!r}: expected key=value, e.g. optimizer.lr=3e-6")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(overrides), resolve=False)
    except Exception as exc:  # noqa: BLE001 - YAML's scanner errors are not OmegaConf's: both are the user's
        detail = " ".join(str(exc).split())
        raise ArenaError(f"override {' '.join(overrides)!r}: not a valid value ({detail})") from None


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
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(schema._get_node(str(key)), ListConfig):
            raise ConfigError(f"{path}.{key}", f"expected a list; `{path}.{key}.N.KEY=...` sets item N of a list "
                                               "the config already holds; give the whole list here")
    try:
        merged = OmegaConf.merge(schema, data)
        options = OmegaConf.to_object(merged)
    except (ConfigKeyError, ValidationError) as exc:
        raise _omegaconf_error(path, exc, schema) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(path, str(exc).splitlines()[0]) from None
    check_rules(options, path)
    return options


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
    """A resolved config: `config` the validated, typed options (built from once, never re-validated), `tree`
    the same as a plain dict (config.yaml), `sources` the layer that set each leaf."""

    config: Config
    tree: dict[str, Any]
    sources: dict[str, str]

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
    typed: dict[str, Any] = {"model": validate(ModelOptions, tree.get("model"), "model"),
                             "run": validate(RunOptions, tree.get("run"), "run")}
    entries = {}
    for kind in COMPONENTS:
        options, entries[kind] = validate_component(registry, kind, tree.get(kind), kind)
        typed[kind] = Component(entries[kind].name, options)
    for key in ("model", "run"):
        tree[key] = dataclasses.asdict(typed[key])
    for kind in COMPONENTS:
        tree[kind] = {"name": typed[kind].name, **dataclasses.asdict(typed[kind].options)}
    for i, logger in enumerate(tree["run"]["loggers"]):
        registry.get("logger", logger, f"run.loggers.{i}")
    check_training(entries["game"].obj, typed["game"].options, entries["optimizer"].obj, typed["optimizer"])
    check_token_limits(typed, entries["backend"].obj.context_length(typed["model"]))
    entries["backend"].obj.check_model(typed["model"])
    reference = getattr(typed["optimizer"].options, "reference", None)
    if reference not in (None, "base") and entries["game"].obj.freezes(typed["game"].options, reference) is False:
        raise ConfigError("optimizer.reference", f"{reference!r}: game {game!r} makes no frozen adapter of that name; "
                                                 "leave it unset (each pair's own reference) or write base")
    return Resolved(Config(**typed), tree, sources)


def check_token_limits(typed: dict[str, Any], limit: int | None) -> None:
    """Every `*max_new_tokens` option of the game and the judge fits the model's context (when the backend can
    tell it without loading the model): a longer one would fail at the first generation."""
    if not limit:
        return
    for kind in ("game", "judge"):
        options = typed[kind].options
        for f in dataclasses.fields(options):
            value = getattr(options, f.name)
            if f.name.endswith("max_new_tokens") and isinstance(value, int) and value > limit:
                raise ConfigError(f"{kind}.{f.name}", f"{value}; the model's context holds {limit} tokens, prompt "
                                                      "included: expected fewer")


def check_training(game_class: Any, game_options: Any, optimizer: Any, chosen: Component) -> None:
    """What the game produces against what the optimizer learns from: role by role for a game that declares
    `role_names` (a mix part per trained role, each part's objective fit for its roles' samples), else the game's
    kinds together. Errors are keyed under `optimizer.`."""
    by_role = game_class.produced_by_role(game_options)
    try:
        if by_role:
            optimizer.check_role_names(chosen.options, list(by_role), [r for r, kinds in by_role.items() if kinds])
            optimizer.check_produced(chosen.options, by_role, chosen.name)
            return
        produced, consumed = game_class.produced(game_options), optimizer.consumed(chosen.options)
        if consumed - produced:
            raise ConfigError("name", f"{chosen.name!r} learns from {', '.join(sorted(consumed - produced))} but the "
                                      f"game produces {', '.join(sorted(produced))} with these settings; choose an "
                                      "optimizer that consumes what the game produces")
        if produced - consumed:  # samples of a kind no part learns from would be played and silently never trained
            raise ConfigError("name", f"the game produces {' and '.join(sorted(produced))} with these settings but "
                                      f"{chosen.name!r} learns only from {', '.join(sorted(consumed))}; use an "
                                      "optimizer that learns from every kind, e.g. a mix with one part per kind")
    except ConfigError as exc:
        raise ConfigError(f"optimizer.{exc.path}", exc.detail) from None


# What `--resume DIR key=value` may change: how long and how the run goes on, and the optimizer's and backend's
# settings (an optimizer re-applies its options over a restored state: `Optimizer.load_state_dict`). Everything
# else (the model and adapter shape, the game and its data, the judge, the seed) defines what the checkpoints mean.
RESUMABLE = ("run.iterations", "run.eval_every", "run.checkpoint_every", "run.keep_checkpoints", "run.threads",
             "run.loggers", "optimizer.", "backend.")


def check_resume_changes(saved: dict[str, Any], resolved: dict[str, Any]) -> None:
    """Refuse a resume that changes a key outside RESUMABLE (or a component's name), naming the key."""
    before, after = flatten(saved), flatten(resolved)
    for key in sorted(set(before) | set(after), key=lambda k: (not k.endswith(".name"), k)):  # a new component first
        if before.get(key, _MISSING) == after.get(key, _MISSING):
            continue
        allowed = any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)
        if not allowed or key.endswith(".name"):
            may = ", ".join(r.rstrip(".") + (".*" if r.endswith(".") else "") for r in RESUMABLE)
            raise ConfigError(key, f"cannot change on --resume ({before.get(key, 'unset')!r} in the run, "
                                   f"{after.get(key, 'unset')!r} given); a resumed run may change only {may} "
                                   "(not a component's name); start a new run for the rest")

