"""`advsearch eval` without torch: the numpy forward agrees with the fused evaluator, a warm cache answers
without importing torch, and what eval prints does not depend on the cache (cold, warm, spoiled, unwritable)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from advsearch.errors import AdvsearchError
from advsearch.model.checkpoint import WEIGHT_NAMES, load_model, read_cached_weights
from advsearch.model.evaluator import Evaluator
from advsearch.model.judge import judge
from advsearch.model.numpy_eval import forward, table_lines
from advsearch.model.weights_cache import cache_key, cache_path

from .conftest import REPO, invoke, reference_tokens
from .test_model import SPOILERS

# Passing and failing sequences of every length class (the last two fail on the challenge checkpoint).
SEQUENCES = ["?", "?a", "?abcab", "?acbba", "?cbcbc", "?jjjjjjjjjjjjjjjjjjj", "?fjjfjddjfjfffdjjd", "?dejjfjjjfjjfed"]
# Logits of the numpy forward (float64) and the fused evaluator (float32) differ by the evaluator's float32
# rounding; the largest difference seen over 12,000 sequences on three checkpoints was 3.1e-4.
LOGIT_TOLERANCE = 5e-4
ROW = re.compile(r"^\s*(\d+)\s+(\S)\s+(\S)\s+(\S)\s+(\d\.\d{4})\s+(\d\.\d{4})(  <- FAIL)?$")


def _numpy_weights(loaded) -> dict:
    return loaded.weights.arrays()


def _random_sequences(n: int, seed: int) -> list[list[int]]:
    """Sequences of every length from 1 to 20 over 2 to 10 letters (few letters: many repeats, many failures)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length, letters = 1 + i % 20, int(torch.randint(2, 11, (1,), generator=g))
        out.append([10] + torch.randint(0, letters, (length - 1,), generator=g).tolist())
    return out


@pytest.mark.parametrize("which", ["challenge", "other_seed"])
def test_numpy_forward_matches_the_fused_evaluator(request, which):
    loaded = request.getfixturevalue(which)
    w, evaluator = _numpy_weights(loaded), Evaluator(loaded.weights, "cpu")
    seqs = _random_sequences(400, seed=1) + reference_tokens(100).tolist()
    worst = 0.0
    for ids in seqs:
        fused = evaluator.logits(torch.tensor([ids]))[0].numpy()
        mine = forward(w, loaded.weights.eps, ids)
        assert mine.shape == fused.shape
        worst = max(worst, float(np.abs(mine - fused).max()))
        assert (mine.argmax(-1) == fused.argmax(-1)).all(), ids
    assert worst <= LOGIT_TOLERANCE


def test_numpy_forward_depends_on_the_weights(challenge):
    """The agreement above is not vacuous: other weights give other logits."""
    ids = reference_tokens(1)[0].tolist()
    w = _numpy_weights(challenge)
    shuffled = w | {"W_U": w["W_U"][:, ::-1].copy()}
    assert np.abs(forward(w, challenge.weights.eps, ids) - forward(shuffled, challenge.weights.eps, ids)).max() > 1


def _rows(output: str) -> list[tuple]:
    """Each table row of `eval` output as (pos, in, true, pred, p_pred, p_true, failed); other lines as text."""
    parsed = []
    for line in output.splitlines():
        m = ROW.match(line)
        parsed.append((*m.groups()[:4], float(m[5]), float(m[6]), bool(m[7])) if m else line)
    return parsed


def assert_same_tables(numpy_output: str, torch_output: str) -> None:
    """Same lines, same verdicts; probabilities equal to their 4 printed decimals or 1e-4 apart (float32 rounding
    of the torch path can move the last printed digit)."""
    a, b = _rows(numpy_output), _rows(torch_output)
    assert len(a) == len(b) and any(isinstance(r, tuple) for r in a), (numpy_output, torch_output)
    for x, y in zip(a, b):
        if isinstance(x, str) or isinstance(y, str):
            assert x == y
        else:
            assert x[:4] == y[:4] and x[6] == y[6], (x, y)
            assert abs(x[4] - y[4]) <= 1.01e-4 and abs(x[5] - y[5]) <= 1.01e-4, (x, y)


WRAPPER = """
import atexit, json, runpy, sys
HEAVY = ("torch", "numpy", "transformer_lens")
atexit.register(lambda: sys.stderr.write("\\nMODULES " + json.dumps([m for m in HEAVY if m in sys.modules]) + "\\n"))
sys.argv = ["advsearch"] + sys.argv[1:]
runpy.run_module("advsearch.cli.main", run_name="__main__", alter_sys=True)
"""


def _cli(*args, env: dict | None = None) -> tuple[int, str, str, list]:
    """(exit status, stdout, stderr without the module line, heavy modules imported) of a fresh `advsearch` process."""
    done = subprocess.run([sys.executable, "-c", WRAPPER, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, cwd=REPO)  # fmt: skip
    err, _, modules = done.stderr.rpartition("\nMODULES ")
    return done.returncode, done.stdout, err.strip(), json.loads(modules)


def _torch_path_output(sequences, model=None) -> str:
    """The tables of `sequences` as the fused evaluator and the judge (torch, float32) give them."""
    loaded = load_model(model)
    evaluator, lines = Evaluator(loaded.weights, device="cpu"), []
    for text in sequences:
        toks = loaded.spec.encode(text)[None]
        j = judge(toks, evaluator.logits(toks), loaded.spec.qmark)
        lines += table_lines(text, loaded.spec.vocab, j.true[0].tolist(), j.pred[0].tolist(), j.p_pred[0].tolist(),
                             j.p_true[0].tolist())  # fmt: skip
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def torch_tables(challenge_path) -> str:
    """The tables of SEQUENCES on the challenge checkpoint through torch."""
    return _torch_path_output(SEQUENCES, challenge_path)


@pytest.fixture(scope="module")
def tables(challenge_path) -> str:
    """What `eval SEQUENCES` prints on the challenge checkpoint (in this process)."""
    result = invoke("eval", *SEQUENCES, "--model", challenge_path)
    assert result.exit_code == 0, result.output
    return result.output


def test_eval_on_a_warm_cache_does_not_import_torch(tmp_path, challenge_path, tables, torch_tables):
    env = {"ADVSEARCH_CACHE_DIR": str(tmp_path / "cache")}
    code, cold, err, modules = _cli("eval", *SEQUENCES, "--model", challenge_path, env=env)
    assert code == 0 and err == "" and "torch" in modules, "a cold cache loads the model with torch"
    assert len(list((tmp_path / "cache").glob("weights-*.npz"))) == 1
    code, warm, err, modules = _cli("eval", *SEQUENCES, "--model", challenge_path, env=env)
    assert code == 0 and err == ""
    assert modules == ["numpy"], "a warm cache answers with numpy alone"
    assert cold == warm == tables, "what eval prints does not depend on the cache"
    assert "<- FAIL" in warm and "all positions right" in warm
    assert_same_tables(warm, torch_tables)


def test_help_imports_neither_torch_nor_numpy():
    code, out, err, modules = _cli("--help")
    assert code == 0 and "eval" in out and modules == []


def test_a_missing_checkpoint_is_one_line_without_torch(tmp_path):
    code, out, err, modules = _cli("eval", "?ab", "--model", tmp_path / "nope.pt")
    assert code == 2 and out == "" and "torch" not in modules
    assert err == f"advsearch: error: checkpoint not found: {tmp_path / 'nope.pt'}"


@pytest.mark.parametrize("bad, message", [("?abz", "unknown character(s) 'z'"), ("abc", "must start with '?'"),
                                          ("?" + "a" * 20, "has 21 tokens; the model takes at most 20")])  # fmt: skip
def test_a_bad_sequence_is_the_same_one_line_error_on_a_warm_cache(challenge, challenge_path, bad, message):
    # `challenge` warmed this session's cache (conftest's ADVSEARCH_CACHE_DIR, which the subprocess inherits).
    code, out, err, modules = _cli("eval", "?ab", bad, "--model", challenge_path)
    assert code == 2 and out == "" and modules == ["numpy"], "nothing is printed before the bad sequence is found"
    assert err.count("\n") == 0 and message in err
    with pytest.raises(AdvsearchError) as torch_path:  # what the torch path says: ModelSpec.encode
        challenge.spec.encode(bad)
    assert err == f"advsearch: error: {torch_path.value}"


def test_a_checkpoint_that_does_not_match_its_spec_is_still_rejected(tmp_path, challenge, challenge_path):
    """The cache is keyed by the spec too: a sidecar that changes it finds no entry, and validation speaks."""
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(challenge_path.read_bytes())  # same bytes: `challenge` warmed the session cache for it
    assert _cli("eval", "?ab", "--model", ckpt)[3] == ["numpy"]
    (tmp_path / "m.pt.json").write_text(json.dumps({"spec": {"n_heads": 6, "d_head": 7}}))
    code, out, err, _ = _cli("eval", "?ab", "--model", ckpt)
    assert code == 2 and out == "" and err.count("\n") == 0
    assert "W_Q has shape [3, 42, 14], expected [6, 42, 7]" in err


@pytest.mark.parametrize("spoil", SPOILERS)
def test_eval_rebuilds_a_spoiled_cache_file(tmp_path, monkeypatch, challenge_path, challenge, tables, spoil):
    monkeypatch.setenv("ADVSEARCH_CACHE_DIR", str(tmp_path))
    key = cache_key(challenge.sha256, challenge.spec)
    spoil(cache_path(key), key, challenge.spec, challenge.weights)
    expected = tables
    result = invoke("eval", *SEQUENCES, "--model", challenge_path)
    assert result.exit_code == 0 and result.output == expected, "the spoiled file was not used"
    rebuilt = read_cached_weights(key, challenge.spec)
    assert rebuilt is not None and all(torch.equal(getattr(rebuilt, n), getattr(challenge.weights, n))
                                       for n in WEIGHT_NAMES), "the file was rewritten"  # fmt: skip
    code, warm, err, modules = _cli("eval", *SEQUENCES, "--model", challenge_path)
    assert code == 0 and modules == ["numpy"] and warm == expected


def test_eval_with_an_unwritable_cache_folder(tmp_path, challenge_path, tables):
    (tmp_path / "file").write_text("")
    env = {"ADVSEARCH_CACHE_DIR": str(tmp_path / "file" / "cache")}  # cannot be created
    code, out, err, modules = _cli("eval", *SEQUENCES, "--model", challenge_path, env=env)
    assert code == 0 and err == "" and out == tables and "torch" in modules
    assert not (tmp_path / "file" / "cache").exists()


def test_eval_of_the_embedded_default_model(monkeypatch):
    monkeypatch.delenv("ADVSEARCH_MODEL", raising=False)
    load_model()  # warms the session cache
    code, warm, err, modules = _cli("eval", *SEQUENCES)
    assert code == 0 and modules == ["numpy"]
    assert_same_tables(warm, _torch_path_output(SEQUENCES))


def test_the_torch_path_reads_the_cache_as_the_same_tensors(tmp_path, monkeypatch, challenge_path, challenge):
    monkeypatch.setenv("ADVSEARCH_CACHE_DIR", str(tmp_path))
    load_model(challenge_path)  # writes the entry
    hit = load_model(challenge_path)
    assert hit.from_cache
    for n in WEIGHT_NAMES:
        got, want = getattr(hit.weights, n), getattr(challenge.weights, n)
        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want), n
    assert hit.weights.eps == challenge.weights.eps


def test_assert_same_tables_catches_a_different_verdict():
    """The comparison used above can fail: a changed prediction or a far-off probability is caught."""
    line = "  3   c     a     a  0.9000  0.9000"
    with pytest.raises(AssertionError):
        assert_same_tables(line, "  3   c     a     b  0.9000  0.9000")
    with pytest.raises(AssertionError):
        assert_same_tables(line, "  3   c     a     a  0.9002  0.9000")
    assert_same_tables(line, "  3   c     a     a  0.9001  0.9000")

