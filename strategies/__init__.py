"""Search strategies, one module each, behind the interface in `strategies.base`."""

from __future__ import annotations

import inspect

from advsearch.errors import AdvsearchError
from advsearch.model.spec import ModelSpec
from advsearch.search.configs import (
    AdaptiveConfig,
    BatchConfig,
    ConfigError,
    CoverConfig,
    ExhaustiveConfig,
    GuidedConfig,
    LocalConfig,
    OptunaConfig,
    RandomConfig,
    SampledConfig,
)

from .base import Proposal, Strategy
from .exhaustive import ExhaustiveStrategy
from .guided import GuidedStrategy
from .local import LocalStrategy
from .optuna import OptunaStrategy
from .random import RandomStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (RandomStrategy, ExhaustiveStrategy, GuidedStrategy, LocalStrategy, OptunaStrategy)
}


def strategy_class(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise AdvsearchError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def make_strategy(name: str, spec: ModelSpec, config=None, *, tables=None, model_sha256: str | None = None) -> Strategy:
    """Strategy `name` on `spec` with `config` (its `config_class`; None: the defaults).

    Also passes what the strategy computes with rather than is told, to the constructors that take it:
    `tables` (the model's mechanism tables: guided), `model_sha256` (recorded in Optuna studies) and,
    when the config has a `seed_from`, `seeder`: that strategy, made here, whose first batch seeds the
    search.
    """
    cls = strategy_class(name)
    if config is None:
        config = cls.config_class()
    context = {"tables": tables, "model_sha256": model_sha256}
    if getattr(config, "seed_from", None):
        context["seeder"] = make_seeder(config.seed_from, spec, config, tables)
    accepted = inspect.signature(cls).parameters
    return cls(spec, config, **{k: v for k, v in context.items() if k in accepted})


def make_seeder(name: str, spec: ModelSpec, config, tables=None) -> Strategy:
    """Constructor strategy `name` set to propose one batch of `config.batch_size` sequences with `config.seed`."""
    cls = STRATEGIES.get(name)
    if cls is None or not cls.seeds:
        have = ", ".join(n for n, c in STRATEGIES.items() if c.seeds) or "none"
        raise ConfigError("seed_from", f"cannot seed a search from {name!r}: not a constructor strategy "
                                       f"(constructor strategies: {have})")  # fmt: skip
    options = {"budget": config.batch_size, "seed": config.seed, "batch_size": config.batch_size}
    fields = getattr(cls.config_class, "__dataclass_fields__", {})
    return make_strategy(name, spec, cls.config_class(**{k: v for k, v in options.items() if k in fields}),
                         tables=tables)  # fmt: skip


__all__ = ["STRATEGIES", "AdaptiveConfig", "BatchConfig", "ConfigError", "CoverConfig", "ExhaustiveConfig",
           "GuidedConfig", "LocalConfig", "OptunaConfig", "Proposal", "RandomConfig", "SampledConfig",
           "Strategy", "make_seeder", "make_strategy", "strategy_class"]  # fmt: skip
