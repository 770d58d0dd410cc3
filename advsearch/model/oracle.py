"""Ground truth: the first character of each prefix that occurs exactly once in it.

`first_unique` and `first_unique_last` are the batched torch forms; `first_unique_reference` is the
plain statement of the task, for tests and for `eval`, which answers without importing torch (so
torch is imported inside the torch forms).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def first_unique(tokens: torch.Tensor, qmark: int = 10) -> torch.Tensor:
    """Labels for every position of `tokens` ([batch, seq] or [seq]).

    The label at position j is the earliest token of tokens[1..j] that occurs
    exactly once in tokens[1..j], else `qmark`; position 0 (the leading `?`) is
    always `qmark`. Token ids must lie in [0, qmark).
    """
    import torch

    squeeze = tokens.dim() == 1
    toks = tokens.unsqueeze(0) if squeeze else tokens
    batch, seq = toks.shape
    body = toks[:, 1:]
    n = body.shape[1]
    if n == 0:
        labels = torch.full((batch, 1), qmark, dtype=torch.long, device=toks.device)
        return labels[0] if squeeze else labels
    onehot = torch.nn.functional.one_hot(body, qmark + 1)[..., :qmark]  # [b, n, v]
    counts = onehot.cumsum(1)  # counts[b, j, t]: copies of t in body[0..j]
    # first_at[b, t]: index of the first copy of t (n if absent)
    idx = torch.arange(n, device=toks.device).view(1, n, 1)
    first_at = torch.where(onehot.bool(), idx, n).amin(1)  # [b, v]
    # A token t is unique in the prefix ending at j iff count == 1; among those pick min first_at.
    unique = counts == 1  # [b, n, v]
    key = torch.where(unique, first_at.unsqueeze(1), n)  # [b, n, v]
    best_first, best_tok = key.min(-1)
    labels = torch.where(best_first < n, best_tok, torch.full_like(best_tok, qmark))
    labels = torch.cat([torch.full((batch, 1), qmark, dtype=torch.long, device=toks.device), labels], 1)
    return labels[0] if squeeze else labels


def first_unique_last(tokens: torch.Tensor, qmark: int = 10) -> torch.Tensor:
    """The label of the last position only, for each row of `tokens` [batch, seq] (cheaper)."""
    import torch

    body = tokens[:, 1:]
    batch, n = body.shape
    counts = torch.zeros(batch, qmark + 1, dtype=torch.int32, device=tokens.device)
    counts.scatter_add_(1, body, torch.ones_like(body, dtype=torch.int32))
    where = torch.arange(n, device=tokens.device).expand(batch, n)
    first = torch.full((batch, qmark + 1), n, device=tokens.device).scatter_reduce_(1, body, where, "amin")
    best, tok = torch.where(counts == 1, first, n)[:, :qmark].min(-1)
    return torch.where(best < n, tok, torch.full_like(tok, qmark))


def first_unique_reference(seq: list[int], qmark: int = 10) -> list[int]:
    """Labels for every position of one sequence of token ids, in plain Python (what `first_unique` computes)."""
    labels = [qmark]
    for j in range(1, len(seq)):
        prefix = seq[1 : j + 1]
        labels.append(next((t for t in prefix if prefix.count(t) == 1), qmark))
    return labels
