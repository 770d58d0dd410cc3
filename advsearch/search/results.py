"""Run outputs: failures.csv (incremental, resumable, one row per failing prefix),
summary.json, extra tables such as census.csv, and the resume state."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

from advsearch.errors import AdvsearchError

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
        self.writer = csv.writer(self.file)  # the dialect of csv.DictWriter ("excel")
        self.offset = self.file.tell()

    def claim(self, rows: list[dict]) -> list[dict]:
        """The rows whose prefix the log has not had yet, each prefix once (its first row); from now on
        it has them (rows still being annotated are not written yet, but their prefixes are taken)."""
        out, seen = [], self.seen
        for row in rows:
            sequence = row["sequence"]
            if sequence not in seen:
                seen.add(sequence)
                out.append(row)
        return out

    def write(self, rows: list[dict]) -> None:
        """Append `rows` (missing columns empty), each cell as `fmt` writes it, and flush.

        The rows go to a plain `csv.writer` as lists in column order, which writes the bytes
        `csv.DictWriter` writes for the same dicts, without its per-row key check; the cells of the
        common types (str, float, bool, int) are formatted inline, the rest by `fmt`.
        """
        columns = self.columns
        if self.file.tell() != self.offset:  # a write was interrupted: what it left is not a row yet
            self.file.seek(self.offset)
            self.file.truncate()
        lines, confident = [], 0
        for row in rows:
            confident += row["confident"] is True
            cells = []
            for c in columns:
                v = row.get(c, "")
                kind = type(v)
                if kind is str:
                    cells.append(v)
                elif kind is float:
                    cells.append(f"{v:.6g}")
                elif kind is bool:
                    cells.append("true" if v else "false")
                elif kind is int:
                    cells.append(str(v))
                else:
                    cells.append(fmt(v))
            lines.append(cells)
        self.writer.writerows(lines)
        self.file.flush()
        self.offset = self.file.tell()
        self.confident += confident

    def close(self) -> None:
        self.file.close()


def write_table(path: Path, rows: list[dict]) -> None:
    """Write rows (dicts with the same keys) as CSV."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: fmt(v) for k, v in r.items()} for r in rows)
    path.write_text(buf.getvalue())


class FailureRows:
    """A failures.csv read as a stream: `columns` (its header) and, by iteration, its rows as lists of cells.

    A run appends its rows batch by batch, each row ended by a line break, so a run interrupted
    while writing can leave one unfinished last line. That line is dropped: it is not a row yet
    (a resumed run writes it again). Every other line must have one cell per column; a line that
    does not is an error, as is a file that cannot be read. A blank line is skipped.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, newline="")
        except OSError as e:
            raise AdvsearchError(f"cannot read {self.path}: {e.strerror or e}") from None
        self._reader = csv.reader(self._complete_lines())
        self.columns: list[str] = self._next() or []

    def _complete_lines(self) -> Iterator[str]:
        for line in self._file:
            if line.endswith("\n"):
                yield line

    def _next(self) -> list[str] | None:
        try:
            return next(self._reader, None)
        except (OSError, csv.Error, UnicodeDecodeError) as e:
            self.close()
            raise AdvsearchError(f"cannot read {self.path}: {e}") from None

    def __iter__(self) -> Iterator[list[str]]:
        try:
            while (row := self._next()) is not None:
                if not row:
                    continue
                if len(row) != len(self.columns):
                    raise AdvsearchError(f"{self.path} line {self._reader.line_num}: {len(row)} fields, "
                                         f"the header has {len(self.columns)}")  # fmt: skip
                yield row
        finally:
            self.close()

    def dicts(self) -> Iterator[dict[str, str]]:
        """The rows as {column: cell}."""
        return (dict(zip(self.columns, row)) for row in self)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "FailureRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
