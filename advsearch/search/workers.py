"""Worker processes: forked copies of the run that take work off its search loop.

A run's results never depend on how many workers it has. What goes to them is
computed there exactly as it would be here: with the same `EVAL_THREADS` intra-op
threads, on the same inputs (a step's rows, a census shard), and merged back in
the order the single-process run produces it.

Workers are forked (where the platform has `fork`): they start in milliseconds
with the model, the tables and the annotators already in memory, which a fresh
interpreter would spend seconds rebuilding. Elsewhere, and on a GPU (CUDA does
not survive a fork), everything stays in this process. Workers ignore SIGINT, so
an interrupted run can still collect what they were computing.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

from advsearch.errors import AdvsearchError

if TYPE_CHECKING:
    import numpy as np

MAX_AUTO_WORKERS = 8

_shared: object = None  # what the run handed its workers (set in each worker when it starts)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def auto_workers(device: str) -> int:
    """The default worker count: the usable CPU cores (at most `MAX_AUTO_WORKERS`) for a run on the CPU
    where processes can be forked, else 1 (everything in this process)."""
    if str(device).startswith("cuda") or not can_fork():
        return 1
    return max(1, min(usable_cpus(), MAX_AUTO_WORKERS))


def start_worker() -> None:
    """Set a freshly forked worker up: it ignores SIGINT (the run decides what to keep) and computes with
    the run's `EVAL_THREADS` torch threads."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    from advsearch.model.determinism import EVAL_THREADS

    torch.set_num_threads(EVAL_THREADS)


def _start(shared: object) -> None:
    global _shared
    start_worker()
    _shared = shared


def shared() -> object:
    """In a worker, what `WorkerPool(shared=...)` handed it."""
    return _shared


class WorkerPool:
    """`workers` forked processes that run module-level functions; `shared` is inherited, not sent."""

    def __init__(self, workers: int, shared: object = None):
        if not can_fork():
            raise AdvsearchError("worker processes need a platform with fork; run with one worker")
        self.workers = workers
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                         initializer=_start, initargs=(shared,))  # fmt: skip

    def submit(self, fn, *args) -> Future:
        return self._pool.submit(fn, *args)

    @staticmethod
    def result(future: Future, what: str):
        """The future's value; a worker that died is a one-line error (its exceptions pass through)."""
        try:
            return future.result()
        except BrokenProcessPool:
            raise AdvsearchError(f"a worker process died while computing {what} (out of memory?); "
                                 "resuming the run continues from the last finished step") from None  # fmt: skip

    def close(self, kill: bool = False) -> None:
        """Stop the workers once they have finished what they are computing (or at once, with `kill`);
        what they had not started is dropped."""
        if kill:
            for process in list((getattr(self._pool, "_processes", None) or {}).values()):
                process.kill()
        self._pool.shutdown(wait=not kill, cancel_futures=True)


class PooledEvaluator:
    """An `Evaluator` whose full-forward batches are shared between this process and `workers` forked ones.

    A batch's chunks of `evaluator.batch_size` sequences are cut into consecutive parts, one per process
    (this one computes the first while the workers compute the others), and the logits are put back
    together in order. Every chunk is computed exactly as `Evaluator.logits` computes it here (same
    chunk boundaries, same thread count), so the logits are the same bits. For runs whose workers would
    otherwise idle: strategies without annotators, whose search loop is the whole run. Prefix-extension
    batches (the census) stay here: this process's evaluator holds their parents' keys and values.
    """

    def __init__(self, evaluator, workers: int):
        self.evaluator = evaluator
        self.pool = WorkerPool(workers, evaluator)

    def evaluate(self, proposal):
        import torch

        tokens, size = proposal.tokens, self.evaluator.batch_size
        chunks = -(-len(tokens) // size)
        if proposal.extension or chunks < 2:
            return self.evaluator.evaluate(proposal)
        first, *rest = tokens.split(-(-chunks // min(self.pool.workers + 1, chunks)) * size)
        futures = [self.pool.submit(_logits_here, part.numpy()) for part in rest]
        logits = [self.evaluator.logits(first)]
        logits += [torch.from_numpy(self.pool.result(f, "an evaluation")) for f in futures]
        return torch.cat(logits)

    def close(self, kill: bool = False) -> None:
        self.pool.close(kill)


def _logits_here(tokens: np.ndarray) -> np.ndarray:
    """In a worker: the shared evaluator's logits of `tokens`."""
    import torch

    return shared().logits(torch.from_numpy(tokens)).numpy()
