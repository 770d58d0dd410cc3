"""The search loop: strategy -> evaluator -> judge -> annotators (explainer, minimizer) -> results.

One readable loop over *steps*: a step is a judged batch's candidate failure
rows and counts. Locally a step is one propose -> evaluate -> judge -> observe
round (`local_steps`); a scale-out backend (`advsearch.commands.scaleout`) yields whole
shards computed elsewhere. Everything the loop writes survives an interruption,
and `resume=True` continues from the last finished step without duplicating rows
(or, when no step had finished yet, starts the run again from the beginning).
The loop, explanations included, computes with the fixed thread count of
`advsearch.model.determinism`, so the results do not depend on the machine's threads.

An *annotator* adds columns to the failure rows of each step before they are written: the
explainer (`advsearch.mechanism.explain.Explainer`: category, causal check, control, ...) and the
minimizer (`advsearch.search.minimize.Minimizer`: `minimized`).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import json
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from advsearch import __version__
from advsearch.errors import AdvsearchError, Interrupted, RunExists
from advsearch.files import read_json, write_json
from advsearch.model.checkpoint import LoadedModel
from advsearch.model.determinism import EVAL_THREADS, eval_threads
from advsearch.model.evaluator import Evaluator
from advsearch.model.judge import YIELD_CONFIDENCE, Judged, judge
from advsearch.search.audit import EXPLANATION_COLUMNS, audit_csv
from advsearch.search.results import FAILURE_COLUMNS, FailureLog, prepare_dir, write_table


def versions() -> dict:
    return {"advsearch": __version__, "torch": torch.__version__,
            "transformer_lens": importlib.metadata.version("transformer-lens"),
            "python": platform.python_version()}  # fmt: skip


def run_identifier(model: LoadedModel, strategy, min_confidence: float) -> str:
    """A run id that depends only on what determines the results (so reruns are byte-identical)."""
    key = json.dumps([strategy.name, strategy.params(), model.sha256, min_confidence], sort_keys=True)
    return f"{strategy.name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


class Annotator(Protocol):
    """Adds `columns` to failure rows (dicts with at least `sequence` and `position`), in place."""

    columns: tuple[str, ...]

    def annotate(self, rows: list[dict]) -> None: ...


@dataclass
class Step:
    """One finished piece of work: candidate failure rows (in order, duplicates kept) and what was evaluated."""

    rows: list[dict]
    sequences: int
    positions: int
    hits: int  # sequences with a failure at p_pred >= YIELD_CONFIDENCE


def _decoded_rows(tokens: torch.Tensor, spec) -> tuple[str, int] | None:
    """Every row of `tokens` [batch, seq] decoded into one string (row b at [b * seq, (b + 1) * seq)), and seq.

    A token is one character of `spec.vocab` (a str), so a prefix of a row decodes to the prefix of its
    text: `text[b * seq : b * seq + k + 1] == spec.decode(tokens[b, : k + 1])`. None when the ids do
    not fit in a byte (then rows are decoded one by one).
    """
    vocab = spec.vocab
    if not isinstance(vocab, str) or len(vocab) > 256 or not len(tokens):
        return None
    table = {i: c for i, c in enumerate(vocab)}
    return tokens.to(torch.uint8).numpy().tobytes().decode("latin-1").translate(table), tokens.shape[1]


def candidate_rows(judged: Judged, proposal, spec, run_id: str, strategy: str) -> list[dict]:
    """One row per judged failure, in (row, position) order; the same prefix may come more than once.

    The failing entries of each tensor are gathered and converted to Python values in one call per
    column (`tolist` gives the same Python floats, ints and bools as reading the elements one by one),
    and the tokens are decoded in one call.
    """
    fail = judged.failing()
    if not len(fail):
        return []
    b, k = fail.unbind(1)
    columns = [t[b, k].tolist() for t in (judged.true, judged.pred, judged.p_true, judged.p_pred, judged.margin,
                                          judged.confident)]  # fmt: skip
    b, k = b.tolist(), k.tolist()
    decoded = _decoded_rows(judged.tokens, spec)
    if decoded is not None:
        text, seq = decoded
        sequences = [text[bi * seq : bi * seq + ki + 1] for bi, ki in zip(b, k)]
    else:
        sequences = [spec.decode(judged.tokens[bi, : ki + 1].tolist()) for bi, ki in zip(b, k)]
    vocab, extra = spec.vocab, list(proposal.columns.items())
    rows = [
        {"run_id": run_id, "strategy": strategy, "sequence": sequence, "position": ki, "true": vocab[t],
         "predicted": vocab[p], "p_true": pt, "p_pred": pp, "margin": m, "confident": c}
        for sequence, ki, t, p, pt, pp, m, c in zip(sequences, k, *columns)
    ]  # fmt: skip
    for c, v in extra:
        for row, bi in zip(rows, b):
            row[c] = v[bi]
    return rows


def new_rows(rows: list[dict], log: FailureLog) -> list[dict]:
    """The rows whose prefix is not in the log yet, each prefix once (its first row)."""
    out, seen, is_new = [], set(), log.is_new
    for row in rows:
        sequence = row["sequence"]
        if sequence not in seen and is_new(sequence):
            seen.add(sequence)
            out.append(row)
    return out


def local_step(strategy, evaluator: Evaluator, min_confidence: float, run_id: str) -> Step | None:
    """Propose, evaluate, judge and observe one batch; None when the strategy has finished."""
    proposal = strategy.propose()
    if proposal is None:
        return None
    logits = evaluator.evaluate(proposal)
    judged = judge(proposal.tokens, logits, strategy.spec.qmark, min_confidence, proposal.judge_from)
    strategy.observe(proposal, judged)
    rows = candidate_rows(judged, proposal, strategy.spec, run_id, strategy.name)
    return Step(rows, len(proposal.tokens), int(judged.judged.sum()), int(judged.hits().sum()))


def local_steps(strategy, evaluator: Evaluator, min_confidence: float, run_id: str) -> Iterator[Step]:
    """Steps in this process until the strategy has finished."""
    while (step := local_step(strategy, evaluator, min_confidence, run_id)) is not None:
        yield step


@eval_threads()
def run_search(
    model: LoadedModel,
    strategy,
    out_dir: Path | None,
    evaluator: Evaluator,
    *,
    min_confidence: float = 0.5,
    resume: bool = False,
    overwrite: bool = False,
    annotators: Sequence[Annotator] = (),
    progress: bool = True,
    backend=None,
) -> dict:
    """Run `strategy` to completion, writing into `out_dir` (default results/<run id>); returns the summary.

    `backend` (e.g. `advsearch.commands.scaleout.RayBackend`) computes the steps elsewhere; None computes them here.
    The run id and the results do not depend on it, so a run can be resumed with another backend.
    Everything here, explanations and minimization included, runs with `EVAL_THREADS` torch threads.
    """
    spec, run_id = model.spec, run_identifier(model, strategy, min_confidence)
    out_dir = Path(out_dir) if out_dir is not None else Path("results") / run_id
    columns = FAILURE_COLUMNS + strategy.extra_columns + tuple(c for a in annotators for c in a.columns)
    identity = {"strategy": strategy.name, "params": strategy.params(), "model_sha256": model.sha256,
                "min_confidence": min_confidence, "columns": list(columns), "eval_threads": EVAL_THREADS}  # fmt: skip
    state_path, csv_path = out_dir / "state.json", out_dir / "failures.csv"

    if resume and not state_path.exists():
        # Killed before its first step finished (at most the CSV header written): nothing to keep, so start over.
        if not out_dir.is_dir():
            raise AdvsearchError(f"nothing to resume: {out_dir} does not exist")
        resume, overwrite = False, True
    if resume:
        state = read_json(state_path)
        if state["identity"] != identity:
            raise AdvsearchError(f"{out_dir} holds a run with other settings or another model; cannot resume it")
        if state["finished"]:
            raise AdvsearchError(f"the run in {out_dir} already finished; nothing to resume")
        strategy.load_state_dict(state["strategy_state"])
        counters = state["counters"]
        log = FailureLog(csv_path, columns, resume_offset=state["csv_bytes"])
    else:
        if csv_path.exists() and not overwrite:
            raise RunExists(out_dir)
        prepare_dir(out_dir)
        counters = {"sequences": 0, "positions": 0, "failures": 0, "hits": 0, "wall_seconds": 0.0}
        log = FailureLog(csv_path, columns)

    def summary(status: str) -> dict:
        wall = counters["wall_seconds"]
        data = {
            "run_id": run_id, "status": status, "out_dir": str(out_dir), "model": str(model.path), "model_sha256": model.sha256,
            "spec": spec.to_dict(), "strategy": strategy.name, "params": strategy.params(),
            "config": strategy.config_dict(),
            "seed": strategy.params().get("seed"), "min_confidence": min_confidence,
            "device": str(evaluator.device), "backend": backend.name if backend else "local",
            "eval_threads": EVAL_THREADS, "versions": versions(),
            "sequences": counters["sequences"], "positions": counters["positions"],
            "failures": counters["failures"], "confident_failures": log.confident,
            "sequences_with_confident_failure": counters["hits"],
            "yield": round(counters["hits"] / counters["sequences"], 6) if counters["sequences"] else 0.0,
            "yield_confidence": YIELD_CONFIDENCE,
            "wall_seconds": round(wall, 3),
            "sequences_per_second": round(counters["sequences"] / wall, 1) if wall else None,
            "files": ["failures.csv", *strategy.tables()],
            "tables": {name: rows for name, rows in strategy.tables().items() if len(rows) <= 100},
        }  # fmt: skip
        if set(EXPLANATION_COLUMNS) <= set(columns):
            data["audit"] = audit_csv(csv_path)  # how the explanations hold (advsearch audit)
        for name, rows in strategy.tables().items():
            write_table(out_dir / name, rows)
        write_json(out_dir / "summary.json", data)
        return data

    bar = tqdm(total=strategy.total(), initial=counters["sequences"], unit="seq", desc=strategy.name,
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    if backend is None:
        steps = local_steps(strategy, evaluator, min_confidence, run_id)
    else:
        steps = backend.steps(model, strategy, evaluator, min_confidence, run_id)
    # The loop makes many short-lived objects (a dict per failure row): the collector's full passes
    # would walk every object made before it (torch, the model, the tables) again and again, so those
    # are moved out of its reach for the loop's duration.
    gc.freeze()
    try:
        start = time.perf_counter()
        for step in steps:
            rows = new_rows(step.rows, log)
            for annotator in annotators if rows else ():
                annotator.annotate(rows)
            log.write(rows)
            counters["sequences"] += step.sequences
            counters["positions"] += step.positions
            counters["failures"] += len(rows)
            counters["hits"] += step.hits
            counters["wall_seconds"] += time.perf_counter() - start
            write_json(state_path, {"identity": identity, "finished": False, "csv_bytes": log.offset,
                                    "counters": counters, "strategy_state": strategy.state_dict()})  # fmt: skip
            bar.update(step.sequences)
            bar.set_postfix(failures=counters["failures"], refresh=False)
            start = time.perf_counter()
    except KeyboardInterrupt:
        steps.close()  # a backend cancels the work still outstanding
        bar.close()
        log.close()
        summary("interrupted")
        raise Interrupted(
            f"interrupted after {counters['sequences']} sequences; {counters['failures']} failures kept in "
            f"{csv_path}; resuming the run continues it", out_dir
        ) from None
    finally:
        gc.unfreeze()
    bar.close()
    log.close()
    write_json(state_path, {"identity": identity, "finished": True, "csv_bytes": log.offset,
                            "counters": counters, "strategy_state": strategy.state_dict()})  # fmt: skip
    return summary("finished")
