"""Where the checkpoint and its processed-weights cache live, and the cache file format, without torch.

Processing a checkpoint (`advsearch.model.checkpoint`) needs torch, whose import alone takes about a second,
while the processed weights are a few kB. They are therefore cached as one `.npz` file
per checkpoint: float32 arrays under the `advsearch.model.checkpoint.Weights` field names, plus `eps` and `key`
(the JSON of `cache_key`). numpy reads that format, so `advsearch eval` can find and use the weights
without importing torch (`advsearch.model.numpy_eval`), and `advsearch.model.checkpoint` turns the same arrays into
tensors.

A file is used only when it loads without pickle, records the same key, and holds every array with
the expected shape, a floating dtype and finite values; anything else is reported as absent (and
rebuilt by `advsearch.model.checkpoint.load_model`). A cache folder that cannot be written is skipped.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path

import numpy as np

from advsearch import __version__
from advsearch.files import write_atomic
from advsearch.model.spec import ModelSpec

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).parents[1] / "data" / "default_model.pt"
# The files whose code decides what a cache file holds: the processing and this format. Their hash is
# part of the key, so an edit during development cannot serve stale weights.
CODE_FILES = ("checkpoint.py", "weights_cache.py")
FORMAT = 2  # 1 was a torch.save file (weights-*.pt)


def resolve_model_path(model: str | Path | None) -> Path:
    """`--model` > `$ADVSEARCH_MODEL` > the embedded default checkpoint."""
    if model:
        return Path(model)
    if os.environ.get("ADVSEARCH_MODEL"):
        return Path(os.environ["ADVSEARCH_MODEL"])
    return DEFAULT_MODEL


def processed_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Weights field -> shape of the processed tensors for this spec (what a cache file must hold)."""
    d, h, dh, v, n, L = spec.d_model, spec.n_heads, spec.d_head, spec.d_vocab, spec.seq_len, spec.n_layers
    shapes = {"W_E": (v, d), "W_pos": (n, d), "W_O": (L, h, dh, d), "b_O": (L, d), "W_U": (d, v), "b_U": (v,)}
    for m in "QKV":
        shapes |= {f"W_{m}": (L, h, d, dh), f"b_{m}": (L, h, dh)}
    return shapes


def cache_dir() -> Path:
    """Where processed weights are cached: `$ADVSEARCH_CACHE_DIR`, else `$XDG_CACHE_HOME/advsearch`,
    else `~/.cache/advsearch`."""
    if os.environ.get("ADVSEARCH_CACHE_DIR"):
        return Path(os.environ["ADVSEARCH_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "advsearch"
    return Path.home() / ".cache" / "advsearch"


def cache_enabled() -> bool:
    """False when `$ADVSEARCH_NO_CACHE` is set to anything but empty or 0."""
    return os.environ.get("ADVSEARCH_NO_CACHE", "") in ("", "0")


def _version(package: str) -> str:
    """A package's installed version from its metadata (without importing it), or 'none'."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_key(sha256: str, spec: ModelSpec) -> dict:
    """Everything the processed weights depend on: the checkpoint's bytes, its spec and the code.

    The code is the installed advsearch, torch and TransformerLens versions (read from package
    metadata, so that computing the key imports neither) plus a hash of `CODE_FILES`.
    """
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in CODE_FILES)).hexdigest()[:16]
    return {"format": FORMAT, "sha256": sha256, "spec": spec.to_dict(), "advsearch": __version__, "model_code": code,
            "torch": _version("torch"), "transformer_lens": _version("transformer-lens")}  # fmt: skip


def cache_path(key: dict) -> Path:
    """The cache file for `key` (one file per checkpoint and environment)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"weights-{key['sha256'][:16]}-{digest[:16]}.npz"


def read_cache_arrays(key: dict, spec: ModelSpec) -> tuple[dict[str, np.ndarray], float] | None:
    """(arrays by Weights field name, eps) cached for `key`, or None when there are none usable.

    A file that is not an npz readable without pickle, records another key, lacks or adds an
    array, has a wrong shape or a non-floating dtype, or holds non-finite values is not trusted.
    """
    try:
        path = cache_path(key)  # RuntimeError when there is no home folder to put it in
        with np.load(path, allow_pickle=False) as npz:
            payload = {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        return None
    except Exception as e:  # unreadable or corrupt (zip, npy header, pickle refused): rebuild
        log.debug("ignoring the weights cache: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    trusted = _trusted(payload, key, spec)
    if trusted is None:
        log.debug("ignoring weights cache %s: its key or arrays do not match", path)
    return trusted


def _trusted(payload: dict[str, np.ndarray], key: dict, spec: ModelSpec) -> tuple[dict[str, np.ndarray], float] | None:
    """The (arrays, eps) of a loaded payload if it is the weights for `key`, else None."""
    shapes = processed_shapes(spec)
    try:
        if set(payload) != set(shapes) | {"key", "eps"} or json.loads(str(payload["key"])) != key:
            return None
        eps = float(payload["eps"])
        if not 0 < eps < 1:
            return None
        arrays = {n: payload[n] for n in shapes}
        ok = all(
            a.shape == shapes[n] and np.issubdtype(a.dtype, np.floating) and bool(np.isfinite(a).all())
            for n, a in arrays.items()
        )  # fmt: skip
        return (arrays, eps) if ok else None
    except Exception:  # a key that is not JSON, an eps that is not a number
        return None


def write_cache_arrays(key: dict, arrays: dict[str, np.ndarray], eps: float) -> None:
    """Store `arrays` and `eps` under `key` (`advsearch.files.write_atomic`); skip quietly if the cache
    folder cannot be made or written."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: given a path, np.savez would append ".npz" to it
            np.savez(f, key=np.array(json.dumps(key, sort_keys=True)), eps=np.array(float(eps)),
                     **{n: np.ascontiguousarray(a) for n, a in arrays.items()})  # fmt: skip

    try:
        path = cache_path(key)  # RuntimeError when there is no home folder to put it in
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, write)
    except (OSError, RuntimeError) as e:  # no home, unwritable folder, full disk: run without the cache
        log.debug("not caching the processed weights: %s", e)
