"""Random baseline: i.i.d. uniform tokens after `?` (the training distribution).

Sequence i depends only on the seed, not on the batch size: all batches are
drawn from one seeded generator, and a resumed run replays the draws it skips.
"""

from __future__ import annotations

import torch

from .base import Proposal, Strategy


class RandomStrategy(Strategy):
    name = "random"

    def __init__(self, spec, config):
        super().__init__(spec, config)
        self.done = 0  # sequences proposed and observed
        self.gen = torch.Generator().manual_seed(config.seed)

    def params(self) -> dict:
        return {"seed": self.config.seed, "budget": self.config.budget, "length": self.spec.seq_len}

    def total(self) -> int:
        return self.config.budget

    def _draw(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.spec.n_letters, (n, self.spec.seq_len - 1), generator=self.gen)

    def propose(self) -> Proposal | None:
        n = min(self.config.batch_size, self.config.budget - self.done)
        if n <= 0:
            return None
        return Proposal(torch.cat([torch.full((n, 1), self.spec.qmark), self._draw(n)], 1))

    def observe(self, proposal, judged) -> None:
        self.done += len(proposal.tokens)

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = int(state["done"])
        self.gen.manual_seed(self.config.seed)
        for start in range(0, self.done, 1 << 16):  # replay, in bounded memory
            self._draw(min(1 << 16, self.done - start))
