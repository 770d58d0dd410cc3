"""Per-failure explanations (issue 3): attribution, categories, causal checks, and the measured fractions."""

import json
from collections import Counter

import click
import pytest
import torch
from click.testing import CliRunner

from advsearch.cli_mechanism import explain_cmd, mechanism_cmd
from advsearch.evaluator import Evaluator
from advsearch.explain import CATEGORIES, CHECK_RESULTS, CSV_COLUMNS, Explainer, failing_positions
from advsearch.oracle import first_unique

N_SEQUENCES = 10_000  # the closing note's numbers use 20,000 (same code, same seed)


@pytest.fixture(scope="module")
def explainer(challenge):
    return Explainer(challenge)


def random_failures(model, n: int, seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    """One (tokens, k) per distinct failing prefix of n random sequences (fused evaluator)."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.cat([torch.full((n, 1), 10), torch.randint(0, 10, (n, 19), generator=g)], 1)
    pred = Evaluator(model.weights, "cpu").logits(toks).argmax(-1)
    seen, items = set(), []
    for i, k in (pred != first_unique(toks)).nonzero().tolist():
        key = tuple(toks[i, : k + 1].tolist())
        if key not in seen:
            seen.add(key)
            items.append((toks[i], k))
    return items


@pytest.fixture(scope="module")
def explained(challenge, explainer):
    items = random_failures(challenge, N_SEQUENCES)
    return items, explainer.explain_many(items)


def test_known_failure(challenge, explainer):
    toks = challenge.spec.encode("?jeejjfhadc")
    assert failing_positions(challenge, toks) == [10]
    ex = explainer.explain(toks, 10)
    assert (ex.sequence, ex.position, ex.true, ex.predicted) == ("?jeejjfhadc", 10, "f", "h")
    assert ex.category == "overloaded_head"
    assert (ex.resp_head_true, ex.resp_head_pred, ex.load) == (1, 2, 2)
    cols = ex.columns()
    assert tuple(cols) == CSV_COLUMNS
    assert cols["resp_head_true"] == "1.1" and cols["resp_head_pred"] == "1.2"
    assert ex.distraction >= 0.5 and ex.check == "confirmed" and ex.check_detail.startswith("refocus 1.2")
    text = ex.format_text()
    assert "overloaded_head" in text and "deciding path" in text


def test_attribution_adds_up_to_the_logits(explained):
    _, exs = explained
    for ex in exs[:200]:
        for side, logit in (("true", ex.logit_true), ("pred", ex.logit_pred)):
            assert sum(v[side] for v in ex.components.values()) == pytest.approx(logit, abs=1e-3)
            assert sum(v[side] for v in ex.paths.values()) == pytest.approx(logit, abs=1e-3)
        assert len(ex.paths) == 17 and set(ex.components) == {"embed", "0.0", "0.1", "0.2", "1.0", "1.1", "1.2", "bias"}
        gap = {n: v["pred"] - v["true"] for n, v in ex.paths.items() if n != "bias"}
        assert ex.deciding_path == max(gap, key=gap.get)


def test_explanations_are_well_formed(explained):
    items, exs = explained
    assert len(exs) == len(items) > 100
    for (toks, k), ex in zip(items, exs):
        assert ex.category in CATEGORIES and ex.category != "correct"
        assert ex.check in CHECK_RESULTS and ex.check_detail
        assert ex.position == k and ex.sequence == "".join("abcdefghij?"[int(t)] for t in toks[: k + 1])
        assert ex.true != ex.predicted
        cols = ex.columns()
        assert tuple(cols) == CSV_COLUMNS
        for key in ("resp_head_true", "resp_head_pred"):
            assert cols[key] in ("", "1.0", "1.1", "1.2")
        json.loads(ex.to_json())


def _edited(explainer, ex, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix of `ex` and L1 head `head`'s attention at k with what `ex`'s check removes: other heads' letters
    (t*, p aside) for a refocus, t* for an unfocus."""
    spec, R = explainer.spec, explainer.R
    toks = spec.encode(ex.sequence)
    t, p = (spec.vocab.index(c) for c in (ex.true, ex.predicted))
    pattern = explainer.model.bridge.run_with_cache(toks[None])[1]["blocks.1.attn.hook_pattern"][0, head, -1]
    if ex.extra["check_kind"] == "refocus":
        drop = torch.tensor([x != spec.qmark and R[x] != head and x not in (t, p) for x in toks.tolist()])
    else:
        drop = toks == t
    kept = pattern * ~drop
    return toks, kept / kept.sum()


def test_checks_are_interventions_that_can_fail(challenge, explainer, explained):
    """Every check ran the model on an intervened prefix or attention pattern; the outcome is what the model
    says there; and both outcomes occur (a check that cannot fail would never be refuted)."""
    _, exs = explained
    ran = [ex for ex in exs if ex.check != "none"]
    outcomes = Counter(ex.check for ex in ran)
    assert outcomes["confirmed"] > 0 and outcomes["refuted"] > 0
    assert {ex.extra["check_kind"] for ex in ran} == {"refocus", "unfocus", "separate"}
    ev = Evaluator(challenge.weights, "cpu")
    for ex in ran[:300]:
        toks = challenge.spec.encode(ex.check_sequence)
        truth = challenge.spec.vocab[int(first_unique(toks)[-1])]
        if ex.extra["check_kind"] in ("refocus", "unfocus"):  # same prefix, one head's attention edited
            assert ex.check_sequence == ex.sequence
            head = ex.resp_head_pred if ex.extra["check_kind"] == "refocus" else ex.resp_head_true
            _, pattern = _edited(explainer, ex, head)
            logits = explainer.edited_logits(toks[None], [head], [pattern])
        else:
            assert ex.check_sequence != ex.sequence and len(ex.check_sequence) == len(ex.sequence)
            logits = ev.logits(toks[None])[:, -1]
        said = challenge.spec.vocab[int(logits[0].argmax())]
        assert (truth, said) == (ex.check_expected, ex.check_predicted)
        assert (ex.check == "confirmed") == (truth == said)
    for cat in {ex.category for ex in ran}:  # per category, the check is not a constant
        per = Counter(ex.check for ex in ran if ex.category == cat)
        if sum(per.values()) >= 30:
            assert per["refuted"] > 0, cat


def test_attention_checks_are_specific_to_the_head_the_explanation_names(explainer, explained):
    """The refocus (on r(p)) and unfocus (on r(t*)) edits fix far more failures than the same edit on the
    L1 head the explanation does not name (the control)."""
    _, exs = explained
    rates = {}
    for cat in ("qmark_expected", "duplicate_not_suppressed", "overloaded_head", "unique_missed_qmark",
                "first_instance_missed"):  # fmt: skip
        picked = [ex for ex in exs if ex.category == cat and ex.check != "none"]
        fixed = 0
        for ex in picked:
            control = min({0, 1, 2} - {ex.resp_head_pred, ex.resp_head_true})
            toks, pattern = _edited(explainer, ex, control)
            said = int(explainer.edited_logits(toks[None], [control], [pattern])[0].argmax())
            fixed += said == int(first_unique(toks)[-1])
        confirmed = sum(ex.check == "confirmed" for ex in picked) / len(picked)
        rates[cat] = (round(confirmed, 3), round(fixed / len(picked), 3), len(picked))
    print(f"\nnamed head vs control head (fraction fixed, n): {rates}")
    for cat, (named, control, n) in rates.items():
        assert n >= 20 and named >= control + 0.3, cat


def test_fraction_categorised_and_confirmed(explained):
    """Measured on random failures of the challenge checkpoint; the issue's targets: >= 80% categorised and
    >= 90% of those confirmed (10k sequences, seed 0: 99.85% and 90.6%)."""
    _, exs = explained
    categorised = [ex for ex in exs if ex.category != "other"]
    confirmed = sum(ex.check == "confirmed" for ex in categorised)
    frac_cat, frac_conf = len(categorised) / len(exs), confirmed / len(categorised)
    print(f"\n{len(exs)} failures: {frac_cat:.3f} categorised, {frac_conf:.3f} of those confirmed; "
          f"{Counter(ex.category for ex in exs).most_common()}")  # fmt: skip
    assert frac_cat >= 0.80
    assert frac_conf >= 0.90
    cats = Counter(ex.category for ex in exs)
    for name in ("qmark_expected", "unique_missed_qmark", "first_instance_missed", "duplicate_not_suppressed",
                 "overloaded_head", "later_unique_preferred"):  # fmt: skip
        assert cats[name] > 0, name


def test_batched_equals_single(challenge, explainer, explained):
    items, exs = explained
    picks = [0, len(items) // 3, len(items) // 2, len(items) - 1]
    for i in picks:
        a, b = explainer.explain(*items[i]).to_dict(), exs[i].to_dict()
        for key in ("sequence", "position", "true", "predicted", "category", "resp_head_true", "resp_head_pred",
                    "load", "deciding_path", "check", "check_detail", "check_sequence"):  # fmt: skip
            assert a[key] == b[key], key
        assert a["load_mass"] == pytest.approx(b["load_mass"], abs=1e-5)
        for name, v in a["paths"].items():
            assert v["true"] == pytest.approx(b["paths"][name]["true"], abs=1e-3)
            assert v["pred"] == pytest.approx(b["paths"][name]["pred"], abs=1e-3)


def test_correct_position_and_bad_input(challenge, explainer):
    toks = challenge.spec.encode("?abc")
    assert failing_positions(challenge, toks) == []
    ex = explainer.explain(toks, 2)
    assert ex.category == "correct" and ex.check == "none" and ex.deciding_path == ""
    from advsearch.errors import AdvsearchError

    with pytest.raises(AdvsearchError):
        explainer.explain(toks, 7)
    with pytest.raises(AdvsearchError):
        explainer.explain(torch.tensor([1, 2, 3]), 1)


@pytest.fixture(scope="module")
def cli():
    @click.group()
    def main():
        pass

    main.add_command(mechanism_cmd)
    main.add_command(explain_cmd)
    return main


def test_cli_explain(cli, challenge_path):
    r = CliRunner().invoke(cli, ["explain", "?jeejjfhadc", "--model", str(challenge_path)])
    assert r.exit_code == 0, r.output
    assert "overloaded_head" in r.output and "check" in r.output
    r = CliRunner().invoke(cli, ["explain", "?abc", "--model", str(challenge_path)])
    assert r.exit_code == 0 and "no failing position" in r.output
    r = CliRunner().invoke(cli, ["explain", "?jeejjfhadc", "--pos", "3", "--json", "--model", str(challenge_path)])
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["failing_positions"] == [10] and d["explanations"][0]["position"] == 3
    bads = (["explain", "?abx"], ["explain", "abc"], ["explain", "?" + "ab" * 12], ["explain", "?ab", "--pos", "5"])
    for bad in bads:
        r = CliRunner().invoke(cli, [*bad, "--model", str(challenge_path)])
        assert r.exit_code == 2 and "advsearch: error:" in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_mechanism(cli, challenge_path):
    r = CliRunner().invoke(cli, ["mechanism", "--json", "--model", str(challenge_path)])
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert sorted("".join("".join(s) for s in d["layer1"]["responsibility_sets"])) == list("abcdefghij")
    r = CliRunner().invoke(cli, ["mechanism", "--model", str(challenge_path), "--dup-threshold", "0.5"])
    assert r.exit_code == 0 and "Responsibility sets" in r.output
    r = CliRunner().invoke(cli, ["mechanism", "--model", "/nonexistent.pt"])
    assert r.exit_code == 2
