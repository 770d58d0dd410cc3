"""Random baseline: i.i.d. uniform tokens after `?` (the training distribution).

Sequence i depends only on the seed, not on the batch size: all batches are
drawn from one seeded generator, and a resumed run replays the draws it skips.
With `--cover-confusions` it keeps the confusion-coverage table (the baseline
for local and optuna coverage runs) and writes confusions.csv; it does not aim.
"""

from __future__ import annotations

import torch

from advsearch.search.configs import RandomConfig
from advsearch.search.confusions import ConfusionTable

from .base import Proposal, Strategy


class RandomStrategy(Strategy):
    name = "random"
    config_class = RandomConfig

    def __init__(self, spec, config: RandomConfig):
        super().__init__(spec, config)
        self.done = 0  # sequences proposed and observed
        self.gen = torch.Generator().manual_seed(config.seed)
        self.table = ConfusionTable(spec, config.cover_threshold) if config.cover_confusions else None

    def params(self) -> dict:
        p = {"seed": self.config.seed, "budget": self.config.budget, "length": self.spec.seq_len}
        if self.table is not None:
            p |= {"cover_confusions": True, "cover_threshold": self.config.cover_threshold}
        return p

    def total(self) -> int:
        return self.config.budget

    def propose(self) -> Proposal | None:
        n = min(self.config.batch_size, self.config.budget - self.done)
        if n <= 0:
            return None
        return Proposal(self.spec.random_tokens(n, self.gen))

    def observe(self, proposal, judged) -> None:
        self.done += len(proposal.tokens)
        if self.table is not None:
            self.table.update(judged)

    def state_dict(self) -> dict:
        return {"done": self.done} | ({"table": self.table.state_dict()} if self.table is not None else {})

    def load_state_dict(self, state: dict) -> None:
        self.done = int(state["done"])
        if self.table is not None:
            self.table.load_state_dict(state["table"])
        self.gen.manual_seed(self.config.seed)
        for start in range(0, self.done, 1 << 16):  # replay, in bounded memory
            self.spec.random_tokens(min(1 << 16, self.done - start), self.gen)

    def tables(self) -> dict[str, list[dict]]:
        return {"confusions.csv": self.table.rows()} if self.table is not None else {}
