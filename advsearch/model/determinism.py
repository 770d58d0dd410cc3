"""One fixed intra-op thread count for every computation that decides a run's results.

torch's CPU matrix products go to a BLAS (MKL on x86) that picks its kernel, and
with it the order in which each dot product is summed, from the matrix shapes
*and the number of threads*. Measured with torch 2.13 / MKL 2024.2 on an AVX2
CPU: a [M, 42] @ [42, 126] product for M in 5-11 (except 8) differs in the last
bits between 1 and 2 threads, while M = 1-4, 8 and >= 12 do not. The
prefix-sharing census multiplies exactly such small matrices (one new token for
each of 10 letters), so its logits moved by up to 1.8e-4 with the thread count,
and a run on 2 threads differed from the same run on Ray (whose tasks use one
thread) in the 6th significant digit of probabilities.

So the evaluation always runs with `EVAL_THREADS` intra-op threads, whatever
OMP_NUM_THREADS, the core count or an earlier `torch.set_num_threads` says: the
`run` command, the runner, the evaluator, Ray shards and the checkpoint's
processing (`advsearch.model.checkpoint.process_weights`, `build_bridge`) enter `eval_threads()`, and
`summary.json` records the count. One thread is what a Ray task with one CPU
has anyway, and on a shared, busy machine it was also the faster setting
(two OpenMP threads contending with other processes spin).

torch is imported when the context is entered, not with this module, so the CLI
can use it as a decorator without loading torch to print `--help`.
"""

from __future__ import annotations

import contextlib

EVAL_THREADS = 1


@contextlib.contextmanager
def eval_threads():
    """Run the enclosed work with `EVAL_THREADS` torch intra-op threads, then restore the caller's count.

    Nesting is free (an inner context finds the count already set). Usable as a decorator.
    """
    import torch

    before = torch.get_num_threads()
    if before != EVAL_THREADS:
        torch.set_num_threads(EVAL_THREADS)
    try:
        yield
    finally:
        if before != EVAL_THREADS:
            torch.set_num_threads(before)
