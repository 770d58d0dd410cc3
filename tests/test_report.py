"""`advsearch report` and `explain --html`: content, size, CLI, and a real headless Chromium.

The browser test is skipped only when no Chromium is installed and CI is not set; CI installs
Debian's `chromium` and must run it.
"""

import csv
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from advsearch.cli.mechanism import explain_cmd
from advsearch.cli.reports import report_cmd
from advsearch.model.weights_cache import DEFAULT_MODEL
from advsearch.reports.report import read_run, wilson, write_report

TOP = 3
RUN_FIGURES = ["fig-position", "fig-confidence", "fig-confusion", "fig-categories", "fig-mech-l0", "fig-mech-l1"]


def failure_figures(n: int) -> list[str]:
    return [f"fig-f{i}-{kind}" for i in range(n) for kind in ("probs", "attention", "paths")]


def figure_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="figure-data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advsearch: error:"), result.output
    return lines[0]


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, challenge):
    """A real random run on the challenge checkpoint, with the explanation columns."""
    from advsearch.mechanism.explain import Explainer
    from advsearch.model.evaluator import Evaluator
    from advsearch.search.configs import RandomConfig
    from advsearch.search.runner import run_search
    from strategies import make_strategy

    out = tmp_path_factory.mktemp("runs") / "random"
    strategy = make_strategy("random", challenge.spec, RandomConfig(budget=1000, seed=0))
    run_search(challenge, strategy, out, Evaluator(challenge.weights, "cpu"), annotators=[Explainer(challenge)],
               progress=False)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def report(random_run, challenge):
    path, size = write_report(random_run, random_run / "report.html", top=TOP, loaded=challenge)
    return path, size, path.read_text()


# ---- content (no browser) -------------------------------------------------------------------


def test_wilson_interval():
    lo, hi = wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson(0, 10)
    assert lo == 0 and round(hi, 4) == 0.2775
    assert wilson(0, 0) == (0.0, 1.0)


def test_read_run_streams_into_aggregates(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"strategy": "random", "sequences": 10, "positions": 200}))
    cols = ["run_id", "strategy", "sequence", "position", "true", "predicted", "p_true", "p_pred", "margin",
            "confident", "category", "resp_head_true", "resp_head_pred", "load", "deciding_path", "check"]
    rows = [
        ["r", "random", "?aab", 3, "b", "a", 0.3, 0.6, 1.0, "true", "duplicate_not_suppressed", "", "", 1, "", "confirmed"],
        ["r", "random", "?abcb", 4, "a", "c", 0.5, 0.45, 0.1, "false", "later_unique_preferred", "", "", 0, "", "refuted"],
        ["r", "random", "?aa", 2, "?", "a", 0.01, 0.99, 5.0, "true", "qmark_expected", "", "", 0, "", "confirmed"],
    ]  # fmt: skip
    with open(tmp_path / "failures.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
        f.write("r,random,?ab")  # the torn last line of an interrupted run
    data = read_run(tmp_path, top=2)
    assert (data.rows, data.confident) == (3, 2)
    assert data.by_position == {3: [1, 1], 4: [1, 0], 2: [1, 1]}
    assert data.confusion[("?", "a")] == [1, 1]
    assert data.categories["qmark_expected"] == {"confirmed": 1}
    assert [r["sequence"] for r in data.top] == ["?aa", "?aab"]  # most confident first, N = 2
    assert sum(data.p_hist) == 3 and data.has_categories


def test_report_content(report, random_run):
    path, size, page = report
    summary = json.loads((random_run / "summary.json").read_text())
    # self-contained: plotly.js embedded exactly once, nothing fetched
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    rest = page.replace(js, "")
    assert len(page) - len(rest) == len(js), "plotly.js must be embedded exactly once"
    assert "<script src" not in rest and "<link" not in rest and "https://" not in rest
    assert summary["model_sha256"] in page and "95% Wilson CI" in page and "sequence yield" in page
    figs = figure_data(page)
    with open(random_run / "failures.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    categories = {r["category"] for r in rows}
    assert list(figs) == RUN_FIGURES + failure_figures(len(categories))
    for fig_id in figs:
        assert f'id="{fig_id}"' in page
    confusion = figs["fig-confusion"]["data"][0]
    assert confusion["z"]["shape"].replace(" ", "") == "11,11" and confusion["x"] == list("abcdefghij?")
    assert figs["fig-mech-l0"]["data"][0]["z"]["shape"].replace(" ", "") == "3,10"
    assert figs["fig-mech-l1"]["data"][0]["z"]["shape"].replace(" ", "") == "3,10"
    attention = figs["fig-f0-attention"]["data"]
    assert len(attention) == 6 and all(t["type"] == "heatmap" for t in attention)
    assert len(figs["fig-f0-paths"]["data"]) == 3  # truth, prediction, gap
    # the showcase: for each category, its most confident row of failures.csv, explained
    shown = dict(re.findall(r"<h3>([a-z_]+)\s+(\?[a-j]*)</h3>", page))
    assert set(shown) == categories
    for cat, seq in shown.items():
        best = max((r for r in rows if r["category"] == cat), key=lambda r: (float(r["p_pred"]), float(r["margin"])))
        assert seq == best["sequence"]
    # the top table lists the most confident rows, in that order
    best = sorted(rows, key=lambda r: -float(r["p_pred"]))[:TOP]
    listed = re.findall(r"<td>\d+</td><td><code>(\?[a-j]*)</code>", page)
    assert listed == [r["sequence"] for r in best]
    # the audit table, as summary.json records it
    assert "How the explanations hold" in page
    assert summary["audit"][0]["failures"] == len(rows)
    # categories come from the explanation columns
    cats = {t["name"] for t in figs["fig-categories"]["data"]}
    assert cats <= {"check confirmed", "check refuted", "check none"} and cats


def test_report_size_does_not_grow_with_the_run(report, random_run, tmp_path, challenge):
    """200,000 failure rows give the same report (aggregates + top N only), far under 10 MB."""
    _, small, _ = report
    big = tmp_path / "big"
    big.mkdir()
    summary = json.loads((random_run / "summary.json").read_text())
    summary |= {"sequences": 1_000_000, "positions": 20_000_000, "failures": 200_000}
    (big / "summary.json").write_text(json.dumps(summary))
    with open(random_run / "failures.csv", newline="") as f:
        reader = csv.reader(f)
        header, rows = next(reader), list(reader)
    i_pp = header.index("p_pred")
    with open(big / "failures.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(200_000):
            row = list(rows[i % len(rows)])
            row[i_pp] = f"{float(row[i_pp]) * 0.999:.6g}"  # the real rows stay the most confident
            w.writerow(row)
    _, size = write_report(big, None, top=TOP, loaded=challenge)
    assert (big / "report.html").exists()
    assert size < 10_000_000 and abs(size - small) < 50_000, (size, small)


def test_exhaustive_report_shows_rate_by_length(tmp_path, challenge):
    from advsearch.model.evaluator import Evaluator
    from advsearch.search.configs import ExhaustiveConfig
    from advsearch.search.runner import run_search
    from strategies import make_strategy

    strategy = make_strategy("exhaustive", challenge.spec, ExhaustiveConfig(max_len=3))
    run_search(challenge, strategy, tmp_path / "ex", Evaluator(challenge.weights, "cpu"), progress=False)
    path, _ = write_report(tmp_path / "ex", top=1, loaded=challenge)
    figs = figure_data(path.read_text())
    assert "fig-length" in figs and "fig-categories" not in figs
    assert figs["fig-length"]["data"][0]["x"] == [1, 2, 3]


def test_report_cli(random_run, tmp_path, challenge_path):
    out = tmp_path / "r.html"
    # no --model: the checkpoint recorded in summary.json
    result = CliRunner().invoke(report_cmd, [str(random_run), "--out", str(out), "--top", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"report: {out}") and out.stat().st_size > 1_000_000
    one_line_error(CliRunner().invoke(report_cmd, [str(tmp_path / "missing")]))
    one_line_error(CliRunner().invoke(report_cmd, [str(tmp_path)]))  # no summary.json
    line = one_line_error(CliRunner().invoke(report_cmd, [str(random_run), "--model", str(DEFAULT_MODEL)]))
    assert "not the run's model" in line  # the embedded default model is another checkpoint


def test_explain_html(tmp_path, challenge_path):
    out = tmp_path / "ex.html"
    result = CliRunner().invoke(explain_cmd, ["?jeejjfhadc", "--model", str(challenge_path), "--html", str(out)])
    assert result.exit_code == 0, result.output
    assert "overloaded_head" in result.output  # the text explanation is still printed
    page = out.read_text()
    figs = figure_data(page)
    assert list(figs) == ["fig-f0-probs", "fig-f0-attention", "fig-f0-paths", "fig-mech-l0", "fig-mech-l1"]
    assert "overloaded_head" in page and "position 10" in page
    bad = CliRunner().invoke(explain_cmd, ["?jeejjfhadc", "--model", str(challenge_path),
                                           "--html", str(tmp_path / "ex.html" / "x.html")])  # fmt: skip
    one_line_error(bad)


# ---- in a real browser ----------------------------------------------------------------------


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    path = chromium_binary()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium installed; CI must install Debian's chromium (apt-get install -y chromium)")
        pytest.skip("no chromium installed")
    return path


class RenderedFigures(HTMLParser):
    """Which figure divs (by id) contain an svg.main-svg, i.e. were drawn by plotly."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, ids):
        super().__init__()
        self.ids, self.open, self.drawn = set(ids), [], set()

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        a = dict(attrs)
        if tag == "svg" and "main-svg" in (a.get("class") or "").split():
            self.drawn.update(fid for fid, _ in self.open)
        self.open = [(fid, depth + 1) for fid, depth in self.open]
        if tag == "div" and a.get("id") in self.ids:
            self.open.append((a["id"], 1))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        self.open = [(fid, depth - 1) for fid, depth in self.open if depth > 1]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def png_pixels(data: bytes) -> bytes:
    idat, i = b"", 8
    while i < len(data):
        n, kind = struct.unpack(">I4s", data[i : i + 8])
        if kind == b"IDAT":
            idat += data[i + 8 : i + 8 + n]
        i += 12 + n
    return zlib.decompress(idat)


def test_report_in_headless_chromium(browser, report, tmp_path):
    path, _, _ = report
    shot = tmp_path / "report.png"
    width, height = 1280, 2400
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
           "--virtual-time-budget=60000", f"--window-size={width},{height}", f"--screenshot={shot}",
           "--dump-dom", Path(path).resolve().as_uri()]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    # no JavaScript error: none reported to the console, none caught by the page's own hook
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if re.search(r"Uncaught|Error", line)], console
    html_tag = re.search(r"<html[^>]*>", dom).group(0)
    assert "data-js-errors" not in html_tag and 'id="js-errors" hidden' in dom
    body = re.search(r"<body[^>]*>", dom).group(0)
    expected = list(figure_data(Path(path).read_text()))
    assert expected[: len(RUN_FIGURES)] == RUN_FIGURES and len(expected) > len(RUN_FIGURES)
    assert f'data-figures="{len(expected)}"' in body and 'data-complete="1"' in body, body
    assert f'data-rendered="{len(expected)}"' in body
    parser = RenderedFigures(expected)
    parser.feed(dom)
    assert parser.drawn == set(expected), sorted(set(expected) - parser.drawn)
    # a screenshot of the page as a person sees it, not a blank one
    data = shot.read_bytes()
    assert png_size(data) == (width, height)
    pixels = png_pixels(data)
    assert len(set(pixels[:: 101])) > 50
