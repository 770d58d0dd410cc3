"""What adaptive searches maximise, computed in batch from logits and oracle labels.

Per position k of a sequence (truth t = first-unique label at k):

- untargeted: `judge.logit_margin` against t, `max_{c != t} logit_c - logit_t`,
  the margin of the best wrong class over the true class. Positive exactly
  where the model fails at k.
- targeted at a predicted class Y: how far Y leads, `logit_Y - max_{c != Y} logit_c`
  (the negated `logit_margin` against Y). Positive exactly where Y is the
  model's prediction (ties aside).

A `Target` may fix the position (`pos`), the truth (`true`) and/or the wrong
prediction (`pred`). A sequence's score is the best score over the positions
it is judged at (>= `judge_from`; only `pos` when it is set). A position whose
truth does not satisfy the target (truth != X, or truth == Y, which would not
be a failure) is *not dropped*: it keeps its margin minus `MISMATCH_PENALTY`,
so any candidate whose truth matches outranks every candidate whose truth does
not, while mismatched candidates are still ordered among themselves (a search
that has only mismatches still has something to climb). `Scores.matched` says
which case a sequence's score came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advsearch.errors import AdvsearchError
from advsearch.model.judge import logit_margin
from advsearch.model.oracle import first_unique
from advsearch.model.spec import ModelSpec

# Larger than any logit margin of a sane model; makes "truth matches" dominate the ranking.
MISMATCH_PENALTY = 1000.0


@dataclass(frozen=True)
class Target:
    """Token ids (and a position) a targeted search aims for; None = any."""

    pos: int | None = None
    true: int | None = None
    pred: int | None = None

    @property
    def untargeted(self) -> bool:
        return self.pos is None and self.true is None and self.pred is None

    @classmethod
    def parse(cls, spec: ModelSpec, pos: int | None, true: str | None, pred: str | None,
              length: int | None = None) -> "Target":  # fmt: skip
        """Validate user-facing targets (characters of the vocabulary) and convert them to ids."""
        length = length or spec.seq_len

        def token(name: str, ch: str | None) -> int | None:
            if ch is None:
                return None
            if len(ch) != 1 or ch not in spec.vocab:
                raise AdvsearchError(f"the target {name} must be one of {', '.join(spec.vocab)}; got {ch!r}")
            return spec.vocab.index(ch)

        t, p = token("truth", true), token("prediction", pred)
        if t is not None and t == p:
            raise AdvsearchError(f"the target truth and prediction are both {true!r}: that is not a failure")
        if pos is not None and not 1 <= pos < length:
            raise AdvsearchError(f"the target position must be between 1 and {length - 1} "
                                 f"(sequence length {length}); got {pos}")
        return cls(pos, t, p)

    def describe(self, spec: ModelSpec) -> str:
        if self.untargeted:
            return "untargeted"
        parts = [f"pos={self.pos}" if self.pos is not None else "pos=any"]
        parts.append(f"true={spec.vocab[self.true]}" if self.true is not None else "true=any")
        parts.append(f"pred={spec.vocab[self.pred]}" if self.pred is not None else "pred=any-wrong")
        return ",".join(parts)


@dataclass
class Scores:
    """Per-sequence objective values; every tensor is [batch]."""

    score: torch.Tensor  # higher is better
    position: torch.Tensor  # where the score was attained
    matched: torch.Tensor  # the truth at `position` satisfies the target
    success: torch.Tensor  # matched and score > 0: the sought failure is there


def position_scores(
    logits: torch.Tensor, true: torch.Tensor, target: Target = Target()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(margin [batch, seq], truth-matches [batch, seq]) before penalties and position masks."""
    logits = logits.float()
    if target.pred is None:
        margin = logit_margin(logits, true)
    else:
        margin = -logit_margin(logits, torch.full_like(true, target.pred))
    ok = torch.ones_like(true, dtype=torch.bool)
    if target.true is not None:
        ok &= true == target.true
    if target.pred is not None:
        ok &= true != target.pred
    return margin, ok


def score(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    target: Target = Target(),
    judge_from: int = 1,
    qmark: int | None = None,
    true: torch.Tensor | None = None,
) -> Scores:
    """Score each sequence of `tokens` [batch, seq] from its `logits` [batch, seq, vocab].

    `true` (oracle labels) is computed when not given.
    """
    qmark = logits.shape[-1] - 1 if qmark is None else qmark
    if true is None:
        true = first_unique(tokens, qmark)
    margin, ok = position_scores(logits, true, target)
    seq = tokens.shape[1]
    allowed = torch.zeros(seq, dtype=torch.bool)
    if target.pos is not None:
        if target.pos < seq:
            allowed[target.pos] = True
    else:
        allowed[judge_from:] = True
    if not allowed.any():
        raise AdvsearchError(f"no position to score: target position {target.pos} in sequences of length {seq}")
    value = torch.where(ok, margin, margin - MISMATCH_PENALTY)
    value = value.masked_fill(~allowed, float("-inf"))
    best, pos = value.max(-1)
    matched = ok.gather(1, pos.unsqueeze(1)).squeeze(1)
    return Scores(best, pos, matched, matched & (best > 0))
