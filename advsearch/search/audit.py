"""How well a run's explanations hold: per category and per family (or strategy), how many
failures were checked, confirmed, and confirmed *specifically* (the control did not fix them),
with the median effect of the named intervention against the median effect of its control.

Read from the explanation columns of failures.csv (`advsearch.mechanism.explain.CSV_COLUMNS`), so it
can be computed for any run written with explanations, during or after the run.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from advsearch.errors import AdvsearchError
from advsearch.search.results import FailureRows

EXPLANATION_COLUMNS = ("category", "check", "control", "effect", "control_effect")  # what the audit reads
AUDIT_COLUMNS = ("group", "name", "failures", "checked", "confirmed", "specific",
                 "median_effect", "median_control_effect")  # fmt: skip


def _row(group: str, name: str, rows: list[dict]) -> dict:
    n = len(rows)
    checked = [r for r in rows if r["check"] != "none"]
    confirmed = [r for r in checked if r["check"] == "confirmed"]
    specific = [r for r in confirmed if r["control"] == "not_fixed"]

    def median(col: str, among: list[dict]) -> float | None:
        vals = [float(r[col]) for r in among if r[col] != ""]
        return round(statistics.median(vals), 4) if vals else None

    return {
        "group": group, "name": name, "failures": n,
        "checked": len(checked), "confirmed": len(confirmed), "specific": len(specific),
        "median_effect": median("effect", checked),
        "median_control_effect": median("control_effect", [r for r in checked if r["control"] != "none"]),
    }  # fmt: skip


def audit_rows(rows: list[dict]) -> list[dict]:
    """The audit table of failures.csv rows (dicts with the explanation columns): one `all` row,
    then one row per category, then one per family (guided runs) or per strategy."""
    by = "family" if rows and rows[0].get("family") else "strategy"
    table = [_row("all", "all", rows)]
    for group, key in (("category", "category"), (by, by)):
        parts: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            parts[r.get(key, "") or "-"].append(r)
        table += [_row(group, name, parts[name]) for name in sorted(parts, key=lambda x: (-len(parts[x]), x))]
    return table


def audit_csv(path: Path) -> list[dict]:
    """The audit table of a failures.csv written with explanations."""
    with FailureRows(path) as reader:
        missing = [c for c in EXPLANATION_COLUMNS if c not in reader.columns]
        if missing:
            raise AdvsearchError(f"{path} has no explanation columns ({', '.join(missing)}); "
                                 "the run was written without explanations")  # fmt: skip
        return audit_rows(list(reader.dicts()))


def audit_run(run_dir: Path) -> list[dict]:
    """The audit table of the run in `run_dir`."""
    path = Path(run_dir) / "failures.csv"
    if not path.exists():
        raise AdvsearchError(f"no failures.csv in {run_dir}")
    return audit_csv(path)


def format_audit(table: list[dict]) -> str:
    """The audit table as aligned text, rates as percentages of failures."""

    def pct(k: int, n: int) -> str:
        return f"{k / n:7.1%}" if n else "      -"

    def num(x) -> str:
        return "-" if x is None else f"{x:+.2f}"

    lines = [f"{'':<10}{'':<26}{'failures':>9}{'checked':>9}{'confirmed':>10}{'specific':>9}"
             f"{'effect':>9}{'control':>9}"]  # fmt: skip
    for r in table:
        n = r["failures"]
        lines.append(f"{r['group']:<10}{r['name']:<26}{n:>9,}{pct(r['checked'], n):>9}{pct(r['confirmed'], n):>10}"
                     f"{pct(r['specific'], n):>9}{num(r['median_effect']):>9}{num(r['median_control_effect']):>9}")
    lines.append("effect / control: median change of logit(truth) - logit(prediction) under the named "
                 "intervention and under its control")
    return "\n".join(lines)
