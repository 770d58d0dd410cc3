"""`advsearch bench`: throughput of the bridge, the fused evaluator, the exhaustive census and the
guided search with and without explanations (both searches end to end, as `run` does them), and the
start-up time of `advsearch eval`."""

from __future__ import annotations

import contextlib
import io
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from advsearch.errors import AdvsearchError
from advsearch.model.checkpoint import LoadedModel, read_cached_weights
from advsearch.model.evaluator import Evaluator, resolve_device
from advsearch.model.weights_cache import cache_enabled, cache_key


def _rate(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def startup_seconds(model: LoadedModel, runs: int = 3, cold: bool = False) -> float:
    """Median wall time of `python -m advsearch.cli.main eval SEQ --model PATH` in a fresh process.

    It is what a user waits for before any work. With the processed weights cached (as `run_bench`
    leaves them), `eval` hashes the checkpoint and runs a numpy forward without importing torch
    (`advsearch.numpy_eval`); without them (`cold`: each run gets an empty cache folder) it imports
    torch, validates the checkpoint and processes it.
    """
    spec = model.spec
    seq = ("?" + "".join(spec.vocab[i % spec.n_letters] for i in (0, 1, 2, 0, 1)))[: spec.seq_len]
    cmd = [sys.executable, "-m", "advsearch.cli.main", "eval", seq, "--model", str(model.path)]
    times = []
    for _ in range(runs):
        folder = tempfile.TemporaryDirectory(prefix="advsearch-bench-cache-") if cold else contextlib.nullcontext()
        with folder as empty:
            env = os.environ | ({"ADVSEARCH_CACHE_DIR": empty} if cold else {})
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            times.append(time.perf_counter() - start)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise AdvsearchError(f"start-up measurement failed: advsearch eval exited {done.returncode}: {last}")
    return statistics.median(times)


def guided_rate(model: LoadedModel, budget: int, device: str, explain: bool, workers: int) -> tuple[float, float]:
    """(sequences/s of the search loop, set-up seconds) for `run --strategy guided --budget B [--no-explain]`
    with `workers` worker processes.

    Set up through `advsearch.commands.setup.prepare_search`, as the `run` command does (the set-up, mostly
    the mechanism tables, is timed apart), then `run_search` writes failures.csv and summary.json
    into a temporary folder, so the rate includes judging, the CSV and (with `explain`) explanations.
    """
    from advsearch.commands.setup import prepare_search
    from advsearch.search.configs import GuidedConfig
    from advsearch.search.runner import run_search

    start = time.perf_counter()
    search = prepare_search(model, "guided", GuidedConfig(budget=budget, seed=0), device=device, explain=explain)
    setup = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="advsearch-bench-") as tmp:
        start = time.perf_counter()
        s = run_search(model, search.strategy, Path(tmp) / "guided", search.evaluator, annotators=search.annotators,
                       progress=False, workers=workers)  # fmt: skip
        wall = time.perf_counter() - start
    return s["sequences"] / wall, setup


def census_rate(model: LoadedModel, max_len: int, evaluator: Evaluator, workers: int) -> float:
    """Prefixes/s of `run --strategy exhaustive --max-len L --no-explain` (default chunks, prefix sharing)
    with `workers` worker processes: `run_search` with `evaluator`, failures.csv, census.csv and
    summary.json written into a temporary folder, so the rate includes judging and the CSV, computed with
    the run's fixed thread count."""
    from advsearch.search.configs import ExhaustiveConfig
    from advsearch.search.runner import run_search
    from strategies import make_strategy

    strategy = make_strategy("exhaustive", model.spec, ExhaustiveConfig(max_len=max_len))
    with tempfile.TemporaryDirectory(prefix="advsearch-bench-") as tmp:
        start = time.perf_counter()
        s = run_search(model, strategy, Path(tmp) / "census", evaluator, progress=False, workers=workers)
        wall = time.perf_counter() - start
    return s["sequences"] / wall


def run_bench(model: LoadedModel, n: int = 100_000, batch_size: int = 512, device: str = "auto",
              census_len: int = 5, guided_budget: int = 20_000, startup_runs: int = 3,
              workers: int | None = None) -> dict:  # fmt: skip
    """Measure everything in one process on the same data, so ratios are meaningful.

    The census and guided figures are end to end (`run` as users run it, with its default `workers`
    unless given, CSV written), so `census_ratio` (prefixes/s over the fused sequences/s, which the
    evaluator computes on one thread), `guided_ratio` and `guided_explained_ratio` say how much of the
    fused evaluator's speed reaches the user; the census and the explained run are also timed with
    one worker (`*_one_worker_*`), which is what one core gives. The start-up subprocesses run after
    `model` was loaded here, so they find the weights cache warm (`startup_warm_cache` says whether
    they did).
    """
    from advsearch.search.workers import auto_workers

    workers = workers or auto_workers(resolve_device(device))
    r = _throughput(model, n, batch_size, device, census_len, workers)
    guided, guided_setup = guided_rate(model, guided_budget, device, explain=False, workers=workers)
    explained, explained_setup = guided_rate(model, guided_budget, device, explain=True, workers=workers)
    explained_one = explained if workers == 1 else guided_rate(model, guided_budget, device, explain=True, workers=1)[0]
    warm = cache_enabled() and read_cached_weights(cache_key(model.sha256, model.spec), model.spec) is not None
    return r | {
        "guided_sequences": guided_budget,
        "guided_seq_per_s": round(guided),
        "guided_ratio": round(guided / r["fused_seq_per_s"], 3),
        "guided_setup_s": round(guided_setup, 2),
        "guided_explained_seq_per_s": round(explained),
        "guided_explained_ratio": round(explained / r["fused_seq_per_s"], 3),
        "guided_explained_one_worker_seq_per_s": round(explained_one),
        "guided_explained_setup_s": round(explained_setup, 2),
        "startup_s": round(startup_seconds(model, startup_runs), 2),
        "startup_runs": startup_runs,
        "startup_cold_s": round(startup_seconds(model, startup_runs, cold=True), 2),
        "startup_warm_cache": warm,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


@torch.inference_mode()
def _throughput(model: LoadedModel, n: int, batch_size: int, device: str, census_len: int, workers: int) -> dict:
    """Bridge vs fused evaluator on the same n sequences, and the prefix-sharing census."""
    tokens = model.spec.random_tokens(n, seed=0)
    evaluator = Evaluator(model.weights, device=device, batch_size=batch_size)
    with contextlib.redirect_stdout(io.StringIO()):  # the bridge announces device moves on stdout
        bridge = model.bridge.to(evaluator.device)
    evaluator.logits(tokens[:batch_size])  # warm-up
    bridge(tokens[:batch_size].to(evaluator.device))
    max_diff = float((evaluator.logits(tokens[:1000]) - bridge(tokens[:1000].to(evaluator.device)).cpu()).abs().max())
    bridge_rate = _rate(lambda: [bridge(c.to(evaluator.device)) for c in tokens.split(batch_size)], n)
    fused_rate = _rate(lambda: evaluator.logits(tokens), n)

    census = census_rate(model, census_len, evaluator, workers)
    census_one = census if workers == 1 else census_rate(model, census_len, evaluator, 1)
    with contextlib.redirect_stdout(io.StringIO()):
        model.bridge.to("cpu")  # where `run` keeps it (the explainer feeds it CPU tensors)
    return {
        "device": str(evaluator.device),
        "sequences": n,
        "seq_len": model.spec.seq_len,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "bridge_seq_per_s": round(bridge_rate),
        "fused_seq_per_s": round(fused_rate),
        "ratio": round(fused_rate / bridge_rate, 2),
        "max_abs_logit_diff": max_diff,
        "census_max_len": census_len,
        "census_prefixes_per_s": round(census),
        "census_ratio": round(census / fused_rate, 2),
        "census_one_worker_prefixes_per_s": round(census_one),
        "workers": workers,
    }
