"""The one interface every search strategy implements.

A strategy is a generator of candidate batches that may learn from verdicts:

    strategy = make_strategy("random", spec, RandomConfig(budget=10_000, seed=0))
    while (proposal := strategy.propose()) is not None:
        judged = judge(proposal.tokens, evaluator.logits(proposal.tokens), ...)
        strategy.observe(proposal, judged)       # adaptive strategies learn here

- `propose()` returns the next `Proposal` (token ids [batch, seq], each row
  starting with `?`, plus which positions to judge and any extra per-row CSV
  columns), or None when the strategy is finished.
- `observe()` receives the judged batch. Enumeration and random sampling ignore
  it; Optuna and local search use it to choose what to propose next (they score
  `judged.logits` with `advsearch.search.objectives`; see `strategies.adaptive`).
- `state_dict()` / `load_state_dict()` capture progress after an observed batch
  so an interrupted run resumes where it stopped (JSON-serialisable).
- `tables()` returns extra result tables the strategy accumulates (file name ->
  rows), e.g. the exhaustive census.
- `total()` is the number of sequences the strategy will propose, if known
  (drives the progress bar).

Each strategy's options are one small dataclass, its `config_class` (all of them in the torch-free
`advsearch.search.configs`, so that the command line is built from them without importing torch);
`config_dict()` is the chosen config as recorded in summary.json. What a strategy computes rather
than is told (the mechanism tables, the model's sha256, a seeding strategy) are constructor
arguments, which `strategies.make_strategy` supplies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from advsearch.model.judge import Judged
from advsearch.model.spec import ModelSpec
from advsearch.search.configs import SampledConfig, config_dict


@dataclass
class Proposal:
    """A batch of candidates: token ids [batch, seq], judged at positions >= `judge_from`.

    `extension=True` promises that the rows are every one-letter extension of
    consecutive parent prefixes, parent-major; the evaluator then computes only
    their last position from the parents' cached keys/values (`cache=True` keeps
    this batch's keys/values for its own extensions). `warmup` lists extension
    batches to compute and cache first, unjudged: the chunks an uninterrupted run
    evaluated on the way down to this one, so that after a resume (or in a shard
    of a scaled-out run) the cached keys/values are bit-identical to that run's.
    """

    tokens: torch.Tensor
    judge_from: int = 0
    columns: dict[str, list] = field(default_factory=dict)  # extra per-row CSV columns
    extension: bool = False
    cache: bool = False
    warmup: list[torch.Tensor] = field(default_factory=list)


class Strategy:
    """Base class: override `propose`; the rest has sensible no-op defaults."""

    name: ClassVar[str] = ""
    extra_columns: ClassVar[tuple[str, ...]] = ()
    needs_tables: ClassVar[bool] = False  # its constructor takes the mechanism tables (`tables=`)
    seeds: ClassVar[bool] = False  # a constructor strategy: its first batch can seed an Optuna study
    config_class: ClassVar[type] = SampledConfig  # its options (advsearch.search.configs)

    def __init__(self, spec: ModelSpec, config):
        self.spec = spec
        self.config = config

    def config_dict(self) -> dict:
        """The options this strategy was made with (summary.json's `config`)."""
        return config_dict(self.config)

    def params(self) -> dict:
        """The parameters that determine this strategy's output (recorded in summary.json)."""
        return {"seed": self.config.seed}

    def total(self) -> int | None:
        return None

    def propose(self) -> Proposal | None:
        raise NotImplementedError

    def observe(self, proposal: Proposal, judged: Judged) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def tables(self) -> dict[str, list[dict]]:
        return {}
