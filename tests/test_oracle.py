import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advsearch.model.oracle import first_unique, first_unique_reference
from advsearch.model.spec import ModelSpec

SPEC = ModelSpec()


def labels(text: str) -> str:
    return SPEC.decode(first_unique(SPEC.encode(text)))


def test_examples_from_the_task():
    assert labels("?acbba") == "?aaaac"
    assert labels("?cbcbc") == "?ccb??"
    assert labels("?") == "?"
    assert labels("?aa") == "?a?"


@st.composite
def token_batches(draw):
    """(letters, tokens): 1-5 rows of `?` (id = letters) then 0-19 letters, 1-10 letters."""
    vocab = draw(st.integers(1, 10), label="letters")
    length = draw(st.integers(1, 20), label="length")
    body = st.lists(st.integers(0, vocab - 1), min_size=length - 1, max_size=length - 1)
    rows = draw(st.lists(body, min_size=1, max_size=5), label="rows")
    return vocab, torch.tensor([[vocab] + b for b in rows], dtype=torch.long)


@settings(max_examples=300, deadline=None)
@given(token_batches())
def test_matches_plain_python_reference(batch):
    vocab, toks = batch
    expected = [first_unique_reference(row, vocab) for row in toks.tolist()]
    assert first_unique(toks, vocab).tolist() == expected
    assert first_unique(toks[0], vocab).tolist() == expected[0]


@settings(max_examples=100, deadline=None)
@given(token_batches())
def test_last_position_labels_match_the_full_oracle(batch):
    from advsearch.model.oracle import first_unique_last

    vocab, toks = batch
    assert first_unique_last(toks, vocab).tolist() == first_unique(toks, vocab)[:, -1].tolist()
