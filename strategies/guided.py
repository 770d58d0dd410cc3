"""Mechanism-guided constructors: families of inputs built to break the loaded model.

Each family turns a weakness the mechanism tables describe into a seeded,
parametric generator of full-length sequences. The letter sets come from the
loaded checkpoint's computed tables (its layer-1 responsibility sets), never
from typed-in letters, so another checkpoint gets other constructors.

Families (S_h is the set of letters layer-1 head h is responsible for). What
the weights say a layer-1 head does: attending to a letter of its own set, it
pushes that letter down and lifts the letter's set-mates; attending to other
heads' letters, it lifts its own letters and pushes `?` down.

- `overload`: many copies of letters of S_h, then one letter u of S_h (the
  answer from then on), then a unique letter v of another head's set, then
  more copies. Head h's attention goes to its duplicated letters, while the
  head responsible for v attends to letters of S_h, which are not its own, and
  so lifts its own letters, v among them: v can beat u.
- `first_instance`: a run of duplicated letters, most from S_h, then the first
  instance of a letter of S_h at the current position (it is the answer).
- `late_duplicate`: x of S_h first, many copies of other letters of S_h, then a
  second x (x is no longer the answer). Head h's attention is spread over the
  copies, each of which lifts its set-mates, x among them, so x may not be
  pushed down enough.
- `all_duplicated`: every letter duplicated (the answer is `?`), the copies
  concentrated on one head's set, then one late change: a new letter.
- `adjacent_unique`: two unique letters side by side (x then y, from different
  heads) after copies of x's set: the answer is x, the model may say y.

`GuidedStrategy` cycles through the chosen families sequence by sequence, and
counts per family how many sequences contain a confident failure
(p_pred >= 0.9): the yield it reports in `families.csv` and summary.json.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from advsearch.search.configs import ConfigError, GuidedConfig

from .base import Proposal, Strategy


class Constructor:
    """What a family may use: the tables' letter sets, the sequence length and a seeded rng."""

    def __init__(self, tables, letters: int, qmark: int, length: int, rng: random.Random):
        self.sets = [s for s in tables.responsibility_sets if s]
        self.letters, self.qmark, self.length, self.rng = letters, qmark, length, rng

    def other_letters(self, s: list[int]) -> list[int]:
        return [t for t in range(self.letters) if t not in s]

    def draw(self, pool: list[int], n: int) -> list[int]:
        """`[rng.choice(pool) for _ in range(n)]`: the same letters from the same random bits, leaving the
        generator in the same state, without two Python calls per letter.

        `random.Random.choice(seq)` is `seq[rng._randbelow(len(seq))]`, and `_randbelow(m)` draws
        `getrandbits(m.bit_length())` until the value is below m; this loop makes those calls itself
        (tests/test_guided.py holds it to `choice`).
        """
        size, getrandbits = len(pool), self.rng.getrandbits
        bits, out = size.bit_length(), []
        if not size and n > 0:
            raise IndexError("Cannot choose from an empty sequence")
        for _ in range(n):
            r = getrandbits(bits)
            while r >= size:
                r = getrandbits(bits)
            out.append(pool[r])
        return out

    def shuffle(self, x: list[int]) -> None:
        """`rng.shuffle(x)`, with `_randbelow` made inline as in `draw`: the same order from the same random
        bits (tests/test_guided.py holds it to `shuffle`)."""
        getrandbits = self.rng.getrandbits
        for i in range(len(x) - 1, 0, -1):
            size = i + 1
            bits = size.bit_length()
            r = getrandbits(bits)
            while r >= size:
                r = getrandbits(bits)
            x[i], x[r] = x[r], x[i]

    def copies(self, pool: list[int], n: int) -> list[int]:
        """n letters drawn from pool, shuffled, every drawn letter at least twice."""
        body = self.draw(pool, max(n, 2))
        body += [t for t in set(body) if body.count(t) == 1]
        self.shuffle(body)
        return body

    def finish(self, seq: list[int], pool: list[int]) -> list[int]:
        """Pad with letters of pool that are already duplicated (keeps the answer) and cut to length."""
        dup = [t for t in set(seq[1:]) if seq.count(t) >= 2 and t in pool] or pool
        dup.sort()
        seq += self.draw(dup, self.length - len(seq))
        return seq[: self.length]

    def pick_set(self, min_size: int = 1) -> list[int]:
        candidates = [s for s in self.sets if len(s) >= min_size] or [list(range(self.letters))]
        return self.rng.choice(candidates)


def overload(c: Constructor) -> list[int]:
    s = c.pick_set(2)
    u = c.rng.choice(s)
    busy = [t for t in s if t != u]
    body = c.copies(busy, c.rng.randint(10, 16))
    seq = [c.qmark, *body, u, *c.rng.sample(body, c.rng.randint(0, 1)), c.rng.choice(c.other_letters(s))]
    return c.finish(seq, busy)


def first_instance(c: Constructor) -> list[int]:
    s = c.pick_set(2)
    new = c.rng.choice(s)
    busy = [t for t in s if t != new]
    k = c.rng.randint(c.length - 6, c.length - 1)
    return c.finish([c.qmark, *c.copies(busy, k - 1)][:k] + [new], busy)


def late_duplicate(c: Constructor) -> list[int]:
    s = c.pick_set(2)
    x = c.rng.choice(s)
    busy = [t for t in s if t != x]
    return c.finish([c.qmark, x, *c.copies(busy, c.rng.randint(8, 16)), x], busy + [x])


def all_duplicated(c: Constructor) -> list[int]:
    s = c.pick_set(2)
    seq = [c.qmark, *c.copies(s, c.rng.randint(10, 17))][: c.length - 1]
    fresh = [t for t in range(c.letters) if t not in seq]
    seq.append(c.rng.choice([t for t in fresh if t in s] or fresh or s))
    return c.finish(seq, s)


def adjacent_unique(c: Constructor) -> list[int]:
    s = c.pick_set(2)
    x = c.rng.choice(s)
    busy = [t for t in s if t != x]
    seq = [c.qmark, *c.copies(busy, c.rng.randint(10, 16)), x, c.rng.choice(c.other_letters(s))]
    return c.finish(seq, busy)


FAMILIES: dict[str, Callable[[Constructor], list[int]]] = {
    f.__name__: f for f in (overload, first_instance, late_duplicate, all_duplicated, adjacent_unique)
}


class GuidedStrategy(Strategy):
    name = "guided"
    extra_columns = ("family",)
    needs_tables = True
    seeds = True
    config_class = GuidedConfig

    def __init__(self, spec, config: GuidedConfig, *, tables):
        """`tables`: the loaded model's `advsearch.mechanism.tables.MechanismTables` (its letter sets)."""
        super().__init__(spec, config)
        if tables is None:
            raise TypeError("the guided strategy needs the model's mechanism tables (tables=...)")
        names = config.families or list(FAMILIES)
        unknown = [f for f in names if f not in FAMILIES]
        if unknown:
            raise ConfigError("families", f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                                          f"choose from {', '.join(FAMILIES)}")  # fmt: skip
        self.families = names
        self.mechanism = tables
        self.rng = random.Random(config.seed)
        self.builder = Constructor(tables, spec.n_letters, spec.qmark, spec.seq_len, self.rng)
        self.done = 0
        self.counts = {f: {"family": f, "sequences": 0, "confident_failures": 0, "yield": 0.0} for f in names}

    def params(self) -> dict:
        return {"seed": self.config.seed, "budget": self.config.budget, "families": self.families,
                "tables_sha256": self.mechanism.sha256}  # fmt: skip

    def total(self) -> int:
        return self.config.budget

    def _draw(self, n: int) -> tuple[list[list[int]], list[str]]:
        names = [self.families[(self.done + i) % len(self.families)] for i in range(n)]
        return [FAMILIES[f](self.builder) for f in names], names

    def propose(self) -> Proposal | None:
        n = min(self.config.batch_size, self.config.budget - self.done)
        if n <= 0:
            return None
        seqs, names = self._draw(n)
        return Proposal(torch.tensor(seqs, dtype=torch.long), columns={"family": names})

    def observe(self, proposal, judged) -> None:
        for name, h in zip(proposal.columns["family"], judged.hits().tolist()):
            row = self.counts[name]
            row["sequences"] += 1
            row["confident_failures"] += int(h)
            row["yield"] = row["confident_failures"] / row["sequences"]
        self.done += len(proposal.tokens)

    def state_dict(self) -> dict:
        return {"done": self.done, "counts": list(self.counts.values())}

    def load_state_dict(self, state: dict) -> None:
        self.rng.seed(self.config.seed)
        done, self.done = int(state["done"]), 0
        while self.done < done:  # replay the draws, so the next batch is what it would have been
            self.done += len(self._draw(min(self.config.batch_size, done - self.done))[0])
        self.counts = {r["family"]: dict(r) for r in state["counts"]}

    def tables(self) -> dict[str, list[dict]]:
        return {"families.csv": list(self.counts.values())}
