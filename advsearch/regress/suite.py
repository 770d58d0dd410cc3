"""Robustness regression suites: a CSV of prefixes with the answers a baseline model gave.

A suite is built from one or more search runs (`results/<run>/failures.csv`) and a
baseline checkpoint (`advsearch suite build RUN_DIR... --out results/suites/NAME.csv`):

1. every failing prefix of every run is collected and deduplicated (by prefix);
2. each is re-judged on the baseline model (a run may come from another model);
   prefixes the baseline gets right, or gets wrong by less than `min_margin`
   (too close to call across devices), are dropped;
3. per (category, expected, predicted) group the strongest `per_group` are kept
   (highest p(predicted), then the largest logit gap, then the shortest prefix,
   then the prefix itself) - these are the `failure` entries;
4. `guard` entries are added: prefixes the baseline gets right, in three kinds
   (seeded, deterministic): `neighbour` (for each failure, the one-letter
   substitution the baseline gets right by the smallest margin), `near_miss`
   (from random training-distribution prefixes, the right answers with the
   smallest margins, spread over (expected, runner-up) pairs) and `typical`
   (random right answers).

Every entry is judged at its last position (the model is causal, so a prefix's
answer does not depend on what follows it). Columns of the suite CSV:

    id                    f0001.. for failures, g0001.. for guards
    kind                  failure | guard
    sequence              the prefix, starting with `?`
    position              len(sequence) - 1, the judged position
    expected              the oracle's answer there
    baseline_predicted    the baseline model's argmax
    baseline_p_pred       its probability
    baseline_p_true       the probability of the expected answer
    baseline_true_margin  logit(expected) - max other logit (> 0: right, < 0: wrong):
                          the negation of `judge.logit_margin`
    baseline_pass         true when the baseline answered `expected`
    category              failure category from the runs (`category` column) or
                          from the Explainer (`--explain`); empty when unknown
    origin                failures: `<strategy>:<run_id>` of the first run (sorted)
                          that found the prefix; guards: `guard:<kind>:...`

The sidecar `NAME.json` records the baseline model (path, sha256, spec), the
baseline pass rate, counts and how the suite was built. Same inputs give a
byte-identical CSV and sidecar.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from advsearch import __version__
from advsearch.errors import AdvsearchError
from advsearch.files import read_json
from advsearch.mechanism.explain import Explainer
from advsearch.model.evaluator import Evaluator
from advsearch.model.judge import best_wrong, logit_margin
from advsearch.model.oracle import first_unique, first_unique_last
from advsearch.model.spec import ModelSpec
from advsearch.model.tokens import one_letter_neighbours, pad_prefixes
from advsearch.search.results import FailureRows, fmt, prepare_dir

SUITE_FORMAT = 1
SUITE_COLUMNS = (
    "id", "kind", "sequence", "position", "expected", "baseline_predicted", "baseline_p_pred",
    "baseline_p_true", "baseline_true_margin", "baseline_pass", "category", "origin",
)  # fmt: skip
KINDS = ("failure", "guard")
GUARD_KINDS = ("neighbour", "near_miss", "typical")


@dataclass
class SuiteEntry:
    id: str
    kind: str
    sequence: str
    position: int
    expected: str
    baseline_predicted: str
    baseline_p_pred: float
    baseline_p_true: float
    baseline_true_margin: float
    baseline_pass: bool
    category: str
    origin: str

    def row(self) -> dict:
        return {f.name: fmt(getattr(self, f.name)) for f in fields(self)}


@dataclass
class Suite:
    entries: list[SuiteEntry]
    meta: dict
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.meta.get("name") or (self.path.stem if self.path else "suite")

    @property
    def baseline_pass_rate(self) -> float:
        """Fraction of entries the baseline answered right (from the CSV itself)."""
        return sum(e.baseline_pass for e in self.entries) / len(self.entries) if self.entries else 1.0

    def counts(self) -> dict:
        c = {"entries": len(self.entries), "failures": 0, "guards": 0}
        for e in self.entries:
            c["failures" if e.kind == "failure" else "guards"] += 1
        return c


def sidecar_path(suite_csv: Path) -> Path:
    """`results/suites/NAME.csv` -> `results/suites/NAME.json`."""
    suite_csv = Path(suite_csv)
    return suite_csv.with_suffix(".json") if suite_csv.suffix == ".csv" else Path(str(suite_csv) + ".json")


# --------------------------------------------------------------------------------------------
# judging prefixes at their last position
# --------------------------------------------------------------------------------------------


@dataclass
class Verdicts:
    """Last-position verdicts for a list of prefixes (tensors of length n)."""

    expected: torch.Tensor
    pred: torch.Tensor
    p_pred: torch.Tensor
    p_true: torch.Tensor
    margin: torch.Tensor  # `judge.logit_margin` against `expected` (> 0: wrong); the CSV stores its negation

    @property
    def passed(self) -> torch.Tensor:
        return self.pred == self.expected


def judge_last(evaluator: Evaluator, spec: ModelSpec, prefixes: list[torch.Tensor]) -> Verdicts:
    """Judge each prefix (token ids, `?` first) at its last position, in float64 (the fused
    evaluator, the prefixes padded to n_ctx with `?` and evaluated in chunks)."""
    n = len(prefixes)
    if n == 0:
        e = torch.empty(0, dtype=torch.long)
        return Verdicts(e, e, torch.empty(0), torch.empty(0), torch.empty(0))
    batch, lengths = pad_prefixes(prefixes, spec.qmark, spec.seq_len)
    last = lengths - 1
    expected = torch.empty(n, dtype=torch.long)
    for length in last.unique().tolist():  # the oracle on each prefix length
        rows = (last == length).nonzero().flatten()
        expected[rows] = first_unique_last(batch[rows, : length + 1], spec.qmark)
    logits = evaluator.logits(batch)[torch.arange(n), last].double()
    probs = logits.softmax(-1)
    pred = logits.argmax(-1)
    return Verdicts(expected, pred, probs.gather(1, pred[:, None]).squeeze(1),
                    probs.gather(1, expected[:, None]).squeeze(1), logit_margin(logits, expected))  # fmt: skip


# --------------------------------------------------------------------------------------------
# reading runs
# --------------------------------------------------------------------------------------------


@dataclass
class RunFailures:
    path: Path
    run_id: str
    strategy: str
    model_sha256: str | None
    rows: list[dict]
    has_category: bool


def read_run(run_dir: Path) -> RunFailures:
    """failures.csv (a run folder's, or the file itself) and the folder's summary.json when present.

    Rows are read by `results.FailureRows` (an unfinished last line of an interrupted run is dropped)."""
    run_dir = Path(run_dir)
    csv_path = run_dir / "failures.csv" if run_dir.is_dir() else run_dir
    if not csv_path.exists():
        raise AdvsearchError(f"no failures.csv in {run_dir}")
    with FailureRows(csv_path) as table:
        columns = tuple(table.columns)
        if "sequence" not in columns:
            raise AdvsearchError(f"{csv_path} is not a failures.csv (no 'sequence' column)")
        rows = list(table.dicts())
    summary_path = csv_path.parent / "summary.json"
    summary = read_json(summary_path) if summary_path.exists() else {}
    if not isinstance(summary, dict):
        raise AdvsearchError(f"{summary_path} is not a run summary")
    first = rows[0] if rows else {}
    return RunFailures(
        path=run_dir,
        run_id=str(summary.get("run_id") or first.get("run_id") or run_dir.name),
        strategy=str(summary.get("strategy") or first.get("strategy") or "unknown"),
        model_sha256=summary.get("model_sha256"),
        rows=rows,
        has_category="category" in columns,
    )


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


@dataclass
class BuildOptions:
    per_group: int = 1  # strongest failures kept per (category, expected, predicted)
    near_misses: int = 50  # near-miss guards from random prefixes
    typical: int = 50  # typical (random) guards
    neighbours: bool = True  # one neighbour guard per failure
    pool: int = 10_000  # random sequences the near-miss / typical guards are drawn from
    seed: int = 0
    min_margin: float = 0.05  # |logit gap| below this is too close to call: never an entry
    explain: bool = False  # categorise failures with advsearch.mechanism.explain.Explainer on the baseline

    def to_dict(self) -> dict:
        return asdict(self)


def _encode_checked(spec: ModelSpec, text: str, where: str) -> torch.Tensor:
    try:
        toks = spec.encode(text)
    except AdvsearchError as e:
        raise AdvsearchError(f"{where}: {e}") from None
    if len(toks) < 2:
        raise AdvsearchError(f"{where}: prefix {text!r} has no position after '?'")
    return toks


def build_suite(model, run_dirs: list[Path], options: BuildOptions = BuildOptions(), *,
                device: str = "cpu", batch_size: int = 8192, name: str | None = None) -> Suite:  # fmt: skip
    """Build a suite from the failures of `run_dirs`, judged on the baseline `model` (a LoadedModel)."""
    if not run_dirs:
        raise AdvsearchError("suite build needs at least one run folder")
    spec = model.spec
    evaluator = Evaluator(model.weights, device=device, batch_size=batch_size)
    runs = [read_run(Path(d)) for d in run_dirs]

    # 1. candidates: distinct prefixes, each with its sorted origins and a category when known
    origins: dict[str, list[str]] = defaultdict(list)
    categories: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for run in runs:
        same_model = run.model_sha256 in (None, model.sha256)
        for line, row in enumerate(run.rows, start=2):
            seq = row.get("sequence", "")
            _encode_checked(spec, seq, f"{run.path}/failures.csv line {line}")
            origin = f"{run.strategy}:{run.run_id}"
            origins[seq].append(origin)
            if run.has_category and same_model and row.get("category"):
                categories[seq].append((origin, row["category"]))
    seqs = sorted(origins)
    verdicts = judge_last(evaluator, spec, [spec.encode(s) for s in seqs])

    failing = [i for i in range(len(seqs))
               if not verdicts.passed[i] and float(verdicts.margin[i]) >= options.min_margin]  # fmt: skip
    category = {}
    if options.explain and failing:
        category = _explain_categories(model, [seqs[i] for i in failing])
    else:
        for i in failing:
            found = sorted(categories.get(seqs[i], []))
            category[seqs[i]] = found[0][1] if found else ""

    V = spec.vocab
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in failing:
        groups[(category[seqs[i]], int(verdicts.expected[i]), int(verdicts.pred[i]))].append(i)
    chosen = []
    for key in sorted(groups):
        ranked = sorted(groups[key], key=lambda i: (-round(float(verdicts.p_pred[i]), 9),
                                                    round(-float(verdicts.margin[i]), 9), len(seqs[i]), seqs[i]))  # fmt: skip
        chosen.extend(ranked[: options.per_group])
    chosen.sort(key=lambda i: (V[int(verdicts.expected[i])], V[int(verdicts.pred[i])], category[seqs[i]],
                               len(seqs[i]), seqs[i]))  # fmt: skip

    def entry(kind: str, seq: str, v: Verdicts, i: int, cat: str, origin: str) -> SuiteEntry:
        return SuiteEntry(
            id="", kind=kind, sequence=seq, position=len(seq) - 1, expected=V[int(v.expected[i])],
            baseline_predicted=V[int(v.pred[i])], baseline_p_pred=float(v.p_pred[i]),
            baseline_p_true=float(v.p_true[i]), baseline_true_margin=-float(v.margin[i]),
            baseline_pass=bool(v.passed[i]), category=cat, origin=origin,
        )  # fmt: skip

    failures = [entry("failure", seqs[i], verdicts, i, category[seqs[i]], sorted(origins[seqs[i]])[0])
                for i in chosen]  # fmt: skip
    taken = set(origins)  # no guard may repeat a failing prefix of any run
    guards = _guards(evaluator, spec, failures, taken, options, entry)

    for n, e in enumerate(failures, start=1):
        e.id = f"f{n:04d}"
    for n, e in enumerate(guards, start=1):
        e.id = f"g{n:04d}"
    entries = failures + guards
    guard_counts = {k: sum(e.origin.startswith(f"guard:{k}:") for e in guards) for k in GUARD_KINDS}
    meta = {
        "format": SUITE_FORMAT,
        "name": name,
        "advsearch_version": __version__,
        "baseline": {"model": str(model.path), "model_sha256": model.sha256, "spec": spec.to_dict()},
        "baseline_pass_rate": round(len(guards) / len(entries), 6) if entries else 1.0,
        "counts": {
            "entries": len(entries), "failures": len(failures), "guards": len(guards),
            "guards_by_kind": guard_counts,
            "candidate_prefixes": len(seqs), "candidate_rows": sum(len(r.rows) for r in runs),
            "duplicate_rows": sum(len(r.rows) for r in runs) - len(seqs),
            "failing_on_baseline": len(failing),
            "right_or_too_close_on_baseline": len(seqs) - len(failing),
            "groups": len(groups),
        },
        "build": {
            "runs": [{"path": str(r.path), "run_id": r.run_id, "strategy": r.strategy,
                      "model_sha256": r.model_sha256, "rows": len(r.rows)} for r in runs],  # fmt: skip
            "options": options.to_dict(),
            "group_key": "(category, expected, baseline_predicted)",
            "strength": "baseline p_pred desc, then logit gap, then shorter prefix, then prefix",
            "categories": "explainer" if options.explain else "runs' category column (same model only)",
        },
    }
    return Suite(entries, meta)


def _explain_categories(model, seqs: list[str]) -> dict[str, str]:
    spec = model.spec
    items = [(spec.encode(s), len(s) - 1) for s in seqs]
    return {s: ex.category for s, ex in zip(seqs, Explainer(model).explain_many(items))}


def _guards(evaluator, spec, failures, taken: set[str], options: BuildOptions, entry) -> list[SuiteEntry]:
    guards: list[SuiteEntry] = []
    q, n_letters = spec.qmark, spec.n_letters

    # neighbours: per failure, the right-answered one-letter substitution with the smallest margin
    if options.neighbours and failures:
        variants, owner = [], []
        for fi, f in enumerate(failures):
            near = one_letter_neighbours(spec.encode(f.sequence), n_letters)
            variants += list(near)
            owner += [fi] * len(near)
        v = judge_last(evaluator, spec, variants)
        best: dict[int, tuple] = {}
        for i in range(len(variants)):
            lead = -float(v.margin[i])  # how far the expected answer leads
            if not v.passed[i] or lead < options.min_margin:
                continue
            seq = spec.decode(variants[i])
            key = (round(lead, 9), seq)
            if seq not in taken and (owner[i] not in best or key < best[owner[i]][0]):
                best[owner[i]] = (key, i, seq)
        for fi in sorted(best):
            _, i, seq = best[fi]
            if seq in taken:
                continue
            taken.add(seq)
            guards.append(entry("guard", seq, v, i, "", f"guard:neighbour:{failures[fi].sequence}"))

    if options.near_misses <= 0 and options.typical <= 0:
        return guards
    # a seeded pool of training-distribution prefixes (every position >= 1 of `pool` sequences)
    full = spec.random_tokens(options.pool, options.seed)
    logits = evaluator.logits(full).double()  # [pool, L, V]
    truth = first_unique(full, q)
    pred = logits.argmax(-1)
    runner_up = best_wrong(logits, truth)
    lead = -logit_margin(logits, truth)  # how far the truth leads
    ok = (pred == truth) & (lead >= options.min_margin)
    ok[:, 0] = False
    rows, cols = ok.nonzero(as_tuple=True)  # row-major: deterministic
    margins = lead[rows, cols]

    def prefix(i: int) -> str:
        return spec.decode(full[rows[i], : cols[i] + 1])

    def add(selected: list[str], kind: str) -> None:
        sel_toks = [spec.encode(s) for s in sorted(selected, key=lambda s: (len(s), s))]
        v = judge_last(evaluator, spec, sel_toks)
        for i, t in enumerate(sel_toks):
            s = spec.decode(t)
            taken.add(s)
            guards.append(entry("guard", s, v, i, "", f"guard:{kind}:random(seed={options.seed},pool={options.pool})"))

    # near misses: smallest margins, round-robin over (expected, runner-up) pairs for variety
    if options.near_misses > 0 and len(rows):
        order = torch.sort(margins, stable=True).indices.tolist()
        pairs = (truth[rows, cols] * (q + 1) + runner_up[rows, cols]).tolist()
        queues: dict[int, list[str]] = {}
        picked: set[str] = set()
        for i in order:  # ascending margin: each pair's queue holds its nearest misses
            qu = queues.setdefault(pairs[i], [])
            if len(qu) < options.near_misses:
                s = prefix(i)
                if s not in taken and s not in picked:
                    picked.add(s)
                    qu.append(s)
        ranked = list(queues.values())  # pairs in order of their nearest miss
        selected: list[str] = []
        for depth in range(options.near_misses):
            for qu in ranked:
                if depth < len(qu) and len(selected) < options.near_misses:
                    selected.append(qu[depth])
        add(selected, "near_miss")

    # typical: a seeded uniform sample of the right answers
    if options.typical > 0 and len(rows):
        gen_t = torch.Generator().manual_seed(options.seed + 1)
        selected = []
        for i in torch.randperm(len(rows), generator=gen_t).tolist():
            s = prefix(i)
            if s not in taken and s not in selected:
                selected.append(s)
                if len(selected) == options.typical:
                    break
        add(selected, "typical")
    return guards


# --------------------------------------------------------------------------------------------
# writing and reading suites
# --------------------------------------------------------------------------------------------


def suite_csv_text(entries: list[SuiteEntry]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUITE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for e in entries:
        writer.writerow(e.row())
    return buf.getvalue()


def write_suite(suite: Suite, out: Path) -> tuple[Path, Path]:
    """Write the CSV and its sidecar JSON (with the CSV's sha256); returns both paths."""
    out = Path(out)
    prepare_dir(out.parent if str(out.parent) else Path("."))
    text = suite_csv_text(suite.entries)
    meta = dict(suite.meta)
    meta["name"] = meta.get("name") or out.stem
    meta["csv_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    side = sidecar_path(out)
    try:
        out.write_text(text)
        side.write_text(json.dumps(meta, indent=2) + "\n")
    except OSError as e:
        raise AdvsearchError(f"cannot write suite {out}: {e.strerror or e}") from None
    suite.meta, suite.path = meta, out
    return out, side


def _parse_bool(value: str, where: str) -> bool:
    if value in ("true", "false"):
        return value == "true"
    raise AdvsearchError(f"{where}: baseline_pass must be true or false, got {value!r}")


def read_suite(path: Path, spec: ModelSpec | None = None) -> Suite:
    """Read and validate a suite CSV (+ its sidecar when present). Any problem: one-line AdvsearchError."""
    path = Path(path)
    if not path.exists():
        raise AdvsearchError(f"suite not found: {path}")
    try:
        text = path.read_text()
        reader = csv.DictReader(io.StringIO(text))
        columns = tuple(reader.fieldnames or ())
        rows = list(reader)
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise AdvsearchError(f"cannot read suite {path}: {e}") from None
    missing = [c for c in SUITE_COLUMNS if c not in columns]
    if missing:
        raise AdvsearchError(f"{path} is not a suite: missing column(s) {', '.join(missing)}")
    meta: dict = {}
    side = sidecar_path(path)
    if side.exists():
        meta = read_json(side)
        if not isinstance(meta, dict):
            raise AdvsearchError(f"suite sidecar {side} is not a JSON object")
    if spec is None:
        spec = ModelSpec.from_dict(meta["baseline"]["spec"]) if "spec" in meta.get("baseline", {}) else ModelSpec()
    entries, seen = [], set()
    for line, row in enumerate(rows, start=2):
        where = f"{path} line {line}"
        if None in row or any(row.get(c) is None for c in SUITE_COLUMNS):
            raise AdvsearchError(f"{where}: wrong number of fields")
        if row["kind"] not in KINDS:
            raise AdvsearchError(f"{where}: kind must be failure or guard, got {row['kind']!r}")
        toks = _encode_checked(spec, row["sequence"], where)
        try:
            position = int(row["position"])
            floats = {c: float(row[c]) for c in ("baseline_p_pred", "baseline_p_true", "baseline_true_margin")}
        except ValueError as e:
            raise AdvsearchError(f"{where}: {e}") from None
        if position != len(toks) - 1:
            raise AdvsearchError(f"{where}: position {position} is not the last index of {row['sequence']!r}")
        for c in ("expected", "baseline_predicted"):
            if len(row[c]) != 1 or row[c] not in spec.vocab:
                raise AdvsearchError(f"{where}: {c} {row[c]!r} is not in the vocabulary {spec.vocab!r}")
        truth = spec.vocab[int(first_unique_last(toks[None], spec.qmark)[0])]
        if row["expected"] != truth:
            raise AdvsearchError(f"{where}: expected {row['expected']!r} but the oracle says {truth!r}")
        if row["id"] in seen:
            raise AdvsearchError(f"{where}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        entries.append(SuiteEntry(
            id=row["id"], kind=row["kind"], sequence=row["sequence"], position=position,
            expected=row["expected"], baseline_predicted=row["baseline_predicted"],
            baseline_p_pred=floats["baseline_p_pred"], baseline_p_true=floats["baseline_p_true"],
            baseline_true_margin=floats["baseline_true_margin"],
            baseline_pass=_parse_bool(row["baseline_pass"], where), category=row["category"], origin=row["origin"],
        ))  # fmt: skip
    if not entries:
        raise AdvsearchError(f"suite {path} has no entries")
    meta.setdefault("name", path.stem)
    expected_sha = meta.get("csv_sha256")
    meta["csv_modified"] = bool(expected_sha) and hashlib.sha256(text.encode()).hexdigest() != expected_sha
    return Suite(entries, meta, path)
