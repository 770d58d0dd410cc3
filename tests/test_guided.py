from types import SimpleNamespace

import pytest
import torch

from advsearch.errors import AdvsearchError
from advsearch.mechanism.tables import compute_tables
from advsearch.model.evaluator import Evaluator
from advsearch.model.judge import judge
from advsearch.model.oracle import first_unique
from advsearch.model.spec import ModelSpec
from advsearch.search.configs import STRATEGY_CONFIGS, GuidedConfig
from strategies import make_strategy
from strategies.guided import FAMILIES

SPEC = ModelSpec()


def fake_tables(sets):
    head = [next(h for h, s in enumerate(sets) if t in s) for t in range(10)]
    return SimpleNamespace(responsibility_sets=sets, responsible_head=head, sha256="fake")


def sequences(tables, family, n=200, seed=0, batch_size=64):
    s = make_strategy("guided", SPEC, GuidedConfig(budget=n, seed=seed, batch_size=batch_size, families=[family]),
                      tables=tables)  # fmt: skip
    out = []
    while (p := s.propose()) is not None:
        s.observe(p, judge(p.tokens, torch.zeros(*p.tokens.shape, 11), 10))
        out.append(p.tokens)
    return torch.cat(out)


SETS = [[0, 5, 9], [1, 2, 3, 4], [6, 7, 8]]
Q = 10


def home(letter: int) -> set[int]:
    return next(set(s) for s in SETS if letter in s)


def family_promise(family: str, row: list[int], truth: list[int]) -> str | None:
    """What `family` promises about one of its sequences, checked from the tokens and the oracle's
    labels `truth`; None when it holds, else what is broken."""
    count = {t: row[1:].count(t) for t in set(row[1:])}
    uniques = [i for i in range(1, len(row)) if count[row[i]] == 1]  # positions of letters occurring once
    duplicated = {t for t, c in count.items() if c > 1}
    latest_new = max(row.index(t, 1) for t in count)  # where the last letter not seen before appears
    if family == "overload":  # copies of S - {u}, the unique u of S (the answer), a unique v of another set
        if len(uniques) != 2:
            return f"{len(uniques)} unique letters"
        u, v = row[uniques[0]], row[uniques[1]]
        if not duplicated <= home(u) - {u} or v in home(u):
            return "the copies are not u's set-mates, or v is"
        return None if truth[-1] == u else "u is not the answer"
    if family == "first_instance":  # a run of S - {new}, then the first instance of new, unique to the end
        k, new = latest_new, row[latest_new]
        if not (len(row) - 6 <= k and set(row[1:k]) <= home(new) - {new} and count[new] == 1):
            return "not a run of new's set-mates followed by a unique new letter of the set"
        # new is the answer there, unless cutting the run to length left one of its letters single
        return None if truth[k] == new or row[1:k].count(truth[k]) == 1 else "new is not the answer"
    if family == "late_duplicate":  # x, copies of S - {x}, then x again: x answers until its repeat
        x = row[1]
        if not set(row[1:]) <= home(x) or count[x] < 2:
            return "letters outside x's set, or x not repeated"
        second = row.index(x, 2)
        return None if truth[second - 1] == x and truth[second] == Q else "x is not the answer until its repeat"
    if family == "all_duplicated":  # copies of one set (answer ?), then a letter not seen before
        p = latest_new
        if not set(row[1:p]) <= home(row[1]):
            return "the copies come from more than one set"
        return None if truth[p - 1] == Q and truth[p] == row[p] else "not ? then the new letter"
    if family == "adjacent_unique":  # copies of S - {x}, then x and y (of another set) side by side
        if len(uniques) != 2 or uniques[1] != uniques[0] + 1:
            return "not exactly two unique letters side by side"
        x, y = row[uniques[0]], row[uniques[1]]
        if not duplicated <= home(x) - {x} or y in home(x):
            return "the copies are not x's set-mates, or y is"
        return None if truth[uniques[1]] == x and truth[-1] == x else "x is not the answer"
    raise AssertionError(f"no promise written down for family {family}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_keep_their_promise_on_the_given_sets(family):
    toks = sequences(fake_tables(SETS), family, n=400)
    assert toks.shape == (400, 20) and (toks[:, 0] == Q).all() and (toks[:, 1:] < Q).all()
    truth = first_unique(toks).tolist()
    for row, labels in zip(toks.tolist(), truth):
        assert family_promise(family, row, labels) is None, (family, row, family_promise(family, row, labels))
    if family == "first_instance":  # the exception above is rare: the new letter is nearly always the answer
        k = [max(r.index(t, 1) for t in set(r[1:])) for r in toks.tolist()]
        assert sum(t[i] == r[i] for r, t, i in zip(toks.tolist(), truth, k)) >= 0.95 * len(k)


def test_family_promises_catch_broken_sequences():
    """The checks above can fail: hand-made sequences that break each family's promise."""
    broken = {
        "overload": [Q, 0, 5, 0, 5, 9, 1, 2],  # the copies and u from {0, 5, 9}, then v = 1 and an extra unique 2
        "first_instance": [Q, 1, 2, 1, 2, 6] + [1] * 14,  # the late new letter is from another set
        "late_duplicate": [Q, 1, 2, 2, 6, 6, 1] + [2] * 13,  # 6 is not x's set-mate
        "all_duplicated": [Q, 1, 1, 6, 6, 7] + [1] * 14,  # the copies span two sets
        "adjacent_unique": [Q, 2, 2, 1, 3, 6] + [2] * 14,  # three unique letters
    }
    for family, row in broken.items():
        labels = first_unique(torch.tensor([row]))[0].tolist()
        assert family_promise(family, row, labels) is not None, family


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
    config = GuidedConfig(budget=120, seed=3, batch_size=40)
    whole = make_strategy("guided", SPEC, config, tables=tables)
    rows = []
    while (p := whole.propose()) is not None:
        whole.observe(p, judge(p.tokens, torch.zeros(*p.tokens.shape, 11), 10))
        rows.append(p.tokens)
    cut = make_strategy("guided", SPEC, config, tables=tables)
    p = cut.propose()
    cut.observe(p, judge(p.tokens, torch.zeros(*p.tokens.shape, 11), 10))
    resumed = make_strategy("guided", SPEC, config, tables=tables)
    resumed.load_state_dict(cut.state_dict())
    assert torch.equal(resumed.propose().tokens, rows[1])


def test_unknown_family_is_a_clear_error():
    with pytest.raises(AdvsearchError, match="unknown family nope"):
        make_strategy("guided", SPEC, GuidedConfig(families=["nope"]), tables=fake_tables([list(range(10))]))


def test_guided_beats_random_on_the_challenge_model(challenge):
    ev = Evaluator(challenge.weights, "cpu")
    tables = compute_tables(challenge)
    yields = {}
    for name in ("guided", "random"):
        s = make_strategy(name, SPEC, STRATEGY_CONFIGS[name](budget=2000, seed=0, batch_size=1000), tables=tables)
        hits = 0
        while (p := s.propose()) is not None:
            j = judge(p.tokens, ev.logits(p.tokens), 10)
            s.observe(p, j)
            hits += int(j.hits().sum())
        yields[name] = hits / 2000
    assert yields["guided"] >= 0.2 and yields["guided"] >= 5 * yields["random"], yields


def test_draw_is_random_choice_bit_for_bit():
    """`Constructor.draw` replaces a loop of `rng.choice`: the same letters and the generator left in the same
    state, for every pool size (powers of two and not: `choice` rejects draws beyond the size)."""
    import random

    from strategies.guided import Constructor

    for size in (1, 2, 3, 4, 5, 7, 8, 9, 10, 17):
        pool = list(range(100, 100 + size))
        a, b = random.Random(size), random.Random(size)
        c = Constructor.__new__(Constructor)
        c.rng = a
        for n in (0, 1, 5, 40):
            assert c.draw(pool, n) == [b.choice(pool) for _ in range(n)]
            assert a.getstate() == b.getstate()
    with pytest.raises(IndexError):
        c.draw([], 1)


def test_shuffle_is_random_shuffle_bit_for_bit():
    """`Constructor.shuffle` replaces `rng.shuffle`: the same order and the generator left in the same state."""
    import random

    from strategies.guided import Constructor

    for n in (0, 1, 2, 3, 8, 9, 17, 40):
        a, b = random.Random(n), random.Random(n)
        c = Constructor.__new__(Constructor)
        c.rng = a
        for _ in range(3):
            x, y = list(range(n)), list(range(n))
            c.shuffle(x)
            b.shuffle(y)
            assert x == y and a.getstate() == b.getstate()
