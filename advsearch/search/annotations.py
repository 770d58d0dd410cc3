"""Annotators add columns to a step's failure rows before they are written; `Annotations` runs them.

The explainer (`advsearch.mechanism.explain.Explainer`: category, causal check,
control, ...) and the minimizer (`advsearch.search.minimize.Minimizer`:
`minimized`) are annotators. With worker processes, a step's rows are annotated
there while the search loop goes on: each annotator gets the step's rows in one
call, as it would here, or, when its `rows_independent` says a row's columns do
not depend on the other rows of its call, in parts, one per worker.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

from advsearch.search import workers
from advsearch.search.workers import WorkerPool

MIN_PART = 256  # rows: smaller parts cost more in transfer and per-call work than they spread


class Annotator(Protocol):
    """Adds `columns` to failure rows, in place, from their `sequence` and `position` (the only keys it
    may read: workers are sent those alone).

    An annotator may also say `rows_independent = True`: a row's columns do not depend on which other
    rows share its `annotate` call (then workers may split a step's rows)."""

    columns: tuple[str, ...]

    def annotate(self, rows: list[dict]) -> None: ...


def _annotate_here(index: int, rows: list[dict]) -> list[list]:
    """In a worker: annotator `index`'s columns for `rows`."""
    annotator = workers.shared()[index]
    annotator.annotate(rows)
    return [[row[c] for c in annotator.columns] for row in rows]


Pending = list[tuple[int, int, int, Future]]  # (annotator, first row, end row, its columns to come)


class Annotations:
    """Fills the annotators' columns of each step's rows: here at once, or on `pool`'s workers, which must
    have been given `annotators` as their shared object."""

    def __init__(self, annotators: list[Annotator], pool: WorkerPool | None = None):
        self.annotators, self.pool = list(annotators), pool

    def submit(self, rows: list[dict]) -> Pending:
        """Start annotating `rows` (done before returning when there are no workers)."""
        if self.pool is None or not rows:
            for annotator in self.annotators if rows else ():
                annotator.annotate(rows)
            return []
        pending = []
        for i, annotator in enumerate(self.annotators):
            parts = self.pool.workers if getattr(annotator, "rows_independent", False) else 1
            size = max(MIN_PART, -(-len(rows) // parts))
            for lo in range(0, len(rows), size):
                part = [{"sequence": r["sequence"], "position": r["position"]} for r in rows[lo : lo + size]]
                pending.append((i, lo, lo + len(part), self.pool.submit(_annotate_here, i, part)))
        return pending

    @staticmethod
    def ready(pending: Pending) -> bool:
        return all(future.done() for *_, future in pending)

    def fill(self, rows: list[dict], pending: Pending) -> None:
        """Wait for `pending` and put its columns into `rows`."""
        for i, lo, hi, future in pending:
            columns = self.annotators[i].columns
            for row, values in zip(rows[lo:hi], WorkerPool.result(future, "annotations")):
                row.update(zip(columns, values))
