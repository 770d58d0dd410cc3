"""Run-output helpers: the failures.csv reader, atomic writes, file hashes."""

import hashlib

import pytest

from advsearch.errors import AdvsearchError
from advsearch.files import sha256_file, write_atomic
from advsearch.regress.suite import read_run as suite_run
from advsearch.reports.report import read_run as report_run
from advsearch.search.results import FailureRows

HEADER = "run_id,strategy,sequence,position,true,predicted,p_true,p_pred,margin,confident\r\n"
ROWS = ["r,random,?aab,3,b,a,0.3,0.6,1,true\r\n", "r,random,?aa,2,?,a,0.01,0.99,5,true\r\n"]


def write(folder, text):
    folder.mkdir(exist_ok=True)
    (folder / "failures.csv").write_text(text, newline="")
    (folder / "summary.json").write_text('{"run_id": "r", "strategy": "random"}')
    return folder


def test_an_unfinished_last_line_is_dropped_by_every_reader(tmp_path):
    for torn in ("r,random,?ab", "r,random,?abc,3,c,a,0.3,0.6,1,tr"):  # short, and full-width but cut
        run = write(tmp_path / str(len(torn)), HEADER + "".join(ROWS) + torn)
        with FailureRows(run / "failures.csv") as table:
            assert table.columns == HEADER.strip().split(",")
            assert [row[2] for row in table] == ["?aab", "?aa"]
        assert [r["sequence"] for r in suite_run(run).rows] == ["?aab", "?aa"]
        assert report_run(run).rows == 2


def test_a_finished_file_keeps_every_row_and_skips_blank_lines(tmp_path):
    run = write(tmp_path / "ok", HEADER + ROWS[0] + "\r\n" + ROWS[1])
    assert [r["sequence"] for r in FailureRows(run / "failures.csv").dicts()] == ["?aab", "?aa"]
    assert [r["sequence"] for r in suite_run(run).rows] == ["?aab", "?aa"]


def test_a_finished_line_with_missing_cells_is_an_error_everywhere(tmp_path):
    run = write(tmp_path / "bad", HEADER + "r,random,?ab\r\n" + "".join(ROWS))
    with pytest.raises(AdvsearchError, match="line 2: 3 fields"):
        list(FailureRows(run / "failures.csv"))
    with pytest.raises(AdvsearchError, match="line 2"):
        suite_run(run)
    with pytest.raises(AdvsearchError, match="line 2"):
        report_run(run)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(AdvsearchError, match="cannot read"):
        FailureRows(tmp_path / "none.csv")


def test_write_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("old")
    write_atomic(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_atomic(path, fail)
    assert path.read_text() == "new"  # the old file is untouched by a write that did not finish
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"], "the unfinished temporary is removed"
    names = []
    write_atomic(path, lambda tmp: names.append(tmp.name) or tmp.write_text("a"))
    write_atomic(path, lambda tmp: names.append(tmp.name) or tmp.write_text("b"))
    assert names[0] != names[1], "each write has its own temporary (concurrent writers do not share one)"


def test_sha256_file(tmp_path):
    path = tmp_path / "x.bin"
    data = bytes(range(256)) * 5000  # larger than one read block
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_failure_log_writes_the_bytes_of_csv_dictwriter_with_fmt(tmp_path):
    """`FailureLog.write` formats cells inline and writes lists: the bytes must be those of `csv.DictWriter`
    fed `fmt`-formatted dicts (quoting, floats, bools, ints, other types, missing cells)."""
    import csv
    import io

    import numpy as np

    from advsearch.search.results import FailureLog, fmt

    columns = ("run_id", "sequence", "position", "p_pred", "confident", "note", "extra")
    rows = [
        {"run_id": "r", "sequence": "?ab", "position": 2, "p_pred": 0.123456789, "confident": True, "note": 'a, "b"'},
        {"run_id": "r", "sequence": "?ba", "position": 2, "p_pred": 1e-7, "confident": False, "note": "x\ny",
         "extra": np.float64(0.5)},
        {"run_id": "r", "sequence": "?bb", "position": np.int64(2), "p_pred": 3.0, "confident": np.bool_(True),
         "note": None, "extra": float("nan")},
    ]  # fmt: skip
    log = FailureLog(tmp_path / "failures.csv", columns)
    assert log.claim(rows[:1] + rows[:1]) == rows[:1] and log.claim(rows) == rows[1:]  # each prefix once
    log.write(rows[:1])
    log.file.write("?b")  # a write cut short: the next one starts where the last finished one ended
    log.write(rows[1:])
    log.close()
    want = io.StringIO(newline="")
    writer = csv.DictWriter(want, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({c: fmt(row.get(c, "")) for c in columns})
    assert (tmp_path / "failures.csv").read_bytes() == want.getvalue().encode()
    assert log.seen == {"?ab", "?ba", "?bb"} and log.confident == 1 and log.offset == len(want.getvalue())
