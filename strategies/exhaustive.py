"""Exhaustive enumeration: every prefix `?` + n tokens, n = 1..max_len.

Each prefix is judged once, at its last position: the model is causal, so a
prefix's output does not depend on what follows it. Prefixes are enumerated in
lexicographic order (a < b < ... ), depth by depth, in chunks of `batch_size`.
"""

from __future__ import annotations

import torch

from advsearch.errors import AdvsearchError

from .base import Proposal, Strategy


def prefixes(n: int, start: int, stop: int, n_letters: int, qmark: int) -> torch.Tensor:
    """Prefixes number start..stop-1 of length n (base-`n_letters` digits), each led by `?`."""
    idx = torch.arange(start, stop, dtype=torch.long).unsqueeze(1)
    powers = n_letters ** torch.arange(n - 1, -1, -1, dtype=torch.long)
    digits = idx // powers % n_letters
    return torch.cat([torch.full((stop - start, 1), qmark, dtype=torch.long), digits], 1)


class ExhaustiveStrategy(Strategy):
    name = "exhaustive"

    def __init__(self, spec, config):
        super().__init__(spec, config)
        if not 1 <= config.max_len <= spec.seq_len - 1:
            raise AdvsearchError(f"--max-len must be between 1 and {spec.seq_len - 1}, got {config.max_len}")
        self.depth, self.next_index = 1, 0
        self.census: dict[int, dict] = {}

    def params(self) -> dict:
        return {"max_len": self.config.max_len}

    def total(self) -> int:
        return sum(self.spec.n_letters**n for n in range(1, self.config.max_len + 1))

    def propose(self) -> Proposal | None:
        if self.depth > self.config.max_len:
            return None
        count = self.spec.n_letters**self.depth
        stop = min(count, self.next_index + self.config.batch_size)
        tokens = prefixes(self.depth, self.next_index, stop, self.spec.n_letters, self.spec.qmark)
        return Proposal(tokens, judge_from=self.depth)

    def observe(self, proposal, judged) -> None:
        n = proposal.tokens.shape[1] - 1
        row = self.census.setdefault(n, {"length": n, "prefixes": 0, "failures": 0, "confident_failures": 0,
                                          "failure_rate": 0.0, "example": ""})
        last_fail, last_conf = judged.failure[:, -1], judged.confident[:, -1]
        row["prefixes"] += len(proposal.tokens)
        row["failures"] += int(last_fail.sum())
        row["confident_failures"] += int(last_conf.sum())
        row["failure_rate"] = row["failures"] / row["prefixes"]
        if not row["example"] and last_fail.any():
            row["example"] = self.spec.decode(proposal.tokens[int(last_fail.nonzero()[0])])
        self.next_index += len(proposal.tokens)
        if self.next_index >= self.spec.n_letters**self.depth:
            self.depth, self.next_index = self.depth + 1, 0

    def state_dict(self) -> dict:
        return {"depth": self.depth, "next_index": self.next_index, "census": list(self.census.values())}

    def load_state_dict(self, state: dict) -> None:
        self.depth, self.next_index = int(state["depth"]), int(state["next_index"])
        self.census = {int(r["length"]): dict(r) for r in state["census"]}

    def tables(self) -> dict[str, list[dict]]:
        return {"census.csv": [self.census[n] for n in sorted(self.census)]}
