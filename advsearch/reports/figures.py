"""HTML pages with plotly figures: the page builder, the mechanism heatmaps and the
per-failure view shared by `advsearch report` and `advsearch explain --html`.

A `Page` collects HTML fragments and plotly figures and writes one self-contained file:
plotly.js is embedded once, every figure's JSON sits in one `<script type="application/json">`
block (the layout template, identical for all figures, is stored once), and a small loader
calls `Plotly.newPlot` for each figure div, those near the viewport first and the rest one per
task in document order (so a report with many failures is readable at once). `<body>` carries
`data-figures` (how many), `data-rendered` (how many drawn so far) and `data-complete="1"` when all
are; a JavaScript error sets `data-js-errors` on `<html>` and shows a banner, so a reader (and the
browser test) sees at once when something did not render.

Figure divs have ids the tests look for: `fig-mech-l0`, `fig-mech-l1`, and per failure `i`
`fig-f{i}-probs`, `fig-f{i}-attention`, `fig-f{i}-paths`.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from advsearch.errors import AdvsearchError

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #222;
       background: #fafafa; }
header { background: #283845; color: #fff; padding: 14px 28px; }
header h1 { margin: 0; font-size: 22px; font-weight: 600; }
header p { margin: 4px 0 0; opacity: .8; font-size: 13px; }
nav { padding: 6px 28px; background: #eef1f4; font-size: 13px; border-bottom: 1px solid #d9dee3; }
nav a { margin-right: 16px; color: #25557a; text-decoration: none; }
main { padding: 8px 28px 40px; max-width: 1400px; }
section { background: #fff; border: 1px solid #e3e6ea; border-radius: 6px; padding: 12px 18px; margin: 16px 0; }
h2 { font-size: 18px; margin: 4px 0 10px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
th { background: #f4f6f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace; }
.row { display: flex; flex-wrap: wrap; gap: 12px; }
.row > .fig { flex: 1 1 520px; min-width: 420px; }
.fig { min-height: 120px; }
.note { color: #666; font-size: 12.5px; margin: 4px 0; }
.tokens { display: flex; flex-wrap: wrap; gap: 3px; margin: 8px 0; }
.tok { display: inline-flex; flex-direction: column; align-items: center; min-width: 26px; padding: 3px 2px;
       border: 1px solid #cfd6dd; border-radius: 4px; background: #f7f9fb; font-family: ui-monospace, monospace; }
.tok b { font-size: 17px; }
.tok small { font-size: 10px; color: #888; }
.tok.fail { border-color: #e0a040; background: #fff4e0; }
.tok.here { border: 2px solid #c62828; background: #ffe3e3; }
.tok.later { opacity: .45; }
.failure { border-left: 4px solid #c62828; }
.verdict { font-size: 14px; }
.verdict .t { color: #1b6e2f; font-weight: 600; }
.verdict .p { color: #c62828; font-weight: 600; }
#js-errors { background: #c62828; color: #fff; padding: 8px 28px; }
"""

# Registered before plotly.js so that an error while loading it is caught as well.
ERROR_HOOK = """
window.__reportErrors = [];
function __reportError(msg) {
  window.__reportErrors.push(String(msg));
  document.documentElement.dataset.jsErrors = window.__reportErrors.length;
  var b = document.getElementById('js-errors');
  if (b) { b.hidden = false; b.textContent = 'Some figures failed to render: ' + window.__reportErrors.join('; '); }
}
window.addEventListener('error', function (e) { __reportError(e.message || e); });
window.addEventListener('unhandledrejection', function (e) { __reportError(e.reason); });
"""

LOADER = """
(function () {
  // Figures near the viewport render first, the rest in document order, one per task, so the page is
  // readable at once however many failures it shows. data-rendered counts the figures drawn;
  // data-complete is set when all are.
  var template = JSON.parse(document.getElementById('plotly-template').textContent);
  var specs = JSON.parse(document.getElementById('figure-data').textContent);
  var config = {responsive: true, displaylogo: false, modeBarButtonsToRemove: ['select2d', 'lasso2d']};
  var ids = Object.keys(specs), state = {}, urgent = [], cursor = 0, done = 0;
  var body = document.body;
  body.dataset.figures = ids.length;
  function finish() {
    done += 1;
    body.dataset.rendered = done;
    if (done === ids.length) { body.dataset.complete = '1'; body.dataset.renderMs = Math.round(performance.now()); }
  }
  function render(id) {
    state[id] = 1;
    var spec = specs[id];
    spec.layout.template = template;
    try {
      Promise.resolve(Plotly.newPlot(id, spec.data, spec.layout, config))
        .catch(function (e) { __reportError(id + ': ' + e); }).then(finish);
    } catch (e) { __reportError(id + ': ' + e); finish(); }
  }
  function pick() {
    while (urgent.length) { var u = urgent.shift(); if (!state[u]) return u; }
    while (cursor < ids.length) { var c = ids[cursor++]; if (!state[c]) return c; }
    return null;
  }
  function pump() {
    var id = pick();
    if (id === null) return;
    render(id);
    setTimeout(pump, 0);
  }
  if ('IntersectionObserver' in window) {
    var io = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) {
        if (e.isIntersecting) { urgent.push(e.target.id); io.unobserve(e.target); }
      });
    }, {rootMargin: '300px 0px'});
    ids.forEach(function (id) { io.observe(document.getElementById(id)); });
  }
  if (!ids.length) { body.dataset.rendered = 0; body.dataset.complete = '1'; }
  setTimeout(pump, 0);
})();
"""


def esc(x) -> str:
    return html.escape(str(x))


def _script_json(data) -> str:
    """JSON that is safe inside a <script> element."""
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")


class Page:
    """One self-contained HTML document: HTML fragments plus plotly figures."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self.parts: list[str] = []
        self.nav: list[tuple[str, str]] = []
        self.figures: dict[str, dict] = {}
        self.template: dict | None = None

    def html(self, fragment: str) -> None:
        self.parts.append(fragment)

    def section(self, anchor: str, title: str, nav: bool = True) -> None:
        """Open a <section> (closed by `end`)."""
        if nav:
            self.nav.append((anchor, title))
        self.parts.append(f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>')

    def end(self) -> None:
        self.parts.append("</section>")

    def figure(self, fig_id: str, fig, css_class: str = "fig") -> None:
        """Place a plotly figure here (its div gets id `fig_id`)."""
        if fig_id in self.figures:
            raise ValueError(f"duplicate figure id {fig_id}")
        spec = json.loads(fig.to_json())
        layout = spec.setdefault("layout", {})
        template = layout.pop("template", None)
        if self.template is None and template is not None:
            self.template = template
        self.figures[fig_id] = {"data": spec.get("data", []), "layout": layout}
        height = f' style="height:{int(layout["height"])}px"' if "height" in layout else ""
        self.parts.append(f'<div class="{css_class}" id="{esc(fig_id)}"{height}></div>')

    def render(self) -> str:
        from plotly.offline import get_plotlyjs

        nav = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in self.nav)
        return "\n".join([
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{esc(self.title)}</title>",
            f"<style>{CSS}</style>",
            f"<script>{ERROR_HOOK}</script>",
            f"<script>{get_plotlyjs()}</script>",
            "</head><body>",
            '<div id="js-errors" hidden></div>',
            f"<header><h1>{esc(self.title)}</h1><p>{esc(self.subtitle)}</p></header>",
            f"<nav>{nav}</nav>" if nav else "",
            "<main>",
            *self.parts,
            "</main>",
            f'<script type="application/json" id="plotly-template">{_script_json(self.template or {})}</script>',
            f'<script type="application/json" id="figure-data">{_script_json(self.figures)}</script>',
            f"<script>{LOADER}</script>",
            "</body></html>",
        ])  # fmt: skip

    def write(self, path: Path) -> int:
        """Write the page; returns its size in bytes."""
        text = self.render()
        path = Path(path)
        try:
            if path.parent and not path.parent.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise AdvsearchError(f"cannot write {path}: {e.strerror or e}") from None
        return len(text.encode("utf-8"))


def _go():
    import plotly.graph_objects as go

    return go


def _f4(x) -> np.ndarray:
    """float32 arrays (plotly writes them as compact base64)."""
    return np.asarray(x, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# mechanism tables
# --------------------------------------------------------------------------------------------


def mechanism_figures(tables) -> tuple:
    """(L0 detector scores head × letter, L1 responsibility head × letter) heatmaps."""
    go = _go()
    letters = list(tables.letters)
    H = tables.n_heads
    diag = np.asarray(tables.l0_diag)
    marks = [["D" if v > tables.dup_threshold else "A" if v < tables.anti_threshold else "" for v in row]
             for row in diag]  # fmt: skip
    text = [[f"{v:.2f}{(' ' + m) if m else ''}" for v, m in zip(row, mrow)] for row, mrow in zip(diag, marks)]
    l0 = go.Figure(go.Heatmap(
        z=_f4(diag), x=letters, y=[f"0.{h}" for h in range(H)], text=text, texttemplate="%{text}",
        zmin=0, zmax=1, colorscale="Viridis", colorbar={"title": {"text": "diag A"}},
        hovertemplate="head %{y}, letter %{x}: %{z:.3f}<extra></extra>",
    ))  # fmt: skip
    l0.update_layout(
        title={"text": f"Layer 0 detector scores diag(A<sub>h</sub>) (D &gt; {tables.dup_threshold}, "
                       f"A &lt; {tables.anti_threshold})", "font": {"size": 13}},
        height=260, margin={"l": 50, "r": 20, "t": 50, "b": 40},
        yaxis={"autorange": "reversed", "title": {"text": "L0 head"}}, xaxis={"title": {"text": "letter"}},
    )  # fmt: skip
    norm = np.asarray(tables.responsibility_norm)
    text1 = [[f"{norm[j][t]:.1f}{' ★' if tables.responsible_head[t] == j else ''}" for t in range(len(letters))]
             for j in range(H)]  # fmt: skip
    l1 = go.Figure(go.Heatmap(
        z=_f4(norm), x=letters, y=[f"1.{j}" for j in range(H)], text=text1, texttemplate="%{text}",
        colorscale="Blues", colorbar={"title": {"text": "norm"}},
        hovertemplate="head %{y}, letter %{x}: %{z:.2f}<extra></extra>",
    ))  # fmt: skip
    l1.update_layout(
        title={"text": "Layer 1 responsibility: composed-OV norm (★ responsible head)", "font": {"size": 13}},
        height=260, margin={"l": 50, "r": 20, "t": 50, "b": 40},
        yaxis={"autorange": "reversed", "title": {"text": "L1 head"}}, xaxis={"title": {"text": "letter"}},
    )  # fmt: skip
    return l0, l1


def add_mechanism(page: Page, tables, anchor: str = "mechanism") -> None:
    page.section(anchor, "Mechanism tables of the model")
    L = tables.letters
    pairs = enumerate(zip(tables.detectors, tables.anti_detectors))
    dets = "; ".join(f"0.{h} detects {''.join(L[t] for t in d) or '-'}, anti-detects "
                     f"{''.join(L[t] for t in a) or '-'}" for h, (d, a) in pairs)
    sets = "; ".join(f"1.{j}: {''.join(L[t] for t in s) or '-'}" for j, s in enumerate(tables.responsibility_sets))
    page.html(
        f'<p class="note">Computed from the weights of <code>{esc(tables.checkpoint)}</code> '
        f"(sha256 {esc(tables.sha256[:16])}…), as <code>advsearch mechanism</code> prints them. "
        f"Layer 0: {esc(dets)}. Responsibility sets: {esc(sets)}.</p>"
    )
    l0, l1 = mechanism_figures(tables)
    page.html('<div class="row">')
    page.figure("fig-mech-l0", l0)
    page.figure("fig-mech-l1", l1)
    page.html("</div>")
    page.end()


# --------------------------------------------------------------------------------------------
# the per-failure view
# --------------------------------------------------------------------------------------------


@dataclass
class FailureView:
    """Everything the per-failure view draws for one (sequence, position)."""

    sequence: str  # the whole input
    position: int
    truth: list[str]  # per position
    pred: list[str]
    p_truth: np.ndarray  # [L] probability of the truth at each position
    p_pred: np.ndarray  # [L] probability of the prediction at each position
    attention: np.ndarray  # [layers, heads, L, L] (query, key)
    explanation: object  # advsearch.mechanism.explain.Explanation at `position`


@torch.no_grad()
def failure_views(model, explainer, items: list[tuple[torch.Tensor, int]]) -> list[FailureView]:
    """Views of (tokens, position) pairs: one bridge pass per sequence length, one explain_many."""
    from advsearch.model.oracle import first_unique

    spec, vocab = model.spec, model.spec.vocab
    items = [(torch.as_tensor(t).flatten().long(), int(k)) for t, k in items]
    explanations = explainer.explain_many(items) if items else []
    groups: dict[int, list[int]] = defaultdict(list)
    for i, (t, _) in enumerate(items):
        groups[len(t)].append(i)
    views: list[FailureView | None] = [None] * len(items)
    n_layers = spec.n_layers
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)}
    for _, idxs in sorted(groups.items()):
        toks = torch.stack([items[i][0] for i in idxs])
        logits, cache = model.bridge.run_with_cache(toks, names_filter=lambda n: n in names)
        probs = logits.float().softmax(-1)
        truth = first_unique(toks, spec.qmark)
        pred = probs.argmax(-1)
        att = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(n_layers)], 1)
        for b, i in enumerate(idxs):
            views[i] = FailureView(
                sequence=spec.decode(toks[b]),
                position=items[i][1],
                truth=[vocab[int(x)] for x in truth[b]],
                pred=[vocab[int(x)] for x in pred[b]],
                p_truth=probs[b].gather(-1, truth[b, :, None])[:, 0].numpy(),
                p_pred=probs[b].gather(-1, pred[b, :, None])[:, 0].numpy(),
                attention=att[b].float().numpy(),
                explanation=explanations[i],
            )
    return views  # type: ignore[return-value]


def _token_strip(v: FailureView) -> str:
    k = v.position
    spans = []
    for j, c in enumerate(v.sequence):
        cls = ["tok"]
        if j == k:
            cls.append("here")
        elif v.truth[j] != v.pred[j]:
            cls.append("fail")
        if j > k:
            cls.append("later")
        tip = f"position {j}: truth {v.truth[j]!r}, predicted {v.pred[j]!r}"
        spans.append(f'<span class="{" ".join(cls)}" title="{esc(tip)}"><b>{esc(c)}</b><small>{j}</small></span>')
    return f'<div class="tokens">{"".join(spans)}</div>'


def _probability_figure(v: FailureView):
    go = _go()
    L, k = len(v.sequence), v.position
    x = list(range(L))
    ticks = [f"{c}<br>{j}" for j, c in enumerate(v.sequence)]
    wrong = [j for j in x if v.truth[j] != v.pred[j]]
    custom = [[v.truth[j], v.pred[j]] for j in x]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=_f4(v.p_truth), name="p(truth)", mode="lines+markers",
                             line={"color": "#2e7d32"}, customdata=custom,
                             hovertemplate="pos %{x}: p(truth %{customdata[0]}) = %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=x, y=_f4(v.p_pred), name="p(prediction)", mode="lines+markers",
                             line={"color": "#c62828", "dash": "dot"}, customdata=custom,
                             hovertemplate="pos %{x}: p(pred %{customdata[1]}) = %{y:.3f}<extra></extra>"))
    if wrong:
        fig.add_trace(go.Scatter(x=wrong, y=[float(v.p_pred[j]) for j in wrong], name="failure", mode="markers",
                                 marker={"symbol": "x", "size": 11, "color": "#c62828"}, hoverinfo="skip"))
    fig.add_vrect(x0=k - 0.5, x1=k + 0.5, fillcolor="#c62828", opacity=0.12, line_width=0)
    fig.add_trace(go.Scatter(x=x, y=[1.08] * L, mode="text", showlegend=False, hoverinfo="skip",
                             text=[f"{t}/{p}" if t != p else t for t, p in zip(v.truth, v.pred)],
                             textfont={"size": 10, "color": ["#c62828" if j in wrong else "#555" for j in x]}))
    fig.update_layout(
        title={"text": "Per-position probability of the truth and of the prediction (labels: truth/prediction)",
               "font": {"size": 13}},
        height=290, margin={"l": 50, "r": 20, "t": 40, "b": 50},
        xaxis={"tickmode": "array", "tickvals": x, "ticktext": ticks, "range": [-0.6, L - 0.4]},
        yaxis={"range": [0, 1.15], "title": {"text": "probability"}},
        legend={"orientation": "h", "y": -0.28},
    )  # fmt: skip
    return fig


def _attention_figure(v: FailureView):
    go = _go()
    from plotly.subplots import make_subplots

    n_layers, n_heads, L, _ = v.attention.shape
    k = v.position
    titles = [f"head {layer}.{h}" for layer in range(n_layers) for h in range(n_heads)]
    fig = make_subplots(rows=n_layers, cols=n_heads, subplot_titles=titles,
                        horizontal_spacing=0.04, vertical_spacing=0.12)  # fmt: skip
    ticks = list(range(L))
    labels = list(v.sequence)
    for layer in range(n_layers):
        for h in range(n_heads):
            z = v.attention[layer, h].copy()
            z[np.triu_indices(L, 1)] = np.nan  # causal: keys after the query are not attended
            fig.add_trace(go.Heatmap(
                z=_f4(z), coloraxis="coloraxis",
                hovertemplate=f"{layer}.{h}: query %{{y}} → key %{{x}}: %{{z:.3f}}<extra></extra>",
            ), row=layer + 1, col=h + 1)  # fmt: skip
            fig.add_shape(type="rect", x0=-0.5, x1=k + 0.5, y0=k - 0.5, y1=k + 0.5,
                          line={"color": "#c62828", "width": 1.5}, row=layer + 1, col=h + 1)  # fmt: skip
    fig.update_xaxes(tickmode="array", tickvals=ticks, ticktext=labels, tickfont={"size": 9})
    fig.update_yaxes(tickmode="array", tickvals=ticks, ticktext=labels, tickfont={"size": 9}, autorange="reversed")
    fig.update_layout(
        title={"text": "Attention patterns (rows: query position, columns: key position; "
                       "red box: the failing position's row)", "font": {"size": 13}},
        coloraxis={"colorscale": "Viridis", "cmin": 0, "cmax": 1, "colorbar": {"title": {"text": "attn"}}},
        height=300 * n_layers + 40, margin={"l": 40, "r": 20, "t": 70, "b": 30},
    )  # fmt: skip
    return fig


def _paths_figure(v: FailureView):
    go = _go()
    from plotly.subplots import make_subplots

    ex = v.explanation
    names = [n for n in ex.paths if n != "bias"]
    srcs = list(dict.fromkeys(n.split("->")[0] for n in names))
    dsts = list(dict.fromkeys(n.split("->")[1] for n in names))

    def grid(key):
        return np.array([[ex.paths[f"{s}->{d}"][key] if f"{s}->{d}" in ex.paths else np.nan for d in dsts]
                         for s in srcs])  # fmt: skip

    zt, zp = grid("true"), grid("pred")
    gap = zp - zt
    titles = [f"truth {ex.true!r}: logit {ex.logit_true:.2f}",
              f"prediction {ex.predicted!r}: logit {ex.logit_pred:.2f}",
              f"prediction − truth (gap {ex.margin:+.2f})"]  # fmt: skip
    fig = make_subplots(rows=1, cols=3, subplot_titles=titles, horizontal_spacing=0.07)
    lim = float(np.nanmax(np.abs(np.concatenate([zt.ravel(), zp.ravel()])))) or 1.0
    glim = float(np.nanmax(np.abs(gap))) or 1.0
    for col, (z, m, cb_x) in enumerate([(zt, lim, None), (zp, lim, 0.64), (gap, glim, 1.0)], start=1):
        fig.add_trace(go.Heatmap(
            z=_f4(z), x=dsts, y=srcs, zmid=0, zmin=-m, zmax=m, colorscale="RdBu", reversescale=True,
            text=[[f"{x:+.2f}" for x in row] for row in z], texttemplate="%{text}", textfont={"size": 10},
            showscale=cb_x is not None, colorbar={"x": cb_x, "len": 0.9, "thickness": 12} if cb_x else None,
            hovertemplate="%{y} → %{x}: %{z:+.3f}<extra></extra>",
        ), row=1, col=col)  # fmt: skip
    if ex.deciding_path and "->" in ex.deciding_path:
        s, d = ex.deciding_path.split("->")
        if s in srcs and d in dsts:
            i, j = srcs.index(s), dsts.index(d)
            fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=i - 0.5, y1=i + 0.5,
                          line={"color": "#000", "width": 2.5}, row=1, col=3)  # fmt: skip
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title={"text": "read by", "font": {"size": 11}})
    fig.update_layout(
        title={"text": "Attribution (relative to the mean) per path source → destination at the failing position "
                       f"(logits = straight to the unembedding; box: deciding path {ex.deciding_path or '-'})",
               "font": {"size": 13}},
        height=330, margin={"l": 60, "r": 30, "t": 80, "b": 50},
    )  # fmt: skip
    for a in fig.layout.annotations:
        a.font.size = 11
    return fig


def add_failure_view(page: Page, v: FailureView, index: int, heading: str | None = None, extra: str = "") -> None:
    """The per-failure view: input with the position marked, probabilities, attention, path attribution."""
    ex = v.explanation
    k = v.position
    anchor = f"failure-{index}"
    page.html(f'<section id="{anchor}" class="failure">')
    page.html(f"<h3>{esc(heading or ex.sequence)}</h3>")
    ok = ex.true == ex.predicted
    verdict = (f'position {k} (<code>{esc(v.sequence[k])}</code>): truth <span class="t">{esc(ex.true)}</span>, '
               f'prediction <span class="{"t" if ok else "p"}">{esc(ex.predicted)}</span> — '
               f"p(truth) {float(v.p_truth[k]):.3f}, p(prediction) {float(v.p_pred[k]):.3f}, "
               f"logit gap {ex.margin:+.2f}")  # fmt: skip
    page.html(f'<p class="verdict">{verdict}</p>')
    page.html(_token_strip(v))
    head = lambda h: "-" if h is None else f"1.{h}"  # noqa: E731
    page.html(
        '<table class="mono"><tr><th>category</th><td>'
        f"<b>{esc(ex.category)}</b>: {esc(ex.reason)}</td></tr>"
        f"<tr><th>structure</th><td>duplicated [{esc(''.join(ex.duplicated) or '-')}] · unique "
        f"[{esc(''.join(ex.unique) or '-')}] · absent [{esc(''.join(ex.absent) or '-')}] · r(truth) "
        f"{head(ex.resp_head_true)} · r(prediction) {head(ex.resp_head_pred)} · load on r(truth): "
        f"{ex.load} [{esc(''.join(ex.load_letters) or '-')}]</td></tr>"
        f"<tr><th>detectors</th><td>{esc(ex.detectors or '-')}</td></tr>"
        f"<tr><th>causal check</th><td><b>{esc(ex.check)}</b>: ablating <code>{esc('+'.join(ex.components) or '-')}"
        f"</code> moves logit(truth) − logit(prediction) by {ex.effect:+.2f}; {esc(ex.story)}</td></tr>"
        f"<tr><th>control</th><td><b>{esc(ex.control)}</b>: ablating <code>"
        f"{esc('+'.join(ex.control_components) or '-')}</code> (same kind, like-sized, not named) moves it by "
        f"{ex.control_effect:+.2f}{' — specific' if ex.specific else ''}"
        + f"</td></tr>{extra}</table>"
    )  # fmt: skip
    page.figure(f"fig-f{index}-probs", _probability_figure(v))
    page.figure(f"fig-f{index}-attention", _attention_figure(v))
    page.figure(f"fig-f{index}-paths", _paths_figure(v))
    page.html("</section>")


def write_explain_html(model, tokens: torch.Tensor, positions: list[int], path: Path, explainer=None) -> int:
    """`advsearch explain SEQ --html FILE`: the per-failure view of each position (the last one when
    `positions` is empty), then the model's mechanism tables. Returns the file size in bytes."""
    from advsearch.mechanism.explain import Explainer

    explainer = explainer if explainer is not None else Explainer(model)
    toks = torch.as_tensor(tokens).flatten()
    seq = model.spec.decode(toks)
    shown = list(positions) or [len(toks) - 1]
    views = failure_views(model, explainer, [(toks, k) for k in shown])
    n_fail = sum(v.truth[v.position] != v.pred[v.position] for v in views)
    page = Page(f"advsearch explain {seq}",
                f"model {model.path} · sha256 {model.sha256[:16]}… · {n_fail} failing position(s) shown")
    page.section("positions", "Failing positions" if positions else "No failing position (last position shown)")
    for i, v in enumerate(views):
        page.nav.append((f"failure-{i}", f"position {v.position}"))
        add_failure_view(page, v, i, heading=f"{seq} — position {v.position}")
    page.end()
    add_mechanism(page, explainer.tables)
    return page.write(path)
