import json

import optuna

from strategies.optuna import open_storage

from .conftest import interrupt_judging, invoke, rows


def test_local_cover_run_prints_the_matrix_and_resumes_byte_identically(tmp_path, challenge_path, monkeypatch):
    args = ["run", "--strategy", "local", "--cover-confusions", "--budget", 3000, "--seed", 2,
            "--model", challenge_path, "--quiet", "--no-explain"]  # fmt: skip
    whole = invoke(*args, "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    assert "/110 (true, predicted) pairs witnessed" in whole.output
    table = rows(tmp_path / "whole/confusions.csv")
    assert len(table) == 110 and {r["true"] for r in table} == set("abcdefghij?")
    covered = sum(r["covered"] == "true" for r in table)
    assert f"{covered}/110" in whole.output
    summary = json.loads((tmp_path / "whole/summary.json").read_text())
    assert "confusions.csv" in summary["files"] and summary["params"]["cover_confusions"] is True

    undo = interrupt_judging(monkeypatch, at_call=6)
    assert invoke(*args, "--out", tmp_path / "cut").exit_code == 130
    undo()
    resumed = invoke(*args, "--out", tmp_path / "cut", "--resume")
    assert resumed.exit_code == 0, resumed.output
    for name in ("failures.csv", "confusions.csv"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_optuna_workers_join_one_study_through_the_cli(tmp_path, challenge_path):
    url = f"journal:{tmp_path}/study.journal"
    base = ["run", "--strategy", "optuna", "--budget", 32, "--batch-size", 16, "--length", 10,
            "--storage", url, "--study-name", "w", "--model", challenge_path, "--quiet",
            "--no-explain"]  # fmt: skip
    for worker in (1, 2):
        r = invoke(*base, "--seed", worker, "--out", tmp_path / f"w{worker}")
        assert r.exit_code == 0, r.output
    study = optuna.load_study(study_name="w", storage=open_storage(url))
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 64


def test_search_options_are_checked(tmp_path, challenge_path):
    r = invoke("run", "--strategy", "random", "--target-true", "a", "--model", challenge_path)
    assert r.exit_code == 2 and "only apply to --strategy local or optuna" in r.output
    r = invoke("run", "--strategy", "exhaustive", "--cover-confusions", "--model", challenge_path)
    assert r.exit_code == 2
    r = invoke("run", "--strategy", "optuna", "--storage", "nowhere", "--model", challenge_path,
               "--out", tmp_path / "x")  # fmt: skip
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--storage" in r.stderr
