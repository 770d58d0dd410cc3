"""The exhaustive census in shards: whole subtrees of its chunk tree computed apart, merged in order.

The exhaustive strategy walks a tree of chunks depth-first, and its todo stack
lists what is left in visiting order: the subtree under `todo[-1]` comes before
that of `todo[-2]`, and so on. So `sharded_steps` evaluates the top of the tree
here until the workers can be kept busy (`Shards.ready`), then hands every item
to the workers as one shard that computes its whole subtree (`run_shard`), and
consumes the results strictly in stack order. The concatenated failures are in
exactly the single-process order, and each shard's numbers are bit-identical to
the single process's: it starts from the same keys and values of its parents
(a forked worker copies the driver's prefix store; a Ray task re-evaluates the
chunks on the path down to it, as a resumed run does) and computes with the
same fixed thread count (`advsearch.model.determinism`). Each consumed shard is
one step of the runner's loop (rows written, census merged, state saved), so an
interrupted run resumes with the shards it had not consumed, with any workers.

Workers are the run's forked processes (`ProcessShards`) or Ray tasks
(`advsearch.commands.scaleout`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from advsearch.model.determinism import eval_threads
from advsearch.model.evaluator import Evaluator
from advsearch.search.steps import Step, local_step, local_steps
from advsearch.search import workers
from advsearch.search.workers import WorkerPool

SHARDS_PER_SLOT = 4  # more shards than workers, for load balance


def shardable(strategy) -> bool:
    """Whether `strategy` splits into shards: the prefix-sharing census."""
    return hasattr(strategy, "start_at") and bool(strategy.params().get("shared_prefixes"))


@dataclass(frozen=True)
class ShardJob:
    """One shard: the subtree of todo `item` of a `strategy_class(spec, config)`."""

    strategy_class: type
    spec: object
    config: object
    item: tuple
    min_confidence: float
    run_id: str
    device: str
    warm: bool = False  # the evaluator it runs with holds the keys and values of the item's parents


@eval_threads()
def run_shard(job: ShardJob, weights=None, evaluator: Evaluator | None = None) -> tuple[Step, list[dict]]:
    """Compute `job`'s shard with `evaluator`, or a new one on the model's `weights`: (its Step, its census rows)."""
    strategy = job.strategy_class(job.spec, job.config).start_at(job.item, warm=job.warm)
    evaluator = evaluator or Evaluator(weights, device=job.device)
    steps = list(local_steps(strategy, evaluator, job.min_confidence, job.run_id))
    rows = [row for s in steps for row in s.rows]
    step = Step(rows, sum(s.sequences for s in steps), sum(s.positions for s in steps), sum(s.hits for s in steps))
    return step, strategy.tables()["census.csv"]


class Shards(Protocol):
    """Where shards run, `slots` at a time: `submit` starts `run_shard(job, weights)`, `collect` waits for it;
    `ready(strategy)` says whether to split the strategy's pending items into shards now, and
    `split_leaves` whether to cut chunks of leaves into parts when there are too few items."""

    slots: int
    split_leaves: bool

    def ready(self, strategy) -> bool: ...

    def submit(self, job: ShardJob, weights) -> Any: ...

    def collect(self, job: ShardJob, handle: Any) -> tuple[Step, list[dict]]: ...

    def cancel(self, handle: Any) -> None: ...

    def close(self) -> None: ...


def sharded_steps(shards: Shards, model, strategy, evaluator: Evaluator, min_confidence: float,
                  run_id: str, device: str) -> Iterator[Step]:  # fmt: skip
    """The top of the chunk tree here, then one shard per remaining todo item, consumed in visiting order."""
    while strategy.pending() and not shards.ready(strategy):
        yield local_step(strategy, evaluator, min_confidence, run_id)
    if not strategy.pending():  # finished here
        return
    want = SHARDS_PER_SLOT * shards.slots
    if shards.split_leaves and len(strategy.pending()) < want:  # too few items to keep the slots busy
        strategy.split_leaves(-(-want // len(strategy.pending())))
    items = strategy.pending()
    jobs = {item: ShardJob(type(strategy), model.spec, strategy.config, item, min_confidence, run_id, device)
            for item in items}  # fmt: skip
    # Largest subtrees first (ties in visiting order), so that no big shard starts last.
    order = sorted(items, key=strategy.subtree_size, reverse=True)
    handles = {item: shards.submit(jobs[item], model.weights) for item in order}
    try:
        for item in items:
            step, census = shards.collect(jobs[item], handles.pop(item))
            strategy.absorb(item, census)
            yield step
    finally:
        for handle in handles.values():  # interrupted or failed: drop the shards not consumed yet
            shards.cancel(handle)
        shards.close()


class ProcessShards:
    """Shards on `slots` worker processes forked from this one when the shards start.

    Each worker is a copy of the driver as it stands after the top of the tree, so its evaluator
    already holds the keys and values of every pending item's parents (they are the chunks on the
    driver's path, which its prefix store keeps): a shard starts where the single process would be,
    without re-evaluating the path down to it (`ShardJob.warm`). A worker puts its prefix store back
    to that state before each shard (`PrefixStore.restore`), so it can run any number of them.
    """

    split_leaves = True  # a part of a chunk of leaves starts as warm as the whole chunk would

    def __init__(self, slots: int, evaluator: Evaluator):
        self.slots, self.evaluator, self.pool = slots, evaluator, None

    def ready(self, strategy) -> bool:
        """Enough items to balance the slots, or the next one is a chunk of leaves (evaluating it here
        would give its time to no shard, and a shard of it costs no more than here)."""
        if not strategy.warm:  # a resumed run: the driver's prefix store holds no parents yet
            return False
        pending = strategy.pending()
        leaf = strategy.subtree_size(pending[0]) == pending[0][2] - pending[0][1]
        return len(pending) >= SHARDS_PER_SLOT * self.slots or (leaf and len(pending) > 1)

    def submit(self, job: ShardJob, weights):
        if self.pool is None:  # the fork: the workers copy the driver's prefix store as it is now
            self.pool = WorkerPool(self.slots, (self.evaluator, self.evaluator.prefixes.snapshot()))
        return self.pool.submit(_pooled_shard, dataclasses.replace(job, warm=True))

    def collect(self, job: ShardJob, handle) -> tuple[Step, list[dict]]:
        return self.pool.result(handle, f"census shard {job.item}")

    def cancel(self, handle) -> None:
        handle.cancel()

    def close(self) -> None:
        if self.pool is not None:  # every shard consumed, or the rest dropped: nothing to wait for
            self.pool.close(kill=True)


def _pooled_shard(job: ShardJob) -> tuple[Step, list[dict]]:
    """In a worker: `job` from the driver's prefix store as it was at the fork."""
    evaluator, snapshot = workers.shared()
    evaluator.prefixes.restore(snapshot)
    return run_shard(job, evaluator=evaluator)
