import json
import subprocess
import sys

import pytest
import torch

from advsearch.model.checkpoint import read_state_dict

from .conftest import interrupt_judging, invoke, rows


def one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advsearch: error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_random_run_writes_results_and_is_byte_identical(tmp_path, challenge_path):
    args = ["run", "--strategy", "random", "--budget", 3000, "--seed", 5, "--model", challenge_path, "--quiet"]
    a = invoke(*args, "--out", tmp_path / "a", "--batch-size", 1000)
    b = invoke(*args, "--out", tmp_path / "b", "--batch-size", 512)
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert (tmp_path / "a/failures.csv").read_bytes() == (tmp_path / "b/failures.csv").read_bytes()
    found = rows(tmp_path / "a/failures.csv")
    assert found, "3000 random sequences should expose some failures"
    assert list(found[0])[:10] == ["run_id", "strategy", "sequence", "position", "true", "predicted",
                                   "p_true", "p_pred", "margin", "confident"]  # fmt: skip
    assert len({r["sequence"] for r in found}) == len(found)
    for r in found:
        assert r["sequence"][0] == "?" and len(r["sequence"]) == int(r["position"]) + 1
        assert r["true"] != r["predicted"] and float(r["margin"]) > 0
    summary = json.loads((tmp_path / "a/summary.json").read_text())
    assert summary["sequences"] == 3000 and summary["positions"] == 60000
    assert summary["failures"] == len(found)
    assert summary["confident_failures"] == sum(r["confident"] == "true" for r in found)
    assert summary["model_sha256"] and summary["versions"]["transformer_lens"] == "4.3.0"
    assert "failing prefixes" in a.output and "failures.csv" in a.output


def test_interrupted_run_resumes_without_losing_or_duplicating_rows(tmp_path, challenge_path, monkeypatch):
    args = ["run", "--strategy", "random", "--budget", 4000, "--batch-size", 500, "--model", challenge_path, "--quiet"]
    assert invoke(*args, "--out", tmp_path / "whole").exit_code == 0

    undo = interrupt_judging(monkeypatch, at_call=4)
    interrupted = invoke(*args, "--out", tmp_path / "cut")
    line = one_line_error(interrupted, code=130)
    assert "--resume" in line
    kept = rows(tmp_path / "cut/failures.csv")
    assert json.loads((tmp_path / "cut/summary.json").read_text())["status"] == "interrupted"
    assert kept, "rows found before the interruption are on disk"
    undo()
    resumed = invoke(*args, "--out", tmp_path / "cut", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (tmp_path / "cut/failures.csv").read_bytes() == (tmp_path / "whole/failures.csv").read_bytes()
    one_line_error(invoke(*args, "--out", tmp_path / "cut", "--resume"))  # already finished
    one_line_error(invoke(*args, "--out", tmp_path / "cut"))  # would overwrite


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_a_run_stopped_before_its_first_batch_finished_resumes_from_the_beginning(how, tmp_path, challenge_path,
                                                                                  monkeypatch):  # fmt: skip
    # --no-explain: this is about the resume logic; explanations' own determinism is tested above
    args = ["run", "--strategy", "random", "--budget", 1000, "--batch-size", 500, "--model", challenge_path, "--quiet",
            "--no-explain"]  # fmt: skip
    assert invoke(*args, "--out", tmp_path / "whole").exit_code == 0
    cut = tmp_path / "cut"
    if how == "ctrl-c":
        undo = interrupt_judging(monkeypatch, at_call=1)
        one_line_error(invoke(*args, "--out", cut), code=130)
        undo()
    else:  # what `kill -9` in the first seconds leaves: the folder and the CSV header, nothing else
        cut.mkdir()
        (cut / "failures.csv").write_bytes((tmp_path / "whole/failures.csv").read_bytes().split(b"\n")[0] + b"\n")
    assert not (cut / "state.json").exists() and rows(cut / "failures.csv") == []
    resumed = invoke(*args, "--out", cut, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (cut / "failures.csv").read_bytes() == (tmp_path / "whole/failures.csv").read_bytes()
    assert json.loads((cut / "summary.json").read_text())["status"] == "finished"
    assert "does not exist" in one_line_error(invoke(*args, "--out", tmp_path / "nowhere", "--resume"))


def test_a_reader_that_closes_stdout_early_ends_the_output_quietly(tmp_path, challenge_path):
    """Like `advsearch run ... | head -1`, with a reader that is gone before the first line (so the write must fail)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "advsearch.cli.main", "run", "--strategy", "random", "--budget", 1000, "--no-explain",
           "--compare-random", "--quiet", "--model", challenge_path, "--out", out]  # fmt: skip
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 141 and stderr == ""  # 128 + SIGPIPE, as for other tools; no message
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["failures"] == len(rows(out / "failures.csv")) > 0
    assert summary["compare_random"]["random_sequences"] == 1000  # work after the last line printed was done too
    assert json.loads((out / "state.json").read_text())["finished"]


def test_exhaustive_run_writes_census(tmp_path, challenge_path):
    out = tmp_path / "ex"
    r = invoke("run", "--strategy", "exhaustive", "--max-len", 4, "--model", challenge_path, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    census = rows(out / "census.csv")
    assert [int(c["prefixes"]) for c in census] == [10, 100, 1000, 10000]
    assert sum(int(c["failures"]) for c in census) == len(rows(out / "failures.csv"))


def test_eval_prints_a_per_position_table(challenge_path):
    r = invoke("eval", "?acbba", "?cbcbc", "--model", challenge_path)
    assert r.exit_code == 0, r.output
    table = r.output.splitlines()
    assert table[0] == "?acbba" and table[1].split() == ["pos", "in", "true", "pred", "p_pred", "p_true"]
    assert [line.split()[2] for line in table[2:8]] == list("?aaaac")


@pytest.mark.parametrize("seq, message", [
    ("?abz", "unknown character"),
    ("abc", "must start with '?'"),
    ("?" + "a" * 20, "at most 20"),
    ("", "empty sequence"),
])  # fmt: skip
def test_bad_sequences_exit_2_with_one_line(challenge_path, seq, message):
    assert message in one_line_error(invoke("eval", seq, "--model", challenge_path))


def test_bad_checkpoints_and_outputs_exit_2_with_one_line(tmp_path, challenge_path):
    assert "checkpoint not found" in one_line_error(invoke("eval", "?ab", "--model", tmp_path / "missing.pt"))
    sd = read_state_dict(challenge_path)
    sd["unembed.W_U"] = torch.zeros(42, 12)
    torch.save(sd, tmp_path / "wrong.pt")
    assert "unembed.W_U has shape [42, 12]" in one_line_error(invoke("eval", "?ab", "--model", tmp_path / "wrong.pt"))
    (tmp_path / "file").write_text("")
    line = one_line_error(invoke("run", "--model", challenge_path, "--budget", 10, "--out", tmp_path / "file/sub"))
    assert "cannot write to output folder" in line


def test_bench_reports_throughputs_guided_runs_and_startup(challenge_path):
    r = invoke("bench", "--model", challenge_path, "--sequences", 2000, "--census-len", 2, "--guided-budget", 300,
               "--startup-runs", 1, "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["bridge_seq_per_s"] > 0 and data["fused_seq_per_s"] > 0 and data["census_prefixes_per_s"] > 0
    assert data["ratio"] == pytest.approx(data["fused_seq_per_s"] / data["bridge_seq_per_s"], rel=0.05)
    assert data["max_abs_logit_diff"] <= 1e-3
    assert data["guided_sequences"] == 300
    for name in ("guided", "guided_explained"):
        assert data[f"{name}_seq_per_s"] > 0
        assert data[f"{name}_ratio"] == pytest.approx(data[f"{name}_seq_per_s"] / data["fused_seq_per_s"], rel=0.05)
    assert data["startup_s"] > 0 and data["startup_runs"] == 1
    assert data["startup_warm_cache"] is True  # bench loaded the model first, so the cache is warm
    assert data["startup_cold_s"] > data["startup_s"]  # an empty cache: torch is imported, the weights processed


def test_bench_text_output_names_every_measure(challenge_path):
    r = invoke("bench", "--model", challenge_path, "--sequences", 1000, "--census-len", 1, "--guided-budget", 50,
               "--startup-runs", 1)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert [line.split()[0] for line in r.output.splitlines()[1:]] == [
        "bridge", "fused", "census", "guided", "explained", "start-up", "cold", "peak"]  # fmt: skip


def test_help_does_not_import_torch():
    code = ("import sys\nfrom advsearch.cli.main import main\n"
            "for args in (['--help'], ['run', '--help'], ['bench', '--help'], ['suite', 'build', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'strategies', 'transformer_lens') if m in sys.modules))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--strategy [random|exhaustive|guided|local|optuna]" in done.stdout
    assert done.stdout.splitlines()[-1] == "[]"


def test_static_strategy_names_match_the_registry():
    from advsearch.cli.main import STRATEGY_NAMES
    from strategies import STRATEGIES

    assert STRATEGY_NAMES == tuple(STRATEGIES)


def test_version_and_help():
    assert invoke("--version").output.startswith("advsearch, version")
    for cmd in ("run", "eval", "bench", "train"):
        assert invoke(cmd, "--help").exit_code == 0


def test_ci_script_exports_ci_and_runs_exactly_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme_blocks = (root / "README.md").read_text().split("```bash\n")[1:]
    test_command = next(b.split("\n```")[0].strip() for b in readme_blocks if "pytest" in b)
    lines = [line.strip() for line in (root / ".ci/run").read_text().splitlines() if line.strip()]
    assert lines[-1] == test_command
    assert "export CI=true" in lines[: lines.index(test_command)]  # set before the tests run, so nothing skips
