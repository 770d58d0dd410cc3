"""Token batches built from sequences: prefixes of mixed lengths padded into one batch, and the
one-letter neighbours of a sequence."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_prefixes(prefixes: Sequence[Sequence[int] | torch.Tensor], fill: int,
                 width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Right-pad token-id prefixes with `fill` into one [n, width] batch; returns (batch, lengths).

    `width` defaults to the longest prefix. The model and the oracle are causal, so what follows a
    prefix never changes its positions: `fill` is arbitrary, and one batch can hold every length.
    """
    lengths = torch.tensor([len(p) for p in prefixes], dtype=torch.long)
    if width is None:
        width = int(lengths.max()) if len(prefixes) else 0
    batch = torch.full((len(prefixes), width), fill, dtype=torch.long)
    for i, p in enumerate(prefixes):
        batch[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    return batch, lengths


def one_letter_neighbours(tokens: torch.Tensor, n_letters: int) -> torch.Tensor:
    """Every sequence that differs from `tokens` [L] at exactly one position >= 1, where it holds
    another letter (token ids 0..n_letters-1): [m, L], position by position, and at each position
    the letters in cyclic order after the one there (all n_letters of them where `tokens` has a
    non-letter, so m = (L - 1) * (n_letters - 1) for a sequence of letters after its first token)."""
    length = len(tokens)
    pos = torch.arange(1, length).repeat_interleave(n_letters)
    letter = (tokens[pos] + torch.arange(1, n_letters + 1).repeat(length - 1)) % n_letters
    keep = letter != tokens[pos]
    pos, letter = pos[keep], letter[keep]
    out = tokens.repeat(len(pos), 1)
    out[torch.arange(len(pos)), pos] = letter
    return out
