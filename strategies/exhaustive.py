"""Exhaustive enumeration: every prefix `?` + n tokens, n = 1..max_len.

Each prefix is judged once, at its last position: the model is causal, so a
prefix's output does not depend on what follows it.

With prefix sharing (the default) prefixes are visited depth-first in chunks of
at most `batch_size` (rounded to whole parents): each chunk is every one-letter
extension of a run of parents whose keys/values the evaluator still holds, so a
new prefix costs one token and memory stays bounded by max_len chunks. Without
it (`shared=False`) each depth is enumerated in full, with full forwards. Both
visit the prefixes of one length in lexicographic order and give the same census.
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
        if not 1 <= config.max_len <= min(spec.seq_len - 1, 18):
            raise AdvsearchError(f"--max-len must be between 1 and {min(spec.seq_len - 1, 18)}, got {config.max_len}")
        self.shared = config.shared_prefixes
        t = spec.n_letters
        self.chunk = max(t, config.batch_size // t * t)
        # Work still to do, as (depth, first index, stop index); the last item is next.
        self.todo: list[tuple[int, int, int]] = [(1, 0, t)] if self.shared else [(1, 0, min(t, self.chunk))]
        self.census: dict[int, dict] = {}

    def params(self) -> dict:
        return {"max_len": self.config.max_len, "shared_prefixes": self.shared}

    def total(self) -> int:
        return sum(self.spec.n_letters**n for n in range(1, self.config.max_len + 1))

    def propose(self) -> Proposal | None:
        if not self.todo:
            return None
        depth, start, stop = self.todo[-1]
        tokens = prefixes(depth, start, stop, self.spec.n_letters, self.spec.qmark)
        return Proposal(tokens, judge_from=depth, extension=self.shared, cache=depth < self.config.max_len)

    def _advance(self, depth: int, start: int, stop: int) -> None:
        t, count = self.spec.n_letters, self.spec.n_letters**depth
        if self.shared:  # depth-first: this chunk's children come next, split into chunks
            if depth < self.config.max_len:
                bounds = list(range(start * t, stop * t, self.chunk)) + [stop * t]
                self.todo.extend(reversed(list(zip([depth + 1] * len(bounds), bounds[:-1], bounds[1:]))))
        elif stop < count:
            self.todo.append((depth, stop, min(count, stop + self.chunk)))
        elif depth < self.config.max_len:
            self.todo.append((depth + 1, 0, min(t ** (depth + 1), self.chunk)))

    def observe(self, proposal, judged) -> None:
        depth, start, stop = self.todo.pop()
        row = self.census.setdefault(depth, {"length": depth, "prefixes": 0, "failures": 0,
                                             "confident_failures": 0, "failure_rate": 0.0, "example": ""})  # fmt: skip
        last_fail = judged.failure[:, -1]
        row["prefixes"] += len(proposal.tokens)
        row["failures"] += int(last_fail.sum())
        row["confident_failures"] += int(judged.confident[:, -1].sum())
        row["failure_rate"] = row["failures"] / row["prefixes"]
        if not row["example"] and last_fail.any():
            row["example"] = self.spec.decode(proposal.tokens[int(last_fail.nonzero()[0])])
        self._advance(depth, start, stop)

    def state_dict(self) -> dict:
        return {"todo": [list(item) for item in self.todo], "census": list(self.census.values())}

    def load_state_dict(self, state: dict) -> None:
        self.todo = [tuple(item) for item in state["todo"]]
        self.census = {int(r["length"]): dict(r) for r in state["census"]}

    def tables(self) -> dict[str, list[dict]]:
        return {"census.csv": [self.census[n] for n in sorted(self.census)]}
