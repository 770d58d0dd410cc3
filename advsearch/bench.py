"""`advsearch bench`: throughput of the bridge, the fused evaluator and the exhaustive census."""

from __future__ import annotations

import contextlib
import io
import resource
import time

import torch

from .evaluator import Evaluator
from .judge import judge
from .model import LoadedModel


def _rate(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


@torch.inference_mode()
def run_bench(model: LoadedModel, n: int = 100_000, batch_size: int = 512, device: str = "auto",
              census_len: int = 5) -> dict:  # fmt: skip
    """Measure everything in one process on the same data, so ratios are meaningful."""
    from strategies import RunConfig, make_strategy

    tokens = model.spec.random_tokens(n, seed=0)
    evaluator = Evaluator(model.weights, device=device, batch_size=batch_size)
    with contextlib.redirect_stdout(io.StringIO()):  # the bridge announces device moves on stdout
        bridge = model.bridge.to(evaluator.device)
    evaluator.logits(tokens[:batch_size])  # warm-up
    bridge(tokens[:batch_size].to(evaluator.device))
    max_diff = float((evaluator.logits(tokens[:1000]) - bridge(tokens[:1000].to(evaluator.device)).cpu()).abs().max())
    bridge_rate = _rate(lambda: [bridge(c.to(evaluator.device)) for c in tokens.split(batch_size)], n)
    fused_rate = _rate(lambda: evaluator.logits(tokens), n)

    strategy = make_strategy("exhaustive", model.spec, RunConfig(max_len=census_len, batch_size=65536))

    def census():
        while (p := strategy.propose()) is not None:
            strategy.observe(p, judge(p.tokens, evaluator.evaluate(p), model.spec.qmark, 0.5, p.judge_from))

    census_rate = _rate(census, strategy.total())
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
        "census_prefixes_per_s": round(census_rate),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
