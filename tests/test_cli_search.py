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
    assert r.exit_code == 2 and "--target-true only applies to --strategy local or optuna" in r.output
    r = invoke("run", "--strategy", "exhaustive", "--cover-confusions", "--model", challenge_path)
    assert r.exit_code == 2
    r = invoke("run", "--strategy", "optuna", "--storage", "nowhere", "--model", challenge_path,
               "--out", tmp_path / "x")  # fmt: skip
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--storage" in r.stderr


# ---- strategy configs and the run command ---------------------------------------------------------------------

# A non-default value for every config field: (what the command line says, what the config then holds).
OPTION_VALUES = {
    "budget": ("77", 77), "seed": ("5", 5), "batch_size": ("33", 33), "max_len": ("3", 3),
    "shared_prefixes": (None, False), "families": ("overload,first_instance", ["overload", "first_instance"]),
    "cover_confusions": (None, True), "cover_threshold": ("0.5", 0.5), "length": ("10", 10),
    "target_pos": ("5", 5), "target_true": ("a", "a"), "target_pred": ("b", "b"), "two_position_moves": (None, False),
    "sampler": ("random", "random"), "storage": ("journal:{tmp}/s.journal", "journal:{tmp}/s.journal"),
    "study_name": ("x", "x"), "seed_from": ("guided", "guided"),
}  # fmt: skip


def made_strategies(monkeypatch):
    """Stub the model and the search set-up of `run`: each invocation makes its strategy (on fake mechanism tables)
    and stops there; returns the list the strategies are appended to."""
    from types import SimpleNamespace

    import advsearch.commands.setup
    import advsearch.model.checkpoint
    from advsearch.model.spec import ModelSpec
    from strategies import make_strategy

    from .test_guided import fake_tables

    made = []

    def prepare_search(loaded, strategy, config, **kwargs):
        made.append(make_strategy(strategy, loaded.spec, config, tables=fake_tables([[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]),
                                  model_sha256=loaded.sha256))  # fmt: skip
        raise KeyboardInterrupt  # stop before the search: exit 130

    monkeypatch.setattr(advsearch.model.checkpoint, "load_model", lambda path: SimpleNamespace(spec=ModelSpec(), sha256="x"))
    monkeypatch.setattr(advsearch.commands.setup, "prepare_search", prepare_search)
    return made


def test_every_config_option_is_in_run_help_and_reaches_the_strategy(tmp_path, monkeypatch):
    from dataclasses import fields

    from advsearch.cli.main import CONFIG_OPTIONS, RUN_LEVEL_FIELDS, option_flag
    from advsearch.search.configs import STRATEGY_CONFIGS

    help_text = invoke("run", "--help").output
    made = made_strategies(monkeypatch)
    for name, config_class in STRATEGY_CONFIGS.items():
        for f in fields(config_class):
            assert f.name in OPTION_VALUES, f"give {name}'s new option {f.name} a test value here"
            flag = option_flag(f.name)
            assert flag in help_text, flag
            if f.name not in RUN_LEVEL_FIELDS:  # one option serves every strategy with the field: one default
                assert CONFIG_OPTIONS[f.name][0].default == f.default, (name, f.name)
            given, expected = (str(v).format(tmp=tmp_path) if isinstance(v, str) else v for v in OPTION_VALUES[f.name])
            assert expected != f.default, f.name
            args = [flag, given] if given is not None else [flag if expected is True else f"--no-{flag[2:]}"]
            r = invoke("run", "--strategy", name, *args, "--quiet")
            assert r.exit_code == 130, (name, args, r.output)
            strategy = made.pop()
            assert strategy.name == name and type(strategy.config) is config_class
            assert getattr(strategy.config, f.name) == expected, (name, f.name)
            assert strategy.config_dict()[f.name] == expected
            json.dumps(strategy.config_dict())  # summary.json can record it


def test_run_passes_each_strategy_its_config_defaults(monkeypatch):
    from advsearch.search.configs import STRATEGY_CONFIGS

    made = made_strategies(monkeypatch)
    for name, config_class in STRATEGY_CONFIGS.items():
        assert invoke("run", "--strategy", name).exit_code == 130
        assert made.pop().config == config_class()  # --budget 10000 and --seed 0 are the configs' defaults too


def test_options_of_other_strategies_are_usage_errors(monkeypatch):
    made_strategies(monkeypatch)
    r = invoke("run", "--strategy", "random", "--families", "overload")
    assert r.exit_code == 2 and "--families only applies to --strategy guided" in r.output
    r = invoke("run", "--strategy", "local", "--storage", "x.journal", "--length", 5)
    assert r.exit_code == 2 and "--storage only applies to --strategy optuna" in r.output
    assert "--length" not in r.output.splitlines()[-1]  # --length is local's
    r = invoke("run", "--strategy", "guided", "--storage", "x.journal", "--length", 5, "--no-prefix-sharing")
    assert r.exit_code == 2
    assert "--storage only applies to --strategy optuna" in r.output
    assert "--length only applies to --strategy local or optuna" in r.output
    assert "--prefix-sharing only applies to --strategy exhaustive" in r.output
    r = invoke("run", "--strategy", "guided", "--cover-confusions")
    assert r.exit_code == 2 and "--cover-confusions only applies to --strategy random, local or optuna" in r.output


def test_strategy_errors_name_the_option(monkeypatch):
    made_strategies(monkeypatch)
    r = invoke("run", "--strategy", "exhaustive", "--max-len", 19)
    assert r.exit_code == 2 and "--max-len: the longest prefix must be between 1 and 18" in r.stderr
    r = invoke("run", "--strategy", "local", "--length", 30)
    assert r.exit_code == 2 and "--length: the search length must be between 2 and 20" in r.stderr
    r = invoke("run", "--strategy", "guided", "--families", "nope")
    assert r.exit_code == 2 and "--families: unknown family nope" in r.stderr
