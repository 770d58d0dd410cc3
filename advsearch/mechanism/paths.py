"""The fused forward split into paths, with per-row mean ablations as arguments.

A 2-layer attention-only model's residual stream at the last position k is a sum
of *sources*, `embed` (token + position) and the layer-0 heads `0.h`, read by
*destinations*: the unembedding directly (`logits`) or a layer-1 head `1.j`
through its queries, keys and values. A path `src->dst` is one such read.

`PathModel.run` is the ordinary forward of the last position, keeping what the
rest reads. `PathModel.ablate` evaluates variants of those prefixes with, per
variant, a keep mask over the paths ([variant, source, destination]; a dropped
path is read at its mean instead) and a keep mask over the layer-1 heads'
outputs at k (a dropped output is replaced by its mean). Each layer-1 head reads
its own residual, so ablating `0.1->1.2` changes 1.2's attention pattern and
values but nothing else; only the heads whose input changed are recomputed.

Means are taken per position over a reference batch of the training
distribution (`advsearch.mechanism.tables.reference_batch`), so an ablated component
carries what it carries on average at that position: mean ablation, the usual
choice for asking what a component's *input-specific* output does.

`PathModel.attribute` gives the linear prediction of each ablation from one
clean run (attention patterns and LayerNorm scales frozen): how much every path,
every layer-0 head and every layer-1 head output contributes to each logit
relative to its mean. `advsearch.mechanism.explain` picks components from that prediction
and checks them with `run`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from advsearch.model.checkpoint import Weights


@dataclass
class PathRun:
    """A batch's last-position logits and what attribution reads from the clean run."""

    logits: torch.Tensor  # [B, V]
    sources: torch.Tensor  # [B, S, L, d]: embed, then each layer-0 head's output
    pattern0: torch.Tensor  # [B, H, L, L]: layer-0 attention
    pattern1: torch.Tensor  # [B, H, L]: each layer-1 head's attention at k
    scale1: torch.Tensor  # [B, H, L]: each layer-1 head's LayerNorm scale per position
    scale_final: torch.Tensor  # [B]: the final LayerNorm scale at k
    out1: torch.Tensor  # [B, H, d]: each layer-1 head's output at k
    resid: torch.Tensor  # [B, L, d]: the residual stream layer 1 reads
    deviation: torch.Tensor  # [B, S, L*d]: each source minus its mean
    parts: tuple | None = None  # what `PathModel.ablate` precomputes once per batch


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


def _scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.var(-1, unbiased=False) + eps).sqrt()


class PathModel:
    """Path-level forward of a 2-layer attention-only model over its processed `Weights`."""

    def __init__(self, weights: Weights, reference: torch.Tensor, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):  # fmt: skip
        self.device = torch.device(device)
        w = {k: (v.to(self.device, dtype) if isinstance(v, torch.Tensor) else v)
             for k, v in vars(weights).items()}  # fmt: skip
        self.w = w
        self.n_heads = w["W_Q"].shape[1]
        self.d_head = w["W_Q"].shape[-1]
        self.W_KV1 = torch.cat([w["W_K"][1], w["W_V"][1]], -1)  # [H, d, 2 d_head]
        self.b_KV1 = torch.cat([w["b_K"][1], w["b_V"][1]], -1)[:, None]  # [H, 1, 2 d_head]
        self.reference_scales = self._means(reference.to(self.device))

    # ---- the forward ---------------------------------------------------------------------
    def _layer0(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sources [B, S, L, d], layer-0 patterns [B, H, L, L] and the layer-0 LayerNorm scale [B, L]."""
        w, dh = self.w, self.d_head
        L = tokens.shape[1]
        e = w["W_E"][tokens] + w["W_pos"][:L]
        xn = F.layer_norm(e, e.shape[-1:], eps=w["eps"])
        q, k, v = (torch.einsum("bld,hde->bhle", xn, w[f"W_{m}"][0]) + w[f"b_{m}"][0][:, None] for m in "QKV")
        causal = torch.ones(L, L, dtype=torch.bool, device=tokens.device).triu(1)
        scores = (q @ k.transpose(-1, -2) * dh**-0.5).masked_fill(causal, -torch.inf)
        pattern = scores.softmax(-1)
        out = torch.einsum("bhle,hed->bhld", pattern @ v, w["W_O"][0])
        return torch.cat([e[:, None], out], 1), pattern, _scale(e, w["eps"])

    def _head1(self, x: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer-1 head j reading residual `x` [N, L, d]: its output at the last position [N, d], its
        attention there [N, L] and its LayerNorm scale per position [N, L]."""
        w, dh = self.w, self.d_head
        xn = F.layer_norm(x, x.shape[-1:], eps=w["eps"])
        q = xn[:, -1] @ w["W_Q"][1, j] + w["b_Q"][1, j]  # [N, dh]
        kv = xn @ self.W_KV1[j] + self.b_KV1[j]  # [N, L, 2dh]
        pattern = ((kv[..., :dh] @ q[..., None])[..., 0] * dh**-0.5).softmax(-1)
        z = (pattern[:, None] @ kv[..., dh:])[:, 0]
        return z @ w["W_O"][1, j], pattern, _scale(x, w["eps"])

    def _logits(self, final: torch.Tensor) -> torch.Tensor:
        w = self.w
        return F.layer_norm(final, final.shape[-1:], eps=w["eps"]) @ w["W_U"] + w["b_U"]

    @torch.no_grad()
    def _means(self, reference: torch.Tensor) -> dict[str, float]:
        """Set the per-position means (`mean_sources`, `mean_out1`) from `reference` [N, n_ctx], one clean
        pass over every position; return its mean LayerNorm scales (the `s0`, `s1`, `s_final` of the mechanism tables)."""
        w, dh = self.w, self.d_head
        N, L = reference.shape
        sources, _, scale0 = self._layer0(reference)
        x1 = sources.sum(1) + w["b_O"][0]  # [N, L, d]
        xn = F.layer_norm(x1, x1.shape[-1:], eps=w["eps"])
        q, k, v = (torch.einsum("nld,hde->nhle", xn, w[f"W_{m}"][1]) + w[f"b_{m}"][1][:, None] for m in "QKV")
        causal = torch.ones(L, L, dtype=torch.bool, device=reference.device).triu(1)
        pattern = (q @ k.transpose(-1, -2) * dh**-0.5).masked_fill(causal, -torch.inf).softmax(-1)
        out1 = torch.einsum("nhle,hed->nhld", pattern @ v, w["W_O"][1])  # [N, H, L, d]
        final = x1 + out1.sum(1) + w["b_O"][1]
        self.mean_sources = sources.mean(0)
        self.mean_out1 = out1.mean(0)
        return {"s0": float(scale0.mean()), "s1": float(_scale(x1, w["eps"]).mean()),
                "s_final": float(_scale(final, w["eps"]).mean())}  # fmt: skip

    @torch.no_grad()
    def run(self, tokens: torch.Tensor) -> PathRun:
        """The clean last-position forward of `tokens` [B, L], with what attribution and ablation read."""
        w = self.w
        sources, pattern0, _ = self._layer0(tokens.to(self.device))
        x = sources.sum(1) + w["b_O"][0]
        heads = [self._head1(x, j) for j in range(self.n_heads)]
        out1 = torch.stack([h[0] for h in heads], 1)
        final = x[:, -1] + out1.sum(1) + w["b_O"][1]
        deviation = (sources - self.mean_sources[None, :, : tokens.shape[1]]).flatten(2)
        return PathRun(self._logits(final), sources, pattern0, torch.stack([h[1] for h in heads], 1),
                       torch.stack([h[2] for h in heads], 1), _scale(final, w["eps"]), out1, x, deviation)  # fmt: skip

    @torch.no_grad()
    def ablate(self, clean: PathRun, rows: torch.Tensor, keep: torch.Tensor, keep_out: torch.Tensor) -> torch.Tensor:
        """Last-position logits [N, V] of the variants `rows` [N] of `clean`'s prefixes, with path keep
        masks `keep` [N, S, D] and layer-1 output keep masks `keep_out` [N, H]; a dropped path reads its
        source's mean, a dropped output is its mean.

        Only the layer-1 heads whose input changed are recomputed, and without redoing their
        projections: a head reads LayerNorm(resid − Σ dropped deviations), and since the LayerNorm
        (weights folded) only centres and divides by a per-position scale, its queries, keys and values
        are the same combination of the projected, centred parts divided by the combination's scale,
        which their Gram matrix gives. `clean.parts` caches those per batch."""
        w, dev_ = self.w, self.device
        rows, drop, drop_out = rows.to(dev_), (~keep).to(dev_), (~keep_out).to(dev_)
        B, S, L, d = clean.sources.shape
        dh = self.d_head
        dev = clean.deviation.view(B, S, L, d)
        final = clean.resid[rows, -1] - (drop[:, :, 0, None].to(dev.dtype) * dev[rows, :, -1]).sum(1)
        out1 = clean.out1[rows].clone()  # [N, H, d]
        if clean.parts is None:
            parts = _centre(torch.cat([clean.resid[:, None], dev], 1))  # [B, 1+S, L, d]
            gram = torch.einsum("bald,bcld->blac", parts, parts) / d  # [B, L, 1+S, 1+S]
            kv = [(parts @ self.W_KV1[j]).transpose(0, 1).flatten(2) for j in range(self.n_heads)]  # [1+S, B, L*2dh]
            q = [(parts[:, :, -1] @ w["W_Q"][1, j]).transpose(0, 1) for j in range(self.n_heads)]  # [1+S, B, dh]
            clean.parts = (gram, kv, q)
        gram, kv_parts, q_parts = clean.parts
        for j in range(self.n_heads):
            idx = drop[:, :, 1 + j].any(1).nonzero().flatten()
            if not len(idx):
                continue
            # variants that drop the same paths into head j share one combination of the parts
            patterns, which = drop[idx, :, 1 + j].unique(dim=0, return_inverse=True)
            for u, pattern in enumerate(patterns):
                sel = idx[which == u]
                r = rows[sel]
                coef = torch.cat([torch.ones(1, device=dev_, dtype=dev.dtype), -pattern.to(dev.dtype)])  # [1+S]
                scale = (torch.einsum("a,nlac,c->nl", coef, gram[r], coef) + w["eps"]).sqrt()  # [n, L]
                kv = (coef @ kv_parts[j][:, r].flatten(1)).view(len(r), L, 2 * dh) / scale[..., None] + self.b_KV1[j]
                q = (coef @ q_parts[j][:, r].flatten(1)).view(len(r), dh) / scale[:, -1:] + w["b_Q"][1, j]
                pattern1 = ((kv[..., :dh] @ q[..., None])[..., 0] * dh**-0.5).softmax(-1)
                out1[sel, j] = (pattern1[:, None] @ kv[..., dh:])[:, 0] @ w["W_O"][1, j]
        out1 = torch.where(drop_out[..., None], self.mean_out1[:, L - 1][None], out1)
        return self._logits(final + out1.sum(1) + w["b_O"][1])

    # ---- the linear prediction -------------------------------------------------------------
    @torch.no_grad()
    def attribute(self, run: PathRun) -> dict[str, torch.Tensor]:
        """Each component's contribution to the last-position logits relative to its mean, with attention
        and LayerNorm scales frozen at `run`'s: `paths` [B, S, D, V], `heads0` [B, H, V], `heads1` [B, H, V].
        Ablating a set of paths changes the logits by about minus the sum of their rows."""
        w = self.w
        B, S, L, d = run.sources.shape
        dev = run.deviation.view(B, S, L, d)
        U = w["W_U"] / run.scale_final[:, None, None]  # [B, d, V]
        direct = torch.einsum("bsd,bdv->bsv", _centre(dev[:, :, -1]), U)
        OV = w["W_V"][1] @ w["W_O"][1]  # [H, d, d]
        read = torch.einsum("bhl,bsld->bshd", run.pattern1 / run.scale1, _centre(dev))
        through = torch.einsum("bshd,hde->bshe", read, OV)
        through = torch.einsum("bshd,bdv->bshv", _centre(through), U)
        paths = torch.cat([direct[:, :, None], through], 2)  # [B, S, D, V]
        out_dev = _centre(run.out1 - self.mean_out1[:, L - 1][None])
        heads1 = torch.einsum("bhd,bdv->bhv", out_dev, U)
        return {"paths": paths, "heads0": paths[:, 1:].sum(2), "heads1": heads1}
