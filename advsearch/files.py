"""File helpers shared by every layer: atomic writes, JSON, and the sha256 that identifies
checkpoints and suites."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from advsearch.errors import AdvsearchError


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a sibling temporary file, then rename it over `path`.

    Readers (and a run interrupted mid-write) see either the old file or the complete new one. The
    temporary name is unique to this call, so processes writing the same file (two runs filling one
    weights cache entry, say) do not write into each other's temporary file; it is removed if
    `write` or the rename fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (how checkpoints and suites are identified)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdvsearchError(f"cannot read {path}: {e}") from None
