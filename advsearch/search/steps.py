"""Steps of a search: propose -> evaluate -> judge -> observe, and the candidate failure rows it gives.

A step is a judged batch's candidate failure rows and counts. `local_steps` computes them in this
process; the runner (`advsearch.search.runner`) consumes steps from here or from shards computed
elsewhere (`advsearch.search.shards`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from advsearch.model.evaluator import Evaluator
from advsearch.model.judge import Judged, judge


@dataclass
class Step:
    """One finished piece of work: candidate failure rows (in order, duplicates kept) and what was evaluated."""

    rows: list[dict]
    sequences: int
    positions: int
    hits: int  # sequences with a failure at p_pred >= YIELD_CONFIDENCE


def _decoded_rows(tokens: torch.Tensor, spec) -> tuple[str, int] | None:
    """Every row of `tokens` [batch, seq] decoded into one string (row b at [b * seq, (b + 1) * seq)), and seq.

    A token is one character of `spec.vocab` (a str), so a prefix of a row decodes to the prefix of its
    text: `text[b * seq : b * seq + k + 1] == spec.decode(tokens[b, : k + 1])`. None when the ids do
    not fit in a byte (then rows are decoded one by one).
    """
    vocab = spec.vocab
    if not isinstance(vocab, str) or len(vocab) > 256 or not len(tokens):
        return None
    table = {i: c for i, c in enumerate(vocab)}
    return tokens.to(torch.uint8).numpy().tobytes().decode("latin-1").translate(table), tokens.shape[1]


def candidate_rows(judged: Judged, proposal, spec, run_id: str, strategy: str) -> list[dict]:
    """One row per judged failure, in (row, position) order; the same prefix may come more than once.

    The failing entries of each tensor are gathered and converted to Python values in one call per
    column (`tolist` gives the same Python floats, ints and bools as reading the elements one by one),
    and the tokens are decoded in one call.
    """
    fail = judged.failing()
    if not len(fail):
        return []
    b, k = fail.unbind(1)
    columns = [t[b, k].tolist() for t in (judged.true, judged.pred, judged.p_true, judged.p_pred, judged.margin,
                                          judged.confident)]  # fmt: skip
    b, k = b.tolist(), k.tolist()
    decoded = _decoded_rows(judged.tokens, spec)
    if decoded is not None:
        text, seq = decoded
        sequences = [text[bi * seq : bi * seq + ki + 1] for bi, ki in zip(b, k)]
    else:
        sequences = [spec.decode(judged.tokens[bi, : ki + 1].tolist()) for bi, ki in zip(b, k)]
    vocab, extra = spec.vocab, list(proposal.columns.items())
    rows = [
        {"run_id": run_id, "strategy": strategy, "sequence": sequence, "position": ki, "true": vocab[t],
         "predicted": vocab[p], "p_true": pt, "p_pred": pp, "margin": m, "confident": c}
        for sequence, ki, t, p, pt, pp, m, c in zip(sequences, k, *columns)
    ]  # fmt: skip
    for c, v in extra:
        for row, bi in zip(rows, b):
            row[c] = v[bi]
    return rows


def local_step(strategy, evaluator: Evaluator, min_confidence: float, run_id: str) -> Step | None:
    """Propose, evaluate, judge and observe one batch; None when the strategy has finished."""
    proposal = strategy.propose()
    if proposal is None:
        return None
    logits = evaluator.evaluate(proposal)
    judged = judge(proposal.tokens, logits, strategy.spec.qmark, min_confidence, proposal.judge_from)
    strategy.observe(proposal, judged)
    rows = candidate_rows(judged, proposal, strategy.spec, run_id, strategy.name)
    return Step(rows, len(proposal.tokens), int(judged.judged.sum()), int(judged.hits().sum()))


def local_steps(strategy, evaluator: Evaluator, min_confidence: float, run_id: str) -> Iterator[Step]:
    """Steps in this process until the strategy has finished."""
    while (step := local_step(strategy, evaluator, min_confidence, run_id)) is not None:
        yield step
