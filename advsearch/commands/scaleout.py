"""Scale-out of the exhaustive census onto Ray: `advsearch run --strategy exhaustive --backend ray`.

The census is split into shards exactly as on the run's own worker processes
(`advsearch.search.shards`: the top of the chunk tree here, every remaining todo
item's subtree as one task, consumed in visiting order), so the results are
those of one process, and an interrupted run resumes on either backend. Ray is
imported only here, and only when this backend is asked for.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

from advsearch.errors import AdvsearchError
from advsearch.model.evaluator import Evaluator
from advsearch.search.shards import SHARDS_PER_SLOT, ShardJob, run_shard, shardable, sharded_steps
from advsearch.search.steps import Step


def import_ray():
    try:
        import ray
    except ImportError:
        raise AdvsearchError("the Ray backend needs Ray: pip install 'advsearch[ray]'") from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a HOST:PORT (or ray://HOST:PORT) nobody listens on: Ray itself retries for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # 'auto', or a form Ray parses (and rejects) itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise AdvsearchError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


class RayBackend:
    """Connects to Ray (or starts a local one) and computes exhaustive runs' steps as Ray tasks."""

    name = "ray"
    split_leaves = False  # each shard re-evaluates the chunks on its path: parts of a chunk would repeat that

    def __init__(self, address: str | None = None, device: str = "auto"):
        ray = import_ray()
        if address:
            check_reachable(address)
        try:
            ray.init(address=address or None, include_dashboard=False, ignore_reinit_error=True,
                     log_to_driver=False, logging_level=logging.ERROR)  # fmt: skip
        except (OSError, ValueError, RuntimeError, SystemExit) as e:  # Ray may exit when it gives up on a cluster
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            reason = "" if isinstance(e, SystemExit) else str(e).strip("'\" \n").split("\n")[0]
            raise AdvsearchError(f"cannot start or join {where}: {reason or 'no answer from Ray'}") from None
        self.ray, self.device = ray, device
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if device == "cuda" and not gpus:
            raise AdvsearchError("device 'cuda' asked for, but the Ray cluster has no GPU")
        # Ray hides the GPUs from tasks that do not ask for one: with GPUs to use, each shard takes one.
        self.gpus_per_task = 1 if device != "cpu" and gpus else 0
        self.slots = gpus if self.gpus_per_task else max(1, int(resources.get("CPU", 1)))

    def steps(self, model, strategy, evaluator: Evaluator, min_confidence: float, run_id: str) -> Iterator[Step]:
        if not shardable(strategy):
            raise AdvsearchError("the Ray backend shards only the exhaustive strategy with prefix sharing")
        self.task = self.ray.remote(run_shard).options(num_cpus=1, num_gpus=self.gpus_per_task)
        self.weights = None
        return sharded_steps(self, model, strategy, evaluator, min_confidence, run_id, self.device)

    def ready(self, strategy) -> bool:
        """Enough items to balance the slots (each shard re-evaluates the chunks on its path first)."""
        return len(strategy.pending()) >= SHARDS_PER_SLOT * self.slots

    def submit(self, job: ShardJob, weights):
        if self.weights is None:  # one copy in Ray's object store for every task
            self.weights = self.ray.put(weights)
        return self.task.remote(job, self.weights)

    def collect(self, job: ShardJob, handle) -> tuple[Step, list[dict]]:
        ray = self.ray
        try:
            return ray.get(handle)
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None) or e
            text = str(cause).strip().splitlines()
            raise AdvsearchError(f"Ray shard {job.item} failed ({type(cause).__name__}"
                                 f"{': ' + text[0] if text else ''}); resuming the run continues from there") from None  # fmt: skip

    def cancel(self, handle) -> None:
        self.ray.cancel(handle)

    def close(self) -> None:
        pass  # Ray stays up for the rest of the process (ray.init is idempotent)
