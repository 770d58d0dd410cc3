"""Exact batched local search: coordinate ascent over single-position substitutions.

From the current sequence, every single-position substitution (positions
1..L-1, each to every other letter: 19 x 9 = 171 neighbours at L = 20) is
scored in one batch; the search moves to the best neighbour if it improves the
objective (`advsearch.search.objectives`: untargeted margin, or the `--target-*`
score). When no single substitution improves, a seeded sample of two-position
moves (up to 1024 of the 13,851) is tried; when that fails too, the search
restarts from the best of a pool of 256 fresh uniform random sequences.

Every batch goes through the runner's judge, so every failing neighbour lands
in failures.csv, not only the climb's endpoints. With `--cover-confusions` one
climb is kept per (true, predicted) pair and the coverage schedule in
`strategies.adaptive` decides which pair is climbed next.

Seeded and deterministic: all randomness (restart pools, two-position samples)
comes from one generator seeded by `--seed`, ties go to the first candidate,
and the generator's state is saved with the run so `--resume` continues the
same trajectory.
"""

from __future__ import annotations

import torch

from advsearch.model.tokens import one_letter_neighbours
from advsearch.search.configs import LocalConfig

from .adaptive import AdaptiveStrategy
from .base import Proposal

EPS = 1e-5  # an improvement must beat float noise


class Climb:
    """One coordinate-ascent trajectory: where it is and what it is doing."""

    def __init__(self):
        self.current: torch.Tensor | None = None  # [L] token ids; None: next batch is a restart pool
        self.score = float("-inf")
        self.phase = "single"  # or "double"
        self.ceiling = float("-inf")  # best local optimum it got stuck at (cover mode re-seeding)
        self.moves = self.restarts = 0

    def state_dict(self, spec) -> dict:
        return {"current": None if self.current is None else spec.decode(self.current),
                "score": None if self.score == float("-inf") else self.score, "phase": self.phase,
                "ceiling": None if self.ceiling == float("-inf") else self.ceiling,
                "moves": self.moves, "restarts": self.restarts}  # fmt: skip

    @classmethod
    def from_state(cls, spec, state: dict) -> "Climb":
        c = cls()
        c.current = spec.encode(state["current"]) if state["current"] is not None else None
        c.score = float("-inf") if state["score"] is None else float(state["score"])
        c.ceiling = float("-inf") if state["ceiling"] is None else float(state["ceiling"])
        c.phase, c.moves, c.restarts = state["phase"], int(state["moves"]), int(state["restarts"])
        return c


def double_moves(current: torch.Tensor, n_letters: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """`count` distinct two-position substitutions of `current`, drawn uniformly without replacement."""
    length, k = len(current), n_letters - 1
    pairs = torch.combinations(torch.arange(1, length), 2)
    total = len(pairs) * k * k
    idx = torch.randperm(total, generator=gen)[: min(count, total)]
    pp, rest = pairs[idx // (k * k)], idx % (k * k)
    out = current.repeat(len(idx), 1)
    rows = torch.arange(len(idx))
    out[rows, pp[:, 0]] = (current[pp[:, 0]] + rest // k + 1) % n_letters
    out[rows, pp[:, 1]] = (current[pp[:, 1]] + rest % k + 1) % n_letters
    return out


class LocalStrategy(AdaptiveStrategy):
    name = "local"
    config_class = LocalConfig
    RESTART_POOL = 256
    DOUBLE_POOL = 1024

    def __init__(self, spec, config: LocalConfig):
        super().__init__(spec, config)
        self.climbs: dict[str, Climb] = {}
        self._pending: tuple[str, tuple[int, int] | None] | None = None

    def params(self) -> dict:
        return super().params() | {"two_position_moves": self.config.two_position_moves,
                                   "batch_size": self.config.batch_size}  # fmt: skip

    # -- one climb step ----------------------------------------------------------------------
    def _tokens(self, climb: Climb, limit: int) -> torch.Tensor:
        cap = max(1, min(limit, self.config.batch_size))
        if climb.current is None:
            return self.random_tokens(min(self.RESTART_POOL, cap))
        if climb.phase == "single":
            return one_letter_neighbours(climb.current, self.spec.n_letters)[:limit]
        return double_moves(climb.current, self.spec.n_letters, min(self.DOUBLE_POOL, cap), self.gen)

    def _climb(self, climb: Climb, tokens: torch.Tensor, score: torch.Tensor) -> None:
        best = int(score.argmax())
        value = float(score[best])
        if climb.current is None:  # a restart pool: start from its best
            climb.current, climb.score, climb.phase = tokens[best].clone(), value, "single"
        elif value > climb.score + EPS:
            climb.current, climb.score, climb.phase = tokens[best].clone(), value, "single"
            climb.moves += 1
        elif climb.phase == "single" and self.config.two_position_moves:
            climb.phase = "double"
        else:  # a local optimum: restart
            climb.ceiling = max(climb.ceiling, climb.score)
            climb.current, climb.score, climb.phase = None, float("-inf"), "single"
            climb.restarts += 1

    def _pair_climb(self, pair: tuple[int, int]) -> Climb:
        """The climb aimed at `pair`, moved to the best start the table knows when that is better."""
        key = pair[0] * self.spec.d_vocab + pair[1]
        climb = self.climbs.setdefault(str(key), Climb())
        known = float(self.table.start_score[pair])
        if key in self.table.start and known > max(climb.score, climb.ceiling) + EPS:
            climb.current, climb.score, climb.phase = self.spec.encode(self.table.start[key]), known, "single"
        return climb

    # -- the Strategy interface --------------------------------------------------------------
    def propose(self) -> Proposal | None:
        if self.finished():
            return None
        if self.schedule is None:
            self._pending = ("run", None)
            return Proposal(self._tokens(self.climbs.setdefault("run", Climb()), self.remaining()), judge_from=1)
        if not self.schedule.warmed:
            self._pending = ("warmup", None)
            return Proposal(self.random_tokens(min(self.schedule.warmup, self.remaining())), judge_from=1)
        pair = self.schedule.next_pair()
        if pair is None:
            return None
        self._pending = ("pair", pair)
        return Proposal(self._tokens(self._pair_climb(pair), self.remaining()), judge_from=1)

    def observe(self, proposal, judged) -> None:
        kind, pair = self._pending or ("run", None)
        self._pending = None
        self.observe_table(judged)
        if kind == "run":
            self._climb(self.climbs["run"], proposal.tokens, self.scores(judged, self.target).score)
        elif kind == "warmup":
            self.schedule.warmed = True
        else:
            key = str(pair[0] * self.spec.d_vocab + pair[1])
            self._climb(self.climbs[key], proposal.tokens, self.scores(judged, self.schedule.target(pair)).score)
            self.schedule.step_done(pair, len(proposal.tokens))
        self.done += len(proposal.tokens)

    def state_dict(self) -> dict:
        return self.base_state() | {"climbs": {k: c.state_dict(self.spec) for k, c in self.climbs.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.load_base_state(state)
        self.climbs = {k: Climb.from_state(self.spec, c) for k, c in state["climbs"].items()}
