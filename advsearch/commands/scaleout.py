"""Scale-out of the exhaustive census onto Ray: `advsearch run --strategy exhaustive --backend ray`.

The exhaustive strategy walks a tree of chunks depth-first, and its todo stack
lists what is left in visiting order: the subtree under `todo[-1]` comes before
that of `todo[-2]`, and so on. So the driver evaluates the top of the tree here
until the stack holds enough items (4 per worker slot), then sends every item
as one Ray task that computes its whole subtree (`run_shard`), and consumes the
results strictly in stack order. The concatenated failures are in exactly the
single-process order; each shard warms its prefix cache with the chunks on the
path down to it and computes with the same fixed thread count as the driver
(`advsearch.model.determinism`), so its numbers are bit-identical too. Each consumed shard is
one step of the runner's loop (rows written, census merged, state saved), so
an interrupted run resumes with the shards it had not consumed, on either
backend. Ray is imported only here, and only when this backend is asked for.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

from advsearch.errors import AdvsearchError
from advsearch.model.determinism import eval_threads
from advsearch.model.evaluator import Evaluator
from advsearch.search.configs import ExhaustiveConfig
from advsearch.search.runner import Step, local_step, local_steps
from strategies.exhaustive import ExhaustiveStrategy

SHARDS_PER_SLOT = 4  # more shards than workers, for load balance


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


@eval_threads()
def run_shard(weights, spec, config, item, min_confidence: float, run_id: str, device: str):
    """A Ray task: the whole subtree of exhaustive todo `item`; returns (its Step, its census rows)."""
    strategy = ExhaustiveStrategy(spec, config).start_at(item)
    steps = list(local_steps(strategy, Evaluator(weights, device=device), min_confidence, run_id))
    rows = [row for s in steps for row in s.rows]
    step = Step(rows, sum(s.sequences for s in steps), sum(s.positions for s in steps), sum(s.hits for s in steps))
    return step, strategy.tables()["census.csv"]


class RayBackend:
    """Connects to Ray (or starts a local one) and computes exhaustive runs' steps as Ray tasks."""

    name = "ray"

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
        """The top of the chunk tree here, then one Ray task per remaining todo item, consumed in visiting order."""
        if strategy.name != "exhaustive" or not strategy.params()["shared_prefixes"]:
            raise AdvsearchError("the Ray backend shards only the exhaustive strategy with prefix sharing")
        while 0 < len(strategy.pending()) < SHARDS_PER_SLOT * self.slots:
            yield local_step(strategy, evaluator, min_confidence, run_id)
        ray, items = self.ray, strategy.pending()
        if not items:
            return
        task = ray.remote(run_shard).options(num_cpus=1, num_gpus=self.gpus_per_task)
        weights = ray.put(model.weights)
        config = ExhaustiveConfig(max_len=strategy.config.max_len, batch_size=strategy.config.batch_size)
        # Largest subtrees first (ties in visiting order), so that no big shard starts last.
        order = sorted(items, key=strategy.subtree_size, reverse=True)
        refs = {item: task.remote(weights, model.spec, config, item, min_confidence, run_id, self.device)
                for item in order}  # fmt: skip
        try:
            for item in items:
                try:
                    step, census = ray.get(refs[item])
                except ray.exceptions.RayError as e:
                    cause = getattr(e, "cause", None) or e
                    text = str(cause).strip().splitlines()
                    raise AdvsearchError(f"Ray shard {item} failed ({type(cause).__name__}"
                                         f"{': ' + text[0] if text else ''}); resuming the run continues from there") from None  # fmt: skip
                del refs[item]
                strategy.absorb(item, census)
                yield step
        finally:
            for ref in refs.values():  # interrupted or failed: drop the shards not consumed yet
                ray.cancel(ref)
