"""`advsearch report`; registered in cli.py with add_command. `explain --html` lives in cli_mechanism."""

from __future__ import annotations

import time
from pathlib import Path

import click

from advsearch.cli.options import handle_errors


@click.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML file to write (default: RUN_DIR/report.html).")
@click.option("--top", type=click.IntRange(0, 100), default=10, show_default=True,
              help="Failures shown in full (attention, probabilities, attribution), most confident first.")
@click.option("--model", "model", type=str, default=None,
              help="The run's checkpoint (default: the one recorded in summary.json, else $ADVSEARCH_MODEL, "
                   "else the embedded default); its sha256 must match the run's.")
@handle_errors
def report_cmd(run_dir, out, top, model) -> None:
    """Write a self-contained HTML report of the run in RUN_DIR (opens offline in any browser).

    The model is --model if given, else the checkpoint recorded in summary.json; it must be the run's
    model (same sha256).
    """
    from advsearch.reports.report import write_report

    start = time.perf_counter()
    path, size = write_report(run_dir, out, top, model)
    click.echo(f"report: {path} ({size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)")


@click.command("audit")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@handle_errors
def audit_cmd(run_dir, as_json) -> None:
    """How the explanations of the run in RUN_DIR hold: per category and per family (or strategy),
    failures checked, confirmed and specific (confirmed while the control did not fix), and the median
    effect of the named intervention against that of its control."""
    import json

    from advsearch.search.audit import audit_run, format_audit

    table = audit_run(run_dir)
    click.echo(json.dumps(table, indent=2) if as_json else format_audit(table))
