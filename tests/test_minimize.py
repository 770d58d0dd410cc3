import csv

import pytest
import torch
from click.testing import CliRunner

from advsearch.cli.main import main
from advsearch.errors import AdvsearchError
from advsearch.model.evaluator import Evaluator
from advsearch.model.judge import judge
from advsearch.model.spec import ModelSpec
from advsearch.search.minimize import Minimizer

SPEC = ModelSpec()


@pytest.fixture(scope="module")
def ev(challenge):
    return Evaluator(challenge.weights, "cpu")


@pytest.fixture(scope="module")
def failures(ev):
    """Failing (sequence, position) pairs of full length from random sequences, no hand-picked ones."""
    gen = torch.Generator().manual_seed(11)
    toks = torch.cat([torch.full((3000, 1), SPEC.qmark), torch.randint(0, 10, (3000, 19), generator=gen)], 1)
    j = judge(toks, ev.logits(toks), SPEC.qmark, judge_from=1)
    rows, cols = j.failing().T.tolist()
    picked, seen = [], set()
    for b, k in zip(rows, cols):
        if b not in seen and len(picked) < 12:
            seen.add(b)
            picked.append((SPEC.decode(toks[b]), k, SPEC.vocab[j.true[b, k]], SPEC.vocab[j.pred[b, k]]))
    assert len(picked) == 12
    return picked


def verdict(ev, seq):
    t = SPEC.encode(seq)[None]
    j = judge(t, ev.logits(t), SPEC.qmark)
    return SPEC.vocab[j.true[0, -1]], SPEC.vocab[j.pred[0, -1]]


def test_minimized_failures_still_fail_with_the_same_kind_and_are_no_longer(ev, failures):
    results = Minimizer(ev, SPEC).minimize_many([f[0] for f in failures], [f[1] for f in failures])
    shorter = 0
    for (seq, pos, true, pred), m in zip(failures, results):
        assert m.kind == (true, pred)
        assert len(m.sequence) <= len(seq) and len(m.sequence) <= pos + 1
        shorter += len(m.sequence) < pos + 1
        # it fails at its last position, with the original kind under the reported renaming
        rename = lambda c: m.mapping.get(c, c)  # noqa: E731
        assert verdict(ev, m.sequence) == m.minimized_kind == (rename(true), rename(pred))
        assert len(set(m.sequence[1:])) <= len(set(seq[1 : pos + 1]))
    assert shorter > 0, "minimisation shortened none of 12 random failures"


def test_minimizing_twice_is_a_fixed_point_unless_letters_were_renamed(ev, failures):
    """The greedy reduction stops where no candidate is smaller, so minimising its result again
    finds nothing more. A renaming (step 3) changes the sequence the model sees, so after one the
    second pass may shrink further: it never grows, and keeps the renamed kind."""
    mz = Minimizer(ev, SPEC)
    once = mz.minimize_many([f[0] for f in failures], [f[1] for f in failures])
    twice = mz.minimize_many([m.sequence for m in once], [m.position for m in once])
    size = lambda s: (len(s), len(set(s[1:])))  # noqa: E731  (what the greedy reduction orders by)
    assert any(not m.mapping for m in once), "no failure kept its letters: the fixed-point case went untested"
    for a, b in zip(once, twice):
        assert b.kind == a.minimized_kind and verdict(ev, b.sequence) == b.minimized_kind
        assert size(b.sequence) <= size(a.sequence)
        if not a.mapping:
            assert (b.sequence, b.mapping, b.minimized_kind) == (a.sequence, {}, a.minimized_kind)


def test_default_position_is_the_first_failure_and_errors_are_clear(ev, failures):
    seq = failures[0][0]
    t = SPEC.encode(seq)[None]
    j = judge(t, ev.logits(t), SPEC.qmark, judge_from=1)
    first = int(j.failure[0].nonzero()[0])
    m = Minimizer(ev, SPEC).minimize(seq)
    assert m.kind == (SPEC.vocab[j.true[0, first]], SPEC.vocab[j.pred[0, first]])
    right = next(k for k in range(1, 20) if not j.failure[0, k])
    with pytest.raises(AdvsearchError, match=f"does not fail at position {right}"):
        Minimizer(ev, SPEC).minimize(seq, right)
    with pytest.raises(AdvsearchError, match="does not fail at any position"):
        Minimizer(ev, SPEC).minimize("?a")


def test_cli_minimize_and_run_minimize_column(tmp_path, challenge_path, ev, failures):
    seq, pos = failures[1][0], failures[1][1]
    r = CliRunner().invoke(main, ["minimize", seq, "--pos", str(pos), "--model", str(challenge_path)])
    assert r.exit_code == 0, r.output
    shown = r.output.splitlines()[1].split()[1]
    assert verdict(ev, shown)[0] != verdict(ev, shown)[1]
    r = CliRunner().invoke(main, ["minimize", "?ab", "--model", str(challenge_path)])
    assert r.exit_code == 2 and "nothing to minimise" in r.stderr
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", "--strategy", "local", "--budget", "300", "--length", "12", "--minimize",
                                  "--no-explain", "--model", str(challenge_path), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    with open(out / "failures.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["minimized"] for r in rows)
    for row in rows[:20]:
        assert len(row["minimized"]) <= len(row["sequence"])
        true, pred = verdict(ev, row["minimized"])
        assert true != pred


def test_annotate_fills_rows_and_leaves_unreproduced_ones_empty(ev, failures):
    seq, pos = failures[2][0], failures[2][1]
    rows = [{"sequence": seq[: pos + 1], "position": pos}, {"sequence": "?ab", "position": 2}]
    Minimizer(ev, SPEC).annotate(rows)
    assert rows[1]["minimized"] == ""
    got = rows[0]["minimized"]
    assert got and len(got) <= pos + 1 and verdict(ev, got)[0] != verdict(ev, got)[1]
