"""Side-by-side robustness of checkpoints on the same data (`advsearch compare A.pt B.pt`).

Sections (each model sees exactly the same inputs):

- random data: accuracy over every position of `sequences` seeded training-distribution
  sequences, mean p(true), failure and confident-failure rates (per position and per
  sequence position k = 1..n_ctx-1);
- categories: failure categories (`advsearch.mechanism.explain.Explainer`) of the first
  `explain_limit` failing positions of that data;
- suites: pass rate, fixed and regressed counts on every suite in `results/suites/`
  (or the ones given);
- search yield: confident failures per 1000 sequences evaluated that a search strategy
  (default `guided`) finds with the same budget and seed; skipped with a note when the
  strategy does not exist.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import torch

from advsearch.errors import AdvsearchError
from advsearch.mechanism.explain import Explainer
from advsearch.model.evaluator import Evaluator
from advsearch.model.judge import judge

SUITES_DIR = Path("results") / "suites"


def random_section(model, tokens: torch.Tensor, evaluator: Evaluator, min_confidence: float) -> tuple[dict, list]:
    spec = model.spec
    j = judge(tokens, evaluator.logits(tokens), spec.qmark, min_confidence)
    fail, conf = j.failure.float(), j.confident.float()
    per_pos = [{"position": k, "failure_rate": round(float(fail[:, k].mean()), 6),
                "confident_rate": round(float(conf[:, k].mean()), 6)} for k in range(1, tokens.shape[1])]  # fmt: skip
    data = {
        "accuracy": round(1 - float(fail.mean()), 6),
        "mean_p_true": round(float(j.p_true.mean()), 6),
        "failure_rate": round(float(fail.mean()), 6),
        "confident_failure_rate": round(float(conf.mean()), 6),
        "sequences_with_a_failure": round(float(j.failure.any(1).float().mean()), 6),
        "per_position": per_pos,
    }
    return data, j.failing().tolist()


def category_section(model, tokens: torch.Tensor, failing: list, limit: int) -> dict:
    items = [(tokens[b, : k + 1], k) for b, k in failing[:limit]]
    if not items:
        return {"explained": 0, "counts": {}}
    counts = Counter(ex.category for ex in Explainer(model).explain_many(items))
    return {"explained": len(items), "of_failures": len(failing), "counts": dict(sorted(counts.items()))}


def find_suites(suites: list[Path] | None) -> list[Path]:
    if suites:
        return [Path(s) for s in suites]
    return sorted(SUITES_DIR.glob("*.csv")) if SUITES_DIR.is_dir() else []


def yield_section(model, strategy_name: str, budget: int, seed: int, device: str, min_confidence: float) -> dict:
    from advsearch.commands.setup import make_search_strategy, strategy_options
    from advsearch.search.runner import run_search
    from strategies import STRATEGIES

    if strategy_name not in STRATEGIES:
        return {"skipped": f"no {strategy_name!r} strategy in strategies/ (have: {', '.join(STRATEGIES)})"}
    strat, _ = make_search_strategy(model, strategy_name, strategy_options(strategy_name, budget=budget, seed=seed))
    with tempfile.TemporaryDirectory(prefix="advsearch-compare-") as tmp:
        s = run_search(model, strat, Path(tmp), Evaluator(model.weights, device=device),
                       min_confidence=min_confidence, progress=False)  # fmt: skip
    n = s["sequences"] or 1
    return {"strategy": strategy_name, "budget": budget, "seed": seed, "sequences": s["sequences"],
            "failures": s["failures"], "confident_failures": s["confident_failures"],
            "confident_per_1000_sequences": round(1000 * s["confident_failures"] / n, 4),
            # the project's yield: share of sequences with a failure of p_pred >= yield_confidence
            "yield": s.get("yield"), "yield_confidence": s.get("yield_confidence"),
            "sequences_with_confident_failure": s.get("sequences_with_confident_failure")}  # fmt: skip


def compare_models(paths: list, *, sequences: int = 20_000, seed: int = 12345, suites: list[Path] | None = None,
                   explain_limit: int = 1000, yield_strategy: str = "guided", yield_budget: int = 20_000,
                   device: str = "cpu", min_confidence: float = 0.5, categories: bool = True) -> dict:  # fmt: skip
    """Compare checkpoints (paths or LoadedModels) on the same data; returns a JSON-ready dict."""
    from advsearch.model.checkpoint import load_model
    from advsearch.regress.testing import evaluate_suite

    models = [m if not isinstance(m, (str, Path)) else load_model(m) for m in paths]
    if len(models) < 2:
        raise AdvsearchError("compare needs at least two checkpoints")
    specs = {m.spec.vocab for m in models}
    if len(specs) > 1 or len({m.spec.seq_len for m in models}) > 1:
        raise AdvsearchError("the checkpoints have different vocabularies or context lengths; cannot compare")
    tokens = models[0].spec.random_tokens(sequences, seed)
    out: dict = {"models": [{"path": str(m.path), "sha256": m.sha256} for m in models],
                 "data": {"sequences": sequences, "seed": seed, "min_confidence": min_confidence}}  # fmt: skip
    randoms, cats = [], []
    for m in models:
        data, failing = random_section(m, tokens, Evaluator(m.weights, device=device), min_confidence)
        randoms.append(data)
        cats.append(category_section(m, tokens, failing, explain_limit) if categories else {"skipped": "not asked for"})
    out["random"] = randoms
    out["categories"] = cats
    out["suites"] = []
    for path in find_suites(suites):
        reports = [evaluate_suite(m, path, device=device) for m in models]
        out["suites"].append({
            "suite": str(path), "entries": len(reports[0].results),
            "baseline_pass_rate": round(reports[0].baseline_pass_rate, 6),
            "models": [{"pass_rate": round(r.pass_rate, 6), **r.counts} for r in reports],
        })  # fmt: skip
    if not out["suites"]:
        out["suites_note"] = f"no suites found (looked in {SUITES_DIR}/)" if not suites else ""
    if yield_budget > 0:
        out["yield"] = [yield_section(m, yield_strategy, yield_budget, seed, device, min_confidence) for m in models]
    else:
        out["yield"] = [{"skipped": "yield budget 0"} for _ in models]
    return out


def format_comparison(r: dict) -> str:
    names = [f"{chr(65 + i)}" for i in range(len(r["models"]))]
    w = 12
    head = lambda title: f"{title:<40}" + "".join(f"{n:>{w}}" for n in names)  # noqa: E731
    row = lambda label, vals: f"{label:<40}" + "".join(f"{v:>{w}}" for v in vals)  # noqa: E731
    lines = [f"{n}: {m['path']} ({m['sha256'][:12]})" for n, m in zip(names, r["models"])]
    d = r["data"]
    lines += ["", head(f"random data ({d['sequences']:,} seq, seed {d['seed']})")]
    for key, label in (("accuracy", "accuracy (all positions)"), ("mean_p_true", "mean p(true)"),
                       ("failure_rate", "failure rate"), ("confident_failure_rate", "confident failure rate"),
                       ("sequences_with_a_failure", "sequences with a failure")):  # fmt: skip
        lines.append(row(label, [f"{x[key]:.4%}" for x in r["random"]]))
    lines += ["", f"{'failure rate by position':<40}" + "".join(f"{n + ' fail / confident':>22}" for n in names)]
    for k, p in enumerate(r["random"][0]["per_position"]):
        cells = [f"{x['per_position'][k]['failure_rate']:.3%} / {x['per_position'][k]['confident_rate']:.3%}"
                 for x in r["random"]]  # fmt: skip
        lines.append(f"{'  position ' + str(p['position']):<40}" + "".join(f"{c:>22}" for c in cells))
    lines += [""]
    if all("counts" in c for c in r["categories"]):
        lines.append(head("failure categories (explained)"))
        cats = sorted({k for c in r["categories"] for k in c["counts"]})
        for k in cats:
            lines.append(row(f"  {k}", [str(c["counts"].get(k, 0)) for c in r["categories"]]))
        lines.append(row("  explained", [str(c["explained"]) for c in r["categories"]]))
    else:
        note = next(c.get("skipped") for c in r["categories"] if "skipped" in c)
        lines.append(f"failure categories: skipped ({note})")
    lines.append("")
    if r["suites"]:
        lines.append(head("suites: pass rate (regressed guards)"))
        for s in r["suites"]:
            lines.append(row(f"  {Path(s['suite']).name} ({s['entries']})",
                             [f"{m['pass_rate']:.2%} ({m['regressed']})" for m in s["models"]]))  # fmt: skip
    else:
        lines.append(f"suites: none ({r.get('suites_note', '')})")
    lines.append("")
    ys = r["yield"]
    if all("skipped" not in y for y in ys):
        lines.append(head(f"{ys[0]['strategy']} search ({ys[0]['budget']:,} seq, seed {ys[0]['seed']})"))
        lines.append(row("  sequences evaluated", [f"{y['sequences']:,}" for y in ys]))
        lines.append(row("  confident failures", [f"{y['confident_failures']:,}" for y in ys]))
        lines.append(row("  confident per 1000 sequences", [f"{y['confident_per_1000_sequences']:.2f}" for y in ys]))
        if all(y.get("yield") is not None for y in ys):
            lines.append(row(f"  yield (seq. with p_pred >= {ys[0]['yield_confidence']})",
                             [f"{y['yield']:.4%}" for y in ys]))  # fmt: skip
            key = "yield"
        else:
            key = "confident_per_1000_sequences"
        if len(ys) == 2:
            ratio = f"{ys[0][key] / ys[1][key]:.2f}x" if ys[1][key] else "inf (B has none)"
            lines.append(f"  A/B {key.replace('_', ' ')} ratio: {ratio}")
    else:
        note = next(y["skipped"] for y in ys if "skipped" in y)
        lines.append(f"search yield: skipped ({note})")
    return "\n".join(lines)
