"""`advsearch mechanism` and `advsearch explain`; registered in cli.py with add_command."""

from __future__ import annotations

import json

import click

from advsearch.cli.options import handle_errors, model_option
from advsearch.errors import AdvsearchError


@click.command("mechanism")
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print the tables as JSON (schema: advsearch.mechanism.tables).")
@click.option("--dup-threshold", type=click.FloatRange(0, 1), default=0.30, show_default=True,
              help="diag(A) above this: the L0 head is a duplicate detector for the letter.")
@click.option("--anti-threshold", type=click.FloatRange(0, 1), default=0.04, show_default=True,
              help="diag(A) below this: the L0 head is an anti-duplicate detector for the letter.")
@handle_errors
def mechanism_cmd(model, as_json, dup_threshold, anti_threshold) -> None:
    """Detector and responsibility tables computed from the checkpoint's weights."""
    from advsearch.mechanism.tables import compute_tables
    from advsearch.model.checkpoint import load_model

    tables = compute_tables(load_model(model), dup_threshold=dup_threshold, anti_threshold=anti_threshold)
    click.echo(tables.to_json() if as_json else tables.format_text())


@click.command("explain")
@click.argument("sequence")
@click.option("--pos", "pos", type=int, default=None,
              help="Explain this position only (default: every failing position).")
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print the explanations as JSON.")
@click.option("--html", "html", type=click.Path(dir_okay=False), default=None,
              help="Also write the per-failure view (attention, probabilities, attribution) to this HTML file.")
@handle_errors
def explain_cmd(sequence, pos, model, as_json, html) -> None:
    """Explain why the model fails on SEQUENCE (e.g. '?jeejjfhadc'): attribution, category, causal check."""
    from advsearch.mechanism.explain import Explainer, failing_positions
    from advsearch.model.checkpoint import load_model

    loaded = load_model(model)
    toks = loaded.spec.encode(sequence)
    if pos is not None:
        if not 0 <= pos < len(toks):
            raise AdvsearchError(f"--pos {pos} is outside {sequence!r} (positions 0..{len(toks) - 1})")
        positions = [pos]
    else:
        positions = failing_positions(loaded, toks)
    explanations = Explainer(loaded).explain_many([(toks, k) for k in positions]) if positions else []
    if html is not None:
        from advsearch.reports.figures import write_explain_html

        size = write_explain_html(loaded, toks, positions, html)
        click.echo(f"wrote {html} ({size / 1e6:.1f} MB)", err=True)
    if as_json:
        click.echo(json.dumps({
            "sequence": sequence,
            "model": str(loaded.path),
            "failing_positions": failing_positions(loaded, toks),
            "explanations": [e.to_dict() for e in explanations],
        }, indent=2))  # fmt: skip
        return
    if not explanations:
        click.echo(f"{sequence}: no failing position; the model is right at all {len(toks)} positions")
        return
    click.echo("\n\n".join(e.format_text() for e in explanations))
