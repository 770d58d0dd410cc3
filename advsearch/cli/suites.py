"""`advsearch suite build`, `advsearch regress`, `advsearch compare`, `advsearch harden`.

Registered in cli.py with `main.add_command(...)` for `suite`, `regress`, `compare`, `harden`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from advsearch.cli.options import device_option, handle_errors, model_option
from advsearch.errors import AdvsearchError


@click.group("suite")
def suite() -> None:
    """Robustness regression suites (results/suites/NAME.csv + NAME.json)."""


@suite.command("build")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Suite CSV to write, e.g. results/suites/NAME.csv (its sidecar NAME.json goes next to it).")
@model_option
@click.option("--per-group", type=click.IntRange(min=1), default=1, show_default=True,
              help="Strongest failures kept per (category, expected, predicted).")
@click.option("--near-misses", type=click.IntRange(min=0), default=50, show_default=True,
              help="Guards the baseline gets right by the smallest margins (from random prefixes).")
@click.option("--typical", type=click.IntRange(min=0), default=50, show_default=True,
              help="Guards drawn uniformly from random prefixes the baseline gets right.")
@click.option("--neighbours/--no-neighbours", default=True, show_default=True,
              help="Per failure, a guard: its nearest one-letter substitution the baseline gets right.")
@click.option("--pool", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Random sequences the near-miss and typical guards are drawn from.")
@click.option("--min-margin", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="Entries must be right/wrong by at least this logit gap (robust to float noise).")
@click.option("--explain", is_flag=True, help="Categorise failures with the Explainer instead of the runs' column.")
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@handle_errors
def build_cmd(run_dirs, out, model, per_group, near_misses, typical, neighbours, pool, min_margin, explain, seed,
              device) -> None:  # fmt: skip
    """Build a suite from the failures of RUN_DIR... (each with failures.csv), judged on --model."""
    from advsearch.model.checkpoint import load_model
    from advsearch.regress.suite import BuildOptions, build_suite, write_suite

    loaded = load_model(model)
    options = BuildOptions(per_group=per_group, near_misses=near_misses, typical=typical, neighbours=neighbours,
                           pool=pool, seed=seed, min_margin=min_margin, explain=explain)  # fmt: skip
    s = build_suite(loaded, list(run_dirs), options, device=device)
    csv_path, side = write_suite(s, out)
    c = s.meta["counts"]
    g = c["guards_by_kind"]
    click.echo(f"{c['candidate_rows']:,} failure rows from {len(run_dirs)} run(s) -> {c['candidate_prefixes']:,} "
               f"distinct prefixes, {c['failing_on_baseline']:,} failing on the baseline, {c['groups']} groups")
    click.echo(f"suite: {c['failures']} failures + {c['guards']} guards ({g['neighbour']} neighbour, "
               f"{g['near_miss']} near-miss, {g['typical']} typical); baseline pass rate "
               f"{s.meta['baseline_pass_rate']:.2%}")
    click.echo(f"wrote {csv_path} and {side}")


@click.command("regress")
@click.argument("suite_path", metavar="SUITE", type=click.Path(dir_okay=False, path_type=Path))
@model_option
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write JUnit XML here (one testcase per suite entry).")
@click.option("--min-pass-rate", type=click.FloatRange(0, 1), default=None,
              help="Fail below this pass rate (default: the suite's baseline pass rate).")
@click.option("--allow-regressions", type=click.IntRange(min=0), default=0, show_default=True,
              help="Regressed guards tolerated before failing.")
@click.option("--exact", is_flag=True, help="Also fail unless every entry has the baseline's outcome and prediction.")
@click.option("--verbose", is_flag=True, help="List every fixed and regressed entry.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@device_option
@handle_errors
def regress(suite_path, model, junit, min_pass_rate, allow_regressions, exact, verbose, as_json, device) -> None:
    """Evaluate --model on SUITE: fixed / still failing / regressed, pass rate; exit 1 on a regression."""
    from advsearch.model.checkpoint import load_model
    from advsearch.regress.suite import read_suite
    from advsearch.regress.testing import evaluate_suite, write_junit

    loaded = load_model(model)
    s = read_suite(suite_path, loaded.spec)
    report = evaluate_suite(loaded, s, min_pass_rate=min_pass_rate, allowed_regressions=allow_regressions,
                            exact=exact, device=device)  # fmt: skip
    if junit is not None:
        write_junit(report, junit)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.format_text(limit=None if verbose else 10, more=" (--verbose lists all)"))
        if junit is not None:
            click.echo(f"JUnit XML: {junit}")
    raise SystemExit(0 if report.ok else 1)


@click.command("compare")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--sequences", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Random training-distribution sequences both models are judged on.")
@click.option("--seed", type=int, default=12345, show_default=True)
@click.option("--suite", "suites", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Suite CSV(s) to score (default: every results/suites/*.csv).")
@click.option("--explain-limit", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Failing positions per model to categorise (0: skip categories).")
@click.option("--yield-strategy", default="guided", show_default=True,
              help="Search strategy whose confident-failure yield is compared.")
@click.option("--yield-budget", type=click.IntRange(min=0), default=20_000, show_default=True,
              help="Sequences the yield search may evaluate (0: skip).")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=0.5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@device_option
@handle_errors
def compare(models, sequences, seed, suites, explain_limit, yield_strategy, yield_budget, min_confidence, as_json,
            device) -> None:  # fmt: skip
    """Compare checkpoints A.pt B.pt ... side by side on the same data."""
    from advsearch.commands.compare import compare_models, format_comparison

    if len(models) < 2:
        raise AdvsearchError("compare needs at least two checkpoints")
    r = compare_models(list(models), sequences=sequences, seed=seed, suites=list(suites) or None,
                       explain_limit=explain_limit, yield_strategy=yield_strategy, yield_budget=yield_budget,
                       device=device, min_confidence=min_confidence, categories=explain_limit > 0)  # fmt: skip
    click.echo(json.dumps(r, indent=2) if as_json else format_comparison(r))


@click.command("harden")
@model_option
@click.option("--suite", "suite_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Suite whose failure entries are trained on (relabelled by letter permutations).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Hardened checkpoint to write (+ <out>.json with spec and recipe).")
@click.option("--from-run", "from_runs", multiple=True, type=click.Path(path_type=Path),
              help="Also train on every failing prefix of this run folder (repeatable).")
@click.option("--steps", type=click.IntRange(min=1), default=4000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=512, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Peak learning rate (cosine decay to a tenth).")
@click.option("--mix", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True,
              help="Fraction of each batch made of relabelled failures.")
@click.option("--focus", type=click.FloatRange(min=0), default=4.0, show_default=True,
              help="Loss weight of a relabelled failure's failing position.")
@click.option("--eval-every", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--mine", multiple=True, metavar="STRATEGY", default=("guided", "local"), show_default=True,
              help="Adversarial mining: every --mine-every steps, run a search strategy (repeatable; used in turn, "
                   "e.g. --mine guided --mine local) against the model being trained and add its confident "
                   "failures to the pool. --mine none: no mining.")
@click.option("--mine-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--mine-budget", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Sequences per mining round.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@device_option
@handle_errors
def harden(model, suite_path, out, from_runs, steps, batch_size, lr, mix, focus, eval_every, mine, mine_every,
           mine_budget, seed, quiet, device) -> None:  # fmt: skip
    """Fine-tune --model on the training distribution mixed with the suite's failures; regress before/after."""
    from advsearch.commands.harden import HardenOptions
    from advsearch.commands.harden import harden as run_harden
    from advsearch.files import sha256_file
    from advsearch.model.checkpoint import load_model
    from advsearch.model.weights_cache import resolve_model_path
    from advsearch.regress.suite import read_run, read_suite
    from advsearch.regress.testing import evaluate_suite
    from advsearch.search.results import prepare_dir

    model_path = resolve_model_path(model)
    before = load_model(model_path)
    s = read_suite(suite_path, before.spec)
    failures = [e.sequence for e in s.entries if e.kind == "failure"]
    for run_dir in from_runs:
        failures += [row["sequence"] for row in read_run(run_dir).rows]
    if out.resolve() == model_path.resolve():
        raise AdvsearchError("--out must differ from the model being hardened")
    prepare_dir(out.parent if str(out.parent) else Path("."))
    mine = tuple(m for m in mine if m != "none")
    options = HardenOptions(steps=steps, batch_size=batch_size, lr=lr, mix=mix, focus=focus, eval_every=eval_every,
                            seed=seed, mine=tuple(mine), mine_every=mine_every, mine_budget=mine_budget)  # fmt: skip
    provenance = {"suite": str(suite_path), "suite_csv_sha256": sha256_file(suite_path),
                  "from_runs": [str(r) for r in from_runs]}  # fmt: skip
    info = run_harden(model_path, failures, out, options, progress=not quiet, provenance=provenance)
    b, a = info["before"], info["after"]
    click.echo(f"saved {out} (+ {out}.json): step {info['selected_step']} of {steps} selected; validation accuracy "
               f"{b['val_accuracy']:.4%} -> {a['val_accuracy']:.4%}, held-out relabelled-failure accuracy "
               f"{b['failure_accuracy']:.2%} -> {a['failure_accuracy']:.2%}"
               + (f"; {info['recipe']['mined_prefixes']:,} failures mined with {', '.join(mine)}" if mine else ""))  # fmt: skip
    after = load_model(out)
    for title, m in (("before", before), ("after", after)):
        click.echo(f"\n== regress {title} ==")
        click.echo(evaluate_suite(m, s, device=device).format_text(limit=5))
    click.echo("\n(note: the suite's failures were trained on, relabelled; its pass rate after hardening is in-sample."
               " Use `advsearch compare` and a suite built from fresh runs for out-of-sample numbers.)")
