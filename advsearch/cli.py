"""The `advsearch` command line."""

from __future__ import annotations

import json
from pathlib import Path

import click

from . import __version__
from .cliutil import device_option, handle_errors, model_option


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="advsearch")
def main() -> None:
    """Find inputs that break a small algorithmic transformer, and explain why."""


def _strategy_names() -> list[str]:
    from strategies import STRATEGIES

    return list(STRATEGIES)


@main.command()
@click.option("--strategy", type=click.Choice(_strategy_names()), default="random", show_default=True)
@model_option
@click.option("--budget", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Sequences to evaluate (random).")
@click.option("--max-len", type=click.IntRange(min=1), default=5, show_default=True,
              help="Longest prefix, in tokens after '?' (exhaustive).")
@click.option("--prefix-sharing/--no-prefix-sharing", default=True, show_default=True,
              help="Exhaustive: compute each new prefix from its parent's cached keys/values.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: results/<run-id>).")
@device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="A failure is 'confident' when p(predicted) is at least this.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last finished batch.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in the output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def run(strategy, model, budget, max_len, prefix_sharing, seed, out, device, batch_size, min_confidence, resume, overwrite,
        quiet) -> None:  # fmt: skip
    """Search for failures with a strategy and write failures.csv and summary.json."""
    from strategies import RunConfig, make_strategy

    from .evaluator import Evaluator
    from .model import load_model
    from .runner import run_search

    if resume and out is None:
        raise click.UsageError("--resume needs --out (the folder of the run to continue)")
    loaded = load_model(model)
    config = RunConfig(budget=budget, seed=seed, max_len=max_len, batch_size=batch_size,
                       shared_prefixes=prefix_sharing)
    strat = make_strategy(strategy, loaded.spec, config)
    evaluator = Evaluator(loaded.weights, device=device, batch_size=batch_size)
    s = run_search(loaded, strat, out, evaluator, min_confidence=min_confidence, resume=resume,
                   overwrite=overwrite, progress=not quiet)  # fmt: skip
    rate = s["failures"] / s["positions"] if s["positions"] else 0.0
    click.echo(
        f"{s['strategy']}: evaluated {s['sequences']:,} sequences ({s['positions']:,} positions) "
        f"in {s['wall_seconds']:.1f} s; {s['failures']:,} failing prefixes ({rate:.3%} of positions), "
        f"{s['confident_failures']:,} confident (p_pred >= {min_confidence})."
    )
    click.echo(f"results: {Path(s['out_dir']) / 'failures.csv'}")
    for name in s["files"][1:]:
        click.echo(f"         {Path(s['out_dir']) / name}")


@main.command("eval")
@click.argument("sequences", nargs=-1, required=True)
@model_option
@handle_errors
def eval_cmd(sequences, model) -> None:
    """Per-position table for each SEQUENCE (e.g. '?acbba'): truth, prediction, probabilities."""
    from .evaluator import Evaluator
    from .judge import judge
    from .model import load_model

    loaded = load_model(model)
    spec = loaded.spec
    encoded = [spec.encode(s) for s in sequences]
    evaluator = Evaluator(loaded.weights, device="cpu")
    for text, toks in zip(sequences, encoded):
        j = judge(toks[None], evaluator.logits(toks[None]), spec.qmark)
        click.echo(f"{text}")
        click.echo("pos  in  true  pred  p_pred  p_true")
        for k in range(len(toks)):
            mark = "  <- FAIL" if j.failure[0, k] else ""
            click.echo(f"{k:>3}  {text[k]:>2}  {spec.vocab[j.true[0, k]]:>4}  {spec.vocab[j.pred[0, k]]:>4}  "
                       f"{float(j.p_pred[0, k]):6.4f}  {float(j.p_true[0, k]):6.4f}{mark}")  # fmt: skip
        n_fail = int(j.failure.sum())
        click.echo(f"{n_fail} failing position(s)\n" if n_fail else "all positions right\n")


@main.command()
@model_option
@device_option
@click.option("--sequences", "n", type=click.IntRange(min=1000), default=100_000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--census-len", type=click.IntRange(1, 8), default=5, show_default=True,
              help="Exhaustive census depth timed for prefixes/s.")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
@handle_errors
def bench(model, device, n, batch_size, census_len, as_json) -> None:
    """Throughput of the bridge vs the fused evaluator (same data, one run) and of the census."""
    from .bench import run_bench
    from .model import load_model

    r = run_bench(load_model(model), n=n, batch_size=batch_size, device=device, census_len=census_len)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"device {r['device']}, {r['torch_threads']} threads, {r['sequences']:,} sequences of "
               f"{r['seq_len']} tokens, batch {r['batch_size']}")  # fmt: skip
    click.echo(f"bridge   {r['bridge_seq_per_s']:>10,} seq/s")
    click.echo(f"fused    {r['fused_seq_per_s']:>10,} seq/s   ({r['ratio']}x the bridge, "
               f"max |dlogit| {r['max_abs_logit_diff']:.1e})")  # fmt: skip
    click.echo(f"census   {r['census_prefixes_per_s']:>10,} prefixes/s (every prefix up to {r['census_max_len']} tokens)")
    click.echo(f"peak RSS {r['peak_rss_mb']:>10,} MB")


@main.command()
@click.option("--epochs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True, help="Model initialisation seed.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("model.pt"), show_default=True)
@handle_errors
def train(epochs, seed, out) -> None:
    """Train a model with the challenge's recipe (100k sequences, Adam 1e-3, batch 512)."""
    from .results import prepare_dir
    from .train import train as train_model

    prepare_dir(out.parent if str(out.parent) else Path("."))
    info = train_model(epochs=epochs, init_seed=seed, out=out)
    click.echo(f"saved {out} (best epoch {info['best_epoch']}, validation accuracy {info['val_accuracy']:.4f})")


if __name__ == "__main__":
    main()
