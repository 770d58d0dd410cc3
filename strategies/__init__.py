"""Search strategies, one module each, behind the interface in `strategies.base`."""

from __future__ import annotations

from advsearch.errors import AdvsearchError
from advsearch.spec import ModelSpec

from .base import Proposal, RunConfig, Strategy
from .exhaustive import ExhaustiveStrategy
from .guided import GuidedStrategy
from .local import LocalStrategy
from .optuna import OptunaStrategy
from .random import RandomStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (RandomStrategy, ExhaustiveStrategy, GuidedStrategy, LocalStrategy, OptunaStrategy)
}


def make_strategy(name: str, spec: ModelSpec, config: RunConfig) -> Strategy:
    if name not in STRATEGIES:
        raise AdvsearchError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name](spec, config)


__all__ = ["STRATEGIES", "Proposal", "RunConfig", "Strategy", "make_strategy"]
