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
from advsearch.search.results import FailureRows, fmt

EXPLANATION_COLUMNS = ("category", "check", "control", "effect", "control_effect")  # what the audit reads
AUDIT_COLUMNS = ("group", "name", "failures", "checked", "confirmed", "specific",
                 "median_effect", "median_control_effect")  # fmt: skip


def _row(group: str, name: str, items: list[tuple]) -> dict:
    """One audit row from (check, control, effect, control_effect) items, the effects as floats or None."""
    checked = [it for it in items if it[0] != "none"]
    effects = [it[2] for it in checked if it[2] is not None]
    controls = [it[3] for it in checked if it[1] != "none" and it[3] is not None]
    return {
        "group": group, "name": name, "failures": len(items), "checked": len(checked),
        "confirmed": sum(it[0] == "confirmed" for it in checked),
        "specific": sum(it[0] == "confirmed" and it[1] == "not_fixed" for it in checked),
        "median_effect": round(statistics.median(effects), 4) if effects else None,
        "median_control_effect": round(statistics.median(controls), 4) if controls else None,
    }  # fmt: skip


def _audit(cells: list[tuple], by: str) -> list[dict]:
    """The audit table of (category, by-value, check, control, effect, control_effect) cells as written."""

    def number(cell) -> float | None:
        return None if cell == "" else float(cell)

    items = [(check, control, number(effect), number(ctrl)) for _, _, check, control, effect, ctrl in cells]
    table = [_row("all", "all", items)]
    for group, column in (("category", 0), (by, 1)):
        parts: dict[str, list[tuple]] = defaultdict(list)
        for c, item in zip(cells, items):
            parts[c[column] or "-"].append(item)
        table += [_row(group, name, parts[name]) for name in sorted(parts, key=lambda x: (-len(parts[x]), x))]
    return table


class AuditTally:
    """The audit table of failures.csv rows, kept as they are written (the run's summary needs no
    second read of the file): `add` takes rows as the run writes them, `from_csv` a written file."""

    def __init__(self):
        self.cells: list[tuple] = []  # (category, family or strategy, check, control, effect, control_effect) text
        self.by: str | None = None

    def add(self, rows: list[dict]) -> None:
        if self.by is None and rows:
            self.by = "family" if rows[0].get("family") else "strategy"
        self.cells += [(r["category"], r.get(self.by, ""), r["check"], r["control"], fmt(r["effect"]),
                        fmt(r["control_effect"])) for r in rows]  # fmt: skip

    @classmethod
    def from_csv(cls, path: Path) -> AuditTally:
        """The tally of a failures.csv written with explanations."""
        tally = cls()
        with FailureRows(path) as reader:
            missing = [c for c in EXPLANATION_COLUMNS if c not in reader.columns]
            if missing:
                raise AdvsearchError(f"{path} has no explanation columns ({', '.join(missing)}); "
                                     "the run was written without explanations")  # fmt: skip
            index = {c: i for i, c in enumerate(reader.columns)}
            for row in reader:
                if tally.by is None:
                    tally.by = "family" if "family" in index and row[index["family"]] else "strategy"
                    pick = [index.get(c) for c in ("category", tally.by, *EXPLANATION_COLUMNS[1:])]
                tally.cells.append(tuple("" if i is None else row[i] for i in pick))
        return tally

    def table(self) -> list[dict]:
        """One `all` row, then one row per category, then one per family (guided runs) or per strategy."""
        return _audit(self.cells, self.by or "strategy")


def audit_csv(path: Path) -> list[dict]:
    """The audit table of a failures.csv written with explanations."""
    return AuditTally.from_csv(path).table()


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
