"""Errors the CLI reports as one line with exit status 2 (bad input, bad checkpoint, bad path)."""

from pathlib import Path


class AdvsearchError(Exception):
    """A user-facing error: the message is the whole story, no traceback."""


class RunExists(AdvsearchError):
    """An output folder already holds a run, and the caller asked neither to resume nor to replace it."""

    def __init__(self, out_dir: Path):
        super().__init__(f"{out_dir} already holds a run; resume it or replace it")
        self.out_dir = out_dir


class Interrupted(AdvsearchError):
    """A run was interrupted; what it found is on disk and resuming it continues from its last finished step."""

    exit_code = 130

    def __init__(self, message: str, out_dir: Path):
        super().__init__(message)
        self.out_dir = out_dir
