"""Regression-testing a checkpoint against a robustness suite (`advsearch regress`), and the
pytest-facing API.

    from advsearch.regress.testing import assert_robust

    def test_new_checkpoint_is_at_least_as_robust():
        assert_robust("checkpoints/new.pt", "results/suites/challenge.csv")

Each suite entry is judged at its last position:

- a `failure` entry (the baseline got it wrong) is **fixed** when the model now answers
  right, else **still failing**;
- a `guard` entry (the baseline got it right) is **kept** when the model still answers
  right, else **regressed**.

The pass rate is the fraction of entries answered right. The check fails when more guards
regressed than allowed (default 0) or the pass rate is below `min_pass_rate` (default: the
suite's baseline pass rate). `exact=True` additionally asks for the baseline's outcome on
every entry (same pass/fail and the same prediction), which is what re-running the baseline
model itself must give.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from advsearch.errors import AdvsearchError
from advsearch.model.evaluator import Evaluator
from advsearch.regress.suite import Suite, SuiteEntry, judge_last, read_suite
from advsearch.search.results import fmt

STATUSES = ("fixed", "still_failing", "kept", "regressed")


@dataclass
class EntryResult:
    entry: SuiteEntry
    predicted: str
    p_pred: float
    p_true: float
    margin: float  # judge.logit_margin against the expected answer (> 0: wrong)

    @property
    def passed(self) -> bool:
        return self.predicted == self.entry.expected

    @property
    def status(self) -> str:
        if self.entry.kind == "failure":
            return "fixed" if self.passed else "still_failing"
        return "kept" if self.passed else "regressed"

    @property
    def same_as_baseline(self) -> bool:
        return self.passed == self.entry.baseline_pass and self.predicted == self.entry.baseline_predicted

    def describe(self) -> str:
        e = self.entry
        if e.kind == "guard":
            tag = "guard " + (e.origin.split(":")[1] if e.origin.startswith("guard:") else e.origin)
        else:
            tag = e.category or "failure"
        return (f"{e.id} {e.sequence} @ {e.position}: expected {e.expected}, predicted {self.predicted} "
                f"(p {self.p_pred:.3f}; baseline {e.baseline_predicted} p {e.baseline_p_pred:.3f}) [{tag}]")


@dataclass
class SuiteReport:
    suite: Suite
    model_path: str
    model_sha256: str
    results: list[EntryResult]
    min_pass_rate: float
    allowed_regressions: int = 0
    exact: bool = False
    extra: dict = field(default_factory=dict)

    def by_status(self, status: str) -> list[EntryResult]:
        return [r for r in self.results if r.status == status]

    @property
    def counts(self) -> dict[str, int]:
        return {s: len(self.by_status(s)) for s in STATUSES}

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def pass_rate(self) -> float:
        return self.passed / len(self.results) if self.results else 1.0

    @property
    def baseline_pass_rate(self) -> float:
        return self.suite.baseline_pass_rate

    @property
    def matches_baseline(self) -> bool:
        return all(r.same_as_baseline for r in self.results)

    @property
    def is_baseline_model(self) -> bool:
        return self.model_sha256 == self.suite.meta.get("baseline", {}).get("model_sha256")

    def problems(self) -> list[str]:
        """Why the check fails (empty: it passes)."""
        out = []
        regressed = len(self.by_status("regressed"))
        if regressed > self.allowed_regressions:
            allowed = f" (allowed {self.allowed_regressions})" if self.allowed_regressions else ""
            out.append(f"{regressed} guard(s) regressed{allowed}")
        # compare counts, not floats: passed/total < rate  <=>  passed < rate*total
        if self.passed < self.min_pass_rate * len(self.results) - 1e-9:
            out.append(f"pass rate {self.pass_rate:.2%} is below the minimum {self.min_pass_rate:.2%}")
        if self.exact and not self.matches_baseline:
            n = sum(not r.same_as_baseline for r in self.results)
            out.append(f"{n} entr{'y' if n == 1 else 'ies'} differ from the baseline outcome (exact match required)")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()

    def to_dict(self) -> dict:
        return {
            "suite": str(self.suite.path), "model": self.model_path, "model_sha256": self.model_sha256,
            "entries": len(self.results), **self.counts, "passed": self.passed,
            "pass_rate": round(self.pass_rate, 6), "baseline_pass_rate": round(self.baseline_pass_rate, 6),
            "min_pass_rate": self.min_pass_rate, "matches_baseline": self.matches_baseline,
            "ok": self.ok, "problems": self.problems(),
        }  # fmt: skip

    def format_text(self, limit: int | None = 10, more: str = "") -> str:
        c, s = self.counts, self.suite
        sc = s.counts()
        base = s.meta.get("baseline", {})
        lines = [
            f"suite {s.path}: {sc['entries']} entries ({sc['failures']} failures, {sc['guards']} guards); "
            f"baseline {str(base.get('model_sha256', '?'))[:12]} passes {self.baseline_pass_rate:.2%}",
            f"model {self.model_path} ({self.model_sha256[:12]}"
            + (", the baseline itself)" if self.is_baseline_model else ")"),
            f"  failures: {c['fixed']} fixed, {c['still_failing']} still failing",
            f"  guards:   {c['kept']} kept, {c['regressed']} regressed",
            f"  pass rate {self.pass_rate:.2%} ({self.passed}/{len(self.results)}; baseline "
            f"{self.baseline_pass_rate:.2%}, minimum {self.min_pass_rate:.2%})",
            f"  outcome {'identical to' if self.matches_baseline else 'differs from'} the baseline's",
        ]
        if s.meta.get("csv_modified"):
            lines.append("  note: the suite CSV was edited after it was built (sha256 differs from its sidecar)")
        for status, title in (("regressed", "regressed guards"), ("fixed", "fixed failures")):
            items = self.by_status(status)
            if items:
                lines.append(f"{title}:")
                shown = items if limit is None else items[:limit]
                lines += [f"  {r.describe()}" for r in shown]
                if len(shown) < len(items):
                    lines.append(f"  ... and {len(items) - len(shown)} more{more}")
        problems = self.problems()
        lines.append("FAIL: " + "; ".join(problems) if problems else "PASS")
        return "\n".join(lines)

    def junit_xml(self) -> str:
        """JUnit XML: one testcase per entry. Regressed guards are failures; still-failing
        failure entries are reported as skipped (known failures, like pytest's xfail)."""
        c = self.counts
        suite_el = ET.Element("testsuite", {
            "name": f"advsearch.regress.{self.suite.name}", "tests": str(len(self.results)),
            "failures": str(c["regressed"]), "errors": "0", "skipped": str(c["still_failing"]), "time": "0",
        })  # fmt: skip
        props = ET.SubElement(suite_el, "properties")
        for k, v in (("model", self.model_path), ("model_sha256", self.model_sha256),
                     ("suite", str(self.suite.path)), ("pass_rate", fmt(self.pass_rate)),
                     ("baseline_pass_rate", fmt(self.baseline_pass_rate)),
                     ("min_pass_rate", fmt(self.min_pass_rate)), ("ok", fmt(self.ok))):  # fmt: skip
            ET.SubElement(props, "property", {"name": k, "value": v})
        for r in self.results:
            e = r.entry
            case = ET.SubElement(suite_el, "testcase", {
                "classname": f"advsearch.regress.{self.suite.name}.{e.kind}",
                "name": f"{e.id} {e.sequence}@{e.position}", "time": "0",
            })  # fmt: skip
            detail = (f"expected {e.expected}, predicted {r.predicted} (p_pred {r.p_pred:.4f}, p_true "
                      f"{r.p_true:.4f}); baseline predicted {e.baseline_predicted} (p {e.baseline_p_pred:.4f}); "
                      f"category {e.category or '-'}; origin {e.origin}")  # fmt: skip
            if r.status == "regressed":
                ET.SubElement(case, "failure", {"type": "regressed", "message": f"guard regressed: {detail}"})
            elif r.status == "still_failing":
                ET.SubElement(case, "skipped", {"message": f"known failure, still failing: {detail}"})
            else:
                ET.SubElement(case, "system-out").text = f"{r.status}: {detail}"
        ET.SubElement(suite_el, "system-out").text = self.format_text(limit=None)
        root = ET.Element("testsuites", {"tests": str(len(self.results)), "failures": str(c["regressed"]),
                                         "errors": "0", "skipped": str(c["still_failing"])})  # fmt: skip
        root.append(suite_el)
        ET.indent(root)
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def evaluate_suite(model, suite: Suite | str | Path, *, min_pass_rate: float | None = None,
                   allowed_regressions: int = 0, exact: bool = False, device: str = "cpu",
                   batch_size: int = 8192) -> SuiteReport:  # fmt: skip
    """Judge every entry of `suite` on `model` (a LoadedModel or a checkpoint path)."""
    if model is None or isinstance(model, (str, Path)):
        from advsearch.model.checkpoint import load_model

        model = load_model(model)
    if not isinstance(suite, Suite):
        suite = read_suite(Path(suite), model.spec)
    spec = model.spec
    base_spec = suite.meta.get("baseline", {}).get("spec")
    if base_spec and base_spec.get("vocab", spec.vocab) != spec.vocab:
        raise AdvsearchError(f"suite {suite.path} was built for vocabulary {base_spec['vocab']!r}; "
                             f"the model's is {spec.vocab!r}")  # fmt: skip
    if min_pass_rate is not None and not 0 <= min_pass_rate <= 1:
        raise AdvsearchError(f"min_pass_rate must lie in [0, 1], got {min_pass_rate}")
    evaluator = Evaluator(model.weights, device=device, batch_size=batch_size)
    v = judge_last(evaluator, spec, [spec.encode(e.sequence) for e in suite.entries])
    results = [
        EntryResult(e, spec.vocab[int(v.pred[i])], float(v.p_pred[i]), float(v.p_true[i]), float(v.margin[i]))
        for i, e in enumerate(suite.entries)
    ]
    rate = suite.baseline_pass_rate if min_pass_rate is None else float(min_pass_rate)
    return SuiteReport(suite, str(model.path), model.sha256, results, rate, allowed_regressions, exact)


def write_junit(report: SuiteReport, path: Path) -> None:
    path = Path(path)
    try:
        if str(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.junit_xml())
    except OSError as e:
        raise AdvsearchError(f"cannot write JUnit XML to {path}: {e.strerror or e}") from None


def assert_robust(model_path, suite_path, min_pass_rate: float | None = None, *, allowed_regressions: int = 0,
                  exact: bool = False, device: str = "cpu") -> SuiteReport:  # fmt: skip
    """Assert that the checkpoint at `model_path` passes the suite at `suite_path`.

    Fails (AssertionError with a readable summary: counts, pass rate, the regressed guards)
    when more than `allowed_regressions` guards regressed, when the pass rate is below
    `min_pass_rate` (default: the suite's baseline pass rate), or, with `exact=True`, when
    any entry's outcome differs from the baseline's. Returns the report when it passes.
    Bad input (missing suite or checkpoint) raises `advsearch.errors.AdvsearchError`.
    """
    report = evaluate_suite(model_path, suite_path, min_pass_rate=min_pass_rate,
                            allowed_regressions=allowed_regressions, exact=exact, device=device)  # fmt: skip
    if not report.ok:
        text = report.format_text(limit=20)
        if exact and not report.matches_baseline:
            diffs = [r for r in report.results if not r.same_as_baseline and r.status != "regressed"]
            if diffs:
                text += "\nentries differing from the baseline:\n" + "\n".join(f"  {r.describe()}" for r in diffs[:20])
        raise AssertionError("model is less robust than the suite requires:\n" + text)
    return report
