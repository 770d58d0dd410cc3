import itertools

import pytest
import torch

from advsearch.errors import AdvsearchError
from advsearch.model.evaluator import Evaluator, resolve_device

from .conftest import reference_tokens


def _bridge(model, toks):
    with torch.inference_mode():
        return model.bridge(toks)


def test_fused_matches_bridge_on_random_sequences(challenge):
    toks = reference_tokens(1000, seed=7)
    fused = Evaluator(challenge.weights, "cpu", batch_size=333).logits(toks)
    assert (fused - _bridge(challenge, toks)).abs().max() <= 1e-3


def test_fused_matches_bridge_on_all_three_token_sequences(challenge):
    body = torch.tensor(list(itertools.product(range(10), repeat=3)))
    toks = torch.cat([torch.full((1000, 1), 10), body], 1)
    fused = Evaluator(challenge.weights, "cpu").logits(toks)
    assert fused.shape == (1000, 4, 11)
    assert (fused - _bridge(challenge, toks)).abs().max() <= 1e-3


def test_causal_prefix_outputs_do_not_depend_on_the_future(challenge):
    toks = reference_tokens(50, seed=3)
    ev = Evaluator(challenge.weights, "cpu")
    assert torch.allclose(ev.logits(toks)[:, :8], ev.logits(toks[:, :8]), atol=1e-3)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(AdvsearchError, match="no CUDA device"):
            resolve_device("cuda")
