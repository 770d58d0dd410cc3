"""The fused forward split into paths, with per-row mean ablations as arguments.

A 2-layer attention-only model's residual stream at a position k is a sum of
*sources*, `embed` (token + position) and the layer-0 heads `0.h`, read by
*destinations*: the unembedding directly (`logits`) or a layer-1 head `1.j`
through its queries, keys and values. A path `src->dst` is one such read.

`PathModel.run` is the ordinary forward of a batch of sequences, read at chosen
*items* (a sequence and a position k in it; by default each sequence's last
position), keeping what the rest reads. The model is causal, so every position
of a sequence is computed once however many items read it. `PathModel.ablate`
evaluates variants of items with, per variant, a keep mask over the paths
([variant, source, destination]; a dropped path is read at its mean instead)
and a keep mask over the layer-1 heads' outputs at k (a dropped output is
replaced by its mean). Each layer-1 head reads its own residual, so ablating
`0.1->1.2` changes 1.2's attention pattern and values but nothing else.

A layer-1 head's output under an ablation depends only on which sources are
dropped from its input (one of 2^S *drop patterns*), so `ablate` computes a
head's output once per (item, pattern) it is asked for and keeps it; every
variant is then a sum of kept head outputs, the direct paths and the LayerNorm
and unembedding at k. The head outputs come from projections computed once per
sequence: a head reads LayerNorm(resid − Σ dropped deviations), and since the
LayerNorm (weights folded) only centres and divides by a per-position scale, its
queries, keys and values are the same combination of the projected, centred
parts divided by the combination's scale, which the parts' Gram matrix gives.

Means are taken per position over a reference batch of the training
distribution (`advsearch.mechanism.reference_batch`), so an ablated component
carries what it carries on average at that position: mean ablation, the usual
choice for asking what a component's *input-specific* output does.

`PathModel.attribute` gives the linear prediction of each ablation from the
clean run (attention patterns and LayerNorm scales frozen): how much every path,
every layer-0 head and every layer-1 head output contributes to each logit
relative to its mean. `advsearch.explain` picks components from that prediction
and checks them with `ablate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import Weights


@dataclass
class PathRun:
    """A batch's clean forward, read at its items (sequence `seq[n]`, position `pos[n]`)."""

    tokens: torch.Tensor  # [B, L]
    seq: torch.Tensor  # [N]: each item's sequence
    pos: torch.Tensor  # [N]: each item's position k
    slots: torch.Tensor  # [B, m]: the items of each sequence, -1 where a sequence has fewer than m
    logits: torch.Tensor  # [N, V] at k
    pattern0: torch.Tensor  # [B, H, L, L]: layer-0 attention
    pattern1: torch.Tensor  # [N, H, L]: each layer-1 head's attention at k (0 beyond k)
    scale1: torch.Tensor  # [N, L]: the LayerNorm scale of layer 1's input per position
    scale_final: torch.Tensor  # [N]: the final LayerNorm scale at k
    out1: torch.Tensor  # [N, H, d]: each layer-1 head's output at k
    resid: torch.Tensor  # [N, d]: the residual stream layer 1 reads, at k
    deviation: torch.Tensor  # [B, S, L, d]: each source minus its mean
    gram: torch.Tensor  # [B, L, 1+S, 1+S]: Gram matrix of the centred parts (resid, deviations) / d
    kv: torch.Tensor  # [B, 1+S, L, H*2dh]: the parts projected by each layer-1 head's keys and values
    q: torch.Tensor  # [B, m, 1+S, H*dh]: the parts at each slot's position projected by the queries
    outs: torch.Tensor  # [N, 2^S, H, d]: each layer-1 head's output at k per drop pattern, where `have`
    have: torch.Tensor  # [N, 2^S]: which drop patterns `outs` holds


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
        self.n_heads = H = w["W_Q"].shape[1]
        self.d_head = w["W_Q"].shape[-1]
        self.W_KV1 = torch.cat([w["W_K"][1], w["W_V"][1]], -1).transpose(0, 1).flatten(1)  # [d, H*2dh]
        self.W_Q1 = w["W_Q"][1].transpose(0, 1).flatten(1)  # [d, H*dh]
        self.b_V1 = w["b_V"][1][:, None]  # [H, 1, dh]
        self.n_sources = 1 + H
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
        self.mean_out1 = out1.mean(0)  # [H, n_ctx, d]
        return {"s0": float(scale0.mean()), "s1": float(_scale(x1, w["eps"]).mean()),
                "s_final": float(_scale(final, w["eps"]).mean())}  # fmt: skip

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, positions: list[list[int]] | None = None) -> PathRun:
        """The clean forward of `tokens` [B, L], read at the items `positions[b]` of each sequence b
        (default: its last position); items are numbered sequence by sequence."""
        w, dev_, H, dh = self.w, self.device, self.n_heads, self.d_head
        tokens = tokens.to(dev_)
        B, L = tokens.shape
        if positions is None:
            positions = [[L - 1]] * B
        m = max(len(p) for p in positions)
        slot_pos = torch.tensor([p + [L - 1] * (m - len(p)) for p in positions], device=dev_)  # [B, m]
        valid = torch.tensor([[i < len(p) for i in range(m)] for p in positions], device=dev_)
        slots = torch.full((B, m), -1, dtype=torch.long, device=dev_)
        slots[valid] = torch.arange(int(valid.sum()), device=dev_)
        seq, pos = valid.nonzero(as_tuple=True)[0], slot_pos[valid]

        sources, pattern0, _ = self._layer0(tokens)
        x = sources.sum(1) + w["b_O"][0]  # [B, L, d]
        deviation = sources - self.mean_sources[None, :, :L]
        parts = _centre(torch.cat([x[:, None], deviation], 1))  # [B, 1+S, L, d]
        gram = torch.einsum("bald,bcld->blac", parts, parts) / parts.shape[-1]
        kv = parts @ self.W_KV1  # [B, 1+S, L, H*2dh]
        at = parts[torch.arange(B, device=dev_)[:, None], :, slot_pos]  # [B, m, 1+S, d]
        q = at @ self.W_Q1  # [B, m, 1+S, H*dh]
        N, P = len(seq), 2**self.n_sources
        run = PathRun(tokens, seq, pos, slots, None, pattern0, None, None, None, None, x[seq, pos],
                      deviation, gram, kv, q, torch.zeros(N, P, H, x.shape[-1], dtype=x.dtype, device=dev_),
                      torch.zeros(N, P, dtype=torch.bool, device=dev_))  # fmt: skip
        out, pattern1, scale1 = self._heads(run, torch.arange(B, device=dev_), [0])
        run.outs[:, 0], run.have[:, 0] = out[valid][:, 0], True
        run.out1, run.pattern1 = run.outs[:, 0], pattern1[:, 0].transpose(1, 2)[valid]  # [N, H, L]
        run.scale1 = scale1[:, 0][seq]  # [N, L]
        final = run.resid + run.out1.sum(1) + w["b_O"][1]
        run.logits, run.scale_final = self._logits(final), _scale(final, w["eps"])
        return run

    def _heads(self, run: PathRun, seqs: torch.Tensor, codes: list[int]):
        """Every layer-1 head's output at the slots of the sequences `seqs` [B'] when the sources in each drop
        pattern `codes` [P] (bit s: source s) are read at their means: outputs [B', m, P, H, d], attention
        [B', P, H, m, L] and the input's LayerNorm scale per position [B', P, L]."""
        w, dh, H = self.w, self.d_head, self.n_heads
        S = self.n_sources
        bits = torch.tensor([[(c >> s) & 1 for s in range(S)] for c in codes], device=self.device)
        coef = torch.cat([torch.ones(len(codes), 1, device=self.device), -bits], 1).to(run.kv.dtype)  # [P, 1+S]
        Bs, P, L, m = len(seqs), len(codes), run.tokens.shape[1], run.slots.shape[1]
        scale = (torch.einsum("pa,blac,pc->bpl", coef, run.gram[seqs], coef) + w["eps"]).sqrt()  # [B', P, L]
        kv = torch.einsum("pa,balf->bplf", coef, run.kv[seqs]).view(Bs, P, L, H, 2 * dh).transpose(2, 3)
        q = torch.einsum("pa,bmaf->bpmf", coef, run.q[seqs]).view(Bs, P, m, H, dh).transpose(2, 3)  # [B', P, H, m, dh]
        pos = torch.where(run.slots[seqs] >= 0, run.pos[run.slots[seqs].clamp(min=0)], L - 1)  # [B', m]
        q = q / scale.gather(2, pos[:, None].expand(Bs, P, m))[:, :, None, :, None] + w["b_Q"][1][:, None]
        # keys' biases add the same amount to every score of a query, so the softmax does not see them
        scores = (q @ kv[..., :dh].transpose(-1, -2)) / scale[:, :, None, None] * dh**-0.5  # [B', P, H, m, L]
        after = torch.arange(L, device=self.device) > pos[..., None]  # [B', m, L]
        pattern = scores.masked_fill(after[:, None, None], -torch.inf).softmax(-1)
        z = (pattern / scale[:, :, None, None]) @ kv[..., dh:] + self.b_V1  # [B', P, H, m, dh]
        out = torch.einsum("bphme,hed->bmphd", z, w["W_O"][1])
        return out, pattern, scale

    def _fill(self, run: PathRun, items: torch.Tensor, codes: torch.Tensor) -> None:
        """Compute the head outputs `run.outs` of the drop patterns `codes` [M, H] of the items [M] not yet held."""
        need = torch.zeros_like(run.have)
        need[items[:, None], codes] = True
        missing = need & ~run.have
        if not missing.any():
            return
        seqs = run.seq[missing.any(1)].unique()
        todo = missing.any(0).nonzero().flatten()
        out, _, _ = self._heads(run, seqs, todo.tolist())
        slots = run.slots[seqs]
        idx = slots[slots >= 0]
        run.outs[idx[:, None], todo] = out[slots >= 0]
        run.have[idx[:, None], todo] = True

    @torch.no_grad()
    def ablate(self, run: PathRun, rows: torch.Tensor, keep: torch.Tensor, keep_out: torch.Tensor) -> torch.Tensor:
        """Logits at k [M, V] of the variants of `run`'s items `rows` [M], with path keep masks `keep`
        [M, S, D] and layer-1 output keep masks `keep_out` [M, H]; a dropped path reads its source's mean,
        a dropped output is its mean."""
        w, dev_ = self.w, self.device
        rows, drop, drop_out = rows.to(dev_), (~keep).to(dev_), (~keep_out).to(dev_)
        H = self.n_heads
        weights = 2 ** torch.arange(self.n_sources, device=dev_)
        codes = (drop[:, :, 1:].long() * weights[:, None]).sum(1)  # [M, H]: each head's drop pattern
        self._fill(run, rows, codes)
        out1 = run.outs[rows[:, None], codes, torch.arange(H, device=dev_)]  # [M, H, d]
        mean = self.mean_out1[:, run.pos[rows]].transpose(0, 1)  # [M, H, d]
        out1 = torch.where(drop_out[..., None], mean, out1)
        dev_k = run.deviation[run.seq[rows], :, run.pos[rows]]  # [M, S, d]
        final = run.resid[rows] - (drop[:, :, 0, None].to(dev_k.dtype) * dev_k).sum(1)
        return self._logits(final + out1.sum(1) + w["b_O"][1])

    # ---- the linear prediction -------------------------------------------------------------
    @torch.no_grad()
    def attribute(self, run: PathRun) -> dict[str, torch.Tensor]:
        """Each component's contribution to the logits at k relative to its mean, with attention and
        LayerNorm scales frozen at `run`'s: `paths` [N, S, D, V], `heads0` [N, H, V], `heads1` [N, H, V].
        Ablating a set of paths changes the logits by about minus the sum of their rows."""
        w, H, dh = self.w, self.n_heads, self.d_head
        seq, pos = run.seq, run.pos
        U = w["W_U"] - w["W_U"].mean(0)  # reading a centred vector: centring folded into the unembedding
        dev_k = run.deviation[seq, :, pos]  # [N, S, d]
        direct = dev_k @ U / run.scale_final[:, None, None]  # [N, S, V]
        # the parts' value projections are the deviations' (parts 1..S), already centred
        values = run.kv[seq, 1:].unflatten(-1, (H, 2 * dh))[..., dh:]  # [N, S, L, H, dh]
        read = torch.einsum("nhl,nslhe->nshe", run.pattern1 / run.scale1[:, None], values)
        through = torch.einsum("nshe,hed->nshd", read, w["W_O"][1]) @ U / run.scale_final[:, None, None, None]
        paths = torch.cat([direct[:, :, None], through], 2)  # [N, S, D, V]
        out_dev = run.out1 - self.mean_out1[:, pos].transpose(0, 1)
        heads1 = out_dev @ U / run.scale_final[:, None, None]
        return {"paths": paths, "heads0": paths[:, 1:].sum(2), "heads1": heads1}
