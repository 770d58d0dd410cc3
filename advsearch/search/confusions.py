"""Confusion coverage: for every (true, predicted) pair, the most confident witness seen.

`ConfusionTable.update` takes every judged batch of a run (whatever produced
it) and keeps, for each of the V x (V - 1) pairs (110 for a-j and `?`):

- the best p_pred of a failure of that kind, its witness (the prefix through the
  failing position, as in failures.csv), and how many sequence evaluations the
  run had made when it was found;
- the best *targeted* score for the pair (logit_Y - max other logit at a
  position whose truth is X, see `advsearch.search.objectives`) with its full sequence:
  the starting point for a search aimed at that pair, even before any failure of
  that kind has been seen.
"""

from __future__ import annotations

import torch

from advsearch.model.judge import Judged
from advsearch.model.spec import ModelSpec


def _best_and_first(keys: torch.Tensor, values: torch.Tensor, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key: the largest value (-inf if absent) and the first index where it occurs (len if absent)."""
    best = torch.full((n_keys,), float("-inf"), dtype=values.dtype).scatter_reduce(0, keys, values, "amax")
    at_best = (values == best[keys]).nonzero().flatten()
    first = torch.full((n_keys,), len(keys), dtype=torch.long).scatter_reduce(0, keys[at_best], at_best, "amin")
    return best, first


class ConfusionTable:
    def __init__(self, spec: ModelSpec, threshold: float = 0.9):
        self.spec, self.threshold = spec, threshold
        v = spec.d_vocab
        self.best_p = torch.zeros(v, v, dtype=torch.float64)
        self.witness: dict[int, tuple[str, int, int]] = {}  # pair key -> (prefix, position, evaluations)
        self.start_score = torch.full((v, v), float("-inf"), dtype=torch.float64)
        self.start: dict[int, str] = {}  # pair key -> full sequence with the best targeted score
        self.targeted = torch.zeros(v, v, dtype=torch.long)  # evaluations spent aiming at the pair
        self.evaluations = 0

    # -- bookkeeping --------------------------------------------------------------------------
    def update(self, judged: Judged) -> None:
        """Fold one judged batch in (call once per batch, in order)."""
        v, seq = self.spec.d_vocab, judged.tokens.shape[1]
        self.evaluations += len(judged.tokens)
        # best failures per (true, pred): value and first (row, position) reaching it
        where = (judged.failure & judged.judged).reshape(-1).nonzero().flatten()
        if len(where):
            keys = (judged.true.reshape(-1) * v + judged.pred.reshape(-1))[where]
            p = judged.p_pred.reshape(-1)[where]
            best, first = _best_and_first(keys, p, v * v)
            for key in (best.double() > self.best_p.view(-1)).nonzero().flatten().tolist():
                b, k = divmod(int(where[first[key]]), seq)
                self.best_p.view(-1)[key] = float(best[key])
                self.witness[key] = (self.spec.decode(judged.tokens[b, : k + 1].tolist()), k, self.evaluations)
        # best targeted score per (true, pred), for starting points
        if judged.logits is None:
            return
        logits = judged.logits
        top2 = logits.topk(2, -1).values  # [b, s, 2]
        is_top = logits == top2[..., :1]
        margin = logits - torch.where(is_top, top2[..., 1:], top2[..., :1])  # [b, s, v]: logit_Y - max other
        where = judged.judged.reshape(-1).nonzero().flatten()  # flat (row, position) indices judged
        flat_m, flat_t = margin.reshape(-1, v)[where], judged.true.reshape(-1)[where]
        keys = (flat_t[:, None] * v + torch.arange(v)).reshape(-1)  # [(n, y)] -> x * v + y
        best, first = _best_and_first(keys, flat_m.reshape(-1), v * v)
        better = (best.view(v, v).double() > self.start_score) & ~torch.eye(v, dtype=torch.bool)
        for key in better.reshape(-1).nonzero().flatten().tolist():
            b = int(where[int(first[key]) // v]) // seq
            self.start_score.view(-1)[key] = float(best[key])
            self.start[key] = self.spec.decode(judged.tokens[b].tolist())

    # -- queries ------------------------------------------------------------------------------
    def pairs(self) -> list[tuple[int, int]]:
        v = self.spec.d_vocab
        return [(x, y) for x in range(v) for y in range(v) if x != y]

    def covered(self, x: int, y: int) -> bool:
        return bool(self.best_p[x, y] >= self.threshold)

    def n_covered(self) -> int:
        return sum(self.covered(x, y) for x, y in self.pairs())

    def all_covered(self) -> bool:
        return self.n_covered() == len(self.pairs())

    def rows(self) -> list[dict]:
        """confusions.csv: one row per pair."""
        v, out = self.spec.vocab, []
        for x, y in self.pairs():
            key = x * self.spec.d_vocab + y
            prefix, pos, found = self.witness.get(key, ("", "", ""))
            out.append({
                "true": v[x], "predicted": v[y], "best_p_pred": float(self.best_p[x, y]),
                "covered": self.covered(x, y), "witness": prefix, "position": pos,
                "evaluations": found, "targeted_evaluations": int(self.targeted[x, y]),
            })  # fmt: skip
        return out

    def matrix(self) -> str:
        """The V x V coverage matrix as text (rows: truth, columns: prediction)."""
        v = self.spec.vocab
        lines = [
            f"confusion coverage: {self.n_covered()}/{len(self.pairs())} (true, predicted) pairs witnessed with "
            f"p_pred >= {self.threshold:g} in {self.evaluations:,} sequence evaluations",
            "cells: best p_pred x100; '(..)' seen but below the threshold; '-' never seen; "
            "rows: true, columns: predicted",
            "true\\pred" + "".join(f"{c:>5}" for c in v),
        ]
        for x in range(len(v)):
            cells = []
            for y in range(len(v)):
                p = float(self.best_p[x, y])
                if x == y:
                    cells.append("    .")
                elif p <= 0:
                    cells.append("    -")
                elif p >= self.threshold:
                    cells.append(f"{min(99, int(p * 100)):>5}")
                else:
                    cells.append(f" ({int(p * 100):>2})")
            lines.append(f"{v[x]:>9}" + "".join(cells))
        return "\n".join(lines)

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "best_p": self.best_p.flatten().tolist(), "witness": {str(k): list(w) for k, w in self.witness.items()},
            "start_score": [s if s != float("-inf") else None for s in self.start_score.flatten().tolist()],
            "start": {str(k): s for k, s in self.start.items()}, "targeted": self.targeted.flatten().tolist(),
            "evaluations": self.evaluations,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        v = self.spec.d_vocab
        self.best_p = torch.tensor(state["best_p"], dtype=torch.float64).view(v, v)
        self.witness = {int(k): (w[0], int(w[1]), int(w[2])) for k, w in state["witness"].items()}
        scores = [float("-inf") if s is None else s for s in state["start_score"]]
        self.start_score = torch.tensor(scores, dtype=torch.float64).view(v, v)
        self.start = {int(k): s for k, s in state["start"].items()}
        self.targeted = torch.tensor(state["targeted"], dtype=torch.long).view(v, v)
        self.evaluations = int(state["evaluations"])
