import pytest
import torch

from advsearch.errors import AdvsearchError
from advsearch.model.judge import judge
from advsearch.model.oracle import first_unique
from advsearch.model.spec import ModelSpec
from advsearch.search.objectives import MISMATCH_PENALTY, Target, score

SPEC = ModelSpec()
Q = SPEC.qmark
A, B, C = 0, 1, 2


def logits_for(rows: list[list[dict[int, float]]]) -> torch.Tensor:
    """[batch, seq, 11] logits: 0 everywhere except the given {token: value} per position."""
    out = torch.zeros(len(rows), len(rows[0]), SPEC.d_vocab)
    for b, row in enumerate(rows):
        for k, cells in enumerate(row):
            for t, v in cells.items():
                out[b, k, t] = v
    return out


def toks(*texts: str) -> torch.Tensor:
    return torch.stack([SPEC.encode(t) for t in texts])


def test_untargeted_is_best_wrong_margin_over_positions():
    t = toks("?ab")  # truth: ?, a, a
    assert first_unique(t).tolist() == [[Q, A, A]]
    # pos 1 right by 2; pos 2 wrong: b beats a by 1.5
    lg = logits_for([[{Q: 9}, {A: 3, B: 1}, {A: 1, B: 2.5}]])
    s = score(lg, t)
    assert s.score.tolist() == [pytest.approx(1.5)] and s.position.tolist() == [2]
    assert s.matched.tolist() == [True] and s.success.tolist() == [True]


def test_untargeted_right_sequence_scores_minus_its_smallest_margin():
    t = toks("?ab")
    lg = logits_for([[{Q: 9}, {A: 3, B: 1}, {A: 4, C: 3.25}]])
    s = score(lg, t)
    assert s.score.item() == pytest.approx(-0.75) and s.position.item() == 2 and not s.success.item()


def test_position_zero_is_not_judged_by_default_but_can_be():
    t = toks("?a")
    lg = logits_for([[{A: 5}, {A: 5}]])  # position 0 is wrong (truth ?)
    assert score(lg, t).position.item() == 1
    assert score(lg, t, judge_from=0).position.item() == 0


def test_targeted_pred_ranks_matching_truth_above_any_mismatch():
    t = toks("?ab", "?aa")  # truths: (?, a, a) and (?, a, ?)
    target = Target(pos=2, true=A, pred=C)
    lg = logits_for([
        [{}, {}, {A: 2, C: 1}],   # truth a at 2, c loses by 1
        [{}, {}, {C: 7, Q: 1}],   # truth ? at 2: mismatch, though c wins by 6
    ])  # fmt: skip
    s = score(lg, t, target)
    assert s.matched.tolist() == [True, False]
    assert s.score[0].item() == pytest.approx(-1.0)
    assert s.score[1].item() == pytest.approx(6.0 - MISMATCH_PENALTY)  # kept, scored, ranked below
    assert s.success.tolist() == [False, False]
    assert int(s.score.argmax()) == 0


def test_targeted_pred_equal_to_truth_is_a_mismatch():
    t = toks("?ab")  # truth at 1 and 2 is a
    s = score(logits_for([[{}, {A: 3}, {A: 3}]]), t, Target(pred=A))
    assert not s.matched.item() and s.score.item() < -MISMATCH_PENALTY / 2


def test_target_any_position_takes_the_best_matching_one():
    t = toks("?abab")
    assert first_unique(t).tolist() == [[Q, A, A, B, Q]]
    lg = logits_for([[{}, {B: 1}, {B: 4}, {B: 20}, {B: 9}]])
    s = score(lg, t, Target(true=A, pred=B))
    assert s.position.item() == 2 and s.score.item() == pytest.approx(4.0) and s.success.item()
    s_any = score(lg, t, Target(pred=B))  # truth b at 3 is no failure; truth ? at 4 is
    assert s_any.position.item() == 4 and s_any.score.item() == pytest.approx(9.0)


def test_untargeted_score_agrees_with_the_judge_on_random_batches():
    gen = torch.Generator().manual_seed(7)
    t = torch.cat([torch.full((500, 1), Q), torch.randint(0, 10, (500, 9), generator=gen)], 1)
    lg = torch.randn(500, 10, 11, generator=gen) * 3
    j = judge(t, lg, Q, judge_from=1)
    s = score(lg, t)
    assert torch.equal(s.score > 0, j.failure.any(1))
    # the margin of a failing position equals the judge's margin (pred is the best wrong class)
    failing = s.score > 0
    assert torch.allclose(s.score[failing], j.margin[failing].gather(1, s.position[failing, None]).squeeze(1))


def test_target_parse_validates():
    assert Target.parse(SPEC, 3, "a", "?") == Target(3, A, Q)
    for args, msg in [((3, "a", "a"), "not a failure"), ((0, None, None), "between 1 and 19"),
                      ((20, None, None), "between 1 and 19"), ((None, "z", None), "target truth"),
                      ((None, None, "ab"), "target prediction")]:  # fmt: skip
        with pytest.raises(AdvsearchError, match=msg):
            Target.parse(SPEC, *args)
    with pytest.raises(AdvsearchError, match="between 1 and 7"):
        Target.parse(SPEC, 8, None, None, length=8)
