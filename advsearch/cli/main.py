"""The `advsearch` command line."""

from __future__ import annotations

import functools
import json
import typing
from dataclasses import fields
from pathlib import Path

import click

from advsearch import __version__
from advsearch.cli.mechanism import explain_cmd, mechanism_cmd
from advsearch.cli.options import device_option, handle_errors, model_option, workers_option
from advsearch.cli.reports import audit_cmd, report_cmd
from advsearch.cli.suites import compare, harden, regress, suite
from advsearch.errors import AdvsearchError, Interrupted, RunExists
from advsearch.model.determinism import eval_threads
from advsearch.search.configs import STRATEGY_CONFIGS, ConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="advsearch")
def main() -> None:
    """Find inputs that break a small algorithmic transformer, and explain why."""


# The names in strategies.STRATEGIES, from their configs, so that building the CLI (and `--help`) does not
# import the strategies and with them torch; a test keeps the two equal.
STRATEGY_NAMES = tuple(STRATEGY_CONFIGS)
# Options of `run` that every strategy with the field gets, and that the others ignore (as before the configs).
RUN_LEVEL_FIELDS = ("budget", "seed", "batch_size")


def _config_options() -> dict[str, tuple[object, list[str]]]:
    """Each strategy-specific config field (name -> its dataclasses.Field and the strategies that have it)."""
    found: dict[str, tuple[object, list[str]]] = {}
    for name, config_class in STRATEGY_CONFIGS.items():
        for f in fields(config_class):
            if f.name not in RUN_LEVEL_FIELDS:
                found.setdefault(f.name, (f, []))[1].append(name)
    return found


CONFIG_OPTIONS = _config_options()


def option_flag(field_name: str) -> str:
    """The `run` option of a config field (`max_len` -> `--max-len`, `shared_prefixes` -> `--prefix-sharing`)."""
    entry = CONFIG_OPTIONS.get(field_name)
    meta = entry[0].metadata if entry else {}
    return "--" + meta.get("flag", field_name.replace("_", "-"))


def _strategies_phrase(names) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _click_option(f, strategies: list[str]):
    """A click option built from config field `f` (type, default and help from the dataclass)."""
    meta, flag, text = f.metadata, option_flag(f.name), f.metadata.get("help", "")
    if text and not (len(text.split()[0]) > 1 and text.split()[0].isupper()):  # "Aim at" -> "aim at"; "TPE" stays
        text = text[0].lower() + text[1:]
    help_text = f"{'/'.join(strategies)}: {text}"
    args = typing.get_args(f.type)
    base = next(t for t in args if t is not type(None)) if type(None) in args else f.type  # X | None -> X
    if base is bool and f.default:
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=True, show_default=True, help=help_text)
    if base is bool:
        return click.option(flag, f.name, is_flag=True, default=False, help=help_text)
    if meta.get("csv"):
        kind = str
    elif "choices" in meta:
        kind = click.Choice(list(meta["choices"]))
    elif base is int:
        kind = click.IntRange(meta.get("min"), meta.get("max")) if "min" in meta or "max" in meta else int
    elif base is float:
        kind = click.FloatRange(meta.get("min"), meta.get("max")) if "min" in meta or "max" in meta else float
    else:
        kind = str
    return click.option(flag, f.name, type=kind, default=f.default, show_default=f.default is not None,
                        help=help_text)  # fmt: skip


def config_options(fn):
    """Decorate `run` with one option per strategy-specific config field, in the configs' order."""
    for f, strategies in reversed(list(CONFIG_OPTIONS.values())):
        fn = _click_option(f, strategies)(fn)
    return fn


def _run_level_help(field_name: str, text: str) -> str:
    having = [n for n, c in STRATEGY_CONFIGS.items() if field_name in c.__dataclass_fields__]
    return f"{text} ({', '.join(having)})."


def _batch_size_help() -> str:
    defaults = ", ".join(f"{n} {c.__dataclass_fields__['batch_size'].default}" for n, c in STRATEGY_CONFIGS.items())
    return ("Sequences per batch (exhaustive: prefixes per chunk; optuna: trials asked per batch). "
            f"Default: {defaults}.")  # fmt: skip


def _check_strategy_options(ctx: click.Context, strategy: str) -> None:
    """A usage error for each strategy option given on the command line that the chosen strategy has not."""
    misplaced: dict[tuple[str, ...], list[str]] = {}
    for name, (_, strategies) in CONFIG_OPTIONS.items():
        source = ctx.get_parameter_source(name)
        if strategy not in strategies and source not in (None, click.core.ParameterSource.DEFAULT):
            misplaced.setdefault(tuple(strategies), []).append(option_flag(name))
    if misplaced:
        raise click.UsageError("; ".join(
            f"{', '.join(flags)} only appl{'ies' if len(flags) == 1 else 'y'} to --strategy {_strategies_phrase(s)}"
            for s, flags in misplaced.items()))  # fmt: skip


def flag_errors(fn):
    """Name the option behind a strategy's ConfigError (`--max-len: ...`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            raise AdvsearchError(f"{option_flag(e.field)}: {e}") from None

    return wrapper


def build_config(strategy: str, run_level: dict, options: dict):
    """The config of `strategy` from the run-level options (None: the strategy's default) and its own options."""
    config_class = STRATEGY_CONFIGS[strategy]
    values = {k: v for k, v in run_level.items() if v is not None} | options
    own = {}
    for f in fields(config_class):
        if f.name in values:
            v = values[f.name]
            own[f.name] = (v.split(",") if v else None) if f.metadata.get("csv") else v
    return config_class(**own)


@main.command()
@click.option("--strategy", type=click.Choice(STRATEGY_NAMES), default="random", show_default=True)
@model_option
@click.option("--budget", type=click.IntRange(min=1), default=10_000, show_default=True,
              help=_run_level_help("budget", "Sequences to evaluate"))
@click.option("--seed", type=int, default=0, show_default=True, help=_run_level_help("seed", "Seed"))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: results/<run-id>).")
@device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help=_batch_size_help())
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="A failure is 'confident' when p(predicted) is at least this.")
@config_options
@click.option("--compare-random", is_flag=True,
              help="Also run the random baseline with the same budget and print the yield ratio.")
@click.option("--explain/--no-explain", default=True, show_default=True,
              help="Add explanation columns (category, responsible heads, load, deciding path, causal check).")
@click.option("--minimize", "minimize_rows", is_flag=True,
              help="Add a `minimized` column: each failure shrunk by `advsearch minimize`.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last finished batch.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in the output folder.")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="exhaustive: 'ray' shards the prefix tree onto Ray tasks (same results; needs advsearch[ray]).")
@click.option("--ray-address", default=None,
              help="--backend ray: the cluster to join (auto, HOST:PORT, ray://HOST:10001); default: a local Ray.")
@workers_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
@handle_errors
@flag_errors
@eval_threads()  # from loading the checkpoint to the last row, the results do not depend on the thread count
def run(ctx, strategy, model, budget, seed, out, device, batch_size, min_confidence, compare_random, explain,
        minimize_rows, resume, overwrite, backend, ray_address, workers, quiet, **options) -> None:  # fmt: skip
    """Search for failures with a strategy and write failures.csv and summary.json.

    The options whose help starts with strategy names (random/local/optuna: ...) are the fields of those
    strategies' configs (advsearch/search/configs.py), and apply to those strategies only.
    """
    from advsearch.commands.setup import prepare_search
    from advsearch.model.checkpoint import load_model
    from advsearch.search.runner import run_search
    from advsearch.search.workers import auto_workers

    if resume and out is None:
        raise click.UsageError("--resume needs --out (the folder of the run to continue)")
    _check_strategy_options(ctx, strategy)
    if backend == "ray" and strategy != "exhaustive":
        raise click.UsageError("--backend ray applies to --strategy exhaustive")
    if backend == "ray" and not options["shared_prefixes"]:
        raise click.UsageError("--backend ray shards the prefix-sharing tree; drop --no-prefix-sharing")
    if ray_address is not None and backend != "ray":
        raise click.UsageError("--ray-address needs --backend ray")
    loaded = load_model(model)
    ray_backend = None
    if backend == "ray":
        from advsearch.commands.scaleout import RayBackend

        ray_backend = RayBackend(ray_address, device)
    config = build_config(strategy, {"budget": budget, "seed": seed, "batch_size": batch_size}, options)
    search = prepare_search(loaded, strategy, config, device=device, explain=explain, minimize=minimize_rows)
    strat, evaluator = search.strategy, search.evaluator
    try:
        s = run_search(loaded, strat, out, evaluator, min_confidence=min_confidence, resume=resume,
                       overwrite=overwrite, annotators=search.annotators, progress=not quiet,
                       backend=ray_backend, workers=workers or auto_workers(evaluator.device))  # fmt: skip
    except RunExists as e:
        raise AdvsearchError(f"{e.out_dir} already holds a run; --resume continues it, --overwrite replaces it") from None
    except Interrupted as e:
        raise Interrupted(f"{e}; continue with --resume --out {e.out_dir}", e.out_dir) from None
    # Every file is written before the first line is printed: a reader that stops early (`| head -1`) ends the
    # output, not the work.
    baseline = None
    if compare_random:
        baseline = _compare_random(loaded, s, seed, config.batch_size, evaluator, min_confidence, quiet)
    if getattr(strat, "table", None) is not None:
        click.echo(strat.table.matrix())
    rate = s["failures"] / s["positions"] if s["positions"] else 0.0
    click.echo(
        f"{s['strategy']}: evaluated {s['sequences']:,} sequences ({s['positions']:,} positions) "
        f"in {s['wall_seconds']:.1f} s; {s['failures']:,} failing prefixes ({rate:.3%} of positions), "
        f"{s['confident_failures']:,} confident (p_pred >= {min_confidence})."
    )
    if "families.csv" in s["tables"]:
        click.echo(f"{'family':<18}{'sequences':>10}{'confident failure':>19}{'yield':>8}")
        for r in s["tables"]["families.csv"]:
            click.echo(f"{r['family']:<18}{r['sequences']:>10,}{r['confident_failures']:>19,}{r['yield']:>8.1%}")
    click.echo(f"yield: {s['yield']:.2%} of sequences have a failure with p_pred >= {s['yield_confidence']}")
    if s.get("audit") and s["audit"][0]["failures"]:
        a = s["audit"][0]
        n = a["failures"]
        click.echo(f"explanations: {a['confirmed'] / n:.1%} confirmed, {a['specific'] / n:.1%} specific (the control "
                   f"did not fix them); per category: advsearch audit {s['out_dir']}")  # fmt: skip
    if baseline:
        click.echo(baseline)
    click.echo(f"results: {Path(s['out_dir']) / 'failures.csv'}")
    for name in s["files"][1:]:
        click.echo(f"         {Path(s['out_dir']) / name}")


def _compare_random(loaded, s: dict, seed: int, batch_size: int, evaluator, min_confidence: float,
                    quiet: bool) -> str:  # fmt: skip
    """Run the random baseline with the same budget into <out>/random-baseline, record the yield ratio in the
    summary and return the line that reports it."""
    from advsearch.files import write_json
    from advsearch.search.configs import RandomConfig
    from advsearch.search.runner import run_search
    from strategies import make_strategy

    baseline = make_strategy("random", loaded.spec, RandomConfig(budget=s["sequences"], seed=seed,
                                                                 batch_size=batch_size))  # fmt: skip
    b = run_search(loaded, baseline, Path(s["out_dir"]) / "random-baseline", evaluator,
                   min_confidence=min_confidence, overwrite=True, progress=not quiet)  # fmt: skip
    ratio = s["yield"] / b["yield"] if b["yield"] else float("inf")
    s["compare_random"] = {"random_yield": b["yield"], "random_sequences": b["sequences"], "yield_ratio": ratio,
                           "random_out_dir": b["out_dir"]}  # fmt: skip
    write_json(Path(s["out_dir"]) / "summary.json", s)
    return (f"random baseline ({b['sequences']:,} sequences): yield {b['yield']:.2%}; "
            f"{s['strategy']} / random = {ratio:.1f}x")


@main.command("eval")
@click.argument("sequences", nargs=-1, required=True)
@model_option
@handle_errors
def eval_cmd(sequences, model) -> None:
    """Per-position table for each SEQUENCE (e.g. '?acbba'): truth, prediction, probabilities."""
    from advsearch.model.numpy_eval import eval_lines

    click.echo("\n".join(eval_lines(sequences, model)))


@main.command()
@click.argument("sequence")
@click.option("--pos", type=int, default=None, help="The failing position to keep (default: the first failing one).")
@model_option
@handle_errors
def minimize(sequence, pos, model) -> None:
    """Shrink a failing SEQUENCE while it fails with the same (true, predicted) kind."""
    from advsearch.model.checkpoint import load_model
    from advsearch.model.evaluator import Evaluator
    from advsearch.search.minimize import Minimizer

    loaded = load_model(model)
    m = Minimizer(Evaluator(loaded.weights, device="cpu"), loaded.spec).minimize(sequence, pos)
    click.echo(f"input      {m.original}  (true {m.kind[0]}, predicted {m.kind[1]})")
    click.echo(f"minimized  {m.sequence}  (fails at position {m.position}: true {m.minimized_kind[0]}, "
               f"predicted {m.minimized_kind[1]}, p_pred {m.p_pred:.4f})")  # fmt: skip
    if m.mapping:
        click.echo("renamed    " + ", ".join(f"{a}->{b}" for a, b in sorted(m.mapping.items())))
    click.echo(f"{len(m.original)} -> {len(m.sequence)} tokens, {m.evaluations} candidates judged")


@main.command()
@model_option
@device_option
@click.option("--sequences", "n", type=click.IntRange(min=1000), default=100_000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Sequences per forward call, for both the bridge and the fused evaluator.")
@click.option("--census-len", type=click.IntRange(1, 8), default=5, show_default=True,
              help="Exhaustive census depth timed for prefixes/s.")
@click.option("--guided-budget", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Sequences of the end-to-end guided runs (with and without explanations).")
@click.option("--startup-runs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Fresh `advsearch eval` processes timed for startup_s (the median is reported).")
@workers_option
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
@handle_errors
def bench(model, device, n, batch_size, census_len, guided_budget, startup_runs, workers, as_json) -> None:
    """Throughput of the bridge vs the fused evaluator (same data, one run), of the census and of
    `run --strategy guided` end to end, and the start-up time of `advsearch eval`."""
    from advsearch.commands.bench import run_bench
    from advsearch.model.checkpoint import load_model

    r = run_bench(load_model(model), n=n, batch_size=batch_size, device=device, census_len=census_len,
                  guided_budget=guided_budget, startup_runs=startup_runs, workers=workers)  # fmt: skip
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"device {r['device']}, {r['torch_threads']} threads, {r['sequences']:,} sequences of "
               f"{r['seq_len']} tokens, batch {r['batch_size']}")  # fmt: skip
    click.echo(f"bridge   {r['bridge_seq_per_s']:>10,} seq/s")
    click.echo(f"fused    {r['fused_seq_per_s']:>10,} seq/s   ({r['ratio']}x the bridge, "
               f"max |dlogit| {r['max_abs_logit_diff']:.1e})")  # fmt: skip
    w = f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}"
    click.echo(f"census   {r['census_prefixes_per_s']:>10,} prefixes/s ({r['census_ratio']}x fused; every prefix up to "
               f"{r['census_max_len']} tokens, {w}; {r['census_one_worker_prefixes_per_s']:,} with one)")  # fmt: skip
    click.echo(f"guided   {r['guided_seq_per_s']:>10,} seq/s   ({r['guided_ratio']:.0%} of fused; run --no-explain "
               f"end to end, {r['guided_sequences']:,} sequences, set-up {r['guided_setup_s']} s)")  # fmt: skip
    click.echo(f"explained{r['guided_explained_seq_per_s']:>10,} seq/s   ({r['guided_explained_ratio']:.0%} of fused; "
               f"run with explanations, {w}; {r['guided_explained_one_worker_seq_per_s']:,} with one; set-up "
               f"{r['guided_explained_setup_s']} s)")  # fmt: skip
    cache = "warm" if r["startup_warm_cache"] else "no"
    click.echo(f"start-up {r['startup_s']:>10.2f} s       (advsearch eval, median of {r['startup_runs']}, {cache} "
               f"weights cache)")  # fmt: skip
    click.echo(f"cold     {r['startup_cold_s']:>10.2f} s       (the same with an empty weights cache)")
    click.echo(f"peak RSS {r['peak_rss_mb']:>10,} MB")


@main.command()
@click.option("--epochs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True, help="Model initialisation seed.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("model.pt"), show_default=True)
@handle_errors
def train(epochs, seed, out) -> None:
    """Train a model with the challenge's recipe (100k sequences, Adam 1e-3, batch 512)."""
    from advsearch.model.train import train as train_model
    from advsearch.search.results import prepare_dir

    prepare_dir(out.parent if str(out.parent) else Path("."))
    info = train_model(epochs=epochs, init_seed=seed, out=out)
    click.echo(f"saved {out} (best epoch {info['best_epoch']}, validation accuracy {info['val_accuracy']:.4f})")


main.add_command(mechanism_cmd)
main.add_command(explain_cmd)
main.add_command(report_cmd)
main.add_command(audit_cmd)
for command in (suite, regress, compare, harden):
    main.add_command(command)

if __name__ == "__main__":
    main()
