"""Shrink a failing sequence while it stays a failure of the same (true, predicted) kind.

Steps, delta-debugging style, every candidate set judged in one evaluator call:

1. the shortest failing prefix: the sequence is cut right after the first
   position where the model fails with the same (true, predicted) pair;
2. greedy reduction, round after round: candidates are the current sequence
   with one contiguous chunk deleted (chunks of 1, 2, 4, 8, ... tokens, at every
   offset) and with every occurrence of one letter replaced by another letter
   of the sequence (one distinct token fewer). A candidate is kept if the same
   kind of failure occurs in it (it is then cut after the first such position);
   the best kept candidate (shortest, then fewest distinct letters, then highest
   p_pred, then alphabetical) replaces the current sequence when it is shorter
   or has fewer distinct letters. Stops when no candidate improves;
3. canonical relabelling: letters renamed in first-seen order (a, b, c, ...;
   a predicted letter absent from the sequence keeps its name and is skipped),
   kept only if the renamed sequence fails with the renamed kind.

The result is never longer than the input, fails at its last position, and
its kind is the original kind under the returned renaming (`mapping`).
Candidates of different lengths share a batch by right-padding: the model and
the oracle are causal, so padding never changes an earlier position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from advsearch.errors import AdvsearchError
from advsearch.model.oracle import first_unique
from advsearch.model.spec import ModelSpec
from advsearch.model.tokens import pad_prefixes


@dataclass
class Minimized:
    original: str
    sequence: str  # the minimised failure; it fails at its last position
    kind: tuple[str, str]  # (true, predicted) of the original failure
    minimized_kind: tuple[str, str]  # the same kind under `mapping`
    mapping: dict[str, str] = field(default_factory=dict)  # letter renaming applied (identity when empty)
    p_pred: float = 0.0
    evaluations: int = 0

    @property
    def position(self) -> int:
        return len(self.sequence) - 1


def _distinct(seq: list[int]) -> int:
    return len(set(seq[1:]))


class _Item:
    def __init__(self, original: str, seq: list[int], kind: tuple[int, int], p: float):
        self.original, self.seq, self.kind, self.p = original, seq, kind, p
        self.active, self.evaluations, self.mapping, self.kind_renamed = True, 0, {}, kind


class Minimizer:
    """Minimises failures with one evaluator; `annotate` fills the `minimized` column of failure rows."""

    columns = ("minimized",)

    def __init__(self, evaluator, spec: ModelSpec):
        self.evaluator, self.spec = evaluator, spec

    # -- judging candidates of mixed lengths in one call --------------------------------------
    def _first_hits(self, cands: list[list[int]], kinds: list[tuple[int, int]]) -> list[tuple[int, float] | None]:
        """For each candidate, (first position with failure kind, p_pred there), or None."""
        if not cands:
            return []
        toks, lens = pad_prefixes(cands, self.spec.qmark)
        width = toks.shape[1]
        logits = self.evaluator.logits(toks)
        true, pred = first_unique(toks, self.spec.qmark), logits.argmax(-1)
        p = logits.softmax(-1).amax(-1)
        x = torch.tensor([k[0] for k in kinds]).unsqueeze(1)
        y = torch.tensor([k[1] for k in kinds]).unsqueeze(1)
        pos = torch.arange(width).unsqueeze(0)
        hit = (true == x) & (pred == y) & (pos >= 1) & (pos < lens.unsqueeze(1))
        first = hit.int().argmax(1)
        return [(int(first[i]), float(p[i, first[i]])) if hit[i].any() else None for i in range(len(cands))]

    def _candidates(self, seq: list[int]) -> list[list[int]]:
        n, out = len(seq), []
        size = 1
        while size < n - 1:
            for start in range(1, n - size + 1):
                cand = seq[:start] + seq[start + size :]
                if len(cand) >= 2:
                    out.append(cand)
            size *= 2
        letters = sorted(set(seq[1:]))
        for u in letters:
            for v in letters:
                if u != v:
                    out.append([seq[0]] + [v if t == u else t for t in seq[1:]])
        return out

    def _relabel(self, seq: list[int], kind: tuple[int, int]) -> dict[int, int]:
        """Canonical first-seen renaming of the letters (absent predicted letter kept and skipped)."""
        q = self.spec.qmark
        skip = {kind[1]} if kind[1] != q and kind[1] not in seq[1:] else set()
        free = [t for t in range(self.spec.n_letters) if t not in skip]
        mapping: dict[int, int] = {}
        for t in seq[1:]:
            if t not in mapping:
                mapping[t] = free[len(mapping)]
        return mapping

    # -- the public API ------------------------------------------------------------------------
    def start(self, sequences: list[str], positions: list[int | None], strict: bool = True) -> list[_Item | None]:
        """Check each input fails (at `pos`, else at its first failing position) and cut it there.

        A sequence that does not fail there is an error, or, with `strict=False`, None.
        """
        spec = self.spec
        toks = [spec.encode(s).tolist() for s in sequences]
        batch, _ = pad_prefixes(toks, spec.qmark)
        logits = self.evaluator.logits(batch)
        true, pred = first_unique(batch, spec.qmark), logits.argmax(-1)
        items: list[_Item | None] = []
        for i, (s, t, k) in enumerate(zip(sequences, toks, positions)):
            fails = [j for j in range(1, len(t)) if int(pred[i, j]) != int(true[i, j])]
            problem = None
            if k is None:
                problem = None if fails else f"{s!r} does not fail at any position: nothing to minimise"
                k = fails[0] if fails else None
            elif not 0 <= k < len(t):
                problem = f"position {k} is outside {s!r} (positions 0..{len(t) - 1})"
            elif k not in fails:
                problem = f"{s!r} does not fail at position {k}: nothing to minimise"
            if problem and strict:
                raise AdvsearchError(problem)
            items.append(None if problem else _Item(s, t, (int(true[i, k]), int(pred[i, k])), 0.0))
        # step 1: the shortest failing prefix of the same kind
        live = [it for it in items if it is not None]
        for item, hit in zip(live, self._first_hits([it.seq for it in live], [it.kind for it in live])):
            j, item.p = hit
            item.seq, item.evaluations = item.seq[: j + 1], 1
        return items

    def run(self, items: list[_Item]) -> list[Minimized]:
        # step 2: greedy reduction, all active items' candidates in one call per round
        while any(it.active for it in items):
            owners, cands, kinds = [], [], []
            for i, it in enumerate(items):
                if it.active:
                    for c in self._candidates(it.seq):
                        owners.append(i), cands.append(c), kinds.append(it.kind)
            hits = self._first_hits(cands, kinds)
            best: dict[int, tuple] = {}
            for i, c, hit in zip(owners, cands, hits):
                items[i].evaluations += 1
                if hit is None:
                    continue
                j, p = hit
                cut = c[: j + 1]
                key = (len(cut), _distinct(cut), -p, self.spec.decode(cut))
                if i not in best or key < best[i][0]:
                    best[i] = (key, cut, p)
            for i, it in enumerate(items):
                if not it.active:
                    continue
                if i in best and best[i][0][:2] < (len(it.seq), _distinct(it.seq)):
                    it.seq, it.p = best[i][1], best[i][2]
                else:
                    it.active = False
        # step 3: canonical relabelling, kept where the renamed failure holds
        q = self.spec.qmark
        maps = [self._relabel(it.seq, it.kind) for it in items]
        renamed = [[it.seq[0]] + [m[t] for t in it.seq[1:]] for it, m in zip(items, maps)]
        rkinds = [tuple(m.get(k, k) if k != q else q for k in it.kind) for it, m in zip(items, maps)]
        todo = [i for i, (it, r) in enumerate(zip(items, renamed)) if r != it.seq]
        hits = self._first_hits([renamed[i] for i in todo], [rkinds[i] for i in todo])
        for i, hit in zip(todo, hits):
            items[i].evaluations += 1
            if hit is not None:
                j, p = hit
                items[i].seq, items[i].kind_renamed, items[i].p = renamed[i][: j + 1], rkinds[i], p
                items[i].mapping = {self.spec.vocab[a]: self.spec.vocab[b] for a, b in maps[i].items() if a != b}
        v = self.spec.vocab
        return [Minimized(it.original, self.spec.decode(it.seq), (v[it.kind[0]], v[it.kind[1]]),
                          tuple(v[k] for k in it.kind_renamed), it.mapping, it.p,
                          it.evaluations) for it in items]  # fmt: skip

    def minimize_many(self, sequences: list[str], positions: list[int | None] | None = None) -> list[Minimized]:
        if not sequences:
            return []
        return self.run(self.start(sequences, positions or [None] * len(sequences)))

    def minimize(self, sequence: str, pos: int | None = None) -> Minimized:
        return self.minimize_many([sequence], [pos])[0]

    def annotate(self, rows: list[dict]) -> None:
        """Fill `minimized` in failure rows (their sequence fails at its last position, `position`).

        A row whose failure the full forward pass does not reproduce (a borderline case judged
        from other arithmetic, e.g. prefix-shared logits) gets an empty `minimized`.
        """
        items = self.start([r["sequence"] for r in rows], [r["position"] for r in rows], strict=False)
        done = iter(self.run([it for it in items if it is not None]))
        for row, item in zip(rows, items):
            row["minimized"] = next(done).sequence if item is not None else ""
