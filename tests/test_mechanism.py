"""Mechanism tables: computed from the weights, and the properties they imply hold on held-out data."""

import json

import pytest
import torch

from advsearch.mechanism.tables import MechanismTables, compute_tables, ln_scales, reference_batch
from advsearch.model.checkpoint import expected_shapes, load_model
from advsearch.model.spec import ModelSpec
from advsearch.model.weights_cache import DEFAULT_MODEL

from .conftest import reference_tokens


@pytest.fixture(scope="module")
def tables(challenge) -> MechanismTables:
    return compute_tables(challenge)


def held_out(n: int = 2000, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.full((n, 1), 10), torch.randint(0, 10, (n, 19), generator=g)], 1)


def random_init_checkpoint(path, seed: int = 3):
    spec = ModelSpec()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_shapes(spec).items():
        if key.endswith(("ln1.w", "ln_final.w")):
            state[key] = torch.ones(shape)
        elif key.endswith(("ln1.b", "ln_final.b")) or ".b_" in key or key.endswith("b_U"):
            state[key] = torch.zeros(shape)
        else:
            state[key] = torch.randn(shape, generator=g) * 0.3
    torch.save(state, path)
    return path


def test_reference_batch_is_the_issue_batch():
    assert torch.equal(reference_batch(ModelSpec()), reference_tokens())


def test_ln_scales_are_mean_hook_scales(challenge, tables):
    _, cache = challenge.bridge.run_with_cache(reference_tokens())
    assert tables.ln_scales["s0"] == pytest.approx(float(cache["blocks.0.ln1.hook_scale"].mean()), rel=1e-5)
    assert tables.ln_scales["s1"] == pytest.approx(float(cache["blocks.1.ln1.hook_scale"].mean()), rel=1e-5)
    assert tables.ln_scales["s_final"] == pytest.approx(float(cache["ln_final.hook_scale"].mean()), rel=1e-5)


def test_tables_follow_the_formulas(challenge, tables):
    """Recompute a few entries straight from the bridge's processed weights."""
    b = challenge.bridge
    s0, s1, sf = (tables.ln_scales[k] for k in ("s0", "s1", "s_final"))
    d = lambda x: x.detach().double()  # noqa: E731
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    E = d(b.W_E)[:10] / s0
    for h in range(3):
        A = (E @ d(b.blocks[0].attn.W_Q[h]) @ d(b.blocks[0].attn.W_K[h]).T @ E.T / 14**0.5).softmax(-1)
        assert torch.allclose(A.diagonal(), f64(tables.l0_diag[h]), atol=1e-6)
    OV1 = d(b.blocks[1].attn.W_V[2]) @ d(b.blocks[1].attn.W_O[2]) / s1
    OV0 = d(b.blocks[0].attn.W_V[1]) @ d(b.blocks[0].attn.W_O[1]) / s0
    U = d(b.W_U) / sf
    via01 = (d(b.W_E) @ OV0 @ OV1 @ U).diagonal()[:10]
    assert torch.allclose(via01, f64(tables.composed_ov_diag[2][2]), rtol=1e-6, atol=1e-6)
    direct = (d(b.W_E) @ OV1 @ U).diagonal()[:10]
    assert torch.allclose(direct, f64(tables.composed_ov_diag[2][0]), rtol=1e-6, atol=1e-6)


def test_derived_sets_are_consistent(tables):
    norms = torch.tensor(tables.responsibility_norm)
    assert tables.responsible_head == norms.argmax(0).tolist()
    for h in range(3):
        for t, v in enumerate(tables.l0_diag[h]):
            assert (t in tables.detectors[h]) == (v > tables.dup_threshold)
            assert (t in tables.anti_detectors[h]) == (v < tables.anti_threshold)
    for j in range(3):
        for t in range(10):
            vec = torch.tensor([tables.composed_ov_diag[j][p][t] for p in range(4)], dtype=torch.float64)
            assert float(vec.norm()) == pytest.approx(tables.responsibility_norm[j][t], rel=1e-9)


def test_responsibility_sets_partition_the_letters(tables):
    sets = tables.responsibility_sets
    flat = [t for s in sets for t in s]
    assert sorted(flat) == list(range(10))
    assert all(sets), "every L1 head is responsible for some letter on the challenge model"


def test_detector_heads_attend_to_earlier_copies(challenge, tables):
    """Held-out check: a detector for t puts well over the uniform share of its attention on earlier
    copies of t (b on head 0.2 sits at the 0.30 threshold and gets ~1.9x), an anti-detector well under it."""
    toks = held_out()
    _, cache = challenge.bridge.run_with_cache(toks)
    A0 = cache["blocks.0.attn.hook_pattern"]
    n, L = toks.shape
    copies = (toks[:, :, None] == toks[:, None, :]) & torch.ones(L, L, dtype=torch.bool).tril(-1)
    has_copy = copies.any(-1)
    uniform = copies.sum(-1).float() / (torch.arange(L) + 1).float()
    checked = 0
    for h in range(3):
        mass = (A0[:, h] * copies).sum(-1)
        for t in tables.detectors[h]:
            sel = (toks == t) & has_copy
            assert mass[sel].mean() > 1.5 * uniform[sel].mean(), (h, t)
            checked += 1
        for t in tables.anti_detectors[h]:
            sel = (toks == t) & has_copy
            assert mass[sel].mean() < 0.5 * uniform[sel].mean(), (h, t)
            checked += 1
    assert checked >= 10


def test_responsible_head_suppresses_duplicates_and_boosts_uniques(challenge, tables):
    """Held-out check: for every letter, its responsible head's mean DLA on it is the most negative of the
    L1 heads where the letter is duplicated in the prefix, and the most positive where it is unique."""
    toks = held_out()
    _, cache = challenge.bridge.run_with_cache(toks)
    res = cache.stack_head_results(layer=-1, pos_slice=None)[3:]  # the L1 heads
    dla = torch.einsum("hbld,dv->hblv", res / cache["ln_final.hook_scale"], challenge.weights.W_U)
    counts = torch.nn.functional.one_hot(toks, 11)[..., :10].cumsum(1)
    counts[:, 0] = 0
    for t in range(10):
        r = tables.responsible_head[t]
        dup = torch.stack([dla[h, ..., t][counts[..., t] >= 2].mean() for h in range(3)])
        uni = torch.stack([dla[h, ..., t][counts[..., t] == 1].mean() for h in range(3)])
        assert int(dup.argmin()) == r, (t, dup)
        assert int(uni.argmax()) == r, (t, uni)


def test_thresholds_are_options(challenge):
    strict = compute_tables(challenge, dup_threshold=0.9, anti_threshold=0.01)
    loose = compute_tables(challenge, dup_threshold=0.1, anti_threshold=0.1)
    assert sum(map(len, strict.detectors)) < sum(map(len, loose.detectors))
    assert sum(map(len, strict.anti_detectors)) < sum(map(len, loose.anti_detectors))
    assert strict.responsible_head == loose.responsible_head


def test_json_schema_and_text(tables):
    d = json.loads(tables.to_json())
    assert set(d) >= {"checkpoint", "sha256", "vocab", "letters", "ln_scales", "thresholds", "layer0", "layer1"}
    assert set(d["layer0"]) == {"diag", "attention", "detectors", "anti_detectors"}
    assert set(d["layer1"]) == {"paths", "composed_ov_diag", "norm", "responsible_head", "responsibility_sets"}
    assert len(d["layer1"]["composed_ov_diag"]) == 3 and len(d["layer1"]["composed_ov_diag"][0]) == 4
    assert sorted("".join(s for s in map("".join, d["layer1"]["responsibility_sets"]))) == list("abcdefghij")
    text = tables.format_text()
    for j, s in enumerate(tables.responsibility_sets):
        assert f"1.{j}: {''.join('abcdefghij'[t] for t in s)}" in text
    assert "s_final=" in text


def test_tables_are_computed_not_copied(challenge, tables, tmp_path):
    other = compute_tables(load_model(random_init_checkpoint(tmp_path / "random.pt")))
    assert other.l0_diag != tables.l0_diag
    assert other.composed_ov_diag != tables.composed_ov_diag
    assert sorted(t for s in other.responsibility_sets for t in s) == list(range(10))


def test_tables_differ_on_the_embedded_default(challenge, tables):
    if not DEFAULT_MODEL.exists():
        pytest.skip(f"embedded default checkpoint {DEFAULT_MODEL} not built yet")
    default = compute_tables(load_model(DEFAULT_MODEL))
    assert default.sha256 != tables.sha256
    assert default.ln_scales != tables.ln_scales
    # a different training run: the scores move by far more than float noise
    assert (torch.tensor(default.l0_diag) - torch.tensor(tables.l0_diag)).abs().max() > 0.05
    assert (torch.tensor(default.responsibility_norm) - torch.tensor(tables.responsibility_norm)).abs().max() > 1.0
    assert sorted(t for s in default.responsibility_sets for t in s) == list(range(10))


def test_ln_scales_function(challenge):
    s = ln_scales(challenge, n=50, seed=1)
    assert set(s) == {"s0", "s1", "s_final"} and all(v > 0 for v in s.values())
