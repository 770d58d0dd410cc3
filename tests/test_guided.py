from types import SimpleNamespace

import pytest
import torch

from advsearch.errors import AdvsearchError
from advsearch.evaluator import Evaluator
from advsearch.judge import judge
from advsearch.mechanism import compute_tables
from advsearch.oracle import first_unique
from advsearch.spec import ModelSpec
from strategies import RunConfig, make_strategy
from strategies.guided import FAMILIES

SPEC = ModelSpec()


def fake_tables(sets):
    head = [next(h for h, s in enumerate(sets) if t in s) for t in range(10)]
    return SimpleNamespace(responsibility_sets=sets, responsible_head=head, sha256="fake")


def sequences(tables, family, n=200, seed=0, batch_size=64):
    s = make_strategy("guided", SPEC, RunConfig(budget=n, seed=seed, batch_size=batch_size, families=[family],
                                                  tables=tables))  # fmt: skip
    out = []
    while (p := s.propose()) is not None:
        s.observe(p, judge(p.tokens, torch.zeros(*p.tokens.shape, 11), 10))
        out.append(p.tokens)
    return torch.cat(out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_build_valid_sequences_from_the_given_sets(family):
    sets = [[0, 5, 9], [1, 2, 3, 4], [6, 7, 8]]
    toks = sequences(fake_tables(sets), family)
    assert toks.shape == (200, 20) and (toks[:, 0] == 10).all() and (toks[:, 1:] < 10).all()
    for row in toks.tolist():
        dup = [t for t in set(row[1:]) if row.count(t) > 1]
        # the duplicated letters that overload a head all come from one responsibility set
        assert any(set(dup) - {x} <= set(s) for s in sets for x in row), (family, row)


def test_sets_come_from_the_tables_not_from_the_code():
    a = sequences(fake_tables([[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]), "late_duplicate")
    b = sequences(fake_tables([[0, 4, 8], [1, 5, 9], [2, 3, 6, 7]]), "late_duplicate")
    for toks, sets in ((a, [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]), (b, [[0, 4, 8], [1, 5, 9], [2, 3, 6, 7]])):
        for row in toks.tolist():
            x = row[1]  # the letter duplicated late, while its head is busy with its own set
            home = next(s for s in sets if x in s)
            assert set(row[1:]) <= set(home) and row[2:].count(x) >= 1


def test_overload_answer_belongs_to_the_overloaded_head():
    sets = [[0, 5, 9], [1, 2, 3, 4], [6, 7, 8]]
    toks = sequences(fake_tables(sets), "overload")
    labels = first_unique(toks)[:, -1].tolist()
    for row, label in zip(toks.tolist(), labels):
        busy = {t for t in row[1:] if row.count(t) > 1}
        assert label != 10 and any(label in s and busy <= set(s) for s in sets)


def test_guided_is_seeded_batch_size_independent_and_resumable():
    tables = fake_tables([[0, 5, 9], [1, 2, 3, 4], [6, 7, 8]])
    a = sequences(tables, "overload", seed=1, batch_size=50)
    assert torch.equal(a, sequences(tables, "overload", seed=1, batch_size=7))
    assert not torch.equal(a, sequences(tables, "overload", seed=2))
    config = RunConfig(budget=120, seed=3, batch_size=40, tables=tables)
    whole = make_strategy("guided", SPEC, config)
    rows = []
    while (p := whole.propose()) is not None:
        whole.observe(p, judge(p.tokens, torch.zeros(*p.tokens.shape, 11), 10))
        rows.append(p.tokens)
    cut = make_strategy("guided", SPEC, config)
    p = cut.propose()
    cut.observe(p, judge(p.tokens, torch.zeros(*p.tokens.shape, 11), 10))
    resumed = make_strategy("guided", SPEC, config)
    resumed.load_state_dict(cut.state_dict())
    assert torch.equal(resumed.propose().tokens, rows[1])


def test_unknown_family_is_a_clear_error():
    with pytest.raises(AdvsearchError, match="unknown family nope"):
        make_strategy("guided", SPEC, RunConfig(families=["nope"], tables=fake_tables([list(range(10))])))


def test_guided_beats_random_on_the_challenge_model(challenge):
    ev = Evaluator(challenge.weights, "cpu")
    config = RunConfig(budget=2000, seed=0, batch_size=1000, tables=compute_tables(challenge))
    yields = {}
    for name in ("guided", "random"):
        s = make_strategy(name, SPEC, config)
        hits = 0
        while (p := s.propose()) is not None:
            j = judge(p.tokens, ev.logits(p.tokens), 10)
            s.observe(p, j)
            hits += int(j.hits().sum())
        yields[name] = hits / 2000
    assert yields["guided"] >= 0.2 and yields["guided"] >= 5 * yields["random"], yields
