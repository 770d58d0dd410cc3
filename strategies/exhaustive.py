"""Exhaustive enumeration: every prefix `?` + n tokens, n = 1..max_len.

Each prefix is judged once, at its last position: the model is causal, so a
prefix's output does not depend on what follows it.

With prefix sharing (the default) prefixes are visited depth-first in chunks of
at most `batch_size` (rounded to whole parents): each chunk is every one-letter
extension of a run of parents whose keys/values the evaluator still holds, so a
new prefix costs one token and memory stays bounded by max_len chunks. Without
it (`shared=False`) each depth is enumerated in full, with full forwards. Both
visit the prefixes of one length in lexicographic order and give the same census.

A chunk and everything below it (its *subtree*) can be computed on its own:
`start_at(item)` restricts a strategy to one todo item's subtree, and `absorb`
merges such a shard's census back in order (`advsearch.commands.scaleout` does this on
Ray). The first chunk a strategy proposes recomputes, as warm-up, the chunks on
the path down to it, so its numbers are bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import torch

from advsearch.errors import AdvsearchError
from advsearch.model.prefix import blocks
from advsearch.search.configs import ConfigError, ExhaustiveConfig

from .base import Proposal, Strategy


def prefixes(n: int, start: int, stop: int, n_letters: int, qmark: int) -> torch.Tensor:
    """Prefixes number start..stop-1 of length n (base-`n_letters` digits), each led by `?`.

    A run of whole parents (start and stop multiples of `n_letters`, as every prefix-sharing chunk is)
    is its parents' rows, each repeated once per letter, with the letters 0..n_letters-1 appended:
    the same tensor as the digit arithmetic, with a tenth of the divisions.
    """
    t = n_letters
    if n > 1 and start % t == 0 and stop % t == 0 and stop > start:
        parents = prefixes(n - 1, start // t, stop // t, t, qmark)
        out = torch.empty(stop - start, n + 1, dtype=torch.long)
        grouped = out.view(len(parents), t, n + 1)
        grouped[:, :, :n] = parents.unsqueeze(1)
        grouped[:, :, n] = torch.arange(t, dtype=torch.long)
        return out
    idx = torch.arange(start, stop, dtype=torch.long).unsqueeze(1)
    powers = n_letters ** torch.arange(n - 1, -1, -1, dtype=torch.long)
    digits = idx // powers % n_letters
    return torch.cat([torch.full((stop - start, 1), qmark, dtype=torch.long), digits], 1)


class ExhaustiveStrategy(Strategy):
    name = "exhaustive"
    config_class = ExhaustiveConfig

    def __init__(self, spec, config: ExhaustiveConfig):
        super().__init__(spec, config)
        if not 1 <= config.max_len <= min(spec.seq_len - 1, 18):
            raise ConfigError("max_len", f"the longest prefix must be between 1 and {min(spec.seq_len - 1, 18)} "
                                         f"tokens after '?', got {config.max_len}")  # fmt: skip
        self.shared = config.shared_prefixes
        t = spec.n_letters
        self.chunk = max(t, config.batch_size // t * t)
        # Work still to do, as (depth, first index, stop index); the last item is next.
        self.todo: list[tuple[int, int, int]] = [(1, 0, t)] if self.shared else [(1, 0, min(t, self.chunk))]
        self.census: dict[int, dict] = {}
        self.warm = False  # the evaluator holds the parents of todo[-1] (after the first observed chunk)

    def params(self) -> dict:
        return {"max_len": self.config.max_len, "shared_prefixes": self.shared}

    def total(self) -> int:
        return sum(self.spec.n_letters**n for n in range(1, self.config.max_len + 1))

    def propose(self) -> Proposal | None:
        if not self.todo:
            return None
        t, q = self.spec.n_letters, self.spec.qmark
        depth, start, stop = self.todo[-1]
        warmup = [] if self.warm or not self.shared else [prefixes(*c, t, q) for c in self._path(self.todo[-1])]
        return Proposal(prefixes(depth, start, stop, t, q), judge_from=depth, extension=self.shared,
                        cache=depth < self.config.max_len, warmup=warmup)  # fmt: skip

    def _path(self, item: tuple[int, int, int]) -> list[tuple[int, int, int]]:
        """The chunks an uninterrupted run evaluates before `item` on its way down from the root, root first."""
        depth, start, _ = item
        t, path, chunk = self.spec.n_letters, [], (1, 0, self.spec.n_letters)
        while chunk[0] < depth:
            path.append(chunk)
            d, lo, hi = chunk
            child = start // t ** (depth - d - 1)  # the ancestor of `item`'s first prefix at depth d + 1
            first = lo * t + (child - lo * t) // self.chunk * self.chunk
            chunk = (d + 1, first, min(first + self.chunk, hi * t))
        return path

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

    def _count(self, depth: int, n: int, failures: int, confident: int, example: str) -> None:
        """Add n prefixes' counts to the census row of `depth`; the first example (in visiting order) stays."""
        row = self.census.setdefault(depth, {"length": depth, "prefixes": 0, "failures": 0,
                                             "confident_failures": 0, "failure_rate": 0.0, "example": ""})  # fmt: skip
        row["prefixes"] += n
        row["failures"] += failures
        row["confident_failures"] += confident
        row["failure_rate"] = row["failures"] / row["prefixes"]
        row["example"] = row["example"] or example

    def observe(self, proposal, judged) -> None:
        depth, start, stop = self.todo.pop()
        last_fail = judged.failure[:, -1]
        example = self.spec.decode(proposal.tokens[int(last_fail.nonzero()[0])]) if last_fail.any() else ""
        self._count(depth, len(proposal.tokens), int(last_fail.sum()), int(judged.confident[:, -1].sum()), example)
        self._advance(depth, start, stop)
        self.warm = True

    # Shards: a todo item's whole subtree, computed by another strategy object (another process).

    def pending(self) -> list[tuple[int, int, int]]:
        """The todo items, next first; each stands for its whole subtree, and subtrees are visited in this order."""
        return self.todo[::-1]

    def subtree_size(self, item: tuple[int, int, int]) -> int:
        """Prefixes in `item`'s chunk and every chunk below it."""
        depth, start, stop = item
        return (stop - start) * sum(self.spec.n_letters**k for k in range(self.config.max_len - depth + 1))

    def start_at(self, item: tuple[int, int, int], warm: bool = False) -> ExhaustiveStrategy:
        """Restrict this strategy to `item`'s subtree, with an empty census (a shard of a larger run).

        `warm`: the evaluator it will be run with already holds the parents of `item` (it is a copy of
        the one that evaluated them), so the chunks on the path down to `item` are not evaluated again."""
        if not self.shared:
            raise AdvsearchError("exhaustive shards need prefix sharing")
        self.todo, self.census, self.warm = [tuple(item)], {}, warm
        return self

    def split_leaves(self, parts: int) -> None:
        """Cut every todo chunk of leaves (prefixes of `max_len` tokens) into up to `parts` consecutive
        items of whole parent blocks, so that shards can share it.

        `advsearch.model.prefix.extend` computes a chunk block by block, each block with the same
        operations on the same inputs whatever else the chunk holds, and a run of a chunk's blocks is
        cut into the same blocks on its own (every block but a chunk's last holds `BLOCK_PARENTS`
        parents): each part gives the numbers the whole chunk gives, and the parts come in order.
        """
        t, todo = self.spec.n_letters, []
        for depth, start, stop in self.todo:
            spans = blocks((stop - start) // t) if self.shared and depth == self.config.max_len else []
            step = -(-len(spans) // parts) if spans else 1
            cuts = [start + lo * t for lo, _ in spans[::step]][1:]
            bounds = [start, *cuts, stop]
            todo.extend(reversed([(depth, lo, hi) for lo, hi in zip(bounds, bounds[1:])]))
        self.todo = todo

    def absorb(self, item: tuple[int, int, int], census: list[dict]) -> None:
        """Count the next todo item's subtree as done, from the census rows of the shard that computed it."""
        if not self.todo or self.todo[-1] != tuple(item):
            raise ValueError(f"shard {item} is not the next todo item")
        self.todo.pop()
        for r in census:
            self._count(r["length"], r["prefixes"], r["failures"], r["confident_failures"], r["example"])

    def state_dict(self) -> dict:
        return {"todo": [list(item) for item in self.todo], "census": list(self.census.values())}

    def load_state_dict(self, state: dict) -> None:
        self.todo = [tuple(item) for item in state["todo"]]
        self.census = {int(r["length"]): dict(r) for r in state["census"]}
        self.warm = False

    def tables(self) -> dict[str, list[dict]]:
        return {"census.csv": [self.census[n] for n in sorted(self.census)]}
