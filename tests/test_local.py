import json

import pytest
import torch

from advsearch.errors import AdvsearchError
from advsearch.model.evaluator import Evaluator
from advsearch.model.judge import judge
from advsearch.model.spec import ModelSpec
from advsearch.model.tokens import one_letter_neighbours
from advsearch.search.configs import STRATEGY_CONFIGS, LocalConfig
from advsearch.search.confusions import ConfusionTable
from advsearch.search.objectives import Target, score
from strategies import make_strategy
from strategies.local import double_moves

from .conftest import drive

SPEC = ModelSpec()


@pytest.fixture(scope="module")
def ev(challenge):
    return Evaluator(challenge.weights, "cpu")


def test_neighbourhoods_are_exact():
    cur = SPEC.encode("?abcabcabcabcabcabca")
    singles = one_letter_neighbours(cur, 10)
    assert singles.shape == (19 * 9, 20)
    diff = singles != cur
    assert (diff.sum(1) == 1).all() and not diff[:, 0].any()
    assert len({tuple(r) for r in singles.tolist()}) == 171 and (singles < 10)[:, 1:].all()
    doubles = double_moves(cur, 10, 500, torch.Generator().manual_seed(0))
    assert doubles.shape == (500, 20) and ((doubles != cur).sum(1) == 2).all()
    assert len({tuple(r) for r in doubles.tolist()}) == 500
    every = double_moves(cur[:5], 10, 10_000, torch.Generator().manual_seed(0))
    assert len({tuple(r) for r in every.tolist()}) == len(every) == 6 * 81


def test_local_finds_failures_and_is_deterministic(ev):
    config = LocalConfig(budget=1500, seed=3)
    a, b = make_strategy("local", SPEC, config), make_strategy("local", SPEC, config)
    pa, pb = drive(a, ev), drive(b, ev)
    assert sum(len(p.tokens) for p in pa) == 1500
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(pa, pb, strict=True))
    other = drive(make_strategy("local", SPEC, LocalConfig(budget=1500, seed=4)), ev)
    assert not torch.equal(pa[0].tokens, other[0].tokens)
    climb = a.climbs["run"]
    # it climbed to a failure: the endpoint's untargeted margin is positive, checked independently
    best = climb.current if climb.current is not None else None
    found = [p.tokens for p in pa]
    allt = torch.cat(found)
    s = score(ev.logits(allt), allt)
    assert (s.score > 0).any()
    if best is not None:
        assert score(ev.logits(best[None]), best[None]).score.item() == pytest.approx(climb.score, abs=1e-4)


def test_climb_scores_never_decrease_between_restarts(ev):
    strategy = make_strategy("local", SPEC, LocalConfig(budget=3000, seed=1, length=10))
    seen = []
    while (p := strategy.propose()) is not None:
        assert p.tokens.shape[1] == 10 and (p.tokens[:, 0] == SPEC.qmark).all()
        strategy.observe(p, judge(p.tokens, ev.logits(p.tokens), SPEC.qmark, 0.5, p.judge_from))
        c = strategy.climbs["run"]
        seen.append((c.restarts, c.score))
    assert seen[-1][0] >= 1, "3000 evaluations at length 10 should reach a local optimum and restart"
    for (r0, s0), (r1, s1) in zip(seen, seen[1:]):
        if r0 == r1 and s0 != float("-inf") and s1 != float("-inf"):
            assert s1 >= s0


def test_targeted_local_search_hits_its_target(ev):
    config = LocalConfig(budget=2000, seed=0, length=12, target_true="b", target_pred="f")
    strategy = make_strategy("local", SPEC, config)
    props = drive(strategy, ev)
    allt = torch.cat([p.tokens for p in props])
    j = judge(allt, ev.logits(allt), SPEC.qmark, judge_from=1)
    hit = (j.true == 1) & (j.pred == 5) & j.judged
    assert hit.any(), "no sequence failing as (true b, predicted f) found"
    assert allt.shape[1] == 12


def test_local_resume_continues_the_same_trajectory(ev):
    config = LocalConfig(budget=1200, seed=9, cover_confusions=True)
    full = drive(make_strategy("local", SPEC, config), ev)
    first = make_strategy("local", SPEC, config)
    drive(first, ev, limit=5)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make_strategy("local", SPEC, config)
    resumed.load_state_dict(state)
    rest = drive(resumed, ev)
    assert len(rest) == len(full) - 5
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(full[5:], rest, strict=True))


def test_options_are_validated():
    with pytest.raises(AdvsearchError, match="length must be between 2 and 20"):
        make_strategy("local", SPEC, LocalConfig(length=21))
    with pytest.raises(AdvsearchError, match="takes no target"):
        make_strategy("local", SPEC, LocalConfig(cover_confusions=True, target_pred="a"))


# ---- confusion coverage ---------------------------------------------------------------------


def test_confusion_table_bookkeeping():
    t = torch.stack([SPEC.encode("?ab"), SPEC.encode("?ba")])  # truths (?, a, a) and (?, b, b)
    lg = torch.zeros(2, 3, 11)
    lg[0, 1, 2] = 5.0  # truth a, predicted c, confidently
    lg[0, 2, 0] = 5.0  # right
    lg[1, 1, 1] = 1.0  # right
    lg[1, 2, 0] = 0.5  # truth b, predicted a, weakly
    table = ConfusionTable(SPEC, threshold=0.9)
    table.update(judge(t, lg, SPEC.qmark, judge_from=1))
    p_ac = torch.softmax(lg[0, 1], 0)[2].item()
    assert table.best_p[0, 2].item() == pytest.approx(p_ac) and p_ac >= 0.9
    assert table.witness[0 * 11 + 2] == ("?a", 1, 2)
    assert table.covered(0, 2) and not table.covered(1, 0) and table.best_p[1, 0] > 0
    assert table.n_covered() == 1 and len(table.rows()) == 110
    # a worse witness later does not replace it; a better one does, with the evaluation count then
    lg2 = lg.clone()
    lg2[0, 1, 2] = 3.0
    table.update(judge(t, lg2, SPEC.qmark, judge_from=1))
    assert table.witness[2][2] == 2
    lg2[0, 1, 2] = 9.0
    table.update(judge(t, lg2, SPEC.qmark, judge_from=1))
    assert table.witness[2][2] == 6 and table.evaluations == 6
    # the best targeted start for (a, c) is that sequence, scored as the objective scores it
    s = score(lg2, t, Target(true=0, pred=2))
    assert table.start[2] == "?ab" and table.start_score[0, 2].item() == pytest.approx(s.score[0].item())
    restored = ConfusionTable(SPEC, 0.9)
    restored.load_state_dict(json.loads(json.dumps(table.state_dict())))
    assert restored.rows() == table.rows() and torch.equal(restored.start_score, table.start_score)
    assert "1/110" in table.matrix() and len(table.matrix().splitlines()) == 3 + 11


def test_coverage_witnesses_are_real_and_local_beats_random(ev):
    budget = 4000
    runs = {}
    for name in ("local", "random"):
        strategy = make_strategy(name, SPEC, STRATEGY_CONFIGS[name](budget=budget, seed=0, cover_confusions=True))
        drive(strategy, ev)
        runs[name] = strategy.table
    table = runs["local"]
    rows = table.rows()
    covered = [r for r in rows if r["covered"]]
    assert covered and table.n_covered() == len(covered)
    # every witness fails, as claimed, at its last position (padding after it changes nothing: causal)
    wit = torch.zeros(len(covered), SPEC.seq_len, dtype=torch.long)
    for i, r in enumerate(covered):
        wit[i, : len(r["witness"])] = SPEC.encode(r["witness"])
    j = judge(wit, ev.logits(wit), SPEC.qmark)
    for i, r in enumerate(covered):
        k = len(r["witness"]) - 1
        assert k == r["position"]
        assert SPEC.vocab[j.true[i, k]] == r["true"] and SPEC.vocab[j.pred[i, k]] == r["predicted"]
        assert j.p_pred[i, k].item() == pytest.approx(r["best_p_pred"], abs=1e-5) and r["best_p_pred"] >= 0.9
        assert 0 < r["evaluations"] <= budget
    assert table.n_covered() > runs["random"].n_covered()
