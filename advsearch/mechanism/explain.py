"""Per-failure explanations: structure in the loaded model's terms, attribution, and a
controlled causal check.

For a failing position k (truth t*, prediction p) an `Explanation` holds:

Structure (from the prefix and the loaded checkpoint's `MechanismTables`)
    Duplicated, unique and absent letters; the layer-1 heads responsible for t*
    and p, r(t*) and r(p); the *load* on r(t*) (the duplicated letters of its
    responsibility set, which it must push down while it lifts t*); and the
    *detectors*: for each duplicate that matters (p when it is duplicated, the
    load letters), every layer-0 head's attention from the latest copy to the
    earlier ones, against that head's entry for the letter in the tables. A head
    *flagged* the duplicate when that attention reaches the tables' duplicate
    threshold, and *missed* it when the tables call it a detector of that letter
    but it stayed below.

Category (first matching rule; only the prefix and the responsibility sets decide)
    qmark_expected             t* = ?, p occurs more than once.
    absent_letter_predicted    t* = ?, p does not occur.
    unique_missed_qmark        t* an earlier unique letter, p = ?.
    first_instance_missed      t* is the letter at k itself, its first instance.
    duplicate_not_suppressed   t* a letter, p occurs more than once.
    overloaded_head            t* earlier unique, p a later unique letter of another
                               head's set, and r(t*) carries a load.
    later_unique_preferred     t* earlier unique, p a later unique letter otherwise.
    set_mate_predicted         t* a letter, p an absent letter of r(t*)'s set.
    other                      t* a letter, p an absent letter of another set.

Attribution (linear, from one clean run; `advsearch.mechanism.paths`)
    Each path src->dst (src: embed, 0.h; dst: logits, 1.j), each layer-0 head and
    each layer-1 head's output, credited with its contribution to each logit
    relative to its mean. `deciding_path` is the path credited with most of the
    gap logit(p) − logit(t*).

Causal check (measured; `advsearch.mechanism.paths.PathModel.ablate`)
    The explanation names the smallest set of components whose mean ablation
    makes the model answer t*, found by search over measured effects: every
    single component (16 paths, 6 heads), then sets of 2 to `MAX_SET` drawn from
    the `PAIR_POOL` paths with the largest measured single effects, or from one
    layer's heads. At equal size a path is named before a head (it says more),
    and among those that fix the failure the one with the largest effect.
    `check` is `confirmed` when such a set exists, `refuted` when no set of up to
    `MAX_SET` components does (the named set is then the largest-effect one
    tried), `none` for a correct position. The path forward runs in float64, so
    a row's numbers do not depend on the other rows of its batch.

    Because the named set is found by search, `confirmed` alone says only that a
    few components suffice. The evidence is the *control*: the same number of
    ablations of the same kind — for each named path, the path into the same
    destination from another source; for each named head, another head of the
    same layer — chosen, among those the explanation does not name, as the one
    closest in size to the named component (the norm of its deviation from its
    mean, which is what mean ablation removes). The control does not look at the
    failure's logits, so it can come out either way. `control` is `fixed` or
    `not_fixed` (`none` when every sibling is named). A confirmation is
    *specific* when the control is `not_fixed`.

    `effect` and `control_effect` are the changes of logit(t*) − logit(p) under
    the two interventions (positive: towards the truth).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from itertools import combinations

import torch

from advsearch.errors import AdvsearchError
from advsearch.mechanism.paths import PathModel
from advsearch.mechanism.tables import MechanismTables, compute_tables, reference_batch
from advsearch.model.oracle import first_unique

MAX_SET = 4  # the largest component set the search tries
PAIR_POOL = 6  # larger sets are drawn from this many paths (or one layer's heads) with the largest effects

CATEGORIES = (
    "qmark_expected",
    "absent_letter_predicted",
    "unique_missed_qmark",
    "first_instance_missed",
    "duplicate_not_suppressed",
    "overloaded_head",
    "later_unique_preferred",
    "set_mate_predicted",
    "other",
    "correct",
)
CHECK_RESULTS = ("confirmed", "refuted", "none")
CONTROL_RESULTS = ("fixed", "not_fixed", "none")
CSV_COLUMNS = ("category", "resp_head_true", "resp_head_pred", "load", "detectors", "deciding_path",
               "components", "check", "control", "effect", "control_effect")  # fmt: skip


def _head(h: int | None) -> str:
    return "" if h is None else f"1.{h}"


def csv_columns(category: str, resp_head_true: int | None, resp_head_pred: int | None, load: int, detectors: str,
                deciding_path: str, components: list[str], check: str, control: str, effect: float,
                control_effect: float) -> dict[str, str | int | float]:  # fmt: skip
    """The explanation columns of failures.csv (`CSV_COLUMNS`), formatted as written."""
    return {
        "category": category,
        "resp_head_true": _head(resp_head_true),
        "resp_head_pred": _head(resp_head_pred),
        "load": load,
        "detectors": detectors,
        "deciding_path": deciding_path,
        "components": "+".join(components),
        "check": check,
        "control": control,
        "effect": round(float(effect), 4),
        "control_effect": round(float(control_effect), 4),
    }


class Components:
    """The ablatable components of a 2-layer model with `n_heads` heads per layer.

    Index order: the paths src->dst (src-major: embed, 0.0, ...; dst: logits, 1.0, ...), then the
    layer-0 heads, then the layer-1 heads. `masks` turns sets of indices into the keep masks
    `PathModel.ablate` takes; `siblings` says which components are of the same kind.
    """

    def __init__(self, n_heads: int):
        self.n_heads = H = n_heads
        self.sources = ["embed"] + [f"0.{h}" for h in range(H)]
        self.dests = ["logits"] + [f"1.{h}" for h in range(H)]
        self.n_paths = P = len(self.sources) * len(self.dests)
        self.names = [f"{s}->{d}" for s in self.sources for d in self.dests]
        self.names += [f"0.{h}" for h in range(H)] + [f"1.{h}" for h in range(H)]
        S, D = len(self.sources), len(self.dests)
        keep = torch.ones(len(self.names), S, D, dtype=torch.bool)
        keep_out = torch.ones(len(self.names), H, dtype=torch.bool)
        for c in range(P):
            keep[c, c // D, c % D] = False
        for h in range(H):
            keep[P + h, 1 + h] = False
            keep_out[P + H + h, h] = False
        self.single_keep, self.single_keep_out = keep, keep_out  # one mask per component
        self.path_mask = torch.arange(len(self.names)) < P
        self.sibling_mask = torch.zeros(len(self.names), len(self.names), dtype=torch.bool)  # [c, siblings of c]
        for c in range(len(self.names)):
            self.sibling_mask[c, self.siblings(c)] = True

    def is_path(self, c: int) -> bool:
        return c < self.n_paths

    def siblings(self, c: int) -> list[int]:
        """Components of the same kind as c: paths into the same destination, heads of the same layer."""
        D, P, H = len(self.dests), self.n_paths, self.n_heads
        if c < P:
            return [s * D + c % D for s in range(len(self.sources)) if s * D + c % D != c]
        first = P if c < P + H else P + H
        return [x for x in range(first, first + H) if x != c]

    def masks(self, sets: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep masks [N, S, D] and [N, H] that mean-ablate each set of components."""
        member = torch.zeros(len(sets), len(self.names))
        member[[i for i, cs in enumerate(sets) for _ in cs], [c for cs in sets for c in cs]] = 1.0
        return self.member_masks(member)

    def member_masks(self, member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep masks [N, S, D] and [N, H] that mean-ablate the components marked in `member` [N, C]."""
        drop = member @ (~self.single_keep).flatten(1).float()
        drop_out = member @ (~self.single_keep_out).float()
        return (drop == 0).view(len(member), *self.single_keep.shape[1:]), drop_out == 0


def _or_none(heads: list[int]) -> list[int | None]:
    return [None if h < 0 else h for h in heads]


def _sets(padded: torch.Tensor) -> list[tuple[int, ...]]:
    """The rows of a [N, K] tensor of component indices, -1 padded on the right, as tuples."""
    return [tuple(row[:n]) for row, n in zip(padded.tolist(), (padded >= 0).sum(1).tolist())]


@dataclass
class Explanation:
    """Why the model fails at `position` of `sequence` (see the module docstring)."""

    sequence: str
    position: int
    true: str
    predicted: str
    category: str
    reason: str
    resp_head_true: int | None  # layer-1 head index, None for `?`
    resp_head_pred: int | None
    load: int  # duplicated letters of r(t*)'s set
    load_letters: list[str]
    detectors: str  # layer-0 heads that flagged or missed the duplicates that matter
    components: list[str]  # the named component set
    story: str  # the named components in the tables' terms
    check: str  # confirmed / refuted / none
    control: str  # fixed / not_fixed / none
    control_components: list[str]
    effect: float  # change of logit(t*) - logit(p) under the named ablation
    control_effect: float
    deciding_path: str
    logit_true: float
    logit_pred: float
    paths: dict[str, dict[str, float]]  # "src->dst" -> {"true", "pred"}: attribution relative to the mean
    heads: dict[str, dict[str, float]]  # "0.h" / "1.j" -> {"true", "pred"}
    duplicated: list[str]
    unique: list[str]
    absent: list[str]
    extra: dict = field(default_factory=dict)

    @property
    def margin(self) -> float:
        return self.logit_pred - self.logit_true

    @property
    def specific(self) -> bool:
        return self.check == "confirmed" and self.control == "not_fixed"

    def columns(self) -> dict[str, str | int | float]:
        """The explanation columns of failures.csv."""
        return csv_columns(self.category, self.resp_head_true, self.resp_head_pred, self.load, self.detectors,
                           self.deciding_path, self.components, self.check, self.control, self.effect,
                           self.control_effect)  # fmt: skip

    def to_dict(self) -> dict:
        d = asdict(self)
        d["margin"] = self.margin
        d["specific"] = self.specific
        d["resp_head_true"] = _head(self.resp_head_true) or None
        d["resp_head_pred"] = _head(self.resp_head_pred) or None
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def format_text(self) -> str:
        s, k = self.sequence, self.position
        named = "+".join(self.components) or "-"
        control = "+".join(self.control_components) or "-"
        lines = [
            f"{s[: k + 1]}  position {k} ('{s[k]}'): true {self.true!r}, predicted {self.predicted!r} "
            f"(logits {self.logit_true:.2f} vs {self.logit_pred:.2f}, gap {self.margin:+.2f})",
            f"  category   {self.category}: {self.reason}",
            f"  structure  duplicated [{''.join(self.duplicated) or '-'}]  unique [{''.join(self.unique) or '-'}]  "
            f"absent [{''.join(self.absent) or '-'}]",
            f"             r(true)={_head(self.resp_head_true) or '-'}  r(pred)={_head(self.resp_head_pred) or '-'}  "
            f"load on r(true): {self.load} [{''.join(self.load_letters) or '-'}]",
            f"  detectors  {self.detectors or '-'}",
            f"  check      {self.check}: ablating {named} (to its mean) moves logit(true)-logit(pred) by "
            f"{self.effect:+.2f}",
            f"             {self.story}",
            f"  control    {self.control}: ablating {control} (same kind, like-sized, not named) moves it by "
            f"{self.control_effect:+.2f}" + ("  => specific" if self.specific else ""),
            f"  attribution relative to the mean (pred-true; deciding path {self.deciding_path or '-'}):",
        ]
        srcs = list(dict.fromkeys(n.split("->")[0] for n in self.paths))
        dsts = list(dict.fromkeys(n.split("->")[1] for n in self.paths))
        lines.append("    " + " " * 7 + "".join(f"{d:>9}" for d in dsts))
        for x in srcs:
            row = "".join(f"{self.paths[f'{x}->{d}']['pred'] - self.paths[f'{x}->{d}']['true']:+9.2f}" for d in dsts)
            lines.append(f"    {x:<7}{row}")
        heads = "  ".join(f"{h} {v['pred'] - v['true']:+.2f}" for h, v in self.heads.items())
        lines.append(f"    heads  {heads}")
        return "\n".join(lines)


@dataclass
class _Structures:
    """What the items' prefixes say, in the tables' terms (see the module docstring): [N, ...] per item."""

    counts: torch.Tensor  # [N, letters]: copies of each letter in the prefix
    first: torch.Tensor  # [N, letters]: the position of its first copy (the prefix's length if absent)
    rt: list[int | None]  # r(t*), None for '?'
    rp: list[int | None]  # r(p)
    load: torch.Tensor  # [N, letters]: the load letters (duplicated letters of r(t*)'s set)
    category: list[str]
    matter: list[list[int]]  # the duplicates whose detectors the explanation shows (at most 3)
    matter_letters: torch.Tensor  # [N, 3]: `matter`, then other letters (what `_duplicate_attention` reads)


@dataclass
class _Measured:
    """One batch's measurements, per item (lists indexed by item; `toks` by sequence)."""

    seq: list[int]
    pos: list[int]
    toks: list[list[int]]
    truth: list[int]
    pred: list[int]
    logit_true: list[float]
    logit_pred: list[float]
    at_true: torch.Tensor  # [N, C]: each component's attribution to logit(t*)
    at_pred: torch.Tensor  # [N, C]: ... and to logit(p)
    deciding: list[int]  # the deciding path's component index
    detector_att: list[list[list[float]]]  # [N][matter letter][H]: `Explainer._duplicate_attention` of `matter`
    structure: _Structures
    named: list[tuple[int, ...]]
    check: list[str]
    effect: list[float]
    control_set: list[tuple[int, ...]]
    control: list[str]
    control_effect: list[float]


class Explainer:
    """Explains failures of one model, batched on the path forward (`advsearch.mechanism.paths`).

    `tables` default to `compute_tables(model)`; `device` is where the path forward runs.
    """

    columns = CSV_COLUMNS  # what `Explanation.columns()` fills in failures.csv
    # a row's columns do not depend on the other rows explained with it (float64 path forward), so a
    # run's worker processes may split a step's rows between them
    rows_independent = True

    def __init__(self, model, tables: MechanismTables | None = None, device: str | torch.device = "cpu"):
        if model.spec.n_layers != 2:
            raise AdvsearchError(f"explanations need a 2-layer model; this one has {model.spec.n_layers} layers")
        self.spec = model.spec
        self.tables = tables if tables is not None else compute_tables(model)
        # float64: a row's numbers must not depend on which other rows share its batch (BLAS kernels
        # round differently per batch shape), so that runs are byte-identical whatever their batching
        self.paths = PathModel(model.weights, reference_batch(model.spec), device, dtype=torch.float64)
        self.comp = Components(model.spec.n_heads)
        self.q = self.spec.qmark
        # the tables' derived views, read for every explanation
        self._responsible = list(self.tables.responsible_head)
        self._responsible_t = torch.tensor(self._responsible + [-1])  # [letters + 1]: -1 for '?'
        self._sets = self.tables.responsibility_sets
        self._detector_sets = self.tables.detectors
        self._stories: dict[tuple, str] = {}
        self._token_ids = {c: i for i, c in enumerate(self.spec.vocab)}
        self._token_bytes = str.maketrans({c: chr(i) for c, i in self._token_ids.items()})

    def explain(self, tokens: torch.Tensor, pos: int) -> Explanation:
        return self.explain_many([(tokens, pos)])[0]

    def explain_many(self, items: list[tuple[torch.Tensor, int]], batch_size: int = 1024) -> list[Explanation]:
        """Explain many (tokens, position) pairs.

        The model is causal, so a prefix is read from the longest given prefix that extends it: each
        sequence is run once, at all its requested positions. Sequences are batched by length, up to
        `batch_size` positions a batch."""
        return self._per_item(items, batch_size, self._explanations)

    def annotate(self, rows: list[dict]) -> None:
        """Fill the explanation columns of failures.csv rows (dicts with `sequence` and `position`), in place."""
        for row, columns in zip(rows, self.explain_columns([(r["sequence"], r["position"]) for r in rows])):
            row.update(columns)

    def explain_columns(self, items: list[tuple[torch.Tensor | str, int]], batch_size: int = 1024) -> list[dict]:
        """`[e.columns() for e in self.explain_many(items)]`, without building the `Explanation`s.

        The search runner needs only the failures.csv columns; the attribution tables, the story and
        the category's reason that an `Explanation` also carries are left out. A sequence can be given
        as its text (`'?abca'`), as the runner's rows hold it, instead of its tokens."""
        return self._per_item(items, batch_size, self._columns)

    def _per_item(self, items: list[tuple[torch.Tensor | str, int]], batch_size: int, finish) -> list:
        """What `finish(measured)` gives for each item of the batches `_measure_batch` measures (see `explain_many`)."""
        prefixes: list[bytes] = []  # token ids, a byte each: hashed and sorted faster than tuples
        letters, ids = set(range(self.q)), self._token_ids
        for toks, pos in items:
            if isinstance(toks, str):
                if not ids.keys() >= set(toks):
                    raise AdvsearchError(f"{toks!r} has characters outside the vocabulary {self.spec.vocab!r}")
                toks = toks.translate(self._token_bytes).encode("latin-1")  # one byte per token id
            else:
                toks = torch.as_tensor(toks).flatten().tolist()
            if not 0 <= pos < len(toks):
                raise AdvsearchError(f"position {pos} is outside a sequence of {len(toks)} tokens")
            if pos >= self.spec.seq_len:
                raise AdvsearchError(f"position {pos} is beyond the model's {self.spec.seq_len} positions")
            p = toks[: pos + 1]
            if p[0] != self.q or not letters.issuperset(p[1:]):
                raise AdvsearchError(f"{self.spec.decode(list(p))!r} is not '?' followed by letters")
            prefixes.append(bytes(p))
        # in sorted order a prefix of any later prefix is a prefix of the next one, which the next one's owner extends
        owner: dict[bytes, bytes] = {}
        positions: dict[bytes, set[int]] = defaultdict(set)
        rep = b""
        for p in sorted(set(prefixes), reverse=True):
            if rep[: len(p)] != p:
                rep = p
            owner[p] = rep
            positions[rep].add(len(p) - 1)
        by_length: dict[int, list[bytes]] = defaultdict(list)
        for r in positions:
            by_length[len(r)].append(r)
        done: dict[tuple[bytes, int], object] = {}
        for _, reps in sorted(by_length.items()):
            reps.sort(key=lambda r: (len(positions[r]), r))  # like counts together: little padding in a batch
            start = 0
            while start < len(reps):
                chunk, n = [], 0
                while start < len(reps) and (not chunk or n + len(positions[reps[start]]) <= batch_size):
                    chunk.append(reps[start])
                    n += len(positions[reps[start]])
                    start += 1
                where = [sorted(positions[r]) for r in chunk]
                measured = self._measure_batch(torch.tensor([list(r) for r in chunk]), where)
                exs = iter(finish(measured))
                for r, ks in zip(chunk, where):
                    for k in ks:
                        done[r, k] = next(exs)
        return [done[owner[p], len(p) - 1] for p in prefixes]

    # ---- the batch --------------------------------------------------------------------------
    @torch.no_grad()
    def _measure_batch(self, toks: torch.Tensor, positions: list[list[int]]) -> _Measured:
        """What the explanations of the items `positions[b]` of each sequence b of `toks` [B, L] need,
        item by item (sequence by sequence)."""
        comp, pm = self.comp, self.paths
        clean = pm.run(toks, positions)
        seq, pos = clean.seq.cpu(), clean.pos.cpu()
        N = len(seq)
        ar = torch.arange(N)
        truth = first_unique(toks, self.q)[seq, pos]
        logits = clean.logits.cpu()
        pred = logits.argmax(-1)
        gap = logits[ar, pred] - logits[ar, truth]  # > 0 for a failure
        rows = (pred != truth).nonzero().flatten()
        R, C = len(rows), len(comp.names)

        # search: every single component for every failing row, then larger sets where no smaller one fixes
        named_set = torch.full((N, MAX_SET), -1)  # the named components, -1 padded
        named_eff = torch.zeros(N, dtype=torch.float64)
        named_fix = torch.zeros(N, dtype=torch.bool)
        if R:
            e, f = self._ablate(clean, truth, pred, gap, rows.repeat_interleave(C),
                                comp.single_keep.repeat(R, 1, 1), comp.single_keep_out.repeat(R, 1))  # fmt: skip
            e1, f1 = e.view(R, C), f.view(R, C)
            # a fixing component if any, a path before a head, then the largest effect
            best = (e1 + 1e4 * f1 + 1e3 * (f1 & comp.path_mask)).argmax(1)
            at = torch.arange(R)
            named_set[rows, 0], named_eff[rows], named_fix[rows] = best, e1[at, best], f1[at, best]
            open_ = ~f1[at, best]  # failing rows (indexing `rows`) no set has fixed yet
            for size in range(2, MAX_SET + 1):
                if not open_.any():
                    break
                sel = open_.nonzero().flatten()
                sets, all_paths = self._candidates(e1[sel], size)  # [n, K, size], [K]
                e, f = self._measure(clean, truth, pred, gap, rows[sel], sets)
                i = self._best(e, f, all_paths)
                at = torch.arange(len(sel))
                fixed = f[at, i]
                take = fixed | (size == MAX_SET)
                r = rows[sel[take]]
                named_set[r, :size], named_eff[r], named_fix[r] = sets[at, i][take], e[at, i][take], fixed[take]
                open_[sel[fixed]] = False

        # controls: like-sized siblings the explanation does not name
        control_set = self._controls(named_set[rows], self._sizes(clean)[rows])  # [R, MAX_SET]
        n_named, has_control = (named_set[rows] >= 0).sum(1), control_set[:, 0] >= 0
        ctrl_eff = torch.zeros(N, dtype=torch.float64)
        ctrl_fix = torch.zeros(N, dtype=torch.bool)
        for size in range(1, MAX_SET + 1):
            sel = (has_control & (n_named == size)).nonzero().flatten()
            if len(sel):
                e, f = self._measure(clean, truth, pred, gap, rows[sel], control_set[sel, None, :size])
                ctrl_eff[rows[sel]], ctrl_fix[rows[sel]] = e[:, 0], f[:, 0]

        # attribution rows for the text
        att = pm.attribute(clean)
        allc = torch.cat([att["paths"].flatten(1, 2), att["heads0"], att["heads1"]], 1).cpu()  # [N, C, V]
        at_t, at_p = allc[ar, :, truth], allc[ar, :, pred]
        deciding = (at_p - at_t)[:, : comp.n_paths].argmax(1).tolist()  # the first of equals, as max() picks
        failing = torch.zeros(N, dtype=torch.bool)
        failing[rows] = True
        check = torch.where(failing, (~named_fix).long(), 2).tolist()  # CHECK_RESULTS
        all_controls = torch.full((N, MAX_SET), -1)
        all_controls[rows] = control_set
        control = torch.where(all_controls[:, 0] >= 0, (~ctrl_fix).long(), 2).tolist()  # CONTROL_RESULTS
        st = self._structures(toks, seq, pos, truth, pred)
        detector_att = self._duplicate_attention(clean, st.matter_letters)
        return _Measured(
            seq=seq.tolist(), pos=pos.tolist(), toks=toks.tolist(), truth=truth.tolist(), pred=pred.tolist(),
            logit_true=logits[ar, truth].tolist(), logit_pred=logits[ar, pred].tolist(), at_true=at_t, at_pred=at_p,
            deciding=deciding, detector_att=detector_att.transpose(1, 2).tolist(), structure=st,
            named=_sets(named_set), check=[CHECK_RESULTS[c] for c in check], effect=named_eff.tolist(),
            control_set=_sets(all_controls), control=[CONTROL_RESULTS[c] for c in control],
            control_effect=ctrl_eff.tolist(),
        )  # fmt: skip

    def _prefixes(self, toks: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """[N, L]: each item's sequence, '?' beyond its position k."""
        return toks[seq].masked_fill(torch.arange(toks.shape[1]) > pos[:, None], self.q)

    def _duplicate_attention(self, clean, letters: torch.Tensor) -> torch.Tensor:
        """[N, H, K]: each layer-0 head's attention from the latest copy of each letter `letters` [N, K] (up
        to k) to its earlier copies (0 for a letter with no earlier copy)."""
        pattern0, seq, pos = clean.pattern0.cpu(), clean.seq.cpu(), clean.pos.cpu()
        prefix = self._prefixes(clean.tokens.cpu(), seq, pos)
        L = prefix.shape[1]
        is_x = prefix[:, None] == letters[..., None]  # [N, K, L]
        last = torch.where(is_x, torch.arange(L), -1).amax(-1)  # [N, K]: the latest copy
        rows = pattern0[seq[:, None, None], torch.arange(pattern0.shape[1])[:, None], last.clamp(min=0)[:, None]]
        earlier = is_x & (torch.arange(L) < last[..., None])  # [N, K, L]
        return (rows * earlier[:, None]).sum(-1)  # [N, H, K]

    def _ablate(self, clean, truth, pred, gap, rows, keep, keep_out) -> tuple[torch.Tensor, torch.Tensor]:
        """Per variant of the items `rows`: the change of logit(t*) − logit(p) and whether the model then answers t*."""
        logits = self.paths.ablate(clean, rows, keep, keep_out).cpu()
        ar = torch.arange(len(rows))
        t, p = truth[rows], pred[rows]
        return gap[rows] - (logits[ar, p] - logits[ar, t]), logits.argmax(-1) == t

    def _measure(self, clean, truth, pred, gap, rows: torch.Tensor, sets: torch.Tensor):
        """`_ablate` for each row's component sets `sets` [R, K, size]: effects and fixes [R, K]."""
        R, K, _ = sets.shape
        member = torch.zeros(R * K, len(self.comp.names))
        member.scatter_(1, sets.flatten(0, 1), 1.0)
        keep, keep_out = self.comp.member_masks(member)
        e, f = self._ablate(clean, truth, pred, gap, rows.repeat_interleave(K), keep, keep_out)
        return e.view(R, K), f.view(R, K)

    @staticmethod
    def _best(effects: torch.Tensor, fixed: torch.Tensor, all_paths: torch.Tensor) -> torch.Tensor:
        """Per row [R], the index of the set to name among [R, K]: a fixing one if any, among those one of
        paths only if any, then the largest effect (the first of equals)."""
        cand = fixed | ~fixed.any(1, keepdim=True)
        paths = cand & all_paths
        cand = cand & (paths | ~paths.any(1, keepdim=True))
        return effects.masked_fill(~cand, -torch.inf).argmax(1)

    def _candidates(self, eff1: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of single effects `eff1` [R, C], the sets of `size` components [R, K, size]: from the
        `PAIR_POOL` paths with the largest single effects, then from each layer's heads; and which of the
        K sets are of paths only."""
        P, H = self.comp.n_paths, self.comp.n_heads
        top = eff1[:, :P].argsort(dim=1, descending=True)[:, :PAIR_POOL].sort(1).values  # [R, PAIR_POOL]
        pick = torch.tensor(list(combinations(range(PAIR_POOL), size)), dtype=torch.long)  # [K1, size]
        heads = [c for first in (P, P + H) for c in combinations(range(first, first + H), size)]
        sets = top[:, pick]  # [R, K1, size]
        if heads:
            sets = torch.cat([sets, torch.tensor(heads).expand(len(sets), -1, -1)], 1)
        return sets, torch.arange(sets.shape[1]) < len(pick)

    def _sizes(self, clean) -> torch.Tensor:
        """How much each component's ablation removes: the norm of its deviation from its mean
        ([N, C]; paths and layer-0 heads over the positions read, layer-1 heads at k)."""
        pm, comp = self.paths, self.comp
        B, L, S, _ = clean.deviation.shape
        norm = clean.deviation.norm(dim=-1)[clean.seq].transpose(1, 2)  # [N, S, L]
        read = (torch.arange(L, device=norm.device) <= clean.pos[:, None])[:, None]  # [N, 1, L]
        rms = (norm.pow(2) * read).sum(-1).div(clean.pos[:, None] + 1).sqrt()  # [N, S]
        at_k = norm.gather(2, clean.pos[:, None, None].expand(-1, S, 1))[..., 0]
        D = len(comp.dests)
        paths = torch.stack([at_k] + [rms] * (D - 1), 2).flatten(1)  # [N, S*D]: direct paths read k only
        out1 = (clean.out1 - pm.mean_out1[:, clean.pos].transpose(0, 1)).norm(dim=-1)  # [N, H]
        return torch.cat([paths, rms[:, 1:], out1], 1).cpu()

    def _controls(self, named: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """Per row of named sets `named` [R, K] (-1 padded) and component sizes [R, C]: for each named
        component, the sibling closest in size (the first of equals) that is neither named nor already
        chosen; all -1 for a row where some named component has no such sibling."""
        R, K = named.shape
        C = sizes.shape[1]
        ar, c = torch.arange(R), named.clamp(min=0)
        used = torch.zeros(R, C + 1, dtype=torch.bool)
        used[ar[:, None], torch.where(named >= 0, named, C)] = True
        chosen, ok = torch.full((R, K), -1), torch.ones(R, dtype=torch.bool)
        for i in range(K):
            active = named[:, i] >= 0
            options = self.comp.sibling_mask[c[:, i]] & ~used[:, :C]
            dist = (sizes - sizes[ar, c[:, i], None]).abs().masked_fill(~options, torch.inf)
            pick, take = dist.argmin(1), active & options.any(1)
            ok &= take | ~active
            chosen[take, i] = pick[take]
            used[ar[take], pick[take]] = True
        return chosen.masked_fill(~ok[:, None], -1)

    # ---- the structure ----------------------------------------------------------------------
    def _structures(self, toks: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, truth: torch.Tensor,
                    pred: torch.Tensor) -> _Structures:  # fmt: skip
        """The items' structure and category (the first matching rule of the module docstring's list)."""
        q, N = self.q, len(seq)
        ar, L = torch.arange(N), toks.shape[1]
        prefix = self._prefixes(toks, seq, pos)
        counts = torch.zeros(N, q + 1, dtype=torch.long).scatter_add_(1, prefix, torch.ones_like(prefix))
        counts[:, q] = 0  # [N, tokens]: copies of each letter, none of '?'
        c_pred, c_true, counts = counts[ar, pred], counts[ar, truth], counts[:, :q]
        first = torch.full((N, q + 1), L).scatter_reduce_(1, prefix, torch.arange(L).expand(N, L), "amin")[:, :q]
        dup = counts >= 2
        R = self._responsible_t  # [letters + 1]: -1 for '?'
        rt, rp = R[truth], R[pred]
        load = dup & (R[:q] == rt[:, None])
        at_k, has_load = prefix[ar, pos], load.any(1)
        rules = [  # in the order of CATEGORIES
            (truth == q) & (c_pred >= 2),
            truth == q,
            (pred == q) & (at_k != truth),
            (at_k == truth) & (c_true == 1),
            c_pred >= 2,
            (c_pred == 1) & has_load & (rt != rp),
            c_pred == 1,
            rt == rp,
            torch.ones(N, dtype=torch.bool),
        ]
        category = torch.stack(rules, 1).int().argmax(1).masked_fill(pred == truth, len(rules))  # the first match
        pred_dup = (pred[:, None] == torch.arange(q)) & dup
        matter = pred_dup | load | (dup & (R[:q] == rp[:, None]) & (truth == q)[:, None])
        order = torch.where(pred_dup, -1, first).masked_fill(~matter, L).argsort(1)[:, :3]  # the prediction first
        shown = matter[ar[:, None], order]
        return _Structures(
            counts=counts, first=first, rt=_or_none(rt.tolist()), rp=_or_none(rp.tolist()), load=load,
            category=[CATEGORIES[c] for c in category.tolist()],
            matter=[[x for x, y in zip(xs, ys) if y] for xs, ys in zip(order.tolist(), shown.tolist())],
            matter_letters=order,
        )  # fmt: skip

    # ---- one item ---------------------------------------------------------------------------
    def _columns(self, m: _Measured) -> list[dict[str, str | int | float]]:
        """Each item's failures.csv columns, as `Explanation.columns()` gives them."""
        st, names = m.structure, self.comp.names
        loads = st.load.sum(1).tolist()
        return [csv_columns(st.category[n], st.rt[n], st.rp[n], loads[n],
                            self._detectors(st.matter[n], m.detector_att[n]),
                            names[m.deciding[n]] if st.category[n] != "correct" else "",
                            [names[c] for c in m.named[n]], m.check[n], m.control[n], m.effect[n],
                            m.control_effect[n]) for n in range(len(m.seq))]  # fmt: skip

    def _explanations(self, m: _Measured) -> list[Explanation]:
        """Each item's `Explanation`."""
        return [self._explanation(m, n) for n in range(len(m.seq))]

    def _explanation(self, m: _Measured, n: int) -> Explanation:
        V, q, names = self.spec.vocab, self.q, self.comp.names
        p, t, pr, named = m.toks[m.seq[n]][: m.pos[n] + 1], m.truth[n], m.pred[n], m.named[n]
        st = m.structure
        counts, first = st.counts[n].tolist(), st.first[n].tolist()
        order = sorted((x for x in range(q) if counts[x]), key=first.__getitem__)
        load = st.load[n].tolist()
        load_letters = [x for x in order if load[x]]
        cat = st.category[n]
        P = self.comp.n_paths
        at_t, at_p = m.at_true[n].tolist(), m.at_pred[n].tolist()
        paths = {x: {"true": a, "pred": b} for x, a, b in zip(names[:P], at_t, at_p)}
        heads = {x: {"true": a, "pred": b} for x, a, b in zip(names[P:], at_t[P:], at_p[P:])}
        story = self._stories.get((named, t, pr))
        if story is None:
            story = self._stories[named, t, pr] = self._story(named, t, pr, self._sets)
        return Explanation(
            sequence="".join(V[x] for x in p),
            position=len(p) - 1,
            true=V[t],
            predicted=V[pr],
            category=cat,
            reason=self._reason(p, t, pr, cat, counts, st.rt[n], st.rp[n], load_letters),
            resp_head_true=st.rt[n],
            resp_head_pred=st.rp[n],
            load=len(load_letters),
            load_letters=[V[x] for x in load_letters],
            detectors=self._detectors(st.matter[n], m.detector_att[n]),
            components=[names[c] for c in named],
            story=story,
            check=m.check[n],
            control=m.control[n],
            control_components=[names[c] for c in m.control_set[n]],
            effect=float(m.effect[n]),
            control_effect=float(m.control_effect[n]),
            deciding_path=names[m.deciding[n]] if pr != t else "",
            logit_true=m.logit_true[n],
            logit_pred=m.logit_pred[n],
            paths=paths,
            heads=heads,
            duplicated=[V[x] for x in order if counts[x] >= 2],
            unique=[V[x] for x in order if counts[x] == 1],
            absent=[V[x] for x in range(q) if counts[x] == 0],
        )

    def _reason(self, p: list[int], t: int, pr: int, cat: str, counts: list[int], rt: int | None,
                rp: int | None, load_letters: list[int]) -> str:  # fmt: skip
        """In words, why the item is in its category `cat` (`_structures` decides it)."""
        V = self.spec.vocab
        return {
            "correct": lambda: "the model predicts the truth here",
            "qmark_expected": lambda: f"every letter is duplicated, yet {V[pr]!r} ({counts[pr]} copies) beat '?'",
            "absent_letter_predicted": lambda: (
                f"every letter is duplicated and {V[pr]!r}, which does not occur, beat '?'"
            ),
            "unique_missed_qmark": lambda: f"{V[t]!r} (position {p.index(t)}) is unique but fell below '?'",
            "first_instance_missed": lambda: f"{V[t]!r} appears for the first time here but lost to {V[pr]!r}",
            "duplicate_not_suppressed": lambda: (
                f"{V[pr]!r} occurs {counts[pr]} times but was not pushed below the unique {V[t]!r}"
            ),
            "overloaded_head": lambda: (
                f"{_head(rt)}, responsible for {V[t]!r}, also carries the duplicated "
                f"{''.join(V[x] for x in load_letters)} of its set; the later unique {V[pr]!r} "
                f"({_head(rp)}'s set) wins"
            ),
            "later_unique_preferred": lambda: (
                f"{V[t]!r} (position {p.index(t)}) lost to the later unique {V[pr]!r} (position {p.index(pr)})"
            ),
            "set_mate_predicted": lambda: f"{V[pr]!r}, absent, is a set-mate of the unique {V[t]!r} under {_head(rt)}",
            "other": lambda: f"{V[pr]!r}, absent and of another head's set, beat the unique {V[t]!r}",
        }[cat]()

    def _detectors(self, letters: list[int], att: list[list[float]]) -> str:
        """For each duplicated letter `letters[i]`, the layer-0 heads that flagged (attention from its latest
        copy to the earlier ones, `att[i][h]`, at least the tables' threshold) or missed (a detector of it
        in the tables, below)."""
        V, tab = self.spec.vocab, self.tables
        thr, diag = tab.dup_threshold, tab.l0_diag
        parts = []
        for x, row in zip(letters, att):
            notes = []
            for h, a in enumerate(row):
                if a >= thr:
                    notes.append(f"0.{h} flagged {a:.2f}")
                elif diag[h][x] > thr:
                    notes.append(f"0.{h} missed {a:.2f}")
            parts.append(f"{V[x]}: " + (", ".join(notes) or "no head flagged"))
        return "; ".join(parts)

    def _story(self, named: tuple[int, ...], t: int, pr: int, sets: list[list[int]]) -> str:
        """The named components in the tables' terms."""
        V, comp = self.spec.vocab, self.comp
        P, H, D = comp.n_paths, comp.n_heads, len(comp.dests)

        def l1(j: int) -> str:
            role = [f"{w} {V[x]!r}" for w, x in (("truth", t), ("prediction", pr)) if x < self.q and self._responsible[x] == j]
            return f"1.{j} (set {''.join(V[x] for x in sets[j]) or '-'}" + (f"; holds the {', '.join(role)})" if role else ")")

        def l0(h: int) -> str:
            det = "".join(V[x] for x in self._detector_sets[h])
            return f"0.{h} (detects duplicates of {det})" if det else f"0.{h} (detects no duplicates)"

        parts = []
        for c in named:
            if c < P:
                s, d = divmod(c, D)
                src = "embed" if s == 0 else l0(s - 1)
                parts.append(f"{src} read {'directly by the unembedding' if d == 0 else 'by ' + l1(d - 1)}")
            elif c < P + H:
                parts.append(l0(c - P))
            else:
                parts.append(l1(c - P - H))
        return "; ".join(parts) if parts else "no component named"


@torch.no_grad()
def failing_positions(model, tokens: torch.Tensor) -> list[int]:
    """Positions of a 1-D token sequence where the model's argmax differs from the truth (fused forward)."""
    from advsearch.model.evaluator import Evaluator

    toks = torch.as_tensor(tokens).flatten()[None]
    pred = Evaluator(model.weights, device="cpu").logits(toks)[0].argmax(-1)
    truth = first_unique(toks, model.spec.qmark)[0]
    return [int(k) for k in (pred != truth).nonzero().flatten()]
