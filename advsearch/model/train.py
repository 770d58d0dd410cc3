"""Train an attention-only first-unique-character transformer with the challenge's recipe.

`RawTransformer` is a plain-torch equivalent of TransformerLens's attention-only
HookedTransformer holding *unprocessed* weights: its `state_dict()` has exactly the
keys and shapes of `advsearch.model.checkpoint.expected_shapes`, so a saved checkpoint loads
with `advsearch.model.checkpoint.load_model`, whose weight processing (LN folding, centring,
value-bias folding) leaves the function unchanged.

`train()` reproduces the recipe that produced the challenge model: 100k random
sequences `?` + 19 letters (seed 42), 5k validation sequences (seed 43), Adam,
cross-entropy at every position against `oracle.first_unique`, 50 epochs, keeping
the epoch with the best validation accuracy.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from advsearch import __version__
from advsearch.files import write_atomic
from advsearch.model.oracle import first_unique
from advsearch.model.spec import ModelSpec

LN_EPS = 1e-5


class _LayerNorm(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HookedTransformer's LayerNorm: centre, divide by sqrt(var + eps) (biased var), * w + b.
        return F.layer_norm(x, x.shape[-1:], self.w, self.b, eps=LN_EPS)


class _Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, d, dh = spec.n_heads, spec.d_model, spec.d_head
        # Same declaration order as HookedTransformer's Attention (matters for seeded init).
        self.W_Q = nn.Parameter(torch.empty(h, d, dh))
        self.W_K = nn.Parameter(torch.empty(h, d, dh))
        self.W_V = nn.Parameter(torch.empty(h, d, dh))
        self.W_O = nn.Parameter(torch.empty(h, dh, d))
        self.b_Q = nn.Parameter(torch.zeros(h, dh))
        self.b_K = nn.Parameter(torch.zeros(h, dh))
        self.b_V = nn.Parameter(torch.zeros(h, dh))
        self.b_O = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d = x.shape
        h, dh = self.W_Q.shape[0], self.W_Q.shape[2]
        # One matmul for Q, K and V of all heads: [d, 3*h*dh].
        W = torch.cat([self.W_Q, self.W_K, self.W_V]).permute(1, 0, 2).reshape(d, 3 * h * dh)
        b = torch.cat([self.b_Q, self.b_K, self.b_V]).reshape(3 * h * dh)
        qkv = torch.addmm(b, x.reshape(batch * seq, d), W)
        q, k, v = qkv.view(batch, seq, 3, h, dh).permute(2, 0, 3, 1, 4)  # each [b, h, seq, dh]
        # Causal softmax(q k^T / sqrt(d_head)) v, as HookedTransformer computes it.
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        z = z.transpose(1, 2).reshape(batch * seq, h * dh)
        return torch.addmm(self.b_O, z, self.W_O.reshape(h * dh, d)).view(batch, seq, d)


class _Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.ln1 = _LayerNorm(spec.d_model)
        self.attn = _Attention(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.ln1(x))


class _Embed(nn.Module):
    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))


class _PosEmbed(nn.Module):
    def __init__(self, n_ctx: int, d_model: int):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(n_ctx, d_model))


class _Unembed(nn.Module):
    def __init__(self, d_model: int, d_vocab: int):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(d_model, d_vocab))
        self.b_U = nn.Parameter(torch.zeros(d_vocab))


class RawTransformer(nn.Module):
    """Attention-only HookedTransformer equivalent with unprocessed weights.

    `state_dict()` keys and shapes are exactly `advsearch.model.checkpoint.expected_shapes(spec)`.
    Initialisation follows HookedTransformer's default "gpt2" scheme: every `W_*`
    normal(0, 0.8 / sqrt(d_model)), biases 0, LayerNorm w = 1 and b = 0, drawn in
    parameter order from a generator seeded with `init_seed` (the same numbers as
    `torch.manual_seed(init_seed)` would give, without touching the global RNG).
    """

    def __init__(self, spec: ModelSpec = ModelSpec(), init_seed: int = 42):
        super().__init__()
        if spec.normalization != "LN":
            raise ValueError(f"normalization {spec.normalization!r} is not supported (only 'LN')")
        self.spec = spec
        self.embed = _Embed(spec.d_vocab, spec.d_model)
        self.pos_embed = _PosEmbed(spec.seq_len, spec.d_model)
        self.blocks = nn.ModuleList(_Block(spec) for _ in range(spec.n_layers))
        self.ln_final = _LayerNorm(spec.d_model)
        self.unembed = _Unembed(spec.d_model, spec.d_vocab)
        self.init_weights(init_seed)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        std = 0.8 / math.sqrt(self.spec.d_model)
        for name, param in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("W_"):
                param.normal_(0.0, std, generator=gen)
            elif leaf == "w":
                param.fill_(1.0)
            else:
                param.zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab] for token ids [batch, seq]."""
        seq = tokens.shape[-1]
        x = self.embed.W_E[tokens] + self.pos_embed.W_pos[:seq]
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x) @ self.unembed.W_U + self.unembed.b_U


def make_dataset(n: int, seed: int, spec: ModelSpec = ModelSpec()) -> torch.Tensor:
    """The challenge's data: `torch.manual_seed(seed)`; `?` then seq_len-1 uniform letters.

    Uses a private generator seeded with `seed`, which yields the same tokens as the
    global RNG after `torch.manual_seed(seed)`.
    """
    return spec.random_tokens(n, seed)


@torch.no_grad()
def evaluate(model: RawTransformer, tokens: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over every position."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for toks, labs in zip(tokens.split(batch_size), labels.split(batch_size)):
        logits = model(toks).reshape(-1, model.spec.d_vocab)
        labs = labs.reshape(-1)
        total_loss += F.cross_entropy(logits, labs, reduction="sum").item()
        correct += (logits.argmax(-1) == labs).sum().item()
        count += labs.numel()
    return total_loss / max(count, 1), correct / max(count, 1)


def train(
    spec: ModelSpec = ModelSpec(),
    epochs: int = 50,
    batch_size: int = 512,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    n_train: int = 100_000,
    n_val: int = 5_000,
    data_seed: int = 42,
    val_seed: int = 43,
    init_seed: int = 42,
    out: Path = Path("model.pt"),
    progress: bool = True,
    shuffle_seed: int | None = None,
    threads: int | None = 1,
) -> dict:
    """Train with the challenge's recipe, save the best-validation-accuracy epoch to `out`.

    Writes the state dict to `out` and a sidecar `<out>.json` (spec, recipe, best epoch,
    validation accuracy/loss, per-epoch history, versions) and returns the sidecar dict.
    The epoch order is shuffled with a generator seeded by `shuffle_seed` (default:
    `init_seed`), so two runs with the same arguments give identical weights.

    `threads` pins torch's intra-op thread count for the run (restored afterwards;
    None leaves it alone). The model is so small that one thread is about as fast as
    several on an idle machine and far steadier on a busy one, and a fixed count keeps
    the floating-point reductions, hence the weights, the same from machine to machine.
    """
    with _torch_threads(threads):
        return _train(spec, epochs, batch_size, lr, weight_decay, n_train, n_val, data_seed,
                      val_seed, init_seed, Path(out), progress, shuffle_seed)


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(spec, epochs, batch_size, lr, weight_decay, n_train, n_val, data_seed, val_seed,
           init_seed, out, progress, shuffle_seed) -> dict:
    from tqdm.auto import tqdm

    if epochs < 1:
        raise ValueError("epochs must be at least 1")
    if n_train < 1 or n_val < 1 or batch_size < 1:
        raise ValueError("n_train, n_val and batch_size must be positive")
    shuffle_seed = init_seed if shuffle_seed is None else shuffle_seed
    recipe = {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "optimizer": "Adam", "loss": "cross-entropy at every position (oracle.first_unique labels)",
        "selection": "best validation accuracy over all positions",
        "n_train": n_train, "n_val": n_val, "data_seed": data_seed, "val_seed": val_seed,
        "init_seed": init_seed, "shuffle_seed": shuffle_seed, "init": "gpt2 (std 0.8/sqrt(d_model))",
        "torch_threads": torch.get_num_threads(),
    }

    started = time.perf_counter()
    train_toks = make_dataset(n_train, data_seed, spec)
    train_labels = first_unique(train_toks, spec.qmark)
    val_toks = make_dataset(n_val, val_seed, spec)
    val_labels = first_unique(val_toks, spec.qmark)

    model = RawTransformer(spec, init_seed=init_seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    shuffle_gen = torch.Generator().manual_seed(shuffle_seed)

    best = {"epoch": 0, "val_accuracy": -1.0, "val_loss": math.inf, "state": None}
    history = []
    bar = tqdm(range(1, epochs + 1), desc="train", unit="epoch", disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        model.train()
        perm = torch.randperm(n_train, generator=shuffle_gen)
        loss_sum, n_seen = 0.0, 0
        for idx in perm.split(batch_size):
            toks, labs = train_toks[idx], train_labels[idx]
            logits = model(toks)
            loss = F.cross_entropy(logits.reshape(-1, spec.d_vocab), labs.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            n_seen += len(idx)
        train_loss = loss_sum / n_seen
        val_loss, val_acc = evaluate(model, val_toks, val_labels)
        history.append({"epoch": epoch, "train_loss": round(train_loss, 6),
                        "val_loss": round(val_loss, 6), "val_accuracy": round(val_acc, 6)})
        if val_acc > best["val_accuracy"]:
            best = {"epoch": epoch, "val_accuracy": val_acc, "val_loss": val_loss,
                    "state": copy.deepcopy(model.state_dict())}
        bar.set_postfix(loss=f"{train_loss:.4f}", val_acc=f"{val_acc:.4f}", best=f"{best['val_accuracy']:.4f}")
    bar.close()
    seconds = time.perf_counter() - started

    state = {k: v.detach().clone().contiguous() for k, v in best["state"].items()}
    sidecar = {
        "spec": spec.to_dict(),
        "recipe": recipe,
        "best_epoch": best["epoch"],
        "val_accuracy": best["val_accuracy"],
        "val_loss": best["val_loss"],
        "history": history,
        "train_seconds": round(seconds, 1),
        "advsearch_version": __version__,
        "torch_version": torch.__version__,
    }
    save_checkpoint(out, state, sidecar)
    return sidecar


def save_checkpoint(out: Path, state: dict, sidecar: dict) -> None:
    """Write the state dict to `out` and its sidecar (spec, provenance, history) to `<out>.json`, each
    atomically, so that an interrupted save leaves the previous files or the complete new ones."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda p: torch.save(state, p))
    write_atomic(Path(str(out) + ".json"), lambda p: p.write_text(json.dumps(sidecar, indent=2) + "\n"))
