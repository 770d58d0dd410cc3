"""Worker processes change how fast a run goes, never what it writes.

Each run is computed with one worker (everything in this process) and with several: census shards on
forked processes, explanations and minimization on forked workers while the search goes on, and the
batches of a run without annotations shared between the run and its workers. Every
file must be byte-identical, interrupted runs must keep what they found and resume to the same bytes,
and a worker that dies is a one-line error.
"""

import json
import os

import pytest

from advsearch.search import shards, workers
from advsearch.search.workers import can_fork

from .conftest import interrupt_judging, invoke, rows
from .test_cli import one_line_error

pytestmark = pytest.mark.skipif(not can_fork(), reason="worker processes need fork")

# 111,110 prefixes in chunks of 20,000 (3 blocks of parents): depths 1-4 here, then the 5 chunks of leaves
# cut into parts, one per worker.
CENSUS = ["run", "--strategy", "exhaustive", "--max-len", 5, "--batch-size", 20_000, "--no-explain", "--quiet"]
# Explanations and minimization of 6 steps of 60 sequences, several of them in flight at once.
GUIDED = ["run", "--strategy", "guided", "--budget", 360, "--batch-size", 60, "--minimize", "--quiet"]
# No annotations: each batch (4,096 sequences, then 904: 8 and 2 of the evaluator's chunks) shared out.
RANDOM = ["run", "--strategy", "random", "--budget", 5000, "--seed", 3, "--no-explain", "--quiet"]


def run(args, model, out, workers, *extra):
    result = invoke(*args, "--model", model, "--out", out, "--workers", workers, *extra)
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


def interrupted(args, model, out, workers):
    """Run, expecting the (simulated) Ctrl-C: a one-line error that says how to resume."""
    assert "--resume" in one_line_error(invoke(*args, "--model", model, "--out", out, "--workers", workers), 130)


def resume_to_same_files(args, model, out, workers, reference):
    resumed = invoke(*args, "--model", model, "--out", out, "--resume", "--workers", workers)
    assert resumed.exit_code == 0, resumed.output
    same_files(out, reference)


def same_files(a, b):
    names = sorted(p.name for p in a.glob("*.csv"))
    assert "failures.csv" in names and names == sorted(p.name for p in b.glob("*.csv"))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def one_worker(challenge_path, tmp_path_factory):
    base = tmp_path_factory.mktemp("one-worker")
    for name, args in (("census", CENSUS), ("guided", GUIDED), ("random", RANDOM)):
        run(args, challenge_path, base / name, 1)
    assert len(rows(base / "census" / "failures.csv")) > 50
    guided = rows(base / "guided" / "failures.csv")
    assert len(guided) > 500 and all(r["category"] and r["minimized"] is not None for r in guided)
    return base


@pytest.mark.parametrize("workers", [2, 3])
def test_census_shards_on_forked_processes_give_the_one_process_bytes(workers, one_worker, challenge_path, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    submitted = []
    real = shards.ProcessShards.submit

    def counting(self, job, weights):
        submitted.append(job.item)
        return real(self, job, weights)

    monkeypatch.setattr(shards.ProcessShards, "submit", counting)
    summary = run(CENSUS, challenge_path, tmp_path / "census", workers)
    same_files(tmp_path / "census", one_worker / "census")
    assert len(submitted) >= 2 * workers  # the census really went to the workers, in parts of its chunks
    assert summary["sequences"] == 111_110 and summary["workers"] == workers


def test_a_census_cut_on_one_process_resumes_on_workers_to_the_same_bytes(one_worker, challenge_path, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    """The resumed driver holds no parents until it has re-evaluated the path down to its next chunk: only
    then may it fork the workers that start from its prefix store."""
    out = tmp_path / "census"
    interrupt_judging(monkeypatch, at_call=6)  # at the second of the five chunks of leaves
    interrupted(CENSUS, challenge_path, out, 1)
    assert len(json.loads((out / "state.json").read_text())["strategy_state"]["todo"]) == 4
    monkeypatch.undo()
    resume_to_same_files(CENSUS, challenge_path, out, 2, one_worker / "census")


def test_a_census_interrupted_among_its_shards_resumes_to_the_same_bytes(one_worker, challenge_path, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    from strategies.exhaustive import ExhaustiveStrategy

    out, real, calls = tmp_path / "census", ExhaustiveStrategy.absorb, {"n": 0}

    def absorb_then_interrupt(self, *a):  # Ctrl-C while the driver waits for its third shard
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(ExhaustiveStrategy, "absorb", absorb_then_interrupt)
    interrupted(CENSUS, challenge_path, out, 2)
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    resume_to_same_files(CENSUS, challenge_path, out, 2, one_worker / "census")


def test_explanations_and_minimization_on_workers_give_the_one_process_bytes(one_worker, challenge_path, tmp_path,
                                                                            monkeypatch):  # fmt: skip
    from advsearch.search import annotations

    monkeypatch.setattr(annotations, "MIN_PART", 16)  # each step's explanations split between the workers
    run(GUIDED, challenge_path, tmp_path / "guided", 2)
    same_files(tmp_path / "guided", one_worker / "guided")


def test_an_interrupted_run_with_workers_keeps_its_steps_and_resumes_to_the_same_bytes(one_worker, challenge_path,
                                                                                        tmp_path, monkeypatch):  # fmt: skip
    out = tmp_path / "guided"
    interrupt_judging(monkeypatch, at_call=4)  # in the search loop, while earlier steps are being annotated
    interrupted(GUIDED, challenge_path, out, 2)
    state = json.loads((out / "state.json").read_text())
    assert state["counters"]["sequences"] == 180  # the 3 steps found before the interrupt were written
    assert len(rows(out / "failures.csv")) == state["counters"]["failures"] > 0
    monkeypatch.undo()
    resume_to_same_files(GUIDED, challenge_path, out, 2, one_worker / "guided")


@pytest.mark.parametrize("n_workers", [2, 3])
def test_batches_shared_with_workers_give_the_one_process_bytes(n_workers, one_worker, challenge_path, tmp_path,
                                                                monkeypatch):  # fmt: skip
    parts, real = [], workers.WorkerPool.submit

    def counting(self, fn, *args):
        if fn is workers._logits_here:
            parts.append(len(args[0]))
        return real(self, fn, *args)

    monkeypatch.setattr(workers.WorkerPool, "submit", counting)
    run(RANDOM, challenge_path, tmp_path / "random", n_workers)
    same_files(tmp_path / "random", one_worker / "random")
    # the run computes the first part of each batch, its workers-1 workers the others
    assert parts == ([2048, 392] if n_workers == 2 else [1536, 1024, 392])


def test_an_interrupted_run_sharing_its_batches_resumes_to_the_same_bytes(one_worker, challenge_path, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    out = tmp_path / "random"
    interrupt_judging(monkeypatch, at_call=2)
    interrupted(RANDOM, challenge_path, out, 2)
    assert json.loads((out / "state.json").read_text())["counters"]["sequences"] == 4096
    monkeypatch.undo()
    resume_to_same_files(RANDOM, challenge_path, out, 2, one_worker / "random")


def test_a_worker_that_dies_is_a_one_line_error(challenge_path, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "run_shard", lambda *a, **k: os._exit(3))  # in the forked worker
    line = one_line_error(invoke(*CENSUS, "--model", challenge_path, "--out", tmp_path / "c", "--workers", 2))
    assert "worker process died" in line and "census shard" in line and "resuming" in line
    assert json.loads((tmp_path / "c" / "state.json").read_text())["finished"] is False
    monkeypatch.setattr(workers, "shared", lambda: os._exit(3))  # in the forked worker, at its first part
    line = one_line_error(invoke(*RANDOM, "--model", challenge_path, "--out", tmp_path / "r", "--workers", 2))
    assert "worker process died" in line and "evaluation" in line and "resuming" in line


def test_the_default_is_one_worker_per_usable_core_and_one_on_a_gpu():
    from advsearch.search.workers import MAX_AUTO_WORKERS, auto_workers, usable_cpus

    assert auto_workers("cpu") == min(usable_cpus(), MAX_AUTO_WORKERS)
    assert auto_workers("cuda:0") == 1


def test_workers_with_a_gpu_evaluator_are_an_error_before_anything_is_written(challenge, tmp_path):
    from types import SimpleNamespace

    import torch

    from advsearch.errors import AdvsearchError
    from advsearch.search.configs import RandomConfig
    from advsearch.search.runner import run_search
    from strategies import make_strategy

    strategy = make_strategy("random", challenge.spec, RandomConfig(budget=10))
    on_gpu = SimpleNamespace(device=torch.device("cuda"))
    with pytest.raises(AdvsearchError, match="one worker"):
        run_search(challenge, strategy, tmp_path / "run", on_gpu, workers=2)
    assert not (tmp_path / "run").exists()
