"""Shared click plumbing: common options and the error policy (one line, exit 2 for bad input)."""

from __future__ import annotations

import functools
import os
import sys

import click

from advsearch.errors import AdvsearchError

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

workers_option = click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes: the census is split into shards over them, explanations and minimization "
    "run on them while the search goes on, and a run without either shares each batch with them; the "
    "results are the same for any count. Default: the usable "
    "CPU cores (at most 8) on the CPU, 1 (this process) on a GPU or where processes cannot be forked.",
)


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit."""
    click.echo(f"advsearch: error: {message}", err=True)
    sys.exit(code)


# The exit status of a command whose reader closed its standard output early (128 + SIGPIPE), as the shell
# reports for `cat`, `yes` and other tools that the closed pipe ends.
BROKEN_PIPE_EXIT = 141


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on it); True when it cannot tell."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return True


def quiet_broken_pipe() -> None:
    """The reader of stdout went away (`advsearch run ... | head -1`): stop writing, say nothing, exit 141.

    stdout is pointed at /dev/null first, so that Python's own flush at exit finds nothing to complain about.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor behind stdout (tests capturing it)
        pass
    sys.exit(BROKEN_PIPE_EXIT)


def handle_errors(fn):
    """Turn AdvsearchError into one line + exit 2, other errors into one line + exit 1, a closed stdout into exit 141."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError as e:
            if not stdout_reader_gone():  # another pipe (a socket to a worker, say): a real error
                fail(f"unexpected BrokenPipeError: {e}", 1)
            quiet_broken_pipe()
        except AdvsearchError as e:
            fail(str(e), getattr(e, "exit_code", 2))
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:  # unexpected: still one line, exit 1
            fail(f"unexpected {type(e).__name__}: {e}", 1)

    return wrapper
