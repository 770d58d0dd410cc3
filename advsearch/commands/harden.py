"""Adversarial hardening: fine-tune a checkpoint on the training distribution mixed with
known failures (`advsearch harden --model M --suite S --out M2.pt`).

The *unprocessed* checkpoint is loaded into `advsearch.model.train.RawTransformer` and trained
with Adam on batches that mix

- fresh sequences from the training distribution (`?` + uniform a–j, seeded), and
- known failing prefixes (the suite's `failure` entries, plus any `--from-run` folders'
  failures), each relabelled by a random permutation of the letters (a permutation of
  a–j maps the task onto itself: the answer is relabelled the same way) and completed
  with random letters up to n_ctx,

with cross-entropy at every position (the failing prefix's last position can be weighted up).
Every `eval_every` steps it measures the validation accuracy over all positions (the
recipe's validation set, seed 43) and the accuracy on a fixed held-out set of relabelled
failures; it keeps the evaluation with the best held-out failure accuracy among those whose
validation accuracy is not lower than the original's (the original itself, step 0, is a
candidate, so hardening never makes the validation accuracy worse). Seeded and
single-threaded by default, so the same inputs give the same weights.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from advsearch import __version__
from advsearch.errors import AdvsearchError
from advsearch.files import sha256_file
from advsearch.model.checkpoint import OPTIONAL_BUFFERS, read_state_dict, validate_state_dict
from advsearch.model.oracle import first_unique
from advsearch.model.spec import ModelSpec
from advsearch.model.tokens import pad_prefixes
from advsearch.model.train import RawTransformer, _torch_threads, make_dataset, save_checkpoint


@dataclass
class HardenOptions:
    steps: int = 4000
    batch_size: int = 512
    lr: float = 1e-3
    schedule: str = "cosine"  # cosine: lr decays to lr/10 over the steps; constant: no decay
    mix: float = 0.5  # fraction of every batch made of relabelled failures
    focus: float = 4.0  # loss weight of a relabelled failure's own (last prefix) position
    eval_every: int = 250
    n_val: int = 5000
    val_seed: int = 43  # the recipe's validation set
    holdout: int = 4000  # relabelled failures the selection is judged on
    seed: int = 0
    threads: int | None = 1
    mine: tuple[str, ...] = ()  # search strategies run in turn against the model being trained (none: no mining)
    mine_every: int = 100  # steps between mining rounds
    mine_budget: int = 2000  # sequences per mining round

    def to_dict(self) -> dict:
        return asdict(self)


def load_raw(path: Path) -> tuple[RawTransformer, ModelSpec, str]:
    """The checkpoint's unprocessed weights in a RawTransformer (validated), its spec and sha256."""
    path = Path(path)
    state = read_state_dict(path)
    spec = ModelSpec.for_checkpoint(path)
    validate_state_dict(state, spec, source=str(path))
    model = RawTransformer(spec)
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith(OPTIONAL_BUFFERS)}, strict=True)
    return model, spec, sha256_file(path)


def relabel(prefixes: torch.Tensor, lengths: torch.Tensor, spec: ModelSpec, gen: torch.Generator) -> torch.Tensor:
    """Full-length training rows from failing prefixes [n, n_ctx] (right-padded; `lengths` tokens
    each): a random letter permutation per row, random letters after the prefix."""
    n, L = prefixes.shape
    perms = torch.argsort(torch.rand(n, spec.n_letters, generator=gen), dim=1)  # [n, letters]
    perms = torch.cat([perms, torch.full((n, 1), spec.qmark)], 1)  # `?` maps to itself
    mapped = perms.gather(1, prefixes)
    tail = torch.randint(0, spec.n_letters, (n, L), generator=gen)
    tail[:, 0] = spec.qmark
    keep = torch.arange(L)[None] < lengths[:, None]
    return torch.where(keep, mapped, tail)


def failure_pool(spec: ModelSpec, sequences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = sorted(set(sequences))
    if not seqs:
        raise AdvsearchError("nothing to harden on: no failing prefixes were given")
    return encode_prefixes(spec, seqs)


def encode_prefixes(spec: ModelSpec, seqs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefixes as [n, n_ctx] token ids right-padded with `?`, and their lengths."""
    return pad_prefixes([spec.encode(s) for s in seqs], spec.qmark, spec.seq_len)


@torch.no_grad()
def accuracy(model: RawTransformer, tokens: torch.Tensor, batch_size: int = 4096) -> float:
    """Accuracy over every position of `tokens`."""
    model.eval()
    labels = first_unique(tokens, model.spec.qmark)
    right = sum(int((model(t).argmax(-1) == lab).sum()) for t, lab in
                zip(tokens.split(batch_size), labels.split(batch_size)))  # fmt: skip
    return right / labels.numel()


@torch.no_grad()
def focus_accuracy(model: RawTransformer, tokens: torch.Tensor, lengths: torch.Tensor) -> float:
    """Accuracy at each row's position lengths-1 (the relabelled failing position)."""
    model.eval()
    labels = first_unique(tokens, model.spec.qmark)
    idx = torch.arange(len(tokens))
    pred = torch.cat([model(t).argmax(-1) for t in tokens.split(4096)])
    return float((pred[idx, lengths - 1] == labels[idx, lengths - 1]).float().mean())


def loaded_from_raw(model: RawTransformer, name: str = "<in training>"):
    """A `LoadedModel` (processed weights, bridge) of the raw model's current weights, no file written."""
    from advsearch.model.checkpoint import LoadedModel, process_weights

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in state.values())).hexdigest()
    return LoadedModel(spec=model.spec, path=Path(name), sha256=digest, weights=process_weights(state, model.spec),
                       state=state)  # fmt: skip


@torch.no_grad()
def mine(model: RawTransformer, strategy: str, budget: int, seed: int, min_confidence: float = 0.5) -> list[str]:
    """Confidently failing prefixes that search `strategy` finds against the (in-training) model.

    Runs any strategy of `strategies/` on the processed current weights through the search loop's
    own steps (`steps.local_steps`: propose, evaluate, judge, observe), without writing files, in
    the order the steps find them (a prefix may repeat); strategies that need the mechanism tables
    (guided) get the current model's own."""
    from advsearch.commands.setup import make_search_strategy, strategy_options
    from advsearch.model.evaluator import Evaluator
    from advsearch.search.steps import local_steps

    loaded = loaded_from_raw(model)
    strat, _ = make_search_strategy(loaded, strategy, strategy_options(strategy, budget=budget, seed=seed))
    evaluator = Evaluator(loaded.weights, device="cpu")
    return [row["sequence"] for step in local_steps(strat, evaluator, min_confidence, run_id="mine")
            for row in step.rows if row["confident"]]  # fmt: skip


def harden(model_path: Path, failures: list[str], out: Path, options: HardenOptions = HardenOptions(), *,
           progress: bool = True, provenance: dict | None = None) -> dict:  # fmt: skip
    """Fine-tune the checkpoint at `model_path` on the training distribution mixed with relabelled
    `failures`; write the selected weights to `out` and `<out>.json`; return the sidecar dict."""
    if not 0 <= options.mix < 1:
        raise AdvsearchError(f"the failure mix must lie in [0, 1), got {options.mix}")
    if options.steps < 1 or options.batch_size < 2 or options.eval_every < 1:
        raise AdvsearchError("steps, batch size and evaluation interval must be positive (batch size >= 2)")
    if options.mine:
        from strategies import STRATEGIES

        options = HardenOptions(**{**options.to_dict(), "mine": tuple(options.mine)})
        for name in options.mine:
            if name not in STRATEGIES:
                raise AdvsearchError(f"unknown mining strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    with _torch_threads(options.threads):
        return _harden(Path(model_path), failures, Path(out), options, progress, provenance or {})


def _harden(model_path, failures, out, o: HardenOptions, progress, provenance) -> dict:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    model, spec, sha = load_raw(model_path)
    pool, lengths = failure_pool(spec, failures)
    gen = torch.Generator().manual_seed(o.seed)
    held_gen = torch.Generator().manual_seed(o.seed + 1_000_003)
    pick = torch.randint(0, len(pool), (o.holdout,), generator=held_gen)
    held_tokens, held_lengths = relabel(pool[pick], lengths[pick], spec, held_gen), lengths[pick]
    val = make_dataset(o.n_val, o.val_seed, spec)

    def measure(step: int) -> dict:
        return {"step": step, "val_accuracy": round(accuracy(model, val), 6),
                "failure_accuracy": round(focus_accuracy(model, held_tokens, held_lengths), 6)}  # fmt: skip

    mined_total, seen = 0, set(failures)
    history = [measure(0)]
    base = history[0]
    best = (base, copy.deepcopy(model.state_dict()))
    n_fail = int(round(o.batch_size * o.mix))
    n_rand = o.batch_size - n_fail
    optimizer = torch.optim.Adam(model.parameters(), lr=o.lr)
    if o.schedule not in ("cosine", "constant"):
        raise AdvsearchError(f"unknown schedule {o.schedule!r} (use cosine or constant)")

    def lr_at(step: int) -> float:
        if o.schedule == "constant":
            return o.lr
        return o.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 1) / max(o.steps - 1, 1))))
    bar = tqdm(range(1, o.steps + 1), desc="harden", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        rand = spec.random_tokens(n_rand, gen)
        idx = torch.randint(0, len(pool), (n_fail,), generator=gen)
        aug = relabel(pool[idx], lengths[idx], spec, gen)
        tokens = torch.cat([rand, aug])
        labels = first_unique(tokens, spec.qmark)
        weights = torch.ones(tokens.shape)
        if n_fail:
            weights[torch.arange(n_rand, len(tokens)), lengths[idx] - 1] = o.focus
        logits = model(tokens)
        loss = F.cross_entropy(logits.reshape(-1, spec.d_vocab), labels.reshape(-1), reduction="none")
        loss = (loss * weights.reshape(-1)).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if o.mine and step % o.mine_every == 0 and step < o.steps:
            name = o.mine[(step // o.mine_every - 1) % len(o.mine)]
            new = sorted(set(mine(model, name, o.mine_budget, o.seed + step)) - seen)
            if new:
                seen.update(new)
                mined_total += len(new)
                extra, extra_len = encode_prefixes(spec, new)
                pool, lengths = torch.cat([pool, extra]), torch.cat([lengths, extra_len])
        if step % o.eval_every == 0 or step == o.steps:
            m = measure(step)
            m["pool"] = len(pool)
            history.append(m)
            if m["val_accuracy"] >= base["val_accuracy"] and (
                (m["failure_accuracy"], m["val_accuracy"]) > (best[0]["failure_accuracy"], best[0]["val_accuracy"])
            ):
                best = (m, copy.deepcopy(model.state_dict()))
            bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{m['val_accuracy']:.4f}",
                            fail=f"{m['failure_accuracy']:.3f}", refresh=False)  # fmt: skip
    bar.close()

    chosen, state = best
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    sidecar = {
        "spec": spec.to_dict(),
        "recipe": {
            "kind": "harden",
            "base_model": str(model_path), "base_model_sha256": sha,
            **provenance,
            "failure_prefixes": len(seen) - mined_total,
            "mined_prefixes": mined_total,
            "data": "fresh training-distribution sequences + failing prefixes relabelled by a random "
                    "permutation of the letters and completed with random letters",
            "optimizer": "Adam", "loss": "cross-entropy at every position, relabelled failing position weighted by focus",
            "selection": "best held-out relabelled-failure accuracy with validation accuracy >= the base model's",
            **o.to_dict(),
        },
        "selected_step": chosen["step"],
        "before": base,
        "after": chosen,
        "history": history,
        "seconds": round(time.perf_counter() - started, 1),
        "advsearch_version": __version__,
        "torch_version": torch.__version__,
    }
    save_checkpoint(out, state, sidecar)
    return sidecar
