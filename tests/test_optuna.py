import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch

import strategies
import strategies.optuna as optuna_strategy
from advsearch.errors import AdvsearchError
from advsearch.model.evaluator import Evaluator
from advsearch.model.spec import ModelSpec
from advsearch.search.configs import OptunaConfig
from advsearch.search.objectives import score
from strategies import make_strategy
from strategies.base import Proposal, Strategy
from strategies.optuna import make_sampler, open_storage

from .conftest import drive

SPEC = ModelSpec()
COMPLETE = optuna.trial.TrialState.COMPLETE


class CountingEvaluator:
    def __init__(self, ev):
        self.ev, self.calls = ev, 0

    def evaluate(self, proposal):
        self.calls += 1
        return self.ev.evaluate(proposal)

    def logits(self, tokens):
        return self.ev.logits(tokens)


@pytest.fixture(scope="module")
def ev(challenge):
    return CountingEvaluator(Evaluator(challenge.weights, "cpu"))


def trials_of(strategy, state=COMPLETE):
    (study,) = strategy.studies.values()
    return study.get_trials(states=(state,))


def test_batches_are_one_evaluator_call_and_trials_hold_their_scores(ev):
    strategy = make_strategy("optuna", SPEC, OptunaConfig(budget=40, batch_size=16, seed=0, length=12))
    before = ev.calls
    props = drive(strategy, ev)
    assert [len(p.tokens) for p in props] == [16, 16, 8] and ev.calls - before == 3
    trials = trials_of(strategy)
    assert len(trials) == 40
    tokens = torch.cat([p.tokens for p in props])
    assert tokens.shape[1] == 12
    as_text = ["?" + "".join(t.params[f"p{k:02d}"] for k in range(1, 12)) for t in trials]
    assert as_text == [SPEC.decode(r) for r in tokens]
    s = score(ev.logits(tokens), tokens)
    assert [t.value for t in trials] == pytest.approx(s.score.tolist(), abs=1e-5)


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_storage_joins_and_resumes_after_an_interruption(tmp_path, ev, kind):
    url = f"journal:{tmp_path}/s.journal" if kind == "journal" else f"sqlite:///{tmp_path}/s.db"
    cfg = OptunaConfig(budget=32, batch_size=16, seed=0, length=8, storage=url, study_name="shared")
    a = make_strategy("optuna", SPEC, cfg)
    drive(a, ev)
    b = make_strategy("optuna", SPEC, replace(cfg, seed=1))
    drive(b, ev, limit=1)
    state = json.loads(json.dumps(b.state_dict()))
    b.propose()  # interrupted: asked, never told
    study = optuna.load_study(study_name="shared", storage=open_storage(url))
    assert len(study.get_trials(states=(COMPLETE,))) == 48
    assert len(study.get_trials(states=(optuna.trial.TrialState.RUNNING,))) == 16
    resumed = make_strategy("optuna", SPEC, replace(cfg, seed=1))
    resumed.load_state_dict(state)
    drive(resumed, ev)
    study = optuna.load_study(study_name="shared", storage=open_storage(url))
    assert len(study.get_trials(states=(COMPLETE,))) == 64  # both workers' budgets, in one study
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))  # stale trials were failed
    assert study.user_attrs["length"] == 8
    other = make_strategy("optuna", SPEC, replace(cfg, length=9))
    with pytest.raises(AdvsearchError, match="other settings"):
        other.propose()


def test_in_memory_resume_rebuilds_the_study(ev):
    cfg = OptunaConfig(budget=48, batch_size=16, seed=2, length=10)
    first = make_strategy("optuna", SPEC, cfg)
    drive(first, ev, limit=2)
    resumed = make_strategy("optuna", SPEC, cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.remaining() == 16
    (study,) = resumed.studies.values()
    assert [t.params for t in study.trials] == [t.params for t in trials_of(first)]
    assert [t.value for t in study.trials] == [t.value for t in trials_of(first)]  # exact, not rounded
    drive(resumed, ev)
    assert len(trials_of(resumed)) == 48


@pytest.mark.parametrize("sampler", ["ga", "random"])
def test_other_samplers_run(ev, sampler):
    strategy = make_strategy("optuna", SPEC, OptunaConfig(budget=24, batch_size=12, sampler=sampler, length=6))
    drive(strategy, ev)
    assert len(trials_of(strategy)) == 24


def test_gp_sampler_proposes_trials(ev, monkeypatch):
    """With scipy (the dev extra) the GP sampler runs: past its random start-up trials, the
    Gaussian process itself proposes the sequences."""
    pytest.importorskip("scipy")
    proposed = []
    plain = optuna.samplers.GPSampler.sample_relative

    def counting(self, study, trial, search_space):
        params = plain(self, study, trial, search_space)
        proposed.append(bool(params))
        return params

    monkeypatch.setattr(optuna.samplers.GPSampler, "sample_relative", counting)
    strategy = make_strategy("optuna", SPEC, OptunaConfig(budget=12, batch_size=2, sampler="gp", length=3, seed=0))
    drive(strategy, ev)
    assert len(trials_of(strategy)) == 12
    assert proposed.count(True) >= 2, proposed  # the trials after the 10 start-up ones came from the GP


def test_gp_sampler_without_scipy_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "scipy", None)  # `import scipy` now raises ImportError
    with pytest.raises(AdvsearchError, match="scipy"):
        make_sampler("gp", 0)
    with pytest.raises(AdvsearchError, match="scipy"):
        make_strategy("optuna", SPEC, OptunaConfig(budget=4, sampler="gp"))


def test_bad_storage_is_one_clear_error(tmp_path):
    with pytest.raises(AdvsearchError, match="is not sqlite"):
        open_storage(str(tmp_path / "x.db"))
    with pytest.raises(AdvsearchError, match="cannot open"):
        open_storage("nosuchdb://x")


def test_seed_from_enqueues_the_constructor_batch_first(ev, monkeypatch):
    fixed = ["?aabbccdd", "?jjiihhgg", "?abcdefgh"]

    class Fixed(Strategy):
        name = "fixed"
        seeds = True

        def propose(self):
            return Proposal(torch.stack([SPEC.encode(s) for s in fixed]))

    monkeypatch.setitem(strategies.STRATEGIES, "fixed", Fixed)
    strategy = make_strategy("optuna", SPEC, OptunaConfig(budget=16, batch_size=8, length=9, seed_from="fixed"))
    first = strategy.propose()
    assert [SPEC.decode(r) for r in first.tokens[:3]] == fixed
    with pytest.raises(AdvsearchError, match="cannot seed a search from 'nothing'"):
        make_strategy("optuna", SPEC, OptunaConfig(budget=16, seed_from="nothing")).propose()


def test_cover_mode_keeps_one_study_per_pair(ev):
    strategy = make_strategy("optuna", SPEC, OptunaConfig(budget=800, batch_size=32, cover_confusions=True))
    drive(strategy, ev)
    assert strategy.table.evaluations == 800
    names = list(strategy.studies)
    assert names and all(n.startswith("advsearch-L20-untargeted:") for n in names)
    x, y = names[0].rsplit(":", 1)[1].split(">")
    rows = {(r["true"], r["predicted"]): r for r in strategy.tables()["confusions.csv"]}
    assert rows[(x, y)]["targeted_evaluations"] > 0


def test_a_worker_with_another_model_cannot_join(tmp_path, ev):
    url = f"journal:{tmp_path}/m.journal"
    cfg = dict(budget=8, batch_size=8, length=6, storage=url, study_name="m")
    drive(make_strategy("optuna", SPEC, OptunaConfig(**cfg), model_sha256="aaa"), ev)
    drive(make_strategy("optuna", SPEC, OptunaConfig(**cfg, seed=1), model_sha256="aaa"), ev)
    with pytest.raises(AdvsearchError, match="other settings"):
        make_strategy("optuna", SPEC, OptunaConfig(**cfg), model_sha256="bbb").propose()


# A worker that asks one batch of 8 trials and never tells them (it is killed first); beats every second.
ASK_AND_HANG = """import sys, time
import strategies.optuna as o
from advsearch.model.spec import ModelSpec
from advsearch.search.configs import OptunaConfig
from strategies import make_strategy
o.HEARTBEAT_INTERVAL = 1
s = make_strategy("optuna", ModelSpec(), OptunaConfig(budget=8, batch_size=8, length=6, storage=sys.argv[1],
                                                      study_name="hb"))
s.propose()
print(s.worker, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_trials_of_a_killed_worker_are_failed_once_their_heartbeat_is_stale(kind, tmp_path, ev, monkeypatch):
    url = f"journal:{tmp_path}/s.journal" if kind == "journal" else f"sqlite:///{tmp_path}/s.db"
    grace = 4  # SQLite times beats to the second: well above the 1 s interval plus that rounding
    monkeypatch.setattr(optuna_strategy, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(optuna_strategy, "GRACE_PERIOD", grace)
    worker = subprocess.Popen([sys.executable, "-c", ASK_AND_HANG, url], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    try:
        dead = worker.stdout.readline().strip()
        assert dead, "the worker did not get to ask its batch"

        storage = open_storage(url)

        def trials(state):
            return optuna.load_study(study_name="hb", storage=storage).get_trials(states=(state,))

        other = make_strategy("optuna", SPEC, OptunaConfig(budget=64, batch_size=8, seed=1, length=6, storage=url,
                                                           study_name="hb"))  # fmt: skip
        time.sleep(grace + 0.5)
        drive(other, ev, limit=1)  # joins and fails stale trials; the live worker's beats keep its batch running
        assert len(trials(optuna.trial.TrialState.RUNNING)) == 8
        worker.kill()  # SIGKILL, as kill -9: no chance to tell or fail anything
        worker.wait()
        time.sleep(grace + 1)
        drive(other, ev, limit=1)  # its next batch first fails the dead worker's trials
        assert not trials(optuna.trial.TrialState.RUNNING)
        failed = trials(optuna.trial.TrialState.FAIL)
        assert len(failed) == 8 and {t.user_attrs["worker"] for t in failed} == {dead}
        assert len(trials(COMPLETE)) == 16
    finally:
        worker.kill()
