import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advsearch.oracle import first_unique, first_unique_reference
from advsearch.spec import ModelSpec

SPEC = ModelSpec()


def labels(text: str) -> str:
    return SPEC.decode(first_unique(SPEC.encode(text)))


def test_examples_from_the_task():
    assert labels("?acbba") == "?aaaac"
    assert labels("?cbcbc") == "?ccb??"
    assert labels("?") == "?"
    assert labels("?aa") == "?a?"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_matches_plain_python_reference(data):
    vocab = data.draw(st.integers(1, 10), label="letters")
    length = data.draw(st.integers(1, 20), label="length")
    body = st.lists(st.integers(0, vocab - 1), min_size=length - 1, max_size=length - 1)
    rows = data.draw(st.lists(body, min_size=1, max_size=4), label="rows")
    toks = torch.tensor([[vocab] + b for b in rows], dtype=torch.long)
    expected = [first_unique_reference(row, vocab) for row in toks.tolist()]
    assert first_unique(toks, vocab).tolist() == expected
    assert first_unique(toks[0], vocab).tolist() == expected[0]


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_last_position_labels_match_the_full_oracle(data):
    from advsearch.oracle import first_unique_last

    vocab = data.draw(st.integers(1, 10), label="letters")
    length = data.draw(st.integers(1, 20), label="length")
    body = st.lists(st.integers(0, vocab - 1), min_size=length - 1, max_size=length - 1)
    toks = torch.tensor([[vocab] + b for b in data.draw(st.lists(body, min_size=1, max_size=5))])
    assert first_unique_last(toks, vocab).tolist() == first_unique(toks, vocab)[:, -1].tolist()
