"""Runs give the same bytes whatever the thread count, and `--backend ray` (a local Ray, 2 CPUs) gives those of one process.

The reference runs are computed in this process with torch set to 2 threads; the same runs in a subprocess
with OMP_NUM_THREADS=1 and with it unset, and the census on Ray (whose tasks get one thread), must match them.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from advsearch.model.spec import ModelSpec
from advsearch.search.configs import ExhaustiveConfig
from strategies import make_strategy

from .conftest import drive, interrupt_judging, invoke, rows
from .test_cli import one_line_error

# 111,110 prefixes in chunks of 1000: the driver walks depths 1-3, then 10 shards of a depth-4 chunk and its children.
ARGS = ["run", "--strategy", "exhaustive", "--max-len", 5, "--batch-size", 1000, "--no-explain", "--quiet"]
SPEC = ModelSpec()
COUNTERS = ("sequences", "positions", "failures", "confident_failures", "sequences_with_confident_failure", "yield")
# One run per kind of evaluation: the prefix-sharing census, and the full forward (random, guided constructors).
RUNS = {
    "exhaustive": ARGS,
    "random": ["run", "--strategy", "random", "--budget", 3000, "--seed", 3, "--no-explain", "--quiet"],
    "guided": ["run", "--strategy", "guided", "--budget", 500, "--no-explain", "--quiet"],
}
# Runs the CLI once per argument list (JSON in argv[1]) in one process, after printing torch's thread count.
RUN_MANY = """import json, sys, torch
from advsearch.cli.main import main
print(torch.get_num_threads(), flush=True)
for args in json.loads(sys.argv[1]):
    main(args, standalone_mode=False)
"""


def need_ray():
    """Ray; outside CI a skip when it is not installed (CI installs the dev extra, so there it must import)."""
    if os.environ.get("CI"):
        import ray

        return ray
    return pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray = need_ray()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def two_threads(challenge_path, tmp_path_factory):
    """Each of RUNS computed in this process with torch set to 2 threads: what every other run must reproduce."""
    base, before = tmp_path_factory.mktemp("two-threads"), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name, args in RUNS.items():
            result = invoke(*args, "--model", challenge_path, "--out", base / name)
            assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(before)
    assert len(rows(base / "exhaustive" / "failures.csv")) > 50 and len(rows(base / "random" / "failures.csv")) > 50
    return base


@pytest.fixture(scope="module")
def single(two_threads):
    """The single-process census."""
    return two_threads / "exhaustive"


def assert_same_run(out, single):
    """Every CSV file byte for byte, and the summary's counts."""
    files = sorted(p.name for p in single.glob("*.csv"))
    assert "failures.csv" in files and sorted(p.name for p in out.glob("*.csv")) == files
    for name in files:
        assert (out / name).read_bytes() == (single / name).read_bytes(), name
    a, b = (json.loads((d / "summary.json").read_text()) for d in (out, single))
    assert a["status"] == "finished" and a["run_id"] == b["run_id"]
    assert {k: a[k] for k in COUNTERS} == {k: b[k] for k in COUNTERS}


@pytest.mark.parametrize("omp", ["1", None], ids=["OMP_NUM_THREADS=1", "OMP_NUM_THREADS-unset"])
def test_runs_are_byte_identical_whatever_the_thread_count(omp, two_threads, challenge_path, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env |= {"OMP_NUM_THREADS": omp} if omp else {}
    jobs = [[str(a) for a in (*args, "--model", challenge_path, "--out", tmp_path / name)] for name, args in RUNS.items()]
    proc = subprocess.run([sys.executable, "-c", RUN_MANY, json.dumps(jobs)], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    threads = int(proc.stdout.split()[0])
    assert threads == (int(omp) if omp else torch.get_num_threads())  # the subprocess really had that many
    for name in RUNS:
        assert_same_run(tmp_path / name, two_threads / name)
        assert json.loads((tmp_path / name / "summary.json").read_text())["eval_threads"] == 1


def test_the_evaluator_ignores_the_callers_thread_count(challenge):
    """A 6-token sequence is a [6, 42] @ [42, 126] product in layer 1: a shape MKL sums differently on 1 and 2 threads."""
    from advsearch.model.determinism import EVAL_THREADS
    from advsearch.model.evaluator import Evaluator

    tokens, before = challenge.spec.encode("?abcab")[None], torch.get_num_threads()
    out = {}
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out[n] = Evaluator(challenge.weights, "cpu").logits(tokens)
            assert torch.get_num_threads() == n  # restored after the call
    finally:
        torch.set_num_threads(before)
    assert EVAL_THREADS == 1 and torch.equal(out[1], out[2]) and torch.equal(out[1], out[3])


def test_a_resumed_exhaustive_strategy_first_recomputes_the_chunks_on_the_way_down():
    config = ExhaustiveConfig(max_len=4, batch_size=70)
    strategy, whole, states = make_strategy("exhaustive", SPEC, config), [], {}
    for cut in (1, 5, 17, 40, 90):
        whole += drive(strategy, limit=cut - len(whole))
        states[cut] = json.loads(json.dumps(strategy.state_dict()))
    whole += drive(strategy)
    for cut, state in states.items():
        resumed = make_strategy("exhaustive", SPEC, config)
        resumed.load_state_dict(state)
        p = resumed.propose()
        latest = {len(q.tokens[0]): q.tokens for q in whole[:cut]}  # the last chunk evaluated at each length
        assert torch.equal(p.tokens, whole[cut].tokens)
        assert [w.tolist() for w in p.warmup] == [latest[n].tolist() for n in range(2, p.tokens.shape[1])]


def test_ray_run_is_byte_identical_to_the_single_process_run(ray_local, single, challenge_path, tmp_path):
    result = invoke(*ARGS, "--model", challenge_path, "--out", tmp_path / "ray", "--backend", "ray")
    assert result.exit_code == 0, result.output
    assert_same_run(tmp_path / "ray", single)
    assert json.loads((tmp_path / "ray/summary.json").read_text())["backend"] == "ray"


@pytest.mark.parametrize("cut_on, resume_on", [("ray", "ray"), ("ray", "local"), ("local", "ray")])
def test_an_interrupted_run_resumes_byte_identically_on_either_backend(cut_on, resume_on, ray_local, single,
                                                                       challenge_path, tmp_path, monkeypatch):  # fmt: skip
    from strategies.exhaustive import ExhaustiveStrategy

    cut, backend = tmp_path / "cut", {"ray": ["--backend", "ray"], "local": ["--workers", "1"]}
    if cut_on == "ray":  # interrupted after 3 of its 10 shards
        real, calls = ExhaustiveStrategy.absorb, {"n": 0}

        def absorb_then_interrupt(self, *a):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
            return real(self, *a)

        monkeypatch.setattr(ExhaustiveStrategy, "absorb", absorb_then_interrupt)
    else:  # interrupted among the depth-5 chunks: the resumed run shards items of depths 4 and 5
        interrupt_judging(monkeypatch, at_call=30)
    assert "--resume" in one_line_error(invoke(*ARGS, "--model", challenge_path, "--out", cut, *backend[cut_on]), 130)
    assert json.loads((cut / "summary.json").read_text())["status"] == "interrupted" and rows(cut / "failures.csv")
    if cut_on == "ray":
        assert len(json.loads((cut / "state.json").read_text())["strategy_state"]["todo"]) == 7
    monkeypatch.undo()
    resumed = invoke(*ARGS, "--model", challenge_path, "--out", cut, "--resume", *backend[resume_on])
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(cut, single)


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "random", "--backend", "ray"], "--backend ray applies to --strategy exhaustive"),
    (["--strategy", "exhaustive", "--ray-address", "auto"], "--ray-address needs --backend ray"),
    (["--strategy", "exhaustive", "--backend", "ray", "--no-prefix-sharing"], "drop --no-prefix-sharing"),
])  # fmt: skip
def test_backend_options_are_checked(extra, message, challenge_path):
    result = invoke("run", *extra, "--model", challenge_path, "--quiet")
    assert result.exit_code == 2 and "Usage:" in result.output and message in result.output


def test_without_ray_the_backend_is_a_one_line_error(challenge_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails
    line = one_line_error(invoke(*ARGS, "--model", challenge_path, "--out", tmp_path / "r", "--backend", "ray"))
    assert "pip install 'advsearch[ray]'" in line
    assert not (tmp_path / "r").exists()


def test_an_unreachable_cluster_is_a_one_line_error(challenge_path, tmp_path):
    need_ray()
    result = invoke(*ARGS, "--model", challenge_path, "--out", tmp_path / "r", "--backend", "ray",
                    "--ray-address", "127.0.0.1:1")  # fmt: skip
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in one_line_error(result)
