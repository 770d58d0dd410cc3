"""File helpers shared by every layer: atomic writes, JSON, and the sha256 that identifies
checkpoints and suites."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from advsearch.errors import AdvsearchError


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a sibling `<name>.tmp`, then rename it over `path`.

    Readers (and a run interrupted mid-write) see either the old file or the complete new one.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


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
