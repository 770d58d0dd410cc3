"""Turn logits and oracle labels into per-position verdicts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .oracle import first_unique


@dataclass
class Judged:
    """Verdicts for a batch; every tensor is [batch, seq]. `judged` marks the positions looked at."""

    tokens: torch.Tensor
    true: torch.Tensor
    pred: torch.Tensor
    p_true: torch.Tensor
    p_pred: torch.Tensor
    margin: torch.Tensor  # logit_pred - logit_true (0 where the prediction is right)
    failure: torch.Tensor
    confident: torch.Tensor
    judged: torch.Tensor

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
    """Judge positions `judge_from..` of each sequence against the first-unique oracle."""
    true = first_unique(tokens, qmark)
    logits = logits.float()
    probs = logits.softmax(-1)
    pred = logits.argmax(-1)
    p_true = probs.gather(-1, true.unsqueeze(-1)).squeeze(-1)
    p_pred = probs.gather(-1, pred.unsqueeze(-1)).squeeze(-1)
    margin = logits.gather(-1, pred.unsqueeze(-1)).squeeze(-1) - logits.gather(-1, true.unsqueeze(-1)).squeeze(-1)
    judged = torch.zeros_like(true, dtype=torch.bool)
    judged[:, judge_from:] = True
    failure = (pred != true) & judged
    return Judged(tokens, true, pred, p_true, p_pred, margin, failure, failure & (p_pred >= min_confidence), judged)
