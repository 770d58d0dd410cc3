"""`run --strategy exhaustive --backend ray`: sharded onto a local Ray (2 CPUs), byte-identical to one process."""

import json
import sys

import pytest
import torch

from advsearch.spec import ModelSpec
from strategies import RunConfig, make_strategy

from .conftest import drive, interrupt_judging, invoke, rows
from .test_cli import one_line_error

# 111,110 prefixes in chunks of 1000: the driver walks depths 1-3, then 10 shards of a depth-4 chunk and its children.
ARGS = ["run", "--strategy", "exhaustive", "--max-len", 5, "--batch-size", 1000, "--no-explain", "--quiet"]
SPEC = ModelSpec()
COUNTERS = ("sequences", "positions", "failures", "confident_failures", "sequences_with_confident_failure", "yield")


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def single(challenge_path, tmp_path_factory):
    """The single-process run everything here must reproduce."""
    out = tmp_path_factory.mktemp("single") / "run"
    result = invoke(*ARGS, "--model", challenge_path, "--out", out)
    assert result.exit_code == 0, result.output
    assert len(rows(out / "failures.csv")) > 50
    return out


def assert_same_run(out, single):
    assert (out / "failures.csv").read_bytes() == (single / "failures.csv").read_bytes()
    assert (out / "census.csv").read_bytes() == (single / "census.csv").read_bytes()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (out, single))
    assert a["status"] == "finished" and a["run_id"] == b["run_id"]
    assert {k: a[k] for k in COUNTERS} == {k: b[k] for k in COUNTERS}


def test_a_resumed_exhaustive_strategy_first_recomputes_the_chunks_on_the_way_down():
    config = RunConfig(max_len=4, batch_size=70)
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

    cut, backend = tmp_path / "cut", {"ray": ["--backend", "ray"], "local": []}
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
    pytest.importorskip("ray")
    result = invoke(*ARGS, "--model", challenge_path, "--out", tmp_path / "r", "--backend", "ray",
                    "--ray-address", "127.0.0.1:1")  # fmt: skip
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in one_line_error(result)
