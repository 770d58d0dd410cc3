import torch

from advsearch.model.evaluator import Evaluator
from advsearch.model.judge import judge
from advsearch.model.spec import ModelSpec
from advsearch.search.configs import ExhaustiveConfig, RandomConfig
from strategies import make_strategy

from .conftest import drive

SPEC = ModelSpec()


def test_random_is_seeded_and_independent_of_batch_size():
    def tokens(**options):
        strategy = make_strategy("random", SPEC, RandomConfig(budget=1000, **options))
        return torch.cat([p.tokens for p in drive(strategy)])

    a, b, c = tokens(seed=3, batch_size=64), tokens(seed=3, batch_size=999), tokens(seed=4)
    assert a.shape == (1000, 20) and (a[:, 0] == 10).all() and (a[:, 1:] < 10).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_resumes_with_the_same_sequences():
    full = torch.cat([p.tokens for p in drive(make_strategy("random", SPEC, RandomConfig(budget=500, batch_size=100)))])
    first = make_strategy("random", SPEC, RandomConfig(budget=500, batch_size=100))
    drain_two = [first.propose() for _ in range(1)]
    first.observe(drain_two[0], None)
    resumed = make_strategy("random", SPEC, RandomConfig(budget=500, batch_size=100))
    resumed.load_state_dict(first.state_dict())
    rest = torch.cat([p.tokens for p in drive(resumed)])
    assert torch.equal(full[100:], rest)


def test_exhaustive_enumerates_every_prefix_once():
    batches = drive(make_strategy("exhaustive", SPEC, ExhaustiveConfig(max_len=3, batch_size=77)))
    seen = [SPEC.decode(row) for p in batches for row in p.tokens]
    assert len(seen) == len(set(seen)) == 10 + 100 + 1000
    assert seen[:3] == ["?a", "?b", "?c"] and seen[-1] == "?jjj"
    assert all(p.judge_from == p.tokens.shape[1] - 1 for p in batches)


def test_exhaustive_census_counts_match_a_direct_count(challenge):
    ev = Evaluator(challenge.weights, "cpu")
    strategy = make_strategy("exhaustive", SPEC, ExhaustiveConfig(max_len=4, batch_size=3000))
    drive(strategy, ev)
    census = strategy.tables()["census.csv"]
    assert [r["length"] for r in census] == [1, 2, 3, 4]
    for row in census:
        n = row["length"]
        body = torch.cartesian_prod(*[torch.arange(10)] * n) if n > 1 else torch.arange(10)[:, None]
        toks = torch.cat([torch.full((len(body), 1), 10), body], 1)
        j = judge(toks, ev.logits(toks), 10)
        fails = j.failure[:, -1]
        assert row["prefixes"] == 10**n
        assert row["failures"] == int(fails.sum())
        assert row["confident_failures"] == int(j.confident[:, -1].sum())
        if row["failures"]:
            assert row["example"] == SPEC.decode(toks[int(fails.nonzero()[0])])


def test_prefix_sharing_census_is_identical_to_the_plain_path(challenge):
    ev = Evaluator(challenge.weights, "cpu")
    census = {}
    for shared in (True, False):
        strategy = make_strategy("exhaustive", SPEC, ExhaustiveConfig(max_len=5, batch_size=5000, shared_prefixes=shared))
        batches = drive(strategy, ev)
        assert all(p.extension == shared for p in batches)
        census[shared] = strategy.tables()["census.csv"]
    assert census[True] == census[False]
    assert [r["prefixes"] for r in census[True]] == [10, 100, 1000, 10000, 100000]


def test_prefix_sharing_resumes_from_saved_state(challenge):
    ev = Evaluator(challenge.weights, "cpu")
    whole = make_strategy("exhaustive", SPEC, ExhaustiveConfig(max_len=4, batch_size=300))
    drive(whole, ev)
    cut = make_strategy("exhaustive", SPEC, ExhaustiveConfig(max_len=4, batch_size=300))
    for _ in range(7):
        p = cut.propose()
        cut.observe(p, judge(p.tokens, ev.evaluate(p), 10, 0.5, p.judge_from))
    resumed = make_strategy("exhaustive", SPEC, ExhaustiveConfig(max_len=4, batch_size=300))
    resumed.load_state_dict(cut.state_dict())
    drive(resumed, Evaluator(challenge.weights, "cpu"))  # a fresh evaluator holds no cached parents
    assert resumed.tables() == whole.tables()


def test_each_strategy_owns_the_config_the_cli_builds_its_options_from():
    from advsearch.search.configs import SEED_FROM, STRATEGY_CONFIGS
    from strategies import STRATEGIES

    assert list(STRATEGY_CONFIGS) == list(STRATEGIES)
    assert SEED_FROM == tuple(name for name, cls in STRATEGIES.items() if cls.seeds)  # --seed-from's choices
    for name, cls in STRATEGIES.items():
        assert cls.config_class is STRATEGY_CONFIGS[name]
        assert "tables" not in cls.config_class.__dataclass_fields__  # computed, passed to the constructor
        assert "model_sha256" not in cls.config_class.__dataclass_fields__
