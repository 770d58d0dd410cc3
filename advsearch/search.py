"""What `advsearch run` builds before its search loop, in one place.

`advsearch bench` times the guided search through this same function, so its
`guided_seq_per_s` figures measure exactly what `run` does (mechanism tables,
strategy, fused evaluator, explainer), not a re-creation of it.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BATCH_SIZES = {"optuna": 128, "exhaustive": 65536}  # every other strategy: 4096


def default_batch_size(strategy: str) -> int:
    """`--batch-size` when not given: trials per ask for optuna, prefixes per chunk for exhaustive."""
    return DEFAULT_BATCH_SIZES.get(strategy, 4096)


@dataclass
class Search:
    """A strategy ready to hand to `advsearch.runner.run_search`, with its evaluator and annotators."""

    strategy: object  # strategies.base.Strategy
    evaluator: object  # advsearch.evaluator.Evaluator
    explainer: object | None = None  # advsearch.explain.Explainer, for the explanation columns
    minimizer: object | None = None  # advsearch.minimize.Minimizer, for the `minimized` column


def prepare_search(loaded, strategy: str, config, *, device: str = "auto", explain: bool = True,
                   minimize: bool = False) -> Search:  # fmt: skip
    """The strategy `strategy` on `loaded` with `config` (a strategies.RunConfig), as `run` sets it up.

    The mechanism tables are computed when the strategy (or the one it seeds from) needs them or
    when explaining, since explanations read the model's own tables; they end up in `config.tables`.
    """
    from strategies import STRATEGIES, make_strategy

    from .evaluator import Evaluator

    if strategy not in STRATEGIES:
        make_strategy(strategy, loaded.spec, config)  # the one-line "unknown strategy" error
    seed_from = getattr(config, "seed_from", None)
    needs_tables = STRATEGIES[strategy].needs_tables or (seed_from and STRATEGIES[seed_from].needs_tables)
    if needs_tables or explain:
        from .mechanism import compute_tables

        config.tables = compute_tables(loaded)
    search = Search(make_strategy(strategy, loaded.spec, config), Evaluator(loaded.weights, device=device))
    if minimize:
        from .minimize import Minimizer

        search.minimizer = Minimizer(search.evaluator, loaded.spec)
    if explain:
        from .explain import Explainer

        search.explainer = Explainer(loaded, config.tables)
    return search
