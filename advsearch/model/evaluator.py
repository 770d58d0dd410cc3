"""Fused pure-torch forward over the processed weights, batched and chunked.

The TransformerLens bridge stays the reference (and the tool for hooks); bulk
evaluation goes through `Evaluator`, which tests hold to |Δlogit| ≤ 1e-3 of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from advsearch.errors import AdvsearchError
from advsearch.model.checkpoint import Weights
from advsearch.model.determinism import eval_threads


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise AdvsearchError("device 'cuda' asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise AdvsearchError(f"unknown device {device!r} (use auto, cpu or cuda)")
    return torch.device(device)


@dataclass(frozen=True)
class FusedWeights:
    """Weights packed for the fused forward: one QKV matrix and one output matrix per layer."""

    W_E: torch.Tensor  # [vocab, d]
    W_pos: torch.Tensor  # [n_ctx, d]
    W_qkv: torch.Tensor  # [layer, d, 3*heads*d_head]
    b_qkv: torch.Tensor  # [layer, 3*heads*d_head]
    W_out: torch.Tensor  # [layer, heads*d_head, d]
    b_out: torch.Tensor  # [layer, d]
    W_U: torch.Tensor
    b_U: torch.Tensor
    qkv0: torch.Tensor  # [vocab * n_ctx, 3*heads*d_head]: layer 0's q, k, v for each (token, position)
    causal: torch.Tensor  # [n_ctx, n_ctx] additive mask (0 on and below the diagonal, -inf above)
    n_heads: int
    d_head: int
    eps: float

    @classmethod
    def pack(cls, w: Weights, device: torch.device) -> "FusedWeights":
        n_layers, n_heads, d_model, d_head = w.W_Q.shape

        def heads_to_cols(m: torch.Tensor) -> torch.Tensor:  # [L,H,d,dh] -> [L,d,H*dh]
            return m.permute(0, 2, 1, 3).reshape(n_layers, d_model, n_heads * d_head)

        W_qkv = torch.cat([heads_to_cols(w.W_Q), heads_to_cols(w.W_K), heads_to_cols(w.W_V)], -1)
        b_qkv = torch.cat([b.reshape(n_layers, -1) for b in (w.b_Q, w.b_K, w.b_V)], -1)
        W_out = w.W_O.reshape(n_layers, n_heads * d_head, d_model)
        # Layer 0 reads only the embeddings, so its q, k, v are a lookup table over (token, position).
        x0 = w.W_E[:, None, :] + w.W_pos[None]
        qkv0 = (F.layer_norm(x0, (d_model,), eps=w.eps) @ W_qkv[0] + b_qkv[0]).reshape(-1, W_qkv.shape[-1])
        n_ctx = w.W_pos.shape[0]
        causal = torch.zeros(n_ctx, n_ctx).masked_fill(torch.ones(n_ctx, n_ctx, dtype=torch.bool).triu(1), -torch.inf)
        t = lambda x: x.to(device=device, dtype=torch.float32).contiguous()  # noqa: E731
        return cls(t(w.W_E), t(w.W_pos), t(W_qkv), t(b_qkv), t(W_out), t(w.b_O), t(w.W_U), t(w.b_U), t(qkv0),
                   t(causal), n_heads, d_head, w.eps)  # fmt: skip


def fused_forward(fw: FusedWeights, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] for token ids [batch, seq] (already on fw's device)."""
    batch, seq = tokens.shape
    h, dh = fw.n_heads, fw.d_head
    x = (fw.W_E[tokens] + fw.W_pos[:seq]).view(batch * seq, -1)
    mask = fw.causal[:seq, :seq].expand(batch, seq, seq)
    for layer in range(fw.W_qkv.shape[0]):
        if layer == 0:
            qkv = fw.qkv0[tokens * fw.W_pos.shape[0] + torch.arange(seq, device=tokens.device)]
        else:
            qkv = torch.addmm(fw.b_qkv[layer], F.layer_norm(x, x.shape[-1:], eps=fw.eps), fw.W_qkv[layer])
        # Per head, q/k/v are strided views of the projection (no permute copies; faster
        # than one batched [batch*heads] attention on the CPU), and each head's output is added in place.
        q, k, v = qkv.view(batch, seq, 3, h, dh).unbind(2)
        x = x + fw.b_out[layer]
        for i in range(h):
            scores = torch.baddbmm(mask, q[:, :, i], k[:, :, i].transpose(1, 2), alpha=dh**-0.5)
            z = torch.bmm(scores.softmax(-1), v[:, :, i])
            x.addmm_(z.view(batch * seq, dh), fw.W_out[layer, i * dh : (i + 1) * dh])
    xn = F.layer_norm(x, x.shape[-1:], eps=fw.eps)
    return torch.addmm(fw.b_U, xn, fw.W_U).view(batch, seq, -1)


class Evaluator:
    """Runs token batches through the fused forward in chunks of `batch_size` on the chosen device.

    Every call computes with the fixed thread count of `advsearch.model.determinism`, so its logits do not
    depend on how many threads the calling process was given.
    """

    def __init__(self, weights: Weights, device: str = "auto", batch_size: int | None = None):
        self.device = resolve_device(device)
        # Small chunks stay in the CPU's caches (512 measured fastest there); a GPU wants large ones.
        self.batch_size = batch_size or (512 if self.device.type == "cpu" else 16384)
        with eval_threads():  # packing multiplies matrices too (layer 0's q/k/v table)
            self.fused = FusedWeights.pack(weights, self.device)
        self.prefixes = None  # PrefixStore, made on first use

    def evaluate(self, proposal) -> torch.Tensor:
        """Logits for a strategy's proposal: all positions, or the last one for extension batches."""
        if proposal.extension:
            for tokens in proposal.warmup:
                self.extension_logits(tokens, cache=True)
            return self.extension_logits(proposal.tokens, proposal.cache)
        return self.logits(proposal.tokens)

    @eval_threads()
    @torch.inference_mode()
    def extension_logits(self, tokens: torch.Tensor, cache: bool = False) -> torch.Tensor:
        """Last-position logits [batch, 1, vocab] of one-letter extensions (see `advsearch.model.prefix`)."""
        if self.prefixes is None:
            from advsearch.model.prefix import PrefixStore

            self.prefixes = PrefixStore(self.fused, self.fused.W_E.shape[0] - 1)
        return self.prefixes.extension_logits(tokens.to(self.device), cache).unsqueeze(1).cpu()

    @eval_threads()
    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits for `tokens` [batch, seq], returned on the CPU as float32."""
        out = [
            fused_forward(self.fused, chunk.to(self.device, non_blocking=True)).cpu()
            for chunk in tokens.split(self.batch_size)
        ]
        if not out:
            return torch.empty(0, tokens.shape[1], self.fused.W_U.shape[1])
        return torch.cat(out)
