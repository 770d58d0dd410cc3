"""Turn logits and oracle labels into per-position verdicts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from advsearch.model.oracle import first_unique, first_unique_last

YIELD_CONFIDENCE = 0.9  # a sequence is a "hit" when it has a failure with p_pred >= this


def best_wrong(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The class with the largest logit other than `label` (the first such on ties); `label` has
    the shape of `logits` without its last (class) dimension."""
    return logits.scatter(-1, label.unsqueeze(-1), float("-inf")).argmax(-1)


def logit_margin(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """`max_{c != label} logit_c - logit_label` at every position, in the dtype of `logits`.

    The one sign convention of the project: positive exactly where the argmax is not `label` (a
    failure when `label` is the truth; there it equals logit(prediction) - logit(truth)), negative
    where `label` wins, by how much it wins; 0 on a tie. Its negation is how far `label` leads.
    """
    others = logits.scatter(-1, label.unsqueeze(-1), float("-inf"))
    return others.amax(-1) - logits.gather(-1, label.unsqueeze(-1)).squeeze(-1)


@dataclass
class Judged:
    """Verdicts for a batch; every tensor is [batch, seq]. `judged` marks the positions looked at;
    the other entries are not meaningful."""

    tokens: torch.Tensor
    true: torch.Tensor
    pred: torch.Tensor
    p_true: torch.Tensor
    p_pred: torch.Tensor
    margin: torch.Tensor  # logit_margin against the truth: > 0 exactly at failures (0 where there are no logits)
    failure: torch.Tensor
    confident: torch.Tensor
    judged: torch.Tensor
    scored: torch.Tensor | None = None  # [batch, k, vocab]: the logits of the last k positions (k = seq: all)

    @cached_property
    def logits(self) -> torch.Tensor | None:
        """[batch, seq, vocab] logits (0 at positions without logits), for objectives. Padded on first
        read: the census judges millions of last positions and never reads them."""
        if self.scored is None or self.scored.shape[1] == self.tokens.shape[1]:
            return self.scored
        full = self.scored.new_zeros(*self.tokens.shape, self.scored.shape[-1])
        full[:, -self.scored.shape[1] :] = self.scored
        return full

    def hits(self, threshold: float = YIELD_CONFIDENCE) -> torch.Tensor:
        """[batch] bool: the sequence has a judged failure with p_pred >= threshold."""
        return (self.failure & (self.p_pred >= threshold)).any(1)

    def failing(self) -> torch.Tensor:
        """[n, 2] (row, position) pairs of judged failures, in row-major order."""
        return (self.failure & self.judged).nonzero()


def judge(
    tokens: torch.Tensor,
    logits: torch.Tensor,
    qmark: int,
    min_confidence: float = 0.5,
    judge_from: int = 0,
) -> Judged:
    """Judge positions `judge_from..` of each sequence against the first-unique oracle.

    `logits` is [batch, seq, vocab], or [batch, k, vocab] for the last k positions only
    (as the prefix-sharing evaluator returns); positions without logits are not judged.
    """
    batch, seq = tokens.shape
    first = seq - logits.shape[1]
    judge_from = max(judge_from, first)
    if logits.device == tokens.device and first == seq - 1 and judge_from == seq - 1:
        return _judge_last(tokens, logits, qmark, min_confidence)
    if logits.device == tokens.device and first == 0:
        return _judge_all(tokens, logits, qmark, min_confidence, judge_from)
    return _judge_general(tokens, logits, qmark, min_confidence, judge_from)


def _judge_general(tokens: torch.Tensor, logits: torch.Tensor, qmark: int, min_confidence: float,
                   judge_from: int) -> Judged:  # fmt: skip
    """`judge` of logits for the last k positions (k = seq for all of them): every tensor is built at
    full size, filled at the positions that have logits, and left at what zero logits give (0, 0 and
    margin 0) elsewhere. The fast paths below must give exactly these tensors."""
    batch, seq = tokens.shape
    first = seq - logits.shape[1]
    if judge_from == seq - 1:  # only the last position is judged
        true = torch.full_like(tokens, qmark)
        true[:, -1] = first_unique_last(tokens, qmark)
    else:
        true = first_unique(tokens, qmark)
    logits = logits.float()
    pred = torch.zeros_like(true)
    pred[:, first:] = logits.argmax(-1)
    probs, last_true = logits.softmax(-1), true[:, first:]
    p_true, p_pred, margin = (torch.zeros(batch, seq) for _ in range(3))
    p_true[:, first:] = probs.gather(-1, last_true.unsqueeze(-1)).squeeze(-1)
    p_pred[:, first:] = probs.gather(-1, pred[:, first:].unsqueeze(-1)).squeeze(-1)
    margin[:, first:] = logit_margin(logits, last_true)
    judged = torch.zeros_like(true, dtype=torch.bool)
    judged[:, judge_from:] = True
    failure = (pred != true) & judged
    return Judged(tokens, true, pred, p_true, p_pred, margin, failure, failure & (p_pred >= min_confidence), judged,
                  logits)


# The two shapes the search loop judges, computed with the operations `judge`'s general path applies
# to the positions that have logits (so every value is the same, bit for bit), without its copies:
# the prefix-sharing census (the last position only: each verdict is computed on [batch] vectors, then
# placed into the last column of the [batch, seq] tensors) and full forwards from position 0 (softmax,
# argmax and margin straight on the logits, which then are `Judged.logits` themselves).


def _judge_last(tokens: torch.Tensor, logits: torch.Tensor, qmark: int, min_confidence: float) -> Judged:
    """`judge` of [batch, 1, vocab] last-position logits, judged at the last position only."""
    batch, seq = tokens.shape
    last = logits[:, 0].float()
    true_last = first_unique_last(tokens, qmark)
    pred_last = last.argmax(-1)
    probs = last.softmax(-1)
    p_true_last = probs.gather(-1, true_last.unsqueeze(-1)).squeeze(-1)
    p_pred_last = probs.gather(-1, pred_last.unsqueeze(-1)).squeeze(-1)
    failure_last = pred_last != true_last

    def column(value: torch.Tensor, fill=0) -> torch.Tensor:  # [batch, seq]: fill, and `value` last
        out = torch.full((batch, seq), fill, dtype=value.dtype, device=tokens.device)
        out[:, -1] = value
        return out

    true, pred = column(true_last, qmark), column(pred_last)
    p_true, p_pred, margin = column(p_true_last), column(p_pred_last), column(logit_margin(last, true_last))
    failure = column(failure_last, False)
    confident = column(failure_last & (p_pred_last >= min_confidence), False)
    judged = torch.zeros(batch, seq, dtype=torch.bool, device=tokens.device)
    judged[:, -1] = True
    return Judged(tokens, true, pred, p_true, p_pred, margin, failure, confident, judged, last.unsqueeze(1))


def _judge_all(tokens: torch.Tensor, logits: torch.Tensor, qmark: int, min_confidence: float,
               judge_from: int) -> Judged:  # fmt: skip
    """`judge` of [batch, seq, vocab] logits (every position), judged from `judge_from` on."""
    logits = logits.float()
    if judge_from == tokens.shape[1] - 1:  # the oracle of the last position only, as `judge` does
        true = torch.full_like(tokens, qmark)
        true[:, -1] = first_unique_last(tokens, qmark)
    else:
        true = first_unique(tokens, qmark)
    pred = logits.argmax(-1)
    probs = logits.softmax(-1)
    p_true = probs.gather(-1, true.unsqueeze(-1)).squeeze(-1)
    p_pred = probs.gather(-1, pred.unsqueeze(-1)).squeeze(-1)
    judged = torch.zeros_like(true, dtype=torch.bool)
    judged[:, judge_from:] = True
    failure = (pred != true) & judged
    return Judged(tokens, true, pred, p_true, p_pred, logit_margin(logits, true), failure,
                  failure & (p_pred >= min_confidence), judged, logits)  # fmt: skip
