"""The `mix` optimizer: a per-role objective for each role, one update of the shared adapter.

One model plays every role, so there is one parameter update per round; what can differ between roles is the
objective. Each part is an optimizer that can `accumulate` (add its loss's gradient without stepping: `grpo`,
`dpo`) and claims the roles it trains (`trains`; a part's own `roles` are that optimizer's per-role settings):

    optimizer: {name: mix, lr: 1e-5, parts: [{name: grpo, trains: [solver], weight: 1.0},
                                             {name: dpo, trains: [judge], weight: 0.5, beta: 0.1}]}

Every part's loss, times its weight, goes into one backward pass (the gradients add up), then the mix clips and
takes one AdamW step with its own `lr`, `weight_decay`, `adam_betas` and `max_grad_norm`. A part's own update
settings (those four and `epochs`) would not be used: setting one is an error, and a resolved part leaves them out.
A role claimed by two parts, a role the game does not have or never trains, a trained role that no part trains, and
a part whose objective does not fit what its roles produce (dpo for a role that produces rewards) are errors when
the config resolves (for games that declare `role_names`) or at start-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from arena.config import Component, number, option, validate_component
from arena.errors import ConfigError
from arena.hookspecs import hookimpl
from arena.interfaces import Env
from arena.plugins.optimizers.adamw import AdamWOptimizer, check_adam_betas
from arena.types import Role, Sample

# a part's own settings that the mix's single step replaces: they stay at the part optimizer's defaults
UPDATE_SETTINGS = ("lr", "weight_decay", "adam_betas", "max_grad_norm", "epochs")
EXAMPLE = ("optimizer: {name: mix, parts: [{name: grpo, trains: [solver]}, "
           "{name: dpo, trains: [judge], weight: 0.5}]}")


@dataclass
class MixOptions:
    parts: list[Any] = field(default_factory=list)  # [{name: X, trains: [roles], weight: w, ...X's options}, ...]
    lr: float = option(1e-5, gt=0.0, le=1.0)  # AdamW: a step moves each weight by up to about lr
    weight_decay: float = option(0.0, ge=0.0)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = option(1.0, ge=0.0)  # 0: no clipping

    def check(self) -> None:
        check_adam_betas(self.adam_betas)


def _update_settings(options: Any) -> dict[str, Any]:
    return {name: getattr(options, name) for name in UPDATE_SETTINGS if hasattr(options, name)}


def _default(options_class: type, name: str) -> Any:
    field_ = next(f for f in dataclasses.fields(options_class) if f.name == name)
    return field_.default_factory() if field_.default is dataclasses.MISSING else field_.default


@dataclass
class Part:
    """A validated part: its optimizer (name and options), the roles it trains and its loss weight."""

    component: Component
    kind: type  # the part's optimizer class
    roles: list[str]
    weight: float
    label: str  # its metrics' prefix: the optimizer's name, with the part's index if two share it


class MixOptimizer(AdamWOptimizer):
    """Per-role objectives (e.g. grpo for one role, dpo for another) summed into one update."""

    Options = MixOptions

    @classmethod
    def check_options(cls, options: MixOptions, registry: Any, path: str) -> None:
        """Validate every part when the config resolves; the validated parts are kept on the options
        (`options.resolved`), so building the mix does not validate them again."""
        if not options.parts:
            raise ConfigError(f"{path}.parts", f"a mix needs at least one part, in the form {EXAMPLE}")
        parts, owner = [], {}
        names = [spec.get("name") if isinstance(spec, dict) else spec for spec in options.parts]
        for i, spec in enumerate(options.parts):
            key = f"{path}.parts.{i}"
            if not isinstance(spec, dict):
                raise ConfigError(key, f"expected {{name: ..., trains: [...]}}, got {spec!r}; e.g. {EXAMPLE}")
            spec = dict(spec)
            roles, weight = spec.pop("trains", None), spec.pop("weight", 1.0)
            if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
                raise ConfigError(f"{key}.trains", f"expected a list of the role names this part trains, got "
                                                   f"{roles!r}")
            weight = number(f"{key}.weight", weight, ge=0.0)
            entry = registry.get("optimizer", spec.get("name"), key)
            if not hasattr(entry.obj, "accumulate"):
                raise ConfigError(f"{key}.name", f"optimizer {entry.name!r} cannot be mixed: it has no "
                                                 "`accumulate` (grpo and dpo can)")
            part_options, entry = validate_component(registry, "optimizer", spec, key)
            for name, value in _update_settings(part_options).items():
                if value != _default(type(part_options), name):
                    raise ConfigError(f"{key}.{name}", "a mixed part makes one pass per round; leave epochs at 1"
                                      if name == "epochs" else f"{value}: the mix takes one step with its own "
                                      f"{name}; set optimizer.{name}, not a part's")
            for role in roles:
                if role in owner:
                    raise ConfigError(f"{key}.trains", f"role {role!r} is already trained by part {owner[role]}; "
                                                       "each role has one objective")
                owner[role] = i
            label = entry.name if names.count(entry.name) == 1 else f"{entry.name}{i}"
            parts.append(Part(Component(entry.name, part_options), entry.obj, roles, float(weight), label))
            # config.yaml keeps each part complete, as it does every other component, less the update settings
            # that a part cannot change
            options.parts[i] = {"name": entry.name, "trains": roles, "weight": float(weight),
                                **{k: v for k, v in dataclasses.asdict(part_options).items()
                                   if k not in UPDATE_SETTINGS}}
        options.resolved = parts

    @classmethod
    def consumed(cls, options: MixOptions) -> frozenset[str]:
        kinds: set[str] = set()
        for part in getattr(options, "resolved", []):
            kinds |= part.kind.consumed(part.component.options)
        return frozenset(kinds) or frozenset({cls.consumes})

    @classmethod
    def check_role_names(cls, options: MixOptions, names: Sequence[str],
                         trained: Sequence[str] | None = None) -> None:
        """Every part names real roles that the game trains (its own role settings too), and every role in
        `trained` (default: all of `names`) has a part."""
        trained = list(names if trained is None else trained)
        claimed = set()
        for i, part in enumerate(getattr(options, "resolved", [])):
            unknown = sorted(set(part.roles) - set(names))
            if unknown:
                raise ConfigError(f"parts.{i}.trains", f"no role {unknown[0]!r}; the game's roles are: "
                                                       f"{', '.join(names)}")
            frozen = [r for r in part.roles if r not in trained]
            if frozen:
                raise ConfigError(f"parts.{i}.trains", f"role {frozen[0]!r} is played but never trained with these "
                                                       "game settings; leave it out of trains")
            try:
                part.kind.check_role_names(part.component.options, names)
            except ConfigError as exc:
                raise ConfigError(f"parts.{i}.{exc.path}", exc.detail) from None
            claimed |= set(part.roles)
        missing = [n for n in trained if n not in claimed]
        if missing:
            raise ConfigError("parts", f"no part trains role {missing[0]!r}; add it to a part's trains (the "
                                       f"game's trained roles are: {', '.join(trained)})")

    @classmethod
    def check_produced(cls, options: MixOptions, produced: dict[str, frozenset[str]], name: str) -> None:
        """Each part's objective against what its own roles produce."""
        for i, part in enumerate(getattr(options, "resolved", [])):
            try:
                part.kind.check_produced(part.component.options, {r: produced[r] for r in part.roles if r in produced},
                                         part.component.name)
            except ConfigError as exc:
                raise ConfigError(f"parts.{i}.{exc.path}", exc.detail) from None

    def __init__(self, options: MixOptions, env: Env):
        super().__init__(options, env)
        if not hasattr(options, "resolved"):  # built from a plain spec, outside resolve
            self.check_options(options, env.registry, "optimizer")
        self.parts = [(part, env.registry.build("optimizer", part.component, env, f"optimizer.parts.{i}"))
                      for i, part in enumerate(options.resolved)]

    def step(self, samples: Sequence[Sample], roles: dict[str, Role]) -> dict[str, float]:
        """Each part adds weight x its loss's gradient for its roles' samples; then one clipped AdamW step."""
        self.torch_optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {"loss": 0.0}
        try:
            for part, optimizer in self.parts:
                mine = [s for s in samples if s.role in part.roles]
                got = optimizer.accumulate(mine, roles, scale=part.weight)
                metrics.update({f"{part.label}/{k}": v for k, v in got.items()})
                metrics["loss"] += part.weight * got.get("loss", 0.0)
            metrics["grad_norm"] = self.update()
        except BaseException:
            for s in samples:  # nothing was updated: nothing was trained on
                s.trained = False
            raise
        finally:
            self.torch_optimizer.zero_grad(set_to_none=True)
        return metrics


@hookimpl
def register_optimizers(register: Any) -> None:
    register("mix", MixOptimizer)
