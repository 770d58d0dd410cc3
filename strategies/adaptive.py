"""What the adaptive strategies (local, optuna) share: length, target, confusion coverage.

`AdaptiveStrategy` resolves `--length` and the `--target-*` options into an
`advsearch.search.objectives.Target`, draws random sequences from one seeded
generator, counts the budget, and, with `--cover-confusions`, keeps a
`ConfusionTable` and a `CoverSchedule` and writes `confusions.csv`.

Confusion coverage (`--cover-confusions`): the run first spends a warm-up batch of uniform random sequences, then aims
at one uncovered (true, predicted) pair at a time: the most promising pair
first (best targeted score seen so far), a few search steps per visit, round
after round over the pairs still uncovered, each round allowing twice the steps
of the one before. Every evaluated batch updates the whole table, so a search
aimed at one pair often covers others on the way. The run stops when every pair
is covered or the budget is spent.
"""

from __future__ import annotations

import base64

import torch

from advsearch.model.judge import Judged
from advsearch.search.configs import AdaptiveConfig, ConfigError
from advsearch.search.confusions import ConfusionTable
from advsearch.search.objectives import Scores, Target, score

from .base import Strategy


class CoverSchedule:
    def __init__(self, table: ConfusionTable, warmup: int, steps: int = 4, growth: int = 2):
        self.table, self.warmup = table, warmup
        self.first_steps, self.growth = steps, growth
        self.round, self.visited, self.active, self.steps_done = 0, set(), None, 0
        self.warmed = warmup == 0

    def steps_per_visit(self) -> int:
        return self.first_steps * self.growth**self.round

    def key(self, pair: tuple[int, int]) -> int:
        return pair[0] * self.table.spec.d_vocab + pair[1]

    def next_pair(self) -> tuple[int, int] | None:
        """The pair to aim at now (None when all are covered)."""
        t = self.table
        if self.active is not None and not t.covered(*self.active) and self.steps_done < self.steps_per_visit():
            return self.active
        if self.active is not None:
            self.visited.add(self.key(self.active))
        self.active, self.steps_done = None, 0
        todo = [p for p in t.pairs() if not t.covered(*p)]
        if not todo:
            return None
        fresh = [p for p in todo if self.key(p) not in self.visited]
        if not fresh:
            self.round, self.visited, fresh = self.round + 1, set(), todo
        # most promising first; ties in table order (deterministic)
        self.active = max(fresh, key=lambda p: float(t.start_score[p]))
        return self.active

    def target(self, pair: tuple[int, int]) -> Target:
        return Target(true=pair[0], pred=pair[1])

    def step_done(self, pair: tuple[int, int], evaluations: int) -> None:
        self.steps_done += 1
        self.table.targeted[pair] += evaluations

    def state_dict(self) -> dict:
        return {"round": self.round, "visited": sorted(self.visited), "active": list(self.active or ()) or None,
                "steps_done": self.steps_done, "warmed": self.warmed}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.round, self.visited = int(state["round"]), set(state["visited"])
        self.active = tuple(state["active"]) if state["active"] else None
        self.steps_done, self.warmed = int(state["steps_done"]), bool(state["warmed"])


class AdaptiveStrategy(Strategy):
    """Base of the strategies that learn from verdicts; subclasses implement propose/observe."""

    WARMUP = 2048  # random sequences a coverage run starts with
    config_class = AdaptiveConfig

    def __init__(self, spec, config: AdaptiveConfig):
        super().__init__(spec, config)
        self.length = config.length or spec.seq_len
        if not 2 <= self.length <= spec.seq_len:
            raise ConfigError("length", f"the search length must be between 2 and {spec.seq_len}; got {self.length}")
        self.target = Target.parse(spec, config.target_pos, config.target_true, config.target_pred, self.length)
        self.done = 0  # sequences proposed and observed
        self.gen = torch.Generator().manual_seed(config.seed)
        self.table = self.schedule = None
        if config.cover_confusions:
            if not self.target.untargeted:
                raise ConfigError("cover_confusions", "confusion coverage aims at every (true, predicted) pair "
                                                      "itself; it takes no target")  # fmt: skip
            self.table = ConfusionTable(spec, config.cover_threshold)
            self.schedule = CoverSchedule(self.table, warmup=min(self.WARMUP, config.budget // 10))

    def params(self) -> dict:
        p = {"seed": self.config.seed, "budget": self.config.budget, "length": self.length,
             "target": self.target.describe(self.spec)}  # fmt: skip
        if self.table is not None:
            p |= {"cover_confusions": True, "cover_threshold": self.config.cover_threshold}
        return p

    def total(self) -> int:
        return self.config.budget

    def remaining(self) -> int:
        return self.config.budget - self.done

    def finished(self) -> bool:
        return self.remaining() <= 0 or (self.table is not None and self.table.all_covered())

    def random_tokens(self, n: int) -> torch.Tensor:
        """n training-distribution sequences of the searched length, from the strategy's generator."""
        return self.spec.random_tokens(n, self.gen, self.length)

    def scores(self, judged: Judged, target: Target) -> Scores:
        return score(judged.logits, judged.tokens, target, judge_from=1, qmark=self.spec.qmark, true=judged.true)

    def observe_table(self, judged: Judged) -> None:
        if self.table is not None:
            self.table.update(judged)

    def tables(self) -> dict[str, list[dict]]:
        return {"confusions.csv": self.table.rows()} if self.table is not None else {}

    def base_state(self) -> dict:
        state = {"done": self.done, "gen": base64.b64encode(bytes(self.gen.get_state().tolist())).decode()}
        if self.table is not None:
            state |= {"table": self.table.state_dict(), "schedule": self.schedule.state_dict()}
        return state

    def load_base_state(self, state: dict) -> None:
        self.done = int(state["done"])
        self.gen.set_state(torch.tensor(list(base64.b64decode(state["gen"])), dtype=torch.uint8))
        if self.table is not None:
            self.table.load_state_dict(state["table"])
            self.schedule.load_state_dict(state["schedule"])
