"""The search loop: strategy -> evaluator -> judge -> annotators (explainer, minimizer) -> results.

One readable loop over *steps* (`advsearch.search.steps`): a step is a judged batch's
candidate failure rows and counts, computed here or, for the census, in shards
(`advsearch.search.shards`) on the run's worker processes or on Ray. A step's new
rows get their annotators' columns (`advsearch.search.annotations`), on the
workers while the loop goes on, and are written in step order. Everything the loop
writes survives an interruption, and `resume=True` continues from the last
written step without duplicating rows (or, when no step had been written yet,
starts the run again from the beginning). The loop, explanations included,
computes with the fixed thread count of `advsearch.model.determinism`, so the
results depend neither on the machine's threads nor on the number of workers.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import importlib.metadata
import json
import platform
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from advsearch import __version__
from advsearch.errors import AdvsearchError, Interrupted, RunExists
from advsearch.files import read_json, write_json
from advsearch.model.checkpoint import LoadedModel
from advsearch.model.determinism import EVAL_THREADS, eval_threads
from advsearch.model.evaluator import Evaluator
from advsearch.model.judge import YIELD_CONFIDENCE
from advsearch.search.annotations import Annotations, Annotator
from advsearch.search.audit import EXPLANATION_COLUMNS, AuditTally
from advsearch.search.results import FAILURE_COLUMNS, FailureLog, prepare_dir, write_table
from advsearch.search.shards import ProcessShards, shardable, sharded_steps
from advsearch.search.steps import Step, local_steps
from advsearch.search.workers import PooledEvaluator, WorkerPool

PENDING_PER_WORKER = 2  # steps the loop may run ahead of the writing, per worker


def versions() -> dict:
    return {"advsearch": __version__, "torch": torch.__version__,
            "transformer_lens": importlib.metadata.version("transformer-lens"),
            "python": platform.python_version()}  # fmt: skip


def run_identifier(model: LoadedModel, strategy, min_confidence: float) -> str:
    """A run id that depends only on what determines the results (so reruns are byte-identical)."""
    key = json.dumps([strategy.name, strategy.params(), model.sha256, min_confidence], sort_keys=True)
    return f"{strategy.name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


@eval_threads()
def run_search(
    model: LoadedModel,
    strategy,
    out_dir: Path | None,
    evaluator: Evaluator,
    *,
    min_confidence: float = 0.5,
    resume: bool = False,
    overwrite: bool = False,
    annotators: Sequence[Annotator] = (),
    progress: bool = True,
    backend=None,
    workers: int = 1,
) -> dict:
    """Run `strategy` to completion, writing into `out_dir` (default results/<run id>); returns the summary.

    `backend` (e.g. `advsearch.commands.scaleout.RayBackend`) computes the steps elsewhere; None computes them
    here, with `workers` > 1 forked worker processes (`advsearch.search.workers`) taking the annotations and
    the census shards. The run id and the results depend on neither, so a run can be resumed with other ones.
    Everything, explanations and minimization included, runs with `EVAL_THREADS` torch threads.
    """
    if workers > 1 and evaluator.device.type == "cuda":
        raise AdvsearchError("worker processes compute on the CPU (CUDA does not survive a fork): "
                             "a run on the GPU takes one worker")  # fmt: skip
    spec, run_id = model.spec, run_identifier(model, strategy, min_confidence)
    out_dir = Path(out_dir) if out_dir is not None else Path("results") / run_id
    columns = FAILURE_COLUMNS + strategy.extra_columns + tuple(c for a in annotators for c in a.columns)
    identity = {"strategy": strategy.name, "params": strategy.params(), "model_sha256": model.sha256,
                "min_confidence": min_confidence, "columns": list(columns), "eval_threads": EVAL_THREADS}  # fmt: skip
    state_path, csv_path = out_dir / "state.json", out_dir / "failures.csv"

    if resume and not state_path.exists():
        # Killed before its first step finished (at most the CSV header written): nothing to keep, so start over.
        if not out_dir.is_dir():
            raise AdvsearchError(f"nothing to resume: {out_dir} does not exist")
        resume, overwrite = False, True
    if resume:
        state = read_json(state_path)
        if state["identity"] != identity:
            raise AdvsearchError(f"{out_dir} holds a run with other settings or another model; cannot resume it")
        if state["finished"]:
            raise AdvsearchError(f"the run in {out_dir} already finished; nothing to resume")
        strategy.load_state_dict(state["strategy_state"])
        counters = state["counters"]
        log = FailureLog(csv_path, columns, resume_offset=state["csv_bytes"])
    else:
        if csv_path.exists() and not overwrite:
            raise RunExists(out_dir)
        prepare_dir(out_dir)
        counters = {"sequences": 0, "positions": 0, "failures": 0, "hits": 0, "wall_seconds": 0.0}
        log = FailureLog(csv_path, columns)

    tally = None  # the audit of the rows written, when they have explanations
    if set(EXPLANATION_COLUMNS) <= set(columns):
        tally = AuditTally.from_csv(csv_path) if resume else AuditTally()

    def summary(status: str) -> dict:
        wall = counters["wall_seconds"]
        data = {
            "run_id": run_id, "status": status, "out_dir": str(out_dir), "model": str(model.path), "model_sha256": model.sha256,
            "spec": spec.to_dict(), "strategy": strategy.name, "params": strategy.params(),
            "config": strategy.config_dict(),
            "seed": strategy.params().get("seed"), "min_confidence": min_confidence,
            "device": str(evaluator.device), "backend": backend.name if backend else "local", "workers": workers,
            "eval_threads": EVAL_THREADS, "versions": versions(),
            "sequences": counters["sequences"], "positions": counters["positions"],
            "failures": counters["failures"], "confident_failures": log.confident,
            "sequences_with_confident_failure": counters["hits"],
            "yield": round(counters["hits"] / counters["sequences"], 6) if counters["sequences"] else 0.0,
            "yield_confidence": YIELD_CONFIDENCE,
            "wall_seconds": round(wall, 3),
            "sequences_per_second": round(counters["sequences"] / wall, 1) if wall else None,
            "files": ["failures.csv", *strategy.tables()],
            "tables": {name: rows for name, rows in strategy.tables().items() if len(rows) <= 100},
        }  # fmt: skip
        if tally is not None:
            data["audit"] = tally.table()  # how the explanations hold (advsearch audit)
        for name, rows in strategy.tables().items():
            write_table(out_dir / name, rows)
        write_json(out_dir / "summary.json", data)
        return data

    bar = tqdm(total=strategy.total(), initial=counters["sequences"], unit="seq", desc=strategy.name,
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    # The loop makes many short-lived objects (a dict per failure row): the collector's full passes
    # would walk every object made before it (torch, the model, the tables) again and again, so those
    # are moved out of its reach for the loop's duration (and stay shared with forked workers).
    gc.freeze()
    pool = WorkerPool(workers, list(annotators)) if workers > 1 and annotators else None
    pooled = None  # with no annotations to take, the workers share the evaluation of each batch
    if backend is not None:
        steps = backend.steps(model, strategy, evaluator, min_confidence, run_id)
    elif workers > 1 and shardable(strategy):
        steps = sharded_steps(ProcessShards(workers, evaluator), model, strategy, evaluator, min_confidence, run_id,
                              str(evaluator.device))  # fmt: skip
    elif workers > 1 and not annotators:
        pooled = PooledEvaluator(evaluator, workers - 1)
        steps = local_steps(strategy, pooled, min_confidence, run_id)
    else:
        steps = local_steps(strategy, evaluator, min_confidence, run_id)
    annotations = Annotations(annotators, pool)
    # Steps whose rows are being annotated, in order, each with the strategy's state after it: a step's
    # rows are written, and its state saved, once its annotations are in.
    pending: deque[tuple[Step, list[dict], list, dict]] = deque()
    start, wall_before = time.perf_counter(), counters["wall_seconds"]

    def write_next() -> None:
        step, rows, annotating, state = pending[0]
        annotations.fill(rows, annotating)
        log.write(rows)
        pending.popleft()  # an interrupt before this line writes the step again, over what it had written
        if tally is not None:
            tally.add(rows)
        counters["sequences"] += step.sequences
        counters["positions"] += step.positions
        counters["failures"] += len(rows)
        counters["hits"] += step.hits
        counters["wall_seconds"] = wall_before + time.perf_counter() - start
        write_json(state_path, {"identity": identity, "finished": False, "csv_bytes": log.offset,
                                "counters": counters, "strategy_state": state})  # fmt: skip
        bar.update(step.sequences)
        bar.set_postfix(failures=counters["failures"], refresh=False)

    ahead = PENDING_PER_WORKER * workers if pool else 0
    try:
        try:
            for step in steps:
                rows = log.claim(step.rows)
                state = strategy.state_dict()
                pending.append((step, rows, annotations.submit(rows), copy.deepcopy(state) if ahead else state))
                while pending and (len(pending) > ahead or annotations.ready(pending[0][2])):
                    write_next()
            while pending:
                write_next()
        except KeyboardInterrupt:
            steps.close()  # a backend cancels the work still outstanding
            try:  # what was found is kept: the workers (which ignore the interrupt) finish the steps in hand
                while pending:
                    write_next()
            except KeyboardInterrupt:  # interrupted again: the saved state matches what was written
                pass
            bar.close()
            log.close()
            summary("interrupted")
            raise Interrupted(
                f"interrupted after {counters['sequences']} sequences; {counters['failures']} failures kept in "
                f"{csv_path}; resuming the run continues it", out_dir
            ) from None
    finally:
        gc.unfreeze()
        steps.close()
        if pool is not None:
            pool.close(kill=bool(pending))  # steps still in hand are dropped (a failure, a second Ctrl-C)
        if pooled is not None:
            pooled.close(kill=True)
    bar.close()
    log.close()
    write_json(state_path, {"identity": identity, "finished": True, "csv_bytes": log.offset,
                            "counters": counters, "strategy_state": strategy.state_dict()})  # fmt: skip
    return summary("finished")
