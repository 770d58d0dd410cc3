"""Mechanism tables, computed from a checkpoint's processed weights.

Nothing here is typed in per checkpoint: every number comes from the weights
(and, for the LayerNorm scales, from one reference forward pass).

The hypothesis the tables measure
---------------------------------
* Layer-0 heads act token by token as **duplicate detectors** (from a token,
  attend strongly to earlier copies of it) or **anti-duplicate detectors**
  (attend away from copies of the current token).
* Each layer-1 head is **responsible** for a subset of the letters: it reads
  the detectors by K/V-composition and suppresses its tokens when they are
  duplicated, boosts them when they are early and unique. The subsets
  partition the letters (here: the argmax over heads always does).

How they are computed
---------------------
LN scales: s0, s1, s_final = mean LayerNorm scale (what TransformerLens calls
`blocks.0.ln1.hook_scale`, `blocks.1.ln1.hook_scale`, `ln_final.hook_scale`)
over all positions of a reference batch of 1000 sequences: `?` then `seq_len - 1` letters drawn by
`torch.randint(0, n_letters, ..., generator=torch.Generator().manual_seed(42))`
(the same tokens `torch.manual_seed(42); torch.randint(...)` gives).

L0 detector scores: for head h, with E = (W_E / s0)[:n_letters] (query and key
tokens are the letters),

    A_h = softmax_keys( E · W_Q[0,h] · W_K[0,h]ᵀ · Eᵀ / √d_head )

`diag(A_h)[t] > dup_threshold` (default 0.30) ⇒ h is a duplicate detector for
t; `< anti_threshold` (default 0.04) ⇒ anti-duplicate detector. Positional
embeddings and Q/K biases are left out: the score compares tokens, not positions.

L1 responsibility: for L1 head j and letter t, the four composed-OV diagonal
entries ("paths")

    direct: [W_E · OV1_j · U][t,t]
    via 0.k: [W_E · OV0_k · OV1_j · U][t,t]     (k = 0 .. n_heads-1)

with OV0_k = W_V[0,k] W_O[0,k] / s0, OV1_j = W_V[1,j] W_O[1,j] / s1 and
U = W_U / s_final. The responsibility score is the Euclidean norm of that
vector; the responsible head of t is the argmax over j.

JSON schema (`MechanismTables.to_json()`)
-----------------------------------------
::

    {
      "checkpoint": str,            # path the model was loaded from
      "sha256": str,                # of the checkpoint file
      "vocab": str,                 # e.g. "abcdefghij?"
      "letters": [str],             # the tokens the tables index, a-j
      "n_heads": int,
      "d_head": int,
      "reference": {"n_sequences": 1000, "seed": 42},
      "ln_scales": {"s0": float, "s1": float, "s_final": float},
      "thresholds": {"dup": float, "anti": float},
      "layer0": {
        "diag": [[float]],          # [head][letter]: diag(A_h)[t]
        "attention": [[[float]]],   # [head][query letter][key letter]: A_h
        "detectors": [[str]],       # [head]: letters with diag > dup
        "anti_detectors": [[str]]   # [head]: letters with diag < anti
      },
      "layer1": {
        "paths": ["direct", "via 0.0", ...],
        "composed_ov_diag": [[[float]]],  # [head][path][letter]
        "norm": [[float]],          # [head][letter]: norm over paths
        "responsible_head": [int],  # [letter]: argmax_head norm (L1 head index)
        "responsibility_sets": [[str]]    # [head]: letters it is responsible for
      }
    }

Heads are written "0.k" / "1.j" (layer.head) in the text report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from advsearch.errors import AdvsearchError

REFERENCE_N = 1000
REFERENCE_SEED = 42


def reference_batch(spec, n: int = REFERENCE_N, seed: int = REFERENCE_SEED) -> torch.Tensor:
    """`?` then seq_len-1 random letters, n rows, from a private generator seeded `seed`."""
    return spec.random_tokens(n, seed)


@torch.no_grad()
def ln_scales(model, n: int = REFERENCE_N, seed: int = REFERENCE_SEED) -> dict[str, float]:
    """Mean scale of each LayerNorm over the reference batch (from the fused path forward)."""
    from advsearch.mechanism.paths import PathModel

    return PathModel(model.weights, reference_batch(model.spec, n, seed)).reference_scales


@dataclass
class MechanismTables:
    """The detector and responsibility tables of one checkpoint (see module docstring)."""

    checkpoint: str
    sha256: str
    vocab: str
    n_heads: int
    d_head: int
    ln_scales: dict[str, float]
    dup_threshold: float
    anti_threshold: float
    l0_attention: list[list[list[float]]]  # [head][query letter][key letter]
    l0_diag: list[list[float]]  # [head][letter]
    composed_ov_diag: list[list[list[float]]]  # [L1 head][path][letter]
    responsibility_norm: list[list[float]]  # [L1 head][letter]
    responsible_head: list[int]  # [letter] -> L1 head index
    reference: dict = field(default_factory=lambda: {"n_sequences": REFERENCE_N, "seed": REFERENCE_SEED})

    # ---- derived views -------------------------------------------------
    @property
    def letters(self) -> str:
        return self.vocab[:-1]

    @property
    def paths(self) -> list[str]:
        return ["direct"] + [f"via 0.{k}" for k in range(self.n_heads)]

    @property
    def detectors(self) -> list[list[int]]:
        """[L0 head] -> letters (ids) for which it is a duplicate detector."""
        return [[t for t, v in enumerate(row) if v > self.dup_threshold] for row in self.l0_diag]

    @property
    def anti_detectors(self) -> list[list[int]]:
        """[L0 head] -> letters (ids) for which it is an anti-duplicate detector."""
        return [[t for t, v in enumerate(row) if v < self.anti_threshold] for row in self.l0_diag]

    @property
    def responsibility_sets(self) -> list[list[int]]:
        """[L1 head] -> letters (ids) it is responsible for; a partition of the letters."""
        return [[t for t, h in enumerate(self.responsible_head) if h == j] for j in range(self.n_heads)]

    def head_of(self, token: int) -> int | None:
        """Responsible L1 head of a token id, None for `?` (or anything not a letter)."""
        return self.responsible_head[token] if 0 <= token < len(self.responsible_head) else None

    # ---- output ----------------------------------------------------------
    def to_dict(self) -> dict:
        L = self.letters

        def names(sets):
            return [[L[t] for t in s] for s in sets]

        return {
            "checkpoint": self.checkpoint,
            "sha256": self.sha256,
            "vocab": self.vocab,
            "letters": list(L),
            "n_heads": self.n_heads,
            "d_head": self.d_head,
            "reference": dict(self.reference),
            "ln_scales": dict(self.ln_scales),
            "thresholds": {"dup": self.dup_threshold, "anti": self.anti_threshold},
            "layer0": {
                "diag": self.l0_diag,
                "attention": self.l0_attention,
                "detectors": names(self.detectors),
                "anti_detectors": names(self.anti_detectors),
            },
            "layer1": {
                "paths": self.paths,
                "composed_ov_diag": self.composed_ov_diag,
                "norm": self.responsibility_norm,
                "responsible_head": self.responsible_head,
                "responsibility_sets": names(self.responsibility_sets),
            },
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def format_text(self) -> str:
        L = self.letters
        col = lambda xs, f="{:7.3f}": "".join(f.format(x) for x in xs)  # noqa: E731
        head = "".join(f"{c:>7}" for c in L)
        out = [
            f"checkpoint {self.checkpoint} (sha256 {self.sha256[:12]})",
            f"LN scales (mean hook_scale over {self.reference['n_sequences']} random sequences, "
            f"seed {self.reference['seed']}): s0={self.ln_scales['s0']:.4f}  s1={self.ln_scales['s1']:.4f}  "
            f"s_final={self.ln_scales['s_final']:.4f}",
            "",
            f"Layer 0: diag of softmax(E·W_Q·W_Kᵀ·Eᵀ/√d_head), E = W_E/s0 over letters; "
            f"D = duplicate detector (> {self.dup_threshold}), A = anti-detector (< {self.anti_threshold})",
            f"head   {head}",
        ]
        for h, row in enumerate(self.l0_diag):
            marks = "".join(
                f"{('D' if v > self.dup_threshold else 'A' if v < self.anti_threshold else '.'):>7}" for v in row
            )
            out += [f"0.{h}    {col(row)}", f"       {marks}"]
        for h in range(self.n_heads):
            d = "".join(L[t] for t in self.detectors[h]) or "-"
            a = "".join(L[t] for t in self.anti_detectors[h]) or "-"
            out.append(f"  0.{h}: detects {d:<10} anti-detects {a}")
        out += ["", "Layer 1: composed-OV diagonals [t,t] (W_U/s_final; OV0 /s0; OV1 /s1) and their norms",
                f"head path    {head}"]
        for j in range(self.n_heads):
            for p, row in zip(self.paths, self.composed_ov_diag[j]):
                out.append(f"1.{j}  {p:<8}{col(row, '{:7.1f}')}")
            out.append(f"1.{j}  {'norm':<8}{col(self.responsibility_norm[j], '{:7.1f}')}")
        out.append("responsible " + "".join(f"{'1.' + str(h):>7}" for h in self.responsible_head))
        out.append("")
        out.append("Responsibility sets (partition of the letters):")
        for j, s in enumerate(self.responsibility_sets):
            out.append(f"  1.{j}: {''.join(L[t] for t in s) or '-'}")
        return "\n".join(out)


@torch.no_grad()
def compute_tables(model, dup_threshold: float = 0.30, anti_threshold: float = 0.04) -> MechanismTables:
    """The detector and responsibility tables of a loaded model (`advsearch.model.checkpoint.LoadedModel`)."""
    spec, w = model.spec, model.weights
    if spec.n_layers != 2:
        raise AdvsearchError(f"the mechanism tables need a 2-layer model; this one has {spec.n_layers} layers")
    if not 0 <= anti_threshold <= dup_threshold <= 1:
        raise AdvsearchError(
            f"thresholds must satisfy 0 <= anti ({anti_threshold}) <= dup ({dup_threshold}) <= 1"
        )
    scales = ln_scales(model)
    s0, s1, sf = scales["s0"], scales["s1"], scales["s_final"]
    n = spec.n_letters
    W_E = w.W_E.double()
    E = (W_E / s0)[:n]
    U = w.W_U.double() / sf

    attention, diag = [], []
    for h in range(spec.n_heads):
        scores = E @ w.W_Q[0, h].double() @ w.W_K[0, h].double().T @ E.T / math.sqrt(spec.d_head)
        A = scores.softmax(-1)
        attention.append(A.tolist())
        diag.append(A.diagonal().tolist())

    OV0 = [w.W_V[0, k].double() @ w.W_O[0, k].double() / s0 for k in range(spec.n_heads)]
    composed, norms = [], []
    for j in range(spec.n_heads):
        OV1 = w.W_V[1, j].double() @ w.W_O[1, j].double() / s1
        rows = [(W_E @ OV1 @ U).diagonal()[:n]] + [(W_E @ OV0[k] @ OV1 @ U).diagonal()[:n] for k in range(spec.n_heads)]
        V = torch.stack(rows)
        composed.append(V.tolist())
        norms.append(V.norm(dim=0).tolist())
    responsible = torch.tensor(norms).argmax(0).tolist()

    return MechanismTables(
        checkpoint=str(model.path),
        sha256=model.sha256,
        vocab=spec.vocab,
        n_heads=spec.n_heads,
        d_head=spec.d_head,
        ln_scales=scales,
        dup_threshold=float(dup_threshold),
        anti_threshold=float(anti_threshold),
        l0_attention=attention,
        l0_diag=diag,
        composed_ov_diag=composed,
        responsibility_norm=norms,
        responsible_head=responsible,
    )
