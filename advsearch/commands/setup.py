"""What `advsearch run` builds before its search loop, in one place.

`advsearch bench` times the guided search through this same function, so its
`guided_seq_per_s` figures measure exactly what `run` does (mechanism tables,
strategy, fused evaluator, explainer), not a re-creation of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from advsearch.search.configs import STRATEGY_CONFIGS


def default_batch_size(strategy: str) -> int:
    """`--batch-size` when not given: the default of the strategy's config (trials per ask for optuna,
    prefixes per chunk for exhaustive, sequences per batch for the others)."""
    config_class = STRATEGY_CONFIGS.get(strategy)
    return config_class.__dataclass_fields__["batch_size"].default if config_class else 4096


@dataclass
class Search:
    """A strategy ready to hand to `advsearch.search.runner.run_search`, with its evaluator and annotators."""

    strategy: object  # strategies.base.Strategy
    evaluator: object  # advsearch.model.evaluator.Evaluator
    explainer: object | None = None  # advsearch.mechanism.explain.Explainer, for the explanation columns
    minimizer: object | None = None  # advsearch.search.minimize.Minimizer, for the `minimized` column
    tables: object | None = None  # advsearch.mechanism.tables.MechanismTables, when computed

    @property
    def annotators(self) -> list:
        """What fills the extra failures.csv columns, in column order: the explainer, then the minimizer."""
        return [a for a in (self.explainer, self.minimizer) if a is not None]


def make_search_strategy(loaded, strategy: str, config=None, *, tables=None):
    """Strategy `strategy` on `loaded` with `config` (its config from `advsearch.search.configs`; None:
    the defaults), and the mechanism tables it was given.

    The model's own tables are computed (unless given) when the strategy or the one it seeds from needs
    them; the strategy also gets the model's sha256 (Optuna records it). Returns (strategy, tables).
    """
    from strategies import STRATEGIES, make_strategy, strategy_class

    cls = strategy_class(strategy)  # the one-line "unknown strategy" error
    seed_from = getattr(config, "seed_from", None)
    needs_tables = cls.needs_tables or (seed_from in STRATEGIES and STRATEGIES[seed_from].needs_tables)
    if needs_tables and tables is None:
        from advsearch.mechanism.tables import compute_tables

        tables = compute_tables(loaded)
    return make_strategy(strategy, loaded.spec, config, tables=tables, model_sha256=loaded.sha256), tables


def strategy_options(strategy: str, **options):
    """Strategy `strategy`'s config with those of `options` that are its fields (budget and seed mean
    nothing to exhaustive enumeration, say)."""
    from strategies import strategy_class

    config_class = strategy_class(strategy).config_class
    return config_class(**{k: v for k, v in options.items() if k in config_class.__dataclass_fields__})


def prepare_search(loaded, strategy: str, config=None, *, device: str = "auto", explain: bool = True,
                   minimize: bool = False) -> Search:  # fmt: skip
    """The strategy `strategy` on `loaded` with `config` (see `make_search_strategy`), its fused
    evaluator and, when asked, the explainer (which reads the model's own mechanism tables) and the
    minimizer, as `run` sets them up."""
    from advsearch.model.evaluator import Evaluator

    tables = None
    if explain:
        from advsearch.mechanism.tables import compute_tables

        tables = compute_tables(loaded)
    made, tables = make_search_strategy(loaded, strategy, config, tables=tables)
    search = Search(made, Evaluator(loaded.weights, device=device), tables=tables)
    if minimize:
        from advsearch.search.minimize import Minimizer

        search.minimizer = Minimizer(search.evaluator, loaded.spec)
    if explain:
        from advsearch.mechanism.explain import Explainer

        search.explainer = Explainer(loaded, tables, device=search.evaluator.device)  # on the GPU when present
    return search
