"""The one interface every search strategy implements.

A strategy is a generator of candidate batches that may learn from verdicts:

    strategy = make_strategy("random", spec, RunConfig(budget=10_000, seed=0))
    while (proposal := strategy.propose()) is not None:
        judged = judge(proposal.tokens, evaluator.logits(proposal.tokens), ...)
        strategy.observe(proposal, judged)       # adaptive strategies learn here

- `propose()` returns the next `Proposal` (token ids [batch, seq], each row
  starting with `?`, plus which positions to judge and any extra per-row CSV
  columns), or None when the strategy is finished.
- `observe()` receives the judged batch. Enumeration and random sampling ignore
  it; Optuna and local search use it to choose what to propose next (they score
  `judged.logits` with `advsearch.objectives`; see `strategies.adaptive`).
- `state_dict()` / `load_state_dict()` capture progress after an observed batch
  so an interrupted run resumes where it stopped (JSON-serialisable).
- `tables()` returns extra result tables the strategy accumulates (file name ->
  rows), e.g. the exhaustive census.
- `total()` is the number of sequences the strategy will propose, if known
  (drives the progress bar).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from advsearch.judge import Judged
from advsearch.spec import ModelSpec


@dataclass
class RunConfig:
    """Options a strategy may read; each strategy uses the ones it needs."""

    budget: int = 10_000
    seed: int = 0
    max_len: int = 5
    batch_size: int = 4096
    shared_prefixes: bool = True  # exhaustive: reuse parents' keys/values
    families: list[str] | None = None  # guided: families to use (None: all)
    tables: object | None = None  # guided: the model's MechanismTables (computed, never typed in)
    # adaptive searches (local, optuna)
    length: int | None = None  # searched sequence length, '?' included (None: the model's n_ctx)
    target_pos: int | None = None  # targeted search: position, true char, predicted char (None: any)
    target_true: str | None = None
    target_pred: str | None = None
    cover_confusions: bool = False  # aim at every (true, predicted) pair in turn; writes confusions.csv
    cover_threshold: float = 0.9  # a pair is covered by a witness with p_pred >= this
    two_position_moves: bool = True  # local: try two-position moves before restarting
    sampler: str = "tpe"  # optuna: tpe | ga | gp | random
    storage: str | None = None  # optuna: storage URL (sqlite:///..., journal file, postgresql://...)
    study_name: str | None = None
    seed_from: str | None = None  # optuna: strategy whose first batch is enqueued as the first trials
    model_sha256: str | None = None  # optuna: recorded in the study, so workers with another model cannot join


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
    needs_tables: ClassVar[bool] = False  # set RunConfig.tables (the mechanism tables) before making it

    def __init__(self, spec: ModelSpec, config: RunConfig):
        self.spec = spec
        self.config = config

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
