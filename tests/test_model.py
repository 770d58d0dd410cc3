import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from advsearch.errors import AdvsearchError
from advsearch.model.checkpoint import (
    WEIGHT_NAMES,
    build_bridge,
    load_model,
    process_weights,
    read_cached_weights,
    read_state_dict,
    validate_state_dict,
    weights_from_bridge,  # fmt: skip
)
from advsearch.model.evaluator import Evaluator
from advsearch.model.judge import judge
from advsearch.model.spec import ModelSpec
from advsearch.model.weights_cache import DEFAULT_MODEL, cache_dir, cache_key, cache_path, processed_shapes

from .conftest import OTHER_SEED_MODEL, reference_tokens


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


def _load_in_subprocess(path) -> tuple[bool, list]:
    """(was transformer_lens imported, W_E as a list) after load_model(path) in a fresh process."""
    code = ("import json, sys; from advsearch.model.checkpoint import load_model; m = load_model(sys.argv[1]); "
            "print(json.dumps(['transformer_lens' in sys.modules, m.weights.W_E.tolist()]))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    imported, w_e = json.loads(done.stdout)
    return imported, w_e


def _weights_equal(a, b) -> bool:
    return a.eps == b.eps and all(torch.equal(getattr(a, n), getattr(b, n)) for n in WEIGHT_NAMES)


@pytest.mark.parametrize("checkpoint", ["challenge", "other seed", "embedded default"])
def test_processing_gives_the_bridges_weights_bit_for_bit(checkpoint, challenge_path):
    path = {"challenge": challenge_path, "other seed": OTHER_SEED_MODEL, "embedded default": DEFAULT_MODEL}[checkpoint]
    state = read_state_dict(path)
    spec = ModelSpec.for_checkpoint(path)
    assert _weights_equal(process_weights(state, spec), weights_from_bridge(build_bridge(state, spec)))


def test_loading_imports_transformer_lens_for_the_bridge_only(tmp_path, monkeypatch, challenge_path):
    monkeypatch.setenv("ADVSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    imported, w_e_cold = _load_in_subprocess(challenge_path)
    assert not imported, "a cold cache must not import transformer_lens"
    assert len(list((tmp_path / "cache").glob("weights-*.npz"))) == 1
    imported, w_e = _load_in_subprocess(challenge_path)
    assert not imported and w_e == w_e_cold
    hit = load_model(challenge_path)
    assert hit.from_cache and not hit.bridge_built
    monkeypatch.setenv("ADVSEARCH_NO_CACHE", "1")
    fresh = load_model(challenge_path)
    assert not fresh.from_cache and not fresh.bridge_built and _weights_equal(hit.weights, fresh.weights)
    assert torch.equal(torch.tensor(w_e), fresh.weights.W_E)
    toks = reference_tokens(20)
    with torch.inference_mode():  # the lazily built bridge is the same model
        assert torch.equal(hit.bridge(toks), fresh.bridge(toks))


def _save_npz(path: Path, key: dict, eps, arrays: dict) -> None:
    """A cache file as `advsearch.model.weights_cache.write_cache_arrays` lays it out, with whatever contents."""
    with open(path, "wb") as f:
        np.savez(f, key=np.array(json.dumps(key)), eps=np.array(eps), **arrays)


def _arrays(fresh) -> dict:
    return fresh.arrays()


def _corrupt(path: Path, key: dict, spec: ModelSpec, fresh) -> None:
    path.write_bytes(b"\x00 not an npz file")


def _truncated(path: Path, key: dict, spec: ModelSpec, fresh) -> None:
    _save_npz(path, key, fresh.eps, _arrays(fresh))
    path.write_bytes(path.read_bytes()[:-200])


def _stale(path: Path, key: dict, spec: ModelSpec, fresh) -> None:
    _save_npz(path, key | {"torch": "0.0.1"}, fresh.eps, {n: a + 1 for n, a in _arrays(fresh).items()})


def _misshapen(path: Path, key: dict, spec: ModelSpec, fresh) -> None:
    _save_npz(path, key, fresh.eps, _arrays(fresh) | {"W_U": np.zeros((spec.d_model, spec.d_vocab + 1), np.float32)})


def _missing_array(path: Path, key: dict, spec: ModelSpec, fresh) -> None:
    arrays = _arrays(fresh)
    del arrays["b_K"]
    _save_npz(path, key, fresh.eps, arrays)


def _not_finite(path: Path, key: dict, spec: ModelSpec, fresh) -> None:
    _save_npz(path, key, fresh.eps, _arrays(fresh) | {"b_U": np.full(spec.d_vocab, np.nan, np.float32)})


def _not_floating(path: Path, key: dict, spec: ModelSpec, fresh) -> None:
    _save_npz(path, key, fresh.eps, _arrays(fresh) | {"b_U": np.zeros(spec.d_vocab, np.int64)})


def _pickled(path: Path, key: dict, spec: ModelSpec, fresh) -> None:
    _save_npz(path, key, fresh.eps, _arrays(fresh) | {"b_U": np.array([object()] * spec.d_vocab, dtype=object)})


def _bad_eps(path: Path, key: dict, spec: ModelSpec, fresh) -> None:
    _save_npz(path, key, 2.0, _arrays(fresh))


SPOILERS = [_corrupt, _truncated, _stale, _misshapen, _missing_array, _not_finite, _not_floating, _pickled, _bad_eps]


def test_an_intact_cache_file_is_trusted(tmp_path, monkeypatch, challenge):
    """The counterpart of the spoiled files below: the same writer with good contents is read back."""
    monkeypatch.setenv("ADVSEARCH_CACHE_DIR", str(tmp_path))
    key = cache_key(challenge.sha256, challenge.spec)
    _save_npz(cache_path(key), key, challenge.weights.eps, _arrays(challenge.weights))
    assert _weights_equal(read_cached_weights(key, challenge.spec), challenge.weights)


def test_processed_shapes_name_every_weight(challenge):
    shapes = processed_shapes(challenge.spec)
    assert set(shapes) == set(WEIGHT_NAMES)
    assert all(tuple(getattr(challenge.weights, n).shape) == s for n, s in shapes.items())


@pytest.mark.parametrize("spoil", SPOILERS)
def test_a_spoiled_cache_file_is_rebuilt_not_trusted(tmp_path, monkeypatch, challenge_path, challenge, spoil):
    monkeypatch.setenv("ADVSEARCH_CACHE_DIR", str(tmp_path))
    key = cache_key(challenge.sha256, challenge.spec)
    path = cache_path(key)
    assert path.parent == tmp_path
    spoil(path, key, challenge.spec, challenge.weights)
    assert read_cached_weights(key, challenge.spec) is None
    loaded = load_model(challenge_path)
    assert not loaded.from_cache, "the spoiled file was not used"
    assert _weights_equal(loaded.weights, challenge.weights)
    assert _weights_equal(read_cached_weights(key, challenge.spec), challenge.weights), "the file was rewritten"
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file is left behind"


def test_unwritable_cache_and_no_cache_are_bypassed(tmp_path, monkeypatch, challenge_path, challenge):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("ADVSEARCH_CACHE_DIR", str(tmp_path / "file" / "cache"))  # cannot be created
    assert _weights_equal(load_model(challenge_path).weights, challenge.weights)
    monkeypatch.setenv("ADVSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ADVSEARCH_NO_CACHE", "1")
    assert not load_model(challenge_path).from_cache
    assert not (tmp_path / "cache").exists(), "ADVSEARCH_NO_CACHE writes nothing"
    monkeypatch.setenv("ADVSEARCH_NO_CACHE", "0")
    assert not load_model(challenge_path).from_cache
    assert load_model(challenge_path).from_cache


def test_no_home_folder_means_no_cache(monkeypatch, challenge_path, challenge):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("ADVSEARCH_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    loaded = load_model(challenge_path)
    assert not loaded.from_cache and _weights_equal(loaded.weights, challenge.weights)


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ADVSEARCH_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "advsearch"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "advsearch"
    monkeypatch.setenv("ADVSEARCH_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_cache_key_changes_with_checkpoint_spec_and_versions(challenge):
    key = cache_key(challenge.sha256, challenge.spec)
    assert key["torch"] == str(torch.__version__) and key["transformer_lens"] == "4.3.0"
    others = [cache_key("0" * 64, challenge.spec), cache_key(challenge.sha256, ModelSpec(n_heads=6, d_head=7)),
              key | {"transformer_lens": "4.3.1"}]  # fmt: skip
    assert len({cache_path(k) for k in [key, *others]}) == 4


def test_a_warm_cache_still_validates_the_checkpoint(tmp_path, challenge_path):
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(challenge_path.read_bytes())
    load_model(ckpt)
    assert load_model(ckpt).from_cache
    (tmp_path / "m.pt.json").write_text(json.dumps({"spec": {"n_heads": 6, "d_head": 7}}))
    with pytest.raises(AdvsearchError, match=r"W_Q has shape \[3, 42, 14\], expected \[6, 42, 7\]"):
        load_model(ckpt)
