"""Shared click plumbing: common options and the error policy (one line, exit 2 for bad input)."""

from __future__ import annotations

import functools
import sys

import click

from .errors import AdvsearchError

model_option = click.option(
    "--model",
    "model",
    type=str,
    default=None,
    help="Checkpoint path (default: $ADVSEARCH_MODEL, else the embedded default model).",
)
device_option = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the evaluator runs (auto = cuda when available).",
)


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit."""
    click.echo(f"advsearch: error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Turn AdvsearchError into one line + exit 2, other errors into one line + exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AdvsearchError as e:
            fail(str(e), getattr(e, "exit_code", 2))
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:  # unexpected: still one line, exit 1
            fail(f"unexpected {type(e).__name__}: {e}", 1)

    return wrapper
