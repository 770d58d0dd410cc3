"""Token-batch helpers: padding prefixes into one batch, one-letter neighbours."""

import torch

from advsearch.model.spec import ModelSpec
from advsearch.model.tokens import one_letter_neighbours, pad_prefixes

SPEC = ModelSpec()


def neighbours_by_hand(seq: list[int], n_letters: int) -> set[tuple[int, ...]]:
    out = set()
    for pos in range(1, len(seq)):
        for letter in range(n_letters):
            if letter != seq[pos]:
                out.add(tuple(seq[:pos] + [letter] + seq[pos + 1 :]))
    return out


def test_one_letter_neighbours_are_every_single_substitution_once():
    for text in ("?abcabcabcabcabcabca", "?a", "?jjj", "?a?b"):  # `?` inside: all ten letters replace it
        seq = SPEC.encode(text)
        got = one_letter_neighbours(seq, SPEC.n_letters)
        rows = [tuple(r) for r in got.tolist()]
        assert len(rows) == len(set(rows)) and set(rows) == neighbours_by_hand(seq.tolist(), SPEC.n_letters), text
    assert len(one_letter_neighbours(SPEC.encode("?a?b"), 10)) == 9 + 10 + 9


def test_one_letter_neighbours_go_position_by_position_in_cyclic_letter_order():
    got = one_letter_neighbours(SPEC.encode("?ci"), 10).tolist()
    assert [r[1] for r in got[:9]] == [3, 4, 5, 6, 7, 8, 9, 0, 1] and all(r[2] == 8 for r in got[:9])
    assert [r[2] for r in got[9:]] == [9, 0, 1, 2, 3, 4, 5, 6, 7] and all(r[1] == 2 for r in got[9:])


def test_pad_prefixes():
    batch, lengths = pad_prefixes([[10, 0, 1], [10], torch.tensor([10, 2])], fill=10)
    assert batch.tolist() == [[10, 0, 1], [10, 10, 10], [10, 2, 10]] and lengths.tolist() == [3, 1, 2]
    batch, lengths = pad_prefixes([[10, 3]], fill=0, width=4)
    assert batch.tolist() == [[10, 3, 0, 0]] and lengths.tolist() == [2]
    batch, lengths = pad_prefixes([], fill=10)
    assert batch.shape == (0, 0) and lengths.tolist() == []


def test_random_tokens_of_a_given_length_continue_the_generator():
    gen = torch.Generator().manual_seed(3)
    a = SPEC.random_tokens(4, gen, length=6)
    b = SPEC.random_tokens(2, gen)
    torch.manual_seed(3)
    body = torch.randint(0, 10, (4, 5))
    assert torch.equal(a, torch.cat([torch.full((4, 1), 10), body], 1))
    assert torch.equal(b[:, 1:], torch.randint(0, 10, (2, 19))) and (b[:, 0] == 10).all()
