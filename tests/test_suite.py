"""Robustness regression suites: suite build, regress, JUnit, assert_robust, compare, harden."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from advsearch.errors import AdvsearchError
from advsearch.model.checkpoint import load_model, read_state_dict
from advsearch.model.evaluator import Evaluator
from advsearch.regress.suite import judge_last, read_run, read_suite
from advsearch.regress.testing import assert_robust, evaluate_suite

from .conftest import invoke

REPO = Path(__file__).resolve().parents[1]

def ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advsearch: error:"), result.stderr
    return lines[0]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


SMALL = ["--near-misses", 8, "--typical", 8, "--pool", 1000]


@pytest.fixture(scope="module")
def work(tmp_path_factory, challenge_path):
    """Two small runs on the challenge model, a copy of one (duplicates), and a suite built from them."""
    d = tmp_path_factory.mktemp("suite")
    common = ["--model", challenge_path, "--quiet"]
    ok(invoke("run", "--strategy", "random", "--budget", 800, "--seed", 3, "--out", d / "rand", *common))
    ok(invoke("run", "--strategy", "exhaustive", "--max-len", 4, "--out", d / "ex", *common))
    shutil.copytree(d / "rand", d / "rand_copy")  # every prefix found twice
    runs = [d / "rand", d / "rand_copy", d / "ex"]
    out = d / "suites" / "s.csv"
    built = ok(invoke("suite", "build", *runs, "--out", out, "--model", challenge_path, *SMALL))
    damaged = d / "damaged.pt"
    state = read_state_dict(challenge_path)
    state["blocks.1.attn.W_O"] = torch.zeros_like(state["blocks.1.attn.W_O"])  # layer 1 silenced
    torch.save(state, damaged)
    return {"dir": d, "runs": runs, "suite": out, "damaged": damaged, "build_output": built.output}


def test_build_dedupes_and_keeps_the_strongest(work, challenge):
    s = read_suite(work["suite"])
    meta = json.loads((work["dir"] / "suites" / "s.json").read_text())
    rand_rows = read_rows(work["dir"] / "rand" / "failures.csv")
    run_rows = [r for run in work["runs"] for r in read_rows(run / "failures.csv")]
    all_seqs = {r["sequence"] for r in run_rows}
    category = {r["sequence"]: r.get("category", "") for r in run_rows}  # runs may carry explanations
    assert meta["counts"]["candidate_prefixes"] == len(all_seqs)
    assert meta["counts"]["duplicate_rows"] >= len(rand_rows)  # the copy adds only duplicates
    seqs = [e.sequence for e in s.entries]
    assert len(seqs) == len(set(seqs))
    failures = [e for e in s.entries if e.kind == "failure"]
    assert failures and "failures" in work["build_output"]
    # one entry per (category, expected, predicted), and it is the strongest on the baseline
    keys = [(e.category, e.expected, e.baseline_predicted) for e in failures]
    assert len(keys) == len(set(keys))
    ordered = sorted(all_seqs)
    spec = challenge.spec
    v = judge_last(Evaluator(challenge.weights, "cpu"), spec, [spec.encode(x) for x in ordered])
    best = defaultdict(float)
    for i, x in enumerate(ordered):
        if not v.passed[i] and float(v.margin[i]) >= 0.05:
            key = (category[x], spec.vocab[int(v.expected[i])], spec.vocab[int(v.pred[i])])
            best[key] = max(best[key], float(v.p_pred[i]))
    assert set(best) == set(keys)
    for e in failures:
        assert e.baseline_p_pred == pytest.approx(best[(e.category, e.expected, e.baseline_predicted)], rel=1e-5)
        assert e.origin.split(":")[0] in ("random", "exhaustive")


def test_build_keeps_one_per_category_and_reads_category_column(tmp_path, work, challenge_path, challenge):
    rows = read_rows(work["dir"] / "rand" / "failures.csv")
    by_pair = defaultdict(list)
    for r in rows:
        if float(r["margin"]) >= 0.1:  # clearly failing (suite build drops gaps below --min-margin)
            by_pair[(r["true"], r["predicted"])].append(r)
    pair, group = max(by_pair.items(), key=lambda kv: len(kv[1]))
    assert len(group) >= 3, "need a confusion pair found three times"
    run = tmp_path / "cat_run"
    run.mkdir()
    with open(run / "failures.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys([*rows[0].keys(), "category"])))
        w.writeheader()
        for i, r in enumerate(group[:3]):
            w.writerow({**r, "category": "x" if i < 2 else "y"})
    out = tmp_path / "cat.csv"
    ok(invoke("suite", "build", run, "--out", out, "--model", challenge_path, "--near-misses", 0, "--typical", 0,
              "--no-neighbours"))  # fmt: skip
    entries = read_suite(out).entries
    assert sorted(e.category for e in entries) == ["x", "y"]
    x = next(e for e in entries if e.category == "x")
    assert x.baseline_p_pred == pytest.approx(max(float(r["p_pred"]) for r in group[:2]), rel=1e-4)


def test_build_is_byte_identical(tmp_path, work, challenge_path):
    again = tmp_path / "suites" / "s.csv"
    ok(invoke("suite", "build", *work["runs"], "--out", again, "--model", challenge_path, *SMALL))
    assert again.read_bytes() == work["suite"].read_bytes()
    assert again.with_suffix(".json").read_bytes() == work["suite"].with_suffix(".json").read_bytes()


def test_guards_pass_on_the_baseline_and_failures_fail(work, challenge):
    s = read_suite(work["suite"])
    meta = s.meta
    guards = [e for e in s.entries if e.kind == "guard"]
    failures = [e for e in s.entries if e.kind == "failure"]
    assert all(e.baseline_pass and e.baseline_predicted == e.expected for e in guards)
    assert all(not e.baseline_pass and e.baseline_predicted != e.expected for e in failures)
    assert {e.origin.split(":")[1] for e in guards} == {"neighbour", "near_miss", "typical"}
    assert meta["baseline"]["model_sha256"] == challenge.sha256
    assert meta["baseline_pass_rate"] == pytest.approx(len(guards) / len(s.entries), abs=1e-6)
    report = evaluate_suite(challenge, s)
    assert report.matches_baseline and report.ok and report.counts["regressed"] == 0


def test_regress_exit_codes(work, challenge_path):
    same = invoke("regress", work["suite"], "--model", challenge_path, "--exact")
    assert same.exit_code == 0, same.output
    assert "0 regressed" in same.output and "identical to the baseline" in same.output and "PASS" in same.output
    bad = invoke("regress", work["suite"], "--model", work["damaged"])
    assert bad.exit_code == 1, bad.output
    assert "regressed" in bad.output and "FAIL" in bad.output
    strict = invoke("regress", work["suite"], "--model", challenge_path, "--min-pass-rate", 1)
    assert strict.exit_code == 1 and "below the minimum" in strict.output
    tolerant = invoke("regress", work["suite"], "--model", work["damaged"], "--allow-regressions", 10_000,
                      "--min-pass-rate", 0)  # fmt: skip
    assert tolerant.exit_code == 0, tolerant.output


def test_regress_bad_input_is_one_line_exit_2(tmp_path, work, challenge_path):
    one_line_error(invoke("regress", tmp_path / "missing.csv", "--model", challenge_path))
    one_line_error(invoke("regress", work["suite"], "--model", tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.csv"
    garbage.write_text("a,b\n1,2\n")
    assert "missing column" in one_line_error(invoke("regress", garbage, "--model", challenge_path))
    rows = work["suite"].read_text().splitlines()
    broken = tmp_path / "broken.csv"
    broken.write_text("\n".join([rows[0], rows[1].replace(",?", ",?z", 1), *rows[2:]]) + "\n")
    one_line_error(invoke("regress", broken, "--model", challenge_path))
    wrong_truth = tmp_path / "wrong.csv"
    cells = rows[1].split(",")
    cells[4] = "j" if cells[4] != "j" else "a"
    wrong_truth.write_text("\n".join([rows[0], ",".join(cells), *rows[2:]]) + "\n")
    assert "oracle" in one_line_error(invoke("regress", wrong_truth, "--model", challenge_path))


def test_junit_has_one_testcase_per_entry(tmp_path, work, challenge_path):
    xml_path = tmp_path / "junit" / "regress.xml"
    result = invoke("regress", work["suite"], "--model", work["damaged"], "--junit", xml_path)
    assert result.exit_code == 1
    root = ET.parse(xml_path).getroot()
    cases = root.findall("./testsuite/testcase")
    s = read_suite(work["suite"])
    assert len(cases) == len(s.entries)
    failed = [c for c in cases if c.find("failure") is not None]
    assert len(failed) == int(root.find("testsuite").get("failures")) > 0
    assert all(".guard" in c.get("classname") for c in failed)
    ok(invoke("regress", work["suite"], "--model", challenge_path, "--junit", xml_path))
    root = ET.parse(xml_path).getroot()
    assert root.find("testsuite").get("failures") == "0"
    assert len(root.findall(".//testcase/skipped")) == sum(e.kind == "failure" for e in s.entries)


def test_assert_robust(work, challenge_path):
    report = assert_robust(challenge_path, work["suite"], exact=True)
    assert report.pass_rate == pytest.approx(report.baseline_pass_rate)
    with pytest.raises(AssertionError, match="regressed"):
        assert_robust(work["damaged"], work["suite"])
    with pytest.raises(AssertionError, match="below the minimum"):
        assert_robust(challenge_path, work["suite"], min_pass_rate=1.0)
    with pytest.raises(AdvsearchError):
        assert_robust(challenge_path, work["dir"] / "no-such-suite.csv")


def test_compare_side_by_side(work, challenge_path):
    result = ok(invoke("compare", challenge_path, work["damaged"], "--sequences", 300, "--explain-limit", 10,
                       "--suite", work["suite"], "--yield-strategy", "random", "--yield-budget", 300, "--json"))  # fmt: skip
    r = json.loads(result.output)
    a, b = r["random"]
    assert a["accuracy"] > b["accuracy"] and len(a["per_position"]) == 19
    assert r["suites"][0]["models"][0]["regressed"] == 0 < r["suites"][0]["models"][1]["regressed"]
    assert r["yield"][0]["sequences"] == 300
    for cats in r["categories"]:
        assert "skipped" in cats or sum(cats["counts"].values()) == cats["explained"]
    text = ok(invoke("compare", challenge_path, work["damaged"], "--sequences", 200, "--explain-limit", 0,
                     "--suite", work["suite"], "--yield-strategy", "no-such-strategy"))  # fmt: skip
    assert "accuracy" in text.output and "skipped" in text.output
    one_line_error(invoke("compare", challenge_path))


def test_harden_short_fine_tune_fixes_suite_failures(tmp_path, work, challenge_path, challenge):
    out = tmp_path / "hard.pt"
    short = ["--suite", work["suite"], "--steps", 10, "--eval-every", 5, "--batch-size", 256, "--lr", 1e-4,
             "--mine", "random", "--mine-every", 5, "--mine-budget", 200, "--quiet"]  # fmt: skip
    result = ok(invoke("harden", "--model", challenge_path, "--out", out, *short))
    assert "regress before" in result.output and "regress after" in result.output
    hardened = load_model(out)  # validated against the spec and processed like any checkpoint
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["spec"] == hardened.spec.to_dict()
    assert side["recipe"]["kind"] == "harden" and side["recipe"]["steps"] == 10
    assert side["recipe"]["mine"] == ["random"] and side["history"][-1]["pool"] >= side["recipe"]["failure_prefixes"]
    assert side["after"]["val_accuracy"] >= side["before"]["val_accuracy"]
    # it trained: the saved weights are not the base checkpoint's ...
    base, saved = read_state_dict(challenge_path), read_state_dict(out)
    assert side["selected_step"] > 0 and any(not torch.equal(base[k], saved[k]) for k in base)
    # ... and the hardened model answers more of the suite's failure entries than the base does
    suite = read_suite(work["suite"])
    failures = [e for e in suite.entries if e.kind == "failure"]
    base_fixed, hardened_fixed = (sum(r.passed for r in evaluate_suite(m, suite).results if r.entry.kind == "failure")
                                  for m in (challenge, hardened))  # fmt: skip
    assert failures and base_fixed == 0 and hardened_fixed > 0, (base_fixed, hardened_fixed)
    again = tmp_path / "again.pt"  # seeded: the same inputs give the same weights
    ok(invoke("harden", "--model", challenge_path, "--out", again, *short))
    a, b = read_state_dict(out), read_state_dict(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    one_line_error(invoke("harden", "--model", challenge_path, "--suite", tmp_path / "none.csv", "--out", out))
    one_line_error(invoke("harden", "--model", challenge_path, "--suite", work["suite"], "--out", out,
                          "--mine", "no-such-strategy"))  # fmt: skip


# ---- committed suites: the recorded baseline outcome, exactly (also guards determinism) ----

COMMITTED = sorted((REPO / "results" / "suites").glob("*.csv"))


@pytest.mark.skipif(not COMMITTED, reason="no suite committed under results/suites/ yet")
@pytest.mark.parametrize("suite_path", COMMITTED, ids=[p.stem for p in COMMITTED])
def test_committed_suite_gives_the_recorded_baseline_outcome(suite_path, challenge_path):
    meta = json.loads(suite_path.with_suffix(".json").read_text())
    sha = meta["baseline"]["model_sha256"]
    candidates = [challenge_path, REPO / "advsearch" / "data" / "default_model.pt", REPO / meta["baseline"]["model"]]
    path = next((p for p in candidates if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == sha), None)
    assert path is not None, f"baseline model of {suite_path.name} (sha256 {sha[:12]}) not found"
    result = invoke("regress", suite_path, "--model", path, "--exact")
    assert result.exit_code == 0, result.output
