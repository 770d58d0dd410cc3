"""Fixed-seed runs give exactly the recorded files: restructuring the code must not change results.

`tests/data/golden.json` holds, per output file of a few fixed-seed commands on the challenge
checkpoint, the sha256 of its bytes and of its discrete columns (sequences, positions, labels,
categories, named components: what no float rounding can move). The bytes are compared when this
machine computes with the same torch build and CPU kernels as the one that recorded them (other
kernels may round the last printed digit of a probability differently); the discrete columns are
compared everywhere. After an intended change of results, rewrite the record with
`python tests/test_golden.py CHECKPOINT` and say why in the commit.
"""

import csv
import hashlib
import io
import json
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

GOLDEN = Path(__file__).parent / "data" / "golden.json"
COMMANDS = {
    "census": ["run", "--strategy", "exhaustive", "--max-len", "4", "--no-explain"],
    "guided": ["run", "--strategy", "guided", "--budget", "200", "--seed", "0"],
    "random": ["run", "--strategy", "random", "--budget", "2000", "--seed", "1", "--no-explain"],
    "local": ["run", "--strategy", "local", "--budget", "1000", "--seed", "2", "--no-explain"],
}
FILES = ("census/census.csv", "census/failures.csv", "guided/failures.csv", "guided/families.csv",
         "random/failures.csv", "local/failures.csv", "suite/golden.csv")  # fmt: skip
FLOAT_COLUMNS = {"p_true", "p_pred", "margin", "effect", "control_effect", "detectors", "failure_rate",
                 "baseline_p_pred", "baseline_p_true", "baseline_true_margin"}  # fmt: skip


def environment() -> dict:
    """What decides the last bits of the floats: the torch build and the CPU kernels it picks."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def produce(out: Path, model: Path) -> None:
    """Run the fixed-seed commands into `out`, then build a suite from the guided and random runs."""
    from advsearch.cli.main import main

    runner = CliRunner()
    for name, args in COMMANDS.items():
        r = runner.invoke(main, [*args, "--model", str(model), "--out", str(out / name), "--quiet"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["suite", "build", str(out / "guided"), str(out / "random"), "--model", str(model),
                             "--pool", "2000", "--out", str(out / "suite" / "golden.csv")])  # fmt: skip
    assert r.exit_code == 0, r.output


def digests(path: Path) -> dict:
    """sha256 of the file's bytes and of its columns that hold no floats."""
    text = path.read_text()
    rows = list(csv.reader(io.StringIO(text)))
    keep = [i for i, c in enumerate(rows[0]) if c not in FLOAT_COLUMNS] if rows else []
    discrete = "\n".join(",".join(r[i] for i in keep if i < len(r)) for r in rows)
    return {"bytes": hashlib.sha256(text.encode()).hexdigest(), "discrete": hashlib.sha256(discrete.encode()).hexdigest()}


def record(model: Path, out: Path) -> dict:
    produce(out, model)
    return {"environment": environment(), "files": {f: digests(out / f) for f in FILES}}


def test_fixed_seed_outputs_are_the_recorded_ones(tmp_path, challenge_path):
    golden = json.loads(GOLDEN.read_text())
    produce(tmp_path, challenge_path)
    same_kernels = golden["environment"] == environment()
    for name in FILES:
        got, want = digests(tmp_path / name), golden["files"][name]
        assert got["discrete"] == want["discrete"], f"{name}: other sequences, labels or explanations than recorded"
        if same_kernels:
            assert got["bytes"] == want["bytes"], f"{name}: not byte-identical to the recorded run"


def test_the_digest_sees_a_changed_float_and_ignores_it_only_in_the_discrete_part(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("sequence,position,p_pred\n?ab,1,0.5\n")
    b.write_text("sequence,position,p_pred\n?ab,1,0.500001\n")
    assert digests(a)["bytes"] != digests(b)["bytes"] and digests(a)["discrete"] == digests(b)["discrete"]
    b.write_text("sequence,position,p_pred\n?ab,2,0.5\n")
    assert digests(a)["discrete"] != digests(b)["discrete"]


if __name__ == "__main__":  # python tests/test_golden.py CHECKPOINT: rewrite the record
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.write_text(json.dumps(record(Path(sys.argv[1]), Path(tmp)), indent=2) + "\n")
    print(f"wrote {GOLDEN}")
