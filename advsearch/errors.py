"""Errors the CLI reports as one line with exit status 2 (bad input, bad checkpoint, bad path)."""


class AdvsearchError(Exception):
    """A user-facing error: the message is the whole story, no traceback."""
