import math

import torch

from advsearch.model.judge import best_wrong, judge, logit_margin


def test_judge_fields_on_handmade_logits():
    toks = torch.tensor([[10, 0, 0]])  # truth: ? a ?
    logits = torch.zeros(1, 3, 11)
    logits[0, 0, 10] = 5.0  # right
    logits[0, 1, 1] = 3.0  # predicts b, truth a
    logits[0, 2, 0] = 1.0  # predicts a, truth ?, weakly
    j = judge(toks, logits, qmark=10, min_confidence=0.5)
    assert j.true.tolist() == [[10, 0, 10]]
    assert j.pred.tolist() == [[10, 1, 0]]
    assert j.failure.tolist() == [[False, True, True]]
    p_b = math.exp(3) / (math.exp(3) + 10)
    assert math.isclose(float(j.p_pred[0, 1]), p_b, rel_tol=1e-5)
    assert math.isclose(float(j.p_true[0, 1]), 1 / (math.exp(3) + 10), rel_tol=1e-5)
    assert math.isclose(float(j.margin[0, 1]), 3.0, rel_tol=1e-6)
    assert float(j.margin[0, 0]) == -5.0 and float(j.margin[0, 2]) == 1.0  # right by 5; wrong by 1
    assert j.confident.tolist() == [[False, True, False]]  # p(a) at pos 2 is e/(e+10) < 0.5
    assert j.failing().tolist() == [[0, 1], [0, 2]]


def test_judge_from_limits_the_judged_positions():
    toks = torch.tensor([[10, 0, 0]])
    j = judge(toks, torch.zeros(1, 3, 11), qmark=10, judge_from=2)
    assert j.judged.tolist() == [[False, False, True]]
    assert j.failing().tolist() == [[0, 2]]


def test_logits_for_the_last_positions_only():
    toks = torch.tensor([[10, 0, 0], [10, 1, 2]])
    logits = torch.zeros(2, 1, 11)
    logits[0, 0, 10] = 4.0  # truth at the last position of row 0 is ?
    logits[1, 0, 2] = 4.0  # truth of row 1 is b (index 1): predicts c
    j = judge(toks, logits, qmark=10)
    assert j.judged.tolist() == [[False, False, True]] * 2
    assert j.failing().tolist() == [[1, 2]]
    assert j.pred[1, 2] == 2 and math.isclose(float(j.margin[1, 2]), 4.0)


def test_logit_margin_sign_and_best_wrong_on_handmade_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0], [2.0, 2.0, 0.0], [0.5, -1.0, 4.0]])
    label = torch.tensor([0, 0, 2])
    # best other minus the label's logit: wrong by 2 (3 vs 1), a tie (0), right by 3.5 (4 vs 0.5)
    assert logit_margin(logits, label).tolist() == [2.0, 0.0, -3.5]
    assert best_wrong(logits, label).tolist() == [1, 1, 0]
    assert logit_margin(logits, torch.tensor([1, 1, 0])).tolist() == [-1.0, 0.0, 3.5]
    assert logit_margin(logits.double(), label).dtype == torch.float64


def _reference_judge(tokens, logits, qmark, min_confidence=0.5, judge_from=0):
    """`judge` through its general path only (no fast path)."""
    from advsearch.model.judge import _judge_general

    return _judge_general(tokens, logits, qmark, min_confidence, max(judge_from, tokens.shape[1] - logits.shape[1]))


def test_the_fast_paths_give_the_general_paths_tensors_bit_for_bit():
    """The census (last position only) and full forwards take their own paths through `judge`: every field
    must equal, bit for bit and in dtype, what the general computation gives."""
    from dataclasses import fields

    gen = torch.Generator().manual_seed(0)
    tokens = torch.cat([torch.full((400, 1), 10), torch.randint(0, 10, (400, 7), generator=gen)], 1)
    full = torch.randn(400, 8, 11, generator=gen) * 4
    full[::7] = full[::7].round()  # ties: argmax and margin on equal logits
    cases = [(full[:, -1:], 0), (full[:, -1:], 7), (full, 0), (full, 1), (full, 5), (full, 7), (full[:, -3:], 0)]
    for logits, judge_from in cases:
        for min_confidence in (0.5, 0.9):
            got = judge(tokens, logits, 10, min_confidence, judge_from)
            want = _reference_judge(tokens, logits, 10, min_confidence, judge_from)
            for name in [f.name for f in fields(want)] + ["logits"]:  # logits: padded from `scored`
                a, b = getattr(got, name), getattr(want, name)
                assert a.dtype == b.dtype and torch.equal(a, b), (name, logits.shape, judge_from)
            assert got.failure.any() and not got.failure.all()  # the case tests something
