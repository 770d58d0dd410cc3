import json

import pytest
import torch

from advsearch.errors import AdvsearchError
from advsearch.evaluator import Evaluator
from advsearch.judge import judge
from advsearch.model import load_model, read_state_dict, validate_state_dict
from advsearch.spec import ModelSpec

from .conftest import reference_tokens


def test_reference_figures_on_the_challenge_checkpoint(challenge):
    toks = reference_tokens()
    with torch.inference_mode():
        logits = challenge.bridge(toks)
    labels = judge(toks, logits, 10).true
    logp = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    p = logp.exp()
    assert float(-logp.mean()) == pytest.approx(0.0174, rel=5e-3)
    assert float(p.mean()) == pytest.approx(0.9878, rel=5e-4)
    assert float(p.min()) == pytest.approx(0.00126, rel=5e-3)
    assert float((logits.argmax(-1) == labels).float().mean()) == pytest.approx(0.9955, abs=5e-5)


def test_fused_evaluator_agrees_on_the_reference_figures(challenge):
    toks = reference_tokens()
    j = judge(toks, Evaluator(challenge.weights, "cpu").logits(toks), 10)
    assert float((~j.failure).float().mean()) == pytest.approx(0.9955, abs=5e-5)
    assert float(j.p_true.mean()) == pytest.approx(0.9878, rel=5e-4)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda sd: sd.pop("blocks.1.attn.W_K"), "missing key blocks.1.attn.W_K (expected shape [3, 42, 14])"),
        (lambda sd: sd.__setitem__("blocks.0.attn.W_Q", torch.zeros(3, 42, 7)),
         "key blocks.0.attn.W_Q has shape [3, 42, 7], expected [3, 42, 14]"),
        (lambda sd: sd.__setitem__("blocks.0.mlp.W_in", torch.zeros(42, 168)), "unexpected key blocks.0.mlp.W_in"),
    ],
)  # fmt: skip
def test_mismatched_state_dict_is_a_one_line_error(challenge_path, mutate, message):
    sd = read_state_dict(challenge_path)
    mutate(sd)
    with pytest.raises(AdvsearchError) as e:
        validate_state_dict(sd, ModelSpec())
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_and_unreadable_checkpoints(tmp_path):
    with pytest.raises(AdvsearchError, match="checkpoint not found"):
        load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(AdvsearchError, match="cannot read checkpoint"):
        load_model(bad)


def test_sidecar_overrides_the_spec(tmp_path, challenge_path):
    ckpt = tmp_path / "m.pt"
    torch.save(read_state_dict(challenge_path), ckpt)
    (tmp_path / "m.pt.json").write_text(json.dumps({"spec": {"n_heads": 6, "d_head": 7}}))
    with pytest.raises(AdvsearchError, match=r"W_Q has shape \[3, 42, 14\], expected \[6, 42, 7\]"):
        load_model(ckpt)


def test_embedded_default_is_used_without_a_path(monkeypatch):
    monkeypatch.delenv("ADVSEARCH_MODEL", raising=False)
    model = load_model()
    assert model.path.name == "default_model.pt" and model.path.exists()
    assert model.spec == ModelSpec.for_checkpoint(model.path)


def test_env_variable_selects_the_model(monkeypatch, challenge_path):
    monkeypatch.setenv("ADVSEARCH_MODEL", str(challenge_path))
    assert load_model().path == challenge_path
