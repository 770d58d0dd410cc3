"""`advsearch report RUN_DIR`: one self-contained HTML report of a run.

The report reads the run folder (summary.json, failures.csv, and census.csv / families.csv when
the strategy wrote them) and the run's model, and shows

* the run summary (model, sha256, strategy, parameters, evaluated, failures, confident failures,
  throughput); for random runs the failure rate with a 95% Wilson interval;
* failure rate by position (random: failing prefixes / sequences at each position, with Wilson
  intervals; other strategies: counts) and, for exhaustive runs, by length from census.csv;
* the 11 × 11 true × predicted confusion heatmap of the failures, the distribution of p(prediction),
  category counts when failures.csv has the explanation columns, and yield per family for guided runs;
* the mechanism tables of the model as heatmaps;
* for the top N failures (highest p(prediction) first): the per-failure view of `advsearch.reports.figures`.

Large runs stay small: failures.csv is streamed once into fixed-size aggregates (counts per
position, per (true, predicted) pair, per category, a 20-bin histogram) and a size-N heap of the
most confident failures; no row-level data is embedded, so the file size depends on N, not on the
run (plotly.js, embedded once, is ~4.8 MB of it).
"""

from __future__ import annotations

import csv
import heapq
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from advsearch.errors import AdvsearchError
from advsearch.files import read_json
from advsearch.reports.figures import Page, add_failure_view, add_mechanism, esc, failure_views
from advsearch.search.audit import audit_csv
from advsearch.search.results import FailureRows

DEFAULT_TOP = 10
MAX_TOP = 100
P_BINS = 20
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (95% for the default z)."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(k / n, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class RunData:
    """What the report needs from a run folder, aggregated (no row-level data beyond the top N)."""

    path: Path
    summary: dict
    columns: list[str]
    rows: int = 0
    confident: int = 0
    by_position: dict[int, list[int]] = field(default_factory=dict)  # position -> [failures, confident]
    confusion: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (true, pred) -> [n, confident]
    categories: dict[str, dict[str, int]] = field(default_factory=dict)  # category -> check -> n
    p_hist: list[int] = field(default_factory=lambda: [0] * P_BINS)
    top: list[dict] = field(default_factory=list)  # most confident first
    showcase: dict[str, dict] = field(default_factory=dict)  # category -> its most confident failure
    audit: list[dict] | None = None  # advsearch.search.audit table, when the run has explanation columns
    census: list[dict] | None = None
    families: list[dict] | None = None

    @property
    def vocab(self) -> str:
        return self.summary.get("spec", {}).get("vocab", "abcdefghij?")

    @property
    def seq_len(self) -> int:
        return int(self.summary.get("spec", {}).get("seq_len", 20))

    @property
    def has_categories(self) -> bool:
        return "category" in self.columns


def _read_csv_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError as e:
        raise AdvsearchError(f"cannot read {path}: {e.strerror or e}") from None


def read_run(run_dir: Path, top: int = DEFAULT_TOP) -> RunData:
    """Stream a run folder into `RunData` (one pass over failures.csv, read by `results.FailureRows`:
    an unfinished last line of an interrupted run is dropped)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AdvsearchError(f"run folder not found: {run_dir}")
    summary_path, csv_path = run_dir / "summary.json", run_dir / "failures.csv"
    if not summary_path.exists():
        raise AdvsearchError(f"{run_dir} is not a run folder (no summary.json)")
    summary = read_json(summary_path)
    if not isinstance(summary, dict):
        raise AdvsearchError(f"{summary_path} is not a run summary")
    if not csv_path.exists():
        raise AdvsearchError(f"{run_dir} has no failures.csv")
    with FailureRows(csv_path) as reader:
        header = reader.columns
        need = ("sequence", "position", "true", "predicted", "p_pred", "confident")
        missing = [c for c in need if c not in header]
        if missing:
            raise AdvsearchError(f"{csv_path} lacks the column(s) {', '.join(missing)}")
        data = RunData(path=run_dir, summary=summary, columns=header)
        ix = {c: header.index(c) for c in header}
        i_pos, i_t, i_p, i_pp, i_c = (ix[c] for c in ("position", "true", "predicted", "p_pred", "confident"))
        i_m = ix.get("margin")
        i_cat, i_chk = ix.get("category"), ix.get("check")
        heap: list[tuple] = []  # (p_pred, margin, -row) of the top N, smallest first
        showcase_key: dict[str, tuple[float, float]] = {}
        for n, row in enumerate(reader):
            try:
                pos, pp = int(row[i_pos]), float(row[i_pp])
                margin = float(row[i_m]) if i_m is not None else 0.0
            except ValueError:
                raise AdvsearchError(f"{csv_path}: row {n + 2} is malformed") from None
            conf = row[i_c] == "true"
            data.rows += 1
            data.confident += conf
            c = data.by_position.setdefault(pos, [0, 0])
            c[0] += 1
            c[1] += conf
            c = data.confusion.setdefault((row[i_t], row[i_p]), [0, 0])
            c[0] += 1
            c[1] += conf
            data.p_hist[min(P_BINS - 1, max(0, int(pp * P_BINS)))] += 1
            if i_cat is not None:
                chk = data.categories.setdefault(row[i_cat] or "(none)", {})
                key = row[i_chk] if i_chk is not None and row[i_chk] else "none"
                chk[key] = chk.get(key, 0) + 1
                best = showcase_key.get(row[i_cat])
                if best is None or (pp, margin) > best:
                    showcase_key[row[i_cat]] = (pp, margin)
                    data.showcase[row[i_cat]] = dict(zip(header, row))
            if top > 0:
                item = (pp, margin, -n)
                if len(heap) < top:
                    heapq.heappush(heap, (item, dict(zip(header, row))))
                elif item > heap[0][0]:
                    heapq.heapreplace(heap, (item, dict(zip(header, row))))
    data.top = [r for _, r in sorted(heap, key=lambda x: x[0], reverse=True)]
    if (run_dir / "census.csv").exists():
        data.census = _read_csv_rows(run_dir / "census.csv")
    if (run_dir / "families.csv").exists():
        data.families = _read_csv_rows(run_dir / "families.csv")
    if "check" in header and "control" in header:
        data.audit = summary.get("audit") or audit_csv(csv_path)
    return data


def _audit_table(table: list[dict]) -> str:
    """The audit table (advsearch.search.audit) as HTML, rates as percentages of failures."""
    cols = ("failures", "checked", "confirmed", "specific")
    head = "".join(f"<th>{c}</th>" for c in ("group", "name", *cols, "median effect", "median control effect"))
    body = []
    for r in table:
        n = r["failures"]
        cells = [esc(r["group"]), esc(r["name"]), f"{n:,}"]
        cells += [f"{r[c] / n:.1%}" if n else "-" for c in cols[1:]]
        cells += ["-" if r[c] is None else f"{r[c]:+.2f}" for c in ("median_effect", "median_control_effect")]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def resolve_run_model(summary: dict, model: str | None, run_dir: Path | None = None):
    """`--model` if given, else the checkpoint recorded in summary.json when it exists (a relative path is
    tried from the current folder, then from the folder that holds `results/<run-id>/`), else the default
    ($ADVSEARCH_MODEL / embedded); in every case its sha256 must be the run's."""
    from advsearch.model.checkpoint import load_model

    recorded = summary.get("model")
    if model is None and recorded:
        if Path(recorded).is_file():
            model = recorded
        elif run_dir is not None and (Path(run_dir).resolve().parent.parent / recorded).is_file():
            model = str(Path(run_dir).resolve().parent.parent / recorded)
    loaded = load_model(model)
    want = summary.get("model_sha256")
    if want and loaded.sha256 != want:
        hint = "" if model else f" (the recorded checkpoint {recorded} is not there); give the run's model explicitly"
        raise AdvsearchError(
            f"model {loaded.path} (sha256 {loaded.sha256[:12]}) is not the run's model "
            f"(sha256 {want[:12]}){hint}"
        )
    return loaded


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


def _fmt_int(x) -> str:
    return f"{x:,}" if isinstance(x, int) else esc(x)


def failure_rate(data: RunData) -> dict | None:
    """For random runs: failing positions / judged positions and sequence yield, with Wilson 95% intervals."""
    s = data.summary
    if s.get("strategy") != "random" or not s.get("positions"):
        return None
    out = {"failures": data.rows, "positions": int(s["positions"]), "rate": data.rows / int(s["positions"]),
           "ci": wilson(data.rows, int(s["positions"]))}  # fmt: skip
    if "sequences_with_confident_failure" in s and s.get("sequences"):
        k, n = int(s["sequences_with_confident_failure"]), int(s["sequences"])
        out |= {"hits": k, "sequences": n, "yield": k / n, "yield_ci": wilson(k, n),
                "yield_confidence": s.get("yield_confidence", 0.9)}  # fmt: skip
    return out


def _summary_section(page: Page, data: RunData, model) -> None:
    s = data.summary
    page.section("summary", "Run summary")
    rows = [
        ("run", f"<code>{esc(s.get('run_id', data.path.name))}</code> ({esc(s.get('status', '?'))}) in "
                f"<code>{esc(data.path)}</code>"),
        ("model", f"<code>{esc(s.get('model', model.path))}</code>"),
        ("sha256", f"<code>{esc(s.get('model_sha256', model.sha256))}</code>"),
        ("strategy", f"<b>{esc(s.get('strategy', '?'))}</b>"),
        ("parameters", f"<code>{esc(json.dumps(s.get('params', {}), sort_keys=True))}</code>"),
        ("min confidence", f"p(prediction) ≥ {esc(s.get('min_confidence', '?'))}"),
        ("evaluated", f"{_fmt_int(s.get('sequences', '?'))} sequences, {_fmt_int(s.get('positions', '?'))} positions"),
        ("failures", f"{_fmt_int(s.get('failures', data.rows))} failing prefixes "
                     f"({data.rows:,} rows in failures.csv)"),
        ("confident failures", _fmt_int(s.get("confident_failures", data.confident))),
        ("throughput", f"{esc(s.get('sequences_per_second', '?'))} sequences/s "
                       f"({esc(s.get('wall_seconds', '?'))} s on {esc(s.get('device', '?'))})"),
        ("versions", esc(", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items()))),
    ]  # fmt: skip
    rate = failure_rate(data)
    if rate is not None:
        lo, hi = rate["ci"]
        rows.insert(8, ("failure rate", (
            f"<b>{rate['rate']:.4%}</b> of positions (95% Wilson CI {lo:.4%} – {hi:.4%}; "
            f"{rate['failures']:,} / {rate['positions']:,})"
            '<div class="note">Positions of one sequence are not independent (failures cluster), so this '
            "interval is optimistic; the per-sequence yield below is exact.</div>")))  # fmt: skip
        if "yield" in rate:
            lo, hi = rate["yield_ci"]
            rows.insert(9, ("sequence yield", (
                f"<b>{rate['yield']:.4%}</b> of sequences have a failure with p(prediction) ≥ "
                f"{rate['yield_confidence']} (95% Wilson CI {lo:.4%} – {hi:.4%}; "
                f"{rate['hits']:,} / {rate['sequences']:,})")))  # fmt: skip
    page.html("<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>")
    page.end()


def _position_figure(data: RunData):
    import plotly.graph_objects as go

    s = data.summary
    last = max(int(r["length"]) for r in data.census) if data.census else data.seq_len - 1
    x = list(range(max([last, *data.by_position]) + 1))
    n = [data.by_position.get(k, [0, 0])[0] for k in x]
    nc = [data.by_position.get(k, [0, 0])[1] for k in x]
    fig = go.Figure()
    if s.get("strategy") == "random" and s.get("sequences"):
        seqs = int(s["sequences"])
        rate = np.array(n) / seqs
        ci = np.array([wilson(v, seqs) for v in n])
        fig.add_trace(go.Bar(x=x, y=rate.astype(np.float32), name="failing prefixes / sequences",
                             marker_color="#c62828",
                             error_y={"type": "data", "symmetric": False,
                                      "array": (ci[:, 1] - rate).astype(np.float32),
                                      "arrayminus": (rate - ci[:, 0]).astype(np.float32)},
                             customdata=np.stack([n, nc], 1),
                             hovertemplate="position %{x}: %{y:.3%} (%{customdata[0]} failing, "
                                           "%{customdata[1]} confident)<extra></extra>"))  # fmt: skip
        fig.add_trace(go.Bar(x=x, y=(np.array(nc) / seqs).astype(np.float32), name="confident",
                             marker_color="#ef9a9a", hovertemplate="position %{x}: %{y:.3%} confident<extra></extra>"))
        title, ytitle, fmt = "Failure rate by position (95% Wilson intervals)", "failure rate", ".2%"
    elif data.census:
        rates = {int(r["length"]): float(r["failure_rate"]) for r in data.census}
        fig.add_trace(go.Bar(x=x, y=[rates.get(k, 0.0) for k in x], name="failure rate", marker_color="#c62828",
                             customdata=np.stack([n, nc], 1),
                             hovertemplate="position %{x}: %{y:.3%} (%{customdata[0]} failing, "
                                           "%{customdata[1]} confident)<extra></extra>"))  # fmt: skip
        title, ytitle, fmt = "Failure rate by position (= prefix length; every prefix judged)", "failure rate", ".2%"
    else:
        fig.add_trace(go.Bar(x=x, y=n, name="failing prefixes", marker_color="#c62828"))
        fig.add_trace(go.Bar(x=x, y=nc, name="confident", marker_color="#ef9a9a"))
        title, ytitle, fmt = ("Failing prefixes by position (counts: a search's proposals are not a sample, "
                              "so no rate)", "failing prefixes", ",d")  # fmt: skip
    fig.update_layout(title={"text": title, "font": {"size": 13}}, barmode="overlay", height=330,
                      xaxis={"title": {"text": "position"}, "dtick": 1},
                      yaxis={"title": {"text": ytitle}, "tickformat": fmt, "rangemode": "tozero"},
                      margin={"l": 60, "r": 20, "t": 40, "b": 45}, legend={"orientation": "h", "y": 1.12, "x": 1,
                                                                             "xanchor": "right"})  # fmt: skip
    return fig


def _length_figure(data: RunData):
    import plotly.graph_objects as go

    rows = sorted(data.census or [], key=lambda r: int(r["length"]))
    x = [int(r["length"]) for r in rows]
    rate = [float(r["failure_rate"]) for r in rows]
    custom = [[int(r["failures"]), int(r["prefixes"]), int(r.get("confident_failures") or 0), r.get("example", "")]
              for r in rows]  # fmt: skip
    fig = go.Figure(go.Scatter(x=x, y=rate, mode="lines+markers", marker_color="#c62828", customdata=custom,
                               hovertemplate="length %{x}: %{y:.4%} (%{customdata[0]:,} of %{customdata[1]:,}; "
                                             "%{customdata[2]:,} confident) e.g. %{customdata[3]}<extra></extra>"))
    fig.update_layout(title={"text": "Failure rate by prefix length (census.csv)", "font": {"size": 13}}, height=330,
                      xaxis={"title": {"text": "letters after '?'"}, "dtick": 1},
                      yaxis={"title": {"text": "failure rate"}, "type": "log" if any(rate) else "linear",
                             "tickformat": ".2%", "rangemode": "tozero"},
                      margin={"l": 60, "r": 20, "t": 40, "b": 45})  # fmt: skip
    return fig


def _confusion_figure(data: RunData):
    import plotly.graph_objects as go

    V = list(data.vocab)
    z = np.zeros((len(V), len(V)), dtype=np.int64)
    zc = np.zeros_like(z)
    for (t, p), (n, nc) in data.confusion.items():
        if t in V and p in V:
            z[V.index(t), V.index(p)] += n
            zc[V.index(t), V.index(p)] += nc
    text = [[f"{v:,}" if v else "" for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        # empty cells blank; an all-blank heatmap breaks plotly's colour bar, so a run without failures gets zeros
        z=(np.where(z > 0, z, np.nan) if z.any() else z).astype(np.float32), x=V, y=V, text=text,
        texttemplate="%{text}",
        textfont={"size": 10}, colorscale="Reds", customdata=zc, zmin=0, zmax=max(1, int(z.max())),
        hovertemplate="truth %{y}, predicted %{x}: %{z:,} failures (%{customdata:,} confident)<extra></extra>",
        colorbar={"title": {"text": "failures"}},
    ))  # fmt: skip
    fig.update_layout(title={"text": f"Failures by truth × prediction ({data.rows:,} failing prefixes)",
                             "font": {"size": 13}},
                      height=460, xaxis={"title": {"text": "predicted"}, "side": "bottom", "constrain": "domain"},
                      yaxis={"title": {"text": "true"}, "autorange": "reversed", "scaleanchor": "x"},
                      margin={"l": 60, "r": 20, "t": 40, "b": 45})  # fmt: skip
    return fig


def _confidence_figure(data: RunData):
    import plotly.graph_objects as go

    edges = np.linspace(0, 1, P_BINS + 1)
    centres = ((edges[:-1] + edges[1:]) / 2).astype(np.float32)
    fig = go.Figure(go.Bar(x=centres, y=data.p_hist, width=1 / P_BINS * 0.95, marker_color="#7b1fa2",
                           hovertemplate="p(prediction) ≈ %{x:.3f}: %{y:,} failures<extra></extra>"))
    thr = data.summary.get("min_confidence")
    if isinstance(thr, (int, float)):
        fig.add_vline(x=thr, line_dash="dash", line_color="#333",
                      annotation_text=f"confident ≥ {thr}", annotation_position="top right")
    fig.update_layout(title={"text": "Confidence of the failures: p(prediction)", "font": {"size": 13}}, height=330,
                      xaxis={"title": {"text": "p(prediction)"}, "range": [0, 1]},
                      yaxis={"title": {"text": "failing prefixes"}, "rangemode": "tozero"},
                      margin={"l": 60, "r": 20, "t": 40, "b": 45})  # fmt: skip
    return fig


def _categories_figure(data: RunData):
    import plotly.graph_objects as go

    from advsearch.mechanism.explain import CATEGORIES

    cats = sorted(data.categories, key=lambda c: (CATEGORIES.index(c) if c in CATEGORIES else 99, c))
    checks = sorted({k for v in data.categories.values() for k in v},
                    key=lambda c: ({"confirmed": 0, "refuted": 1, "none": 2}.get(c, 3), c))  # fmt: skip
    colors = {"confirmed": "#2e7d32", "refuted": "#c62828", "none": "#9e9e9e"}
    fig = go.Figure([go.Bar(y=cats, x=[data.categories[c].get(k, 0) for c in cats], name=f"check {k}",
                            orientation="h", marker_color=colors.get(k))
                     for k in checks])  # fmt: skip
    fig.update_layout(title={"text": "Failure categories (explanation columns of failures.csv), by causal check",
                             "font": {"size": 13}}, barmode="stack", height=120 + 32 * len(cats),
                      yaxis={"autorange": "reversed"}, xaxis={"title": {"text": "failing prefixes"}},
                      margin={"l": 190, "r": 20, "t": 40, "b": 45}, legend={"orientation": "h", "y": -0.25})
    return fig


def _families_figure(data: RunData):
    import plotly.graph_objects as go

    rows = data.families or []
    names = [r["family"] for r in rows]
    yields = [float(r.get("yield") or 0) for r in rows]
    custom = [[int(r.get("confident_failures") or 0), int(r.get("sequences") or 0)] for r in rows]
    fig = go.Figure(go.Bar(x=names, y=yields, marker_color="#00838f", customdata=custom,
                           hovertemplate="%{x}: %{y:.2%} (%{customdata[0]:,} of %{customdata[1]:,})<extra></extra>"))
    fig.update_layout(title={"text": "Guided families: yield (sequences with a failure at p ≥ 0.9)",
                             "font": {"size": 13}}, height=330, yaxis={"tickformat": ".0%"},
                      margin={"l": 60, "r": 20, "t": 40, "b": 80})  # fmt: skip
    return fig


def _top_table(data: RunData) -> str:
    extra = [c for c in ("category", "components", "check", "control") if c in data.columns]
    head = "".join(f"<th>{esc(c)}</th>" for c in ("#", "sequence", "pos", "true", "pred", "p_pred", "p_true",
                                                  "margin", *extra))  # fmt: skip
    body = []
    for i, r in enumerate(data.top):
        cells = [str(i + 1), f"<code>{esc(r['sequence'])}</code>", esc(r["position"]),
                 esc(r["true"]), esc(r["predicted"]), esc(r["p_pred"]), esc(r.get("p_true", "")),
                 esc(r.get("margin", "")), *[esc(r.get(c, "")) for c in extra]]  # fmt: skip
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def build_report(run_dir: Path, top: int = DEFAULT_TOP, model: str | None = None, loaded=None) -> Page:
    """Read the run, load its model (or use `loaded`, a LoadedModel that must be the run's), lay out the page."""
    from advsearch.mechanism.explain import Explainer
    from advsearch.mechanism.tables import compute_tables

    if not 0 <= top <= MAX_TOP:
        raise AdvsearchError(f"the number of top failures must be between 0 and {MAX_TOP} (got {top})")
    data = read_run(Path(run_dir), top)
    if loaded is None:
        loaded = resolve_run_model(data.summary, model, data.path)
    elif data.summary.get("model_sha256") not in (None, loaded.sha256):
        raise AdvsearchError(f"model {loaded.path} is not the run's model (sha256 differs)")
    tables = compute_tables(loaded)
    s = data.summary
    page = Page(f"advsearch report — {s.get('run_id', Path(run_dir).name)}",
                f"{s.get('strategy', '?')} run on {Path(str(s.get('model', loaded.path))).name} · "
                f"{data.rows:,} failing prefixes · {s.get('status', '?')}")  # fmt: skip
    _summary_section(page, data, loaded)

    page.section("rates", "Where it fails")
    page.html('<div class="row">')
    page.figure("fig-position", _position_figure(data))
    if data.census:
        page.figure("fig-length", _length_figure(data))
    page.figure("fig-confidence", _confidence_figure(data))
    page.html("</div>")
    page.end()

    page.section("confusions", "What it confuses")
    page.html('<div class="row">')
    page.figure("fig-confusion", _confusion_figure(data))
    if data.has_categories and data.categories:
        page.figure("fig-categories", _categories_figure(data))
    elif not data.has_categories:
        page.html('<p class="note">failures.csv has no explanation columns (category, check, …), so no category '
                  "counts; the categories of the top failures are in their views below.</p>")
    page.html("</div>")
    if data.families:
        page.figure("fig-families", _families_figure(data))
    page.end()

    add_mechanism(page, tables)

    if data.audit:
        page.section("audit", "How the explanations hold")
        page.html('<p class="note">Per category and family (or strategy): failures whose causal check ran, was '
                  "confirmed (the named ablation makes the model answer the truth), and was specific (confirmed "
                  "while the like-sized control ablation did not fix it); median change of logit(truth) − "
                  "logit(prediction) under each (<code>advsearch audit</code>).</p>")
        page.html(_audit_table(data.audit))
        page.end()

    page.section("top", f"Top {len(data.top)} failures (highest p(prediction) first)")
    if not data.top:
        page.html('<p class="note">The run found no failure.</p>')
    else:
        page.html(_top_table(data))
    page.end()
    # one view per category (its most confident failure), else the top failures
    if data.showcase:
        from advsearch.mechanism.explain import CATEGORIES

        cats = sorted(data.showcase, key=lambda c: (CATEGORIES.index(c) if c in CATEGORIES else 99, c))
        shown = [data.showcase[c] for c in cats]
        page.section("showcase", "One failure per category (its most confident), explained")
    else:
        shown = data.top
        page.section("views", "The top failures, explained")
    if shown:
        explainer = Explainer(loaded, tables)
        items = [(loaded.spec.encode(r["sequence"]), int(r["position"])) for r in shown]
        for i, (r, v) in enumerate(zip(shown, failure_views(loaded, explainer, items))):
            label = r.get("category") if data.showcase else f"#{i + 1}"
            add_failure_view(page, v, i, heading=f"{label}  {v.sequence}")
    page.end()
    return page


def write_report(
    run_dir: Path, out: Path | None = None, top: int = DEFAULT_TOP, model: str | None = None, loaded=None
) -> tuple[Path, int]:
    """Build and write the report (default RUN_DIR/report.html); returns (path, size in bytes)."""
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    page = build_report(run_dir, top, model, loaded)
    return out, page.write(out)
