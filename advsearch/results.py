"""Run outputs: failures.csv (incremental, resumable, one row per failing prefix),
summary.json, extra tables such as census.csv, and the resume state."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .errors import AdvsearchError

FAILURE_COLUMNS = (
    "run_id", "strategy", "sequence", "position", "true", "predicted",
    "p_true", "p_pred", "margin", "confident",
)  # fmt: skip


def fmt(value) -> str:
    """Stable text for CSV cells (floats to 6 significant digits)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def prepare_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise AdvsearchError(f"cannot write to output folder {path}: {e.strerror or e}") from None
    return path


class FailureLog:
    """Appends failure rows to a CSV, flushing per batch; skips prefixes already written.

    `offset` is the file size after the last flush: a resumed run truncates the
    file back to the offset saved with its last finished batch, so no row is
    ever duplicated.
    """

    def __init__(self, path: Path, columns: tuple[str, ...], resume_offset: int | None = None):
        self.path, self.columns = path, columns
        self.seen: set[str] = set()
        self.confident = 0
        if resume_offset is not None and path.exists():
            with open(path, "r+", newline="") as f:
                f.truncate(resume_offset)
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if tuple(reader.fieldnames or ()) != columns:
                    raise AdvsearchError(f"{path} has other columns than this run writes; cannot resume")
                for row in reader:
                    self.seen.add(row["sequence"])
                    self.confident += row["confident"] == "true"
            self.file = open(path, "a", newline="")
        else:
            self.file = open(path, "w", newline="")
            self.file.write(",".join(columns) + "\r\n")
            self.file.flush()
        self.writer = csv.DictWriter(self.file, fieldnames=columns)
        self.offset = self.file.tell()

    def is_new(self, sequence: str) -> bool:
        return sequence not in self.seen

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            self.seen.add(row["sequence"])
            self.confident += row["confident"] is True
            self.writer.writerow({c: fmt(row.get(c, "")) for c in self.columns})
        self.file.flush()
        self.offset = self.file.tell()

    def close(self) -> None:
        self.file.close()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdvsearchError(f"cannot read {path}: {e}") from None


def write_table(path: Path, rows: list[dict]) -> None:
    """Write rows (dicts with the same keys) as CSV."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: fmt(v) for k, v in r.items()} for r in rows)
    path.write_text(buf.getvalue())
