"""What `advsearch run` builds before its search loop, in one place.

`advsearch bench` times the guided search through this same function, so its
`guided_seq_per_s` figures measure exactly what `run` does (mechanism tables,
strategy, fused evaluator, explainer), not a re-creation of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .strategy_config import STRATEGY_CONFIGS


def default_batch_size(strategy: str) -> int:
    """`--batch-size` when not given: the default of the strategy's config (trials per ask for optuna,
    prefixes per chunk for exhaustive, sequences per batch for the others)."""
    config_class = STRATEGY_CONFIGS.get(strategy)
    return config_class.__dataclass_fields__["batch_size"].default if config_class else 4096


@dataclass
class Search:
    """A strategy ready to hand to `advsearch.runner.run_search`, with its evaluator and annotators."""

    strategy: object  # strategies.base.Strategy
    evaluator: object  # advsearch.evaluator.Evaluator
    explainer: object | None = None  # advsearch.explain.Explainer, for the explanation columns
    minimizer: object | None = None  # advsearch.minimize.Minimizer, for the `minimized` column
    tables: object | None = None  # advsearch.mechanism.MechanismTables, when computed


def prepare_search(loaded, strategy: str, config=None, *, device: str = "auto", explain: bool = True,
                   minimize: bool = False) -> Search:  # fmt: skip
    """The strategy `strategy` on `loaded` with `config` (its config from `advsearch.strategy_config`;
    None: the defaults; a legacy `strategies.RunConfig` is split), as `run` sets it up.

    The mechanism tables are computed when the strategy (or the one it seeds from) needs them or
    when explaining, since explanations read the model's own tables; they go to the strategy's
    constructor and end up in `Search.tables`. The strategy gets the model's sha256 (Optuna records it).
    """
    from strategies import STRATEGIES, make_strategy, strategy_class

    from .evaluator import Evaluator

    cls = strategy_class(strategy)  # the one-line "unknown strategy" error
    seed_from = getattr(config, "seed_from", None)
    needs_tables = cls.needs_tables or (seed_from in STRATEGIES and STRATEGIES[seed_from].needs_tables)
    tables = getattr(config, "tables", None)  # a legacy RunConfig may carry them
    if (needs_tables or explain) and tables is None:
        from .mechanism import compute_tables

        tables = compute_tables(loaded)
    made = make_strategy(strategy, loaded.spec, config, tables=tables, model_sha256=loaded.sha256)
    search = Search(made, Evaluator(loaded.weights, device=device), tables=tables)
    if minimize:
        from .minimize import Minimizer

        search.minimizer = Minimizer(search.evaluator, loaded.spec)
    if explain:
        from .explain import Explainer

        search.explainer = Explainer(loaded, tables, device=search.evaluator.device)  # on the GPU when present
    return search
