import csv

import torch

from advsearch.model.evaluator import Evaluator
from advsearch.search.configs import SampledConfig
from advsearch.search.runner import run_search
from strategies.base import Proposal, Strategy


class Repeats(Strategy):
    """Proposes one batch holding the same sequences several times, far apart."""

    name = "repeats"

    def __init__(self, spec, tokens):
        super().__init__(spec, SampledConfig())
        self.tokens, self.done = tokens, False

    def propose(self):
        return None if self.done else Proposal(torch.cat([self.tokens] * 5))

    def observe(self, proposal, judged):
        self.done = True


def test_a_failing_prefix_is_written_once_even_when_repeated_within_a_batch(challenge, tmp_path):
    tokens = challenge.spec.random_tokens(300, seed=1)
    s = run_search(challenge, Repeats(challenge.spec, tokens), tmp_path / "run", Evaluator(challenge.weights, "cpu"),
                   progress=False)  # fmt: skip
    with open(tmp_path / "run" / "failures.csv", newline="") as f:
        sequences = [r["sequence"] for r in csv.DictReader(f)]
    assert sequences and len(sequences) == len(set(sequences)) == s["failures"]
    assert s["sequences"] == 1500
