import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The processed-weights cache of this test session (and of the subprocesses it starts) lives in a
# temporary folder, so tests neither read nor write the user's real cache.
os.environ["ADVSEARCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="advsearch-test-cache-")
os.environ.pop("ADVSEARCH_NO_CACHE", None)
atexit.register(shutil.rmtree, os.environ["ADVSEARCH_CACHE_DIR"], True)
SHARED_MODEL = Path("shared") / "models" / "first_unique_char_model.pt"


def challenge_candidates() -> list[Path]:
    """`../shared` beside this checkout, then beside the checkout it was cloned from (a local clone's origin)."""
    places = [REPO.parent]
    origin = subprocess.run(["git", "-C", str(REPO), "config", "remote.origin.url"], capture_output=True, text=True)
    if origin.returncode == 0 and Path(origin.stdout.strip()).is_dir():
        places.append(Path(origin.stdout.strip()).resolve().parent)
    return [place / SHARED_MODEL for place in places]


@pytest.fixture(scope="session")
def challenge_path() -> Path:
    """The original challenge checkpoint; required (not skipped) when CI is set."""
    candidates = challenge_candidates()
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"challenge checkpoint missing at {' or '.join(map(str, candidates))} (required in CI)")
        pytest.skip("challenge checkpoint not available")
    return found.resolve()


@pytest.fixture(scope="session")
def challenge(challenge_path):
    from advsearch.model.checkpoint import load_model

    return load_model(challenge_path)


def reference_tokens(n: int = 1000, seed: int = 42) -> torch.Tensor:
    """The issue's reference batch: torch.manual_seed(seed), `?` then 19 tokens a-j."""
    torch.manual_seed(seed)
    return torch.cat([torch.full((n, 1), 10), torch.randint(0, 10, (n, 19))], 1)


def drive(strategy, evaluator=None, limit=None) -> list:
    """Run a strategy through propose -> evaluate -> judge -> observe; returns its proposals.

    Without an evaluator the judge sees a perfect model (one-hot logits on the oracle's labels).
    """
    from advsearch.model.judge import judge
    from advsearch.model.oracle import first_unique

    out = []
    while (limit is None or len(out) < limit) and (p := strategy.propose()) is not None:
        if evaluator is None:
            logits = torch.nn.functional.one_hot(first_unique(p.tokens), 11).float() * 10
        else:
            logits = evaluator.evaluate(p)
        strategy.observe(p, judge(p.tokens, logits, 10, 0.5, p.judge_from))
        out.append(p)
    return out


def invoke(*args):
    """Run the advsearch CLI in-process (arguments stringified)."""
    from click.testing import CliRunner

    from advsearch.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def rows(path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def interrupt_judging(monkeypatch, at_call: int):
    """Make the search steps' judge raise KeyboardInterrupt on call `at_call`; returns an undo function."""
    from advsearch.search import steps as runner

    real, calls = runner.judge, {"n": 0}

    def judge_then_interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "judge", judge_then_interrupt)
    return lambda: monkeypatch.setattr(runner, "judge", real)


OTHER_SEED_MODEL = REPO / "tests" / "data" / "seed1.pt"


@pytest.fixture(scope="session")
def other_seed():
    """A checkpoint this project trained with `advsearch train --seed 1` (committed under tests/data)."""
    from advsearch.model.checkpoint import load_model

    return load_model(OTHER_SEED_MODEL)
