"""The `mix` optimizer: per-role objectives summed into one update, and every way its config can be wrong."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from arena.config import resolve
from arena.errors import ConfigError
from arena.interfaces import Env
from arena.plugins.optimizers.grpo import GRPO, GRPOOptions
from arena.registry import load_registry
from arena.types import Role
from test_grpo import ROLES, SPECS, make_samples
from tiny import assert_same_grads, gradients

MIX = {"name": "mix", "lr": 1e-2, "max_grad_norm": 0.0,
       "parts": [{"name": "grpo", "trains": ["a"], "beta": 0.05},
                 {"name": "grpo", "trains": ["b"], "beta": 0.3, "weight": 0.5}]}


@pytest.fixture()
def fresh(fresh_policy):
    return fresh_policy


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def test_the_mixed_gradient_is_the_weighted_sum_of_the_parts(fresh, registry):
    env = Env(config=None, registry=registry, policy=fresh)
    mix = registry.build("optimizer", MIX, env)
    params = fresh.trainable_parameters()
    captured = {}
    original = mix.torch_optimizer.step

    def spy(*args, **kwargs):
        captured["grads"] = gradients(params)
        return original(*args, **kwargs)

    mix.torch_optimizer.step = spy
    before = [p.detach().clone() for p in params]
    metrics = mix.step(make_samples(fresh, SPECS), ROLES)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))  # one real update
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)

    separately = []
    for roles, beta in ((["a"], 0.05), (["b"], 0.3)):  # each part alone, as its own optimizer would compute it
        for p in params:
            p.grad = None
        part = GRPO(GRPOOptions(beta=beta), env)
        part.accumulate([s for s in make_samples(fresh, SPECS) if s.role in roles], ROLES)
        separately.append(gradients(params))
    for p in params:
        p.grad = None
    want = [a + 0.5 * b for a, b in zip(*separately)]
    assert_same_grads(captured["grads"], want)
    assert {"grpo0/loss", "grpo1/loss", "grpo0/kl", "grpo1/kl", "loss", "grad_norm"} <= set(metrics)
    assert metrics["loss"] == pytest.approx(metrics["grpo0/loss"] + 0.5 * metrics["grpo1/loss"])


def test_trained_flags_and_a_role_no_part_claims(fresh, registry):
    env = Env(config=None, registry=registry, policy=fresh)
    samples = make_samples(fresh, SPECS)
    registry.build("optimizer", MIX, env).step(samples, ROLES)
    assert all(s.trained for s in samples if s.role in ("a", "b"))
    only_a = {**MIX, "parts": [MIX["parts"][0]]}
    with pytest.raises(ConfigError, match="no part trains role 'b'") as exc:
        registry.build("optimizer", only_a, env).check_roles(ROLES)
    assert exc.value.path == "optimizer.parts"
    # a role the game does not train needs no part ("frozen" in ROLES is untrained)
    registry.build("optimizer", {**MIX, "parts": MIX["parts"]}, env).check_roles(ROLES)


def test_a_failed_part_leaves_the_weights_and_marks_nothing(fresh, registry):
    env = Env(config=None, registry=registry, policy=fresh)
    samples = make_samples(fresh, SPECS)
    samples[-1].reward = float("inf")  # role b: its part's loss is not finite
    params = fresh.trainable_parameters()
    before = [p.detach().clone() for p in params]
    with pytest.raises(Exception, match="loss is nan|loss is inf"):
        registry.build("optimizer", MIX, env).step(samples, ROLES)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not any(s.trained for s in samples)


@pytest.mark.parametrize("parts, key, words", [
    ("[{name: grpo, trains: [solver]}, {name: grpo, trains: [challenger, solver]}]", "optimizer.parts.1.trains",
     "already trained by part 0"),
    ("[{name: grpo, trains: [solver]}]", "optimizer.parts", "no part trains role 'challenger'"),
    ("[{name: grpo, trains: [solver, judge]}, {name: grpo, trains: [challenger]}]", "optimizer.parts.0.trains",
     "no role 'judge'"),
    ("[{name: grpo, trains: [solver], epochs: 2}, {name: grpo, trains: [challenger]}]", "optimizer.parts.0.epochs",
     "one pass"),
    ("[{name: grpo, trains: [solver], lr: -1}, {name: grpo, trains: [challenger]}]", "optimizer.parts.0.lr",
     "more than 0"),
    ("[{name: grpo, trains: [solver], lr: 3e-5}, {name: grpo, trains: [challenger]}]", "optimizer.parts.0.lr",
     "set optimizer.lr"),
    ("[{name: grpo, trains: [solver]}, {name: grpo, trains: [challenger], max_grad_norm: 0}]",
     "optimizer.parts.1.max_grad_norm", "set optimizer.max_grad_norm"),
    ("[{name: dpo, trains: [solver], weight_decay: 0.1}, {name: grpo, trains: [challenger]}]",
     "optimizer.parts.0.weight_decay", "one step with its own weight_decay"),
    ("[{name: grpo, trains: [solver], adam_betas: [0.8, 0.9]}, {name: grpo, trains: [challenger]}]",
     "optimizer.parts.0.adam_betas", "set optimizer.adam_betas"),
    ("[{name: grpo, trains: solver}]", "optimizer.parts.0.trains", "a list"),
    ("[{name: grpo, trains: [solver], weight: -1}]", "optimizer.parts.0.weight", "at least 0"),
    ("[{name: grpo, trains: [solver], weight: .nan}]", "optimizer.parts.0.weight", "finite"),
    ("[{name: grpo, trains: [solver], weight: .inf}]", "optimizer.parts.0.weight", "finite"),
    ("[{name: grpo, trains: [solver], beta_: 1}]", "optimizer.parts.0.beta_", "unknown key"),
    ("[{name: grpo, trains: [solver], roles: {judge: {weight: 2}}}, {name: grpo, trains: [challenger]}]",
     "optimizer.parts.0.roles.judge", "no such role"),
    ("[{name: nope, trains: [solver]}]", "optimizer.parts.0.name", "unknown optimizer"),
    ("[{name: mix, trains: [solver], parts: []}]", "optimizer.parts.0.name", "cannot be mixed"),
    ("[]", "optimizer.parts", "at least one part"),
])
def test_config_errors_name_the_key(registry, parts, key, words):
    overrides = [f"optimizer={{name: mix, parts: {parts}}}"]
    with pytest.raises(ConfigError) as exc:
        resolve(registry, "lsp", overrides=overrides)
    assert exc.value.path == key and words in str(exc.value), str(exc.value)


def test_config_yaml_keeps_each_part_complete(registry):
    r = resolve(registry, "lsp", overrides=[
        "optimizer={name: mix, parts: [{name: grpo, trains: [solver]}, {name: grpo, trains: [challenger], beta: 0}]}"])
    parts = r.tree["optimizer"]["parts"]
    assert parts[0]["name"] == "grpo" and parts[0]["weight"] == 1.0 and parts[0]["beta"] == 0.05
    assert parts[1]["beta"] == 0.0 and "micro_batch_size" in parts[1]
    # the settings the mix's own step replaces are not shown as if they applied
    assert not {"lr", "weight_decay", "adam_betas", "max_grad_norm", "epochs"} & set(parts[0])


def test_a_part_may_state_its_update_settings_at_their_defaults(registry):
    """A config.yaml written before parts left the update settings out still resolves: a default is not a
    request, and the resolved config (as config.yaml saves it) resolves to itself."""
    spec = "{name: grpo, trains: [solver], lr: 1e-5, epochs: 1, max_grad_norm: 1.0, adam_betas: [0.9, 0.999]}"
    r = resolve(registry, "lsp", overrides=[f"optimizer={{name: mix, lr: 3e-5, parts: [{spec}, "
                                            "{name: grpo, trains: [challenger]}]}"])
    again = resolve(registry, "lsp", base=r.tree)  # as --resume resolves the saved config.yaml
    assert again.tree["optimizer"] == r.tree["optimizer"] and r.tree["optimizer"]["lr"] == 3e-5
    again = resolve(registry, "lsp", base=r.tree)  # what --resume reads back resolves to the same
    assert again.tree == r.tree


def test_grpo_for_one_role_and_dpo_for_another(fresh, registry):
    """Two objective families in one update: the gradient is grpo's for role a plus 0.7 x dpo's for role b."""
    from arena.plugins.optimizers.dpo import DPO, DPOOptions
    from test_dpo import SPECS as PAIR_SPECS
    from test_dpo import make_pairs

    env = Env(config=None, registry=registry, policy=fresh)
    rewards = [s for s in make_samples(fresh, SPECS) if s.role == "a"]
    pairs = [s for s in make_pairs(fresh, PAIR_SPECS) if s.role == "b"]
    spec = {"name": "mix", "lr": 1e-2, "max_grad_norm": 0.0,
            "parts": [{"name": "grpo", "trains": ["a"]}, {"name": "dpo", "trains": ["b"], "weight": 0.7}]}
    mix = registry.build("optimizer", spec, env)
    assert type(mix).consumed(mix.options) == frozenset({"rewards", "pairs"})
    params = fresh.trainable_parameters()
    captured = {}
    original = mix.torch_optimizer.step
    mix.torch_optimizer.step = lambda *a, **k: (captured.setdefault("grads", gradients(params)), original(*a, **k))
    before = [p.detach().clone() for p in params]
    metrics = mix.step([replace(s) for s in rewards + pairs], ROLES)
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    for p in params:
        p.grad = None
    GRPO(GRPOOptions(), env).accumulate([replace(s) for s in rewards], ROLES)
    DPO(DPOOptions(), env).accumulate([replace(s) for s in pairs], ROLES, scale=0.7)
    assert_same_grads(captured["grads"], gradients(params))
    for p in params:
        p.grad = None
    assert {"grpo/loss", "dpo/loss", "dpo/margin", "dpo/accuracy"} <= set(metrics)


FROZEN_OPPONENT = '''
from arena.hookspecs import hookimpl
from arena.interfaces import Game
from arena.types import Role


class Duel(Game):
    """A player against a frozen guesser: the guesser is played, never trained."""

    role_names = ("player", "guesser")
    built_trained = False  # what the built guesser says; a test flips it

    @classmethod
    def produced_by_role(cls, options):
        return {"player": frozenset({"rewards"}), "guesser": frozenset()}

    @property
    def roles(self):
        return {"player": Role("player"), "guesser": Role("guesser", trained=self.built_trained)}

    def play(self, ctx):
        return []


@hookimpl
def register_games(register):
    register("duel", Duel)
'''


@pytest.fixture()
def duel(tmp_path, monkeypatch):
    (tmp_path / "duel.py").write_text(FROZEN_OPPONENT)
    monkeypatch.setenv("ARENA_PLUGINS_DIR", str(tmp_path))
    registry = load_registry()
    assert not registry.failed, registry.failed
    return registry


def test_a_role_declared_untrained_needs_no_part(duel):
    one = "optimizer={name: mix, parts: [{name: grpo, trains: [player]}]}"
    assert resolve(duel, "duel", overrides=[one]).tree["optimizer"]["parts"][0]["trains"] == ["player"]
    assert resolve(duel, "duel").config.optimizer.name == "grpo"  # a plain optimizer skips the frozen role
    with pytest.raises(ConfigError, match="'guesser' is played but never trained") as err:
        resolve(duel, "duel", overrides=["optimizer={name: mix, parts: [{name: grpo, trains: [player, guesser]}]}"])
    assert err.value.path == "optimizer.parts.0.trains"


def test_built_roles_must_agree_with_the_declaration(duel):
    from arena.errors import ArenaError

    resolved = resolve(duel, "duel")
    env = Env(config=resolved.config, registry=duel)
    game = duel.build("game", resolved.config.game, env)
    game.check_built_roles()  # agrees: the guesser is built untrained
    type(game).built_trained = True
    with pytest.raises(ArenaError, match="role 'guesser' is built trained but produced_by_role gives it nothing"):
        game.check_built_roles()
