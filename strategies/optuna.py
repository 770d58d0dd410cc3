"""Optuna discrete search: one categorical parameter (a-j) per position after `?`.

Each batch is `--batch-size` trials asked from the study at once (the default
TPE sampler is multivariate with the constant liar, so the trials of one batch
spread out instead of piling onto one point), evaluated in one evaluator call,
and told back with their objective (`advsearch.search.objectives`: untargeted margin
or the `--target-*` score; maximised).

Samplers (`--sampler`): `tpe` (TPESampler(multivariate=True, constant_liar=True)),
`ga` (NSGAIISampler), `gp` (GPSampler; needs scipy: `pip install scipy` or the
`gp` extra; it runs offline but takes seconds per trial on 19 categorical
parameters) and `random` (RandomSampler). All are seeded by `--seed`.

Storage (`--storage URL --study-name NAME`): without it the study lives in
memory and a resumed run rebuilds it from the trials recorded in the run's
state. With it (`sqlite:///file.db`, `postgresql://...`, or a journal file:
`journal:PATH` or any path ending in .journal/.log), the study is created on
first use and joined afterwards: several processes, on one machine or many,
with the same storage, study name and options share one study, each spending
its own `--budget` of trials; running the same command again after an
interruption continues the study. The default study name is derived from the
length and target, so workers started with the same options meet in the same
study. With `--cover-confusions` there is one study per (true, predicted)
pair, named `<study-name>:<true>><pred>`, whose first trial is the best
sequence known for that pair.

`--seed-from guided` enqueues the guided strategy's first batch as the first
trials of each new study: `strategies.make_strategy` builds that seeding
strategy and passes it in (`OptunaStrategy(spec, config, seeder=...)`).

Dead workers: with a shared storage, each worker keeps its in-flight trials
(asked, not yet told) alive with Optuna's heartbeat: one beat as each trial is
asked, then one every `HEARTBEAT_INTERVAL` seconds from a background thread
until the batch is told. Every worker, when it joins a study and before each
batch, calls `optuna.storages.fail_stale_trials`, which marks FAIL the running
trials whose last beat is older than `GRACE_PERIOD` seconds: those of a worker
that was killed. RDB storages (SQLite, PostgreSQL) have the heartbeat built in
(`RDBStorage(heartbeat_interval=..., grace_period=...)`, timed by the database's
clock); Optuna's JournalStorage has none, so journal files are opened as
`HeartbeatJournalStorage`, which implements Optuna's heartbeat interface with
the beat stored as a trial system attribute (the worker's wall clock, so
workers on several machines need clocks within the grace period of each other).
A worker whose trial was failed under it (stopped for longer than the grace
period, say) still finishes: telling a finished trial is skipped.

Cost: TPE's ask time grows with the number of finished trials (tens of ms per
trial beyond ~1,000 trials on one CPU core), so very large budgets are better
spent with `--strategy local`; GP is cubic in the number of trials.
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings

import torch

from advsearch.errors import AdvsearchError
from advsearch.search.configs import SAMPLERS, ConfigError, OptunaConfig

from .adaptive import AdaptiveStrategy
from .base import Proposal, Strategy

JOURNAL_SUFFIXES = (".journal", ".log", ".jsonl")
HEARTBEAT_INTERVAL = 5  # seconds between beats of a worker's in-flight trials (an int: RDBStorage wants one)
GRACE_PERIOD = 30  # seconds without a beat after which a running trial counts as its worker's death
HEARTBEAT_ATTR = "advsearch:heartbeat"  # journal storages: the trial system attribute holding the last beat


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # ask/tell with a heartbeat storage is what this module does on purpose (see Heartbeat below)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


_journal_class = None


def heartbeat_journal_storage(path: str):
    """A JournalStorage on file `path` that supports Optuna's heartbeat (`fail_stale_trials`) as RDBStorage does."""
    global _journal_class
    optuna = _optuna()
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.storages.journal import JournalFileBackend

    if _journal_class is None:

        class HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
            """JournalStorage plus Optuna's heartbeat interface: a beat is the time.time() of the trial's worker, kept
            as a trial system attribute; a running trial whose beat is older than the grace period is stale."""

            def __init__(self, backend, heartbeat_interval: int, grace_period: float):
                super().__init__(backend)
                self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period

            def record_heartbeat(self, trial_id: int) -> None:
                self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

            def _get_stale_trial_ids(self, study_id: int) -> list[int]:
                now, running = time.time(), optuna.trial.TrialState.RUNNING
                trials = self.get_all_trials(study_id, deepcopy=False, states=(running,))
                return [t._trial_id for t in trials
                        if now - t.system_attrs.get(HEARTBEAT_ATTR, now) > self.grace_period]  # fmt: skip

            def get_heartbeat_interval(self) -> int:
                return self.heartbeat_interval

            def get_heartbeat_stale_trial_callback(self):
                return None

        _journal_class = HeartbeatJournalStorage
    return _journal_class(JournalFileBackend(path), HEARTBEAT_INTERVAL, GRACE_PERIOD)


class Heartbeat:
    """Keeps one batch of in-flight trials alive in a heartbeat storage: a beat when each trial is added, then one
    every heartbeat interval from a daemon thread, until `stop()` (the batch is told) or the process dies."""

    def __init__(self, storage):
        self.storage, self.trial_ids, self.lock, self.stopped = storage, [], threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._beat_until_stopped, name="advsearch-optuna-heartbeat", daemon=True)
        self.thread.start()

    def add(self, trial_id: int) -> None:
        self._beat(trial_id)
        with self.lock:
            self.trial_ids.append(trial_id)

    def _beat(self, trial_id: int) -> None:
        try:
            self.storage.record_heartbeat(trial_id)
        except Exception:  # the trial was failed by another worker meanwhile, or the storage hiccuped: try later
            pass

    def _beat_until_stopped(self) -> None:
        while not self.stopped.wait(self.storage.get_heartbeat_interval()):
            with self.lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                self._beat(trial_id)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def make_sampler(name: str, seed: int):
    optuna = _optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if name == "ga":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        try:
            import scipy  # noqa: F401
        except ImportError:
            raise ConfigError("sampler", "the GP sampler needs scipy, which is not installed "
                                         "(pip install scipy, or advsearch[gp])") from None
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError("sampler", f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


def open_storage(url: str | None):
    """An Optuna storage for `url` (None: in memory)."""
    if url is None:
        return None
    optuna = _optuna()
    try:
        if url.startswith("journal:") or ("://" not in url and url.endswith(JOURNAL_SUFFIXES)):
            return heartbeat_journal_storage(url.removeprefix("journal:").removeprefix("//"))
        if "://" not in url:
            raise ConfigError("storage", f"Optuna storage {url!r} is not sqlite:///FILE, postgresql://... or a "
                                         "journal file (journal:PATH or a path ending in .journal/.log)")  # fmt: skip
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_INTERVAL,
                                          grace_period=GRACE_PERIOD)  # fmt: skip
    except AdvsearchError:
        raise
    except Exception as e:  # a bad URL, a missing driver, an unreachable server
        raise ConfigError("storage", f"cannot open Optuna storage {url!r}: {type(e).__name__}: {e}") from None


class OptunaStrategy(AdaptiveStrategy):
    name = "optuna"
    config_class = OptunaConfig

    def __init__(self, spec, config: OptunaConfig, *, model_sha256: str | None = None,
                 seeder: Strategy | None = None):  # fmt: skip
        """`model_sha256`: recorded in each study, so that workers with another model cannot join it;
        `seeder`: a strategy whose first batch becomes the first trials of each new study."""
        super().__init__(spec, config)
        self.optuna = _optuna()
        self.model_sha256, self.seeder = model_sha256, seeder
        self._seeds: list[str] | None = None  # the seeder's first batch, once drawn
        if config.sampler not in SAMPLERS:
            raise ConfigError("sampler", f"unknown sampler {config.sampler!r}; choose from {', '.join(SAMPLERS)}")
        make_sampler(config.sampler, config.seed)  # fail early (e.g. gp without scipy)
        self.storage = open_storage(config.storage)
        self.letters = list(spec.vocab[: spec.n_letters])
        self.names = [f"p{k:02d}" for k in range(1, self.length)]
        self.dist = {n: self.optuna.distributions.CategoricalDistribution(self.letters) for n in self.names}
        self.base_name = config.study_name or f"advsearch-L{self.length}-{self.target.describe(spec)}"
        self.studies: dict[str, object] = {}
        self.log: dict[str, list] = {}  # in-memory studies: study name -> [(sequence, value), ...] for resume
        self.worker = uuid.uuid4().hex[:12]
        self._pending = None
        self._heartbeat = None  # Heartbeat of the batch in flight (shared storages)

    def params(self) -> dict:
        return super().params() | {"sampler": self.config.sampler, "batch_size": self.config.batch_size,
                                   "storage": self.config.storage, "study_name": self.base_name,
                                   "seed_from": self.config.seed_from}  # fmt: skip

    # -- studies -------------------------------------------------------------------------------
    def _attrs(self, target) -> dict:
        attrs = {"length": self.length, "vocab": self.spec.vocab, "target": target.describe(self.spec)}
        return attrs | ({"model_sha256": self.model_sha256} if self.model_sha256 else {})

    def study(self, name: str, target, start: str | None = None):
        """Create or join study `name`; a new one gets `start` (and the seeder's batch) as first trials."""
        if name in self.studies:
            return self.studies[name]
        try:
            study = self.optuna.create_study(storage=self.storage, study_name=name, direction="maximize",
                                             sampler=make_sampler(self.config.sampler, self.config.seed),
                                             load_if_exists=True)  # fmt: skip
        except Exception as e:
            raise AdvsearchError(f"cannot create or join study {name!r}: {type(e).__name__}: {e}") from None
        attrs = self._attrs(target)
        found = {k: study.user_attrs[k] for k in attrs if k in study.user_attrs}
        if any(found[k] != attrs[k] for k in found):
            raise ConfigError("study_name", f"study {name!r} in {self.config.storage} was made with other settings "
                                            f"({found}); this run has {attrs}: pick another study name")  # fmt: skip
        self.optuna.storages.fail_stale_trials(study)  # trials of dead workers (a no-op without a heartbeat)
        fresh = len(study.trials) == 0 and name not in self.log
        for k, v in attrs.items():
            if k not in found:
                study.set_user_attr(k, v)
        if fresh:
            seeds = ([start] if start else []) + self._seed_sequences()
            for seq in seeds:
                study.enqueue_trial(self._params(seq), skip_if_exists=True)
        self.studies[name] = study
        return study

    def _seed_sequences(self) -> list[str]:
        """The seeder's first batch, cut to the searched length (drawn once: every new study gets the same)."""
        if self.seeder is None:
            return []
        if self._seeds is None:
            proposal = self.seeder.propose()
            rows = [] if proposal is None else proposal.tokens
            self._seeds = [self.spec.decode(r[: self.length]) for r in rows if len(r) >= self.length]
        if not self._seeds:
            raise ConfigError("seed_from", f"the seeding strategy {self.seeder.name!r} proposed no sequence of "
                                           f"length {self.length}")  # fmt: skip
        return self._seeds

    def _params(self, seq: str) -> dict:
        return dict(zip(self.names, seq[1:]))

    def _tokens(self, trials) -> torch.Tensor:
        idx = {c: i for i, c in enumerate(self.letters)}
        body = [[idx[t.params[n]] for n in self.names] for t in trials]
        return torch.cat([torch.full((len(trials), 1), self.spec.qmark), torch.tensor(body, dtype=torch.long)], 1)

    # -- the Strategy interface ----------------------------------------------------------------
    def propose(self) -> Proposal | None:
        if self.finished():
            return None
        n = min(self.config.batch_size, self.remaining())
        if self.schedule is not None and not self.schedule.warmed:
            self._pending = ("warmup", None, None, None)
            return Proposal(self.random_tokens(min(self.schedule.warmup, self.remaining())), judge_from=1)
        if self.schedule is None:
            pair, target, name, start = None, self.target, self.base_name, None
        else:
            pair = self.schedule.next_pair()
            if pair is None:
                return None
            v = self.spec.vocab
            target, name = self.schedule.target(pair), f"{self.base_name}:{v[pair[0]]}>{v[pair[1]]}"
            start = self.table.start.get(pair[0] * self.spec.d_vocab + pair[1])
        study = self.study(name, target, start)
        trials = []
        if self.storage is not None:
            self.optuna.storages.fail_stale_trials(study)
            self._heartbeat = Heartbeat(self.storage) if self.storage.get_heartbeat_interval() else None
        for _ in range(n):
            trials.append(study.ask(self.dist))
            if self.storage is not None:
                if self._heartbeat is not None:
                    self._heartbeat.add(trials[-1]._trial_id)
                trials[-1].set_user_attr("worker", self.worker)
        self._pending = ("trials", pair, name, trials)
        return Proposal(self._tokens(trials), judge_from=1)

    def observe(self, proposal, judged) -> None:
        kind, pair, name, trials = self._pending
        self._pending = None
        self.observe_table(judged)
        if kind == "warmup":
            self.schedule.warmed = True
        else:
            target = self.target if pair is None else self.schedule.target(pair)
            values = self.scores(judged, target).score.tolist()
            study = self.studies[name]
            if self._heartbeat is not None:
                self._heartbeat.stop()
                self._heartbeat = None
            for t, value in zip(trials, values):
                study.tell(t, value, skip_if_finished=True)  # failed meanwhile as stale: nothing left to tell
            if self.storage is None:
                self.log.setdefault(name, []).extend(zip((self.spec.decode(r) for r in proposal.tokens), values))
            if pair is not None:
                self.schedule.step_done(pair, len(trials))
        self.done += len(proposal.tokens)

    def state_dict(self) -> dict:
        # compact: per study, the sequences as one string and the values as one string (exact reprs),
        # so the state of a 50,000-trial run stays a few MB and quick to rewrite after every batch
        log = {name: {"sequences": "".join(s for s, _ in rows), "values": ",".join(map(repr, (v for _, v in rows)))}
               for name, rows in self.log.items()}  # fmt: skip
        return self.base_state() | {"worker": self.worker, "log": log}

    def load_state_dict(self, state: dict) -> None:
        self.load_base_state(state)
        self.worker = state["worker"]
        n = self.length
        self.log = {}
        for name, entry in state["log"].items():
            seqs, values = entry["sequences"], entry["values"].split(",") if entry["values"] else []
            self.log[name] = [(seqs[i * n : (i + 1) * n], float(v)) for i, v in enumerate(values)]
        if self.storage is None:  # rebuild the in-memory studies from the recorded trials
            for name, rows in self.log.items():
                target = self.target
                if self.schedule is not None:
                    x, y = name.rsplit(":", 1)[1].split(">")
                    target = self.schedule.target((self.spec.vocab.index(x), self.spec.vocab.index(y)))
                study = self.study(name, target)
                study.add_trials([self.optuna.trial.create_trial(params=self._params(seq), distributions=self.dist,
                                                                  value=value) for seq, value in rows])  # fmt: skip
        else:  # trials this worker asked but never told (interrupted mid-batch) would stay RUNNING forever
            running = self.optuna.trial.TrialState.RUNNING
            for name in self.optuna.get_all_study_names(self.storage):
                if name != self.base_name and not name.startswith(self.base_name + ":"):
                    continue
                study = self.optuna.load_study(study_name=name, storage=self.storage)
                for t in study.get_trials(deepcopy=False, states=(running,)):
                    if t.user_attrs.get("worker") == self.worker:
                        study.tell(t.number, state=self.optuna.trial.TrialState.FAIL)
