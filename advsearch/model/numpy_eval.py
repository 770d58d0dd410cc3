"""`advsearch eval` without torch: a numpy forward over the processed weights, and the per-position table.

Importing torch takes seconds, far more than evaluating a handful of sequences, so `eval_lines`
first looks the processed weights up in the cache (`advsearch.model.weights_cache`): it resolves
the checkpoint, hashes its bytes and reads its spec. A cache entry exists only for a checkpoint
whose exact bytes were validated against that spec when the entry was written, so a hit needs no
re-validation. On a miss, or with the cache disabled, it loads the checkpoint with torch
(`advsearch.model.checkpoint.load_model`, which validates it and writes the entry). Either way the
tables come from the same numpy forward, so what `eval` prints does not depend on the cache.

`forward` is the maths of `advsearch.model.evaluator.fused_forward` in numpy: embeddings plus
positions, then per layer a LayerNorm without affine (its weights are folded into the processed
weights), q/k/v, causal softmax attention per head and W_O, then the final LayerNorm and W_U. It
computes in float64 from the float32 weights, so its logits differ from the evaluator's by the
evaluator's own float32 rounding (of the order of 1e-4 in logits of magnitude tens; the evaluator
and the TransformerLens bridge differ by as much): a probability printed to 4 decimals can differ
from a float32 computation's in its last digit, and the verdicts only where two logits are that close.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from advsearch.errors import AdvsearchError
from advsearch.files import sha256_file
from advsearch.model.oracle import first_unique_reference
from advsearch.model.spec import ModelSpec
from advsearch.model.weights_cache import cache_enabled, cache_key, read_cache_arrays, resolve_model_path


def layer_norm(x: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis without scale or bias: (x - mean) / sqrt(biased var + eps)."""
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred * centred).mean(-1, keepdims=True) + eps)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (max subtracted first; -inf entries get probability 0)."""
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def forward(w: dict[str, np.ndarray], eps: float, ids: list[int]) -> np.ndarray:
    """Logits [seq, vocab] (float64) of one sequence of token ids, from processed weights `w` (the
    arrays of `advsearch.model.checkpoint.Weights`: W_Q [layer, head, d_model, d_head], W_O [layer, head,
    d_head, d_model], ...)."""
    f = {n: np.asarray(a, dtype=np.float64) for n, a in w.items()}
    n_layers, n_heads, _, d_head = f["W_Q"].shape
    seq = len(ids)
    x = f["W_E"][ids] + f["W_pos"][:seq]
    blocked = np.triu(np.ones((seq, seq), dtype=bool), 1)  # key after query
    for layer in range(n_layers):
        xn = layer_norm(x, eps)
        out = x + f["b_O"][layer]
        for h in range(n_heads):
            q = xn @ f["W_Q"][layer, h] + f["b_Q"][layer, h]
            k = xn @ f["W_K"][layer, h] + f["b_K"][layer, h]
            v = xn @ f["W_V"][layer, h] + f["b_V"][layer, h]
            scores = np.where(blocked, -np.inf, (q @ k.T) * d_head**-0.5)
            out = out + (softmax(scores) @ v) @ f["W_O"][layer, h]
        x = out
    return layer_norm(x, eps) @ f["W_U"] + f["b_U"]


def table_lines(text: str, vocab: str, true: list[int], pred: list[int], p_pred: list[float],
                p_true: list[float]) -> list[str]:  # fmt: skip
    """The lines `advsearch eval` prints for one sequence."""
    lines = [text, "pos  in  true  pred  p_pred  p_true"]
    failures = 0
    for k in range(len(text)):
        fail = true[k] != pred[k]
        failures += fail
        lines.append(f"{k:>3}  {text[k]:>2}  {vocab[true[k]]:>4}  {vocab[pred[k]]:>4}  "
                     f"{p_pred[k]:6.4f}  {p_true[k]:6.4f}{'  <- FAIL' if fail else ''}")  # fmt: skip
    lines.append(f"{failures} failing position(s)\n" if failures else "all positions right\n")
    return lines


def judged_table(text: str, spec: ModelSpec, w: dict[str, np.ndarray], eps: float) -> list[str]:
    """`table_lines` for `text`, judged from the numpy forward as `advsearch.model.judge.judge` does: the
    prediction is the first argmax of the logits, the probabilities their softmax."""
    ids = spec.token_ids(text)
    probs = softmax(forward(w, eps, ids))
    true, pred = first_unique_reference(ids, spec.qmark), [int(i) for i in probs.argmax(-1)]
    return table_lines(text, spec.vocab, true, pred, [float(probs[k, pred[k]]) for k in range(len(ids))],
                       [float(probs[k, true[k]]) for k in range(len(ids))])  # fmt: skip


def cached_weights(model: str | Path | None) -> tuple[ModelSpec, dict[str, np.ndarray], float] | None:
    """(spec, processed arrays, eps) of the checkpoint `model` resolves to, from the cache; None on a
    miss, with the cache disabled, or when the spec cannot be read (the torch path then reports it).

    A missing checkpoint is a one-line AdvsearchError, as `advsearch.model.checkpoint.read_state_dict` says it.
    """
    path = resolve_model_path(model)
    if not path.exists():
        raise AdvsearchError(f"checkpoint not found: {path}")
    if not cache_enabled():
        return None
    try:
        spec = ModelSpec.for_checkpoint(path)
        key = cache_key(sha256_file(path), spec)
    except (AdvsearchError, OSError, TypeError, ValueError):  # a bad sidecar or an unreadable file
        return None
    cached = read_cache_arrays(key, spec)
    return None if cached is None else (spec, *cached)


def eval_lines(sequences: list[str], model: str | Path | None) -> list[str]:
    """Every line `advsearch eval` prints for `sequences` on the checkpoint `model` resolves to, from
    the cached weights when there are some (no torch), else from the checkpoint loaded with torch.
    An invalid sequence is a one-line AdvsearchError, raised before anything is printed."""
    found = cached_weights(model)
    if found is None:
        from advsearch.model.checkpoint import load_model

        loaded = load_model(model)
        found = (loaded.spec, loaded.weights.arrays(), loaded.weights.eps)
    spec, w, eps = found
    w = {n: np.asarray(a, dtype=np.float64) for n, a in w.items()}  # once, not per sequence (`forward` reuses them)
    for text in sequences:
        spec.token_ids(text)
    return [line for text in sequences for line in judged_table(text, spec, w, eps)]
