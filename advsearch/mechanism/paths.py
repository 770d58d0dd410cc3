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
distribution (`advsearch.mechanism.tables.reference_batch`), so an ablated component
carries what it carries on average at that position: mean ablation, the usual
choice for asking what a component's *input-specific* output does.

`PathModel.attribute` gives the linear prediction of each ablation from the
clean run (attention patterns and LayerNorm scales frozen): how much every path,
every layer-0 head and every layer-1 head output contributes to each logit
relative to its mean. `advsearch.mechanism.explain` picks components from that prediction
and checks them with `ablate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from advsearch.model.checkpoint import Weights


@dataclass
class PathRun:
    """A batch's clean forward, read at its items (sequence `seq[n]`, position `pos[n]`).

    Items sit in per-sequence slots ([B, m]; `slots` holds each slot's item, -1 where a sequence has
    fewer than m items), so that what a sequence shares is computed once for all its items. Parts are
    the residual layer 1 reads and the sources' deviations from their means, in that order."""

    tokens: torch.Tensor  # [B, L]
    seq: torch.Tensor  # [N]: each item's sequence
    pos: torch.Tensor  # [N]: each item's position k
    slots: torch.Tensor  # [B, m]: the item in each slot, or -1
    slot_pos: torch.Tensor  # [B, m]: each slot's position (the last one for an empty slot)
    pattern0: torch.Tensor  # [B, H, L, L]: layer-0 attention
    deviation: torch.Tensor  # [B, L, S, d]: each source minus its mean
    gram: torch.Tensor  # [B, L, (1+S)^2]: Gram matrix of the centred parts / d
    kv: torch.Tensor  # [B, H, 1+S, L, 2dh]: the centred parts projected by each layer-1 head's keys and values
    q: torch.Tensor  # [B, H, 1+S, m, dh]: the same at each slot's position, projected by its queries
    table: torch.Tensor  # [N, rows, d]: the clean final residual at k and what each ablation adds to it
    have: torch.Tensor  # [N, 2^S]: the drop patterns whose rows `table` holds
    logits: torch.Tensor | None = None  # [N, V] at k
    pattern1: torch.Tensor | None = None  # [B, H, m, L]: each layer-1 head's attention at each slot (0 beyond it)
    scale1: torch.Tensor | None = None  # [B, L]: the LayerNorm scale of layer 1's input per position
    scale_final: torch.Tensor | None = None  # [N]: the final LayerNorm scale at k
    out1: torch.Tensor | None = None  # [N, H, d]: each layer-1 head's output at k


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


def _scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.var(-1, unbiased=False) + eps).sqrt()


class PathModel:
    """Path-level forward of a 2-layer attention-only model over its processed `Weights`.

    `ablate` reads each variant's final residual as a sum of rows of `PathRun.table`: per item, the
    clean final residual, then for each drop pattern c and head j the change of j's output when j
    reads with c dropped (row c*H + j; filled on first use), for each head the change when its
    output is its mean, and for each source minus its deviation (a dropped direct path)."""

    def __init__(self, weights: Weights, reference: torch.Tensor, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):  # fmt: skip
        self.device = torch.device(device)
        w = {k: (v.to(self.device, dtype) if isinstance(v, torch.Tensor) else v)
             for k, v in vars(weights).items()}  # fmt: skip
        self.w = w
        self.n_heads = H = w["W_Q"].shape[1]
        self.d_head = w["W_Q"].shape[-1]
        self.n_sources = S = 1 + H
        self.reference_scales = self._means(reference.to(self.device))
        # Layer 0's queries, keys and values depend only on (token, position): one table.
        e = w["W_E"][:, None] + w["W_pos"][None]  # [V, n_ctx, d]
        xn = F.layer_norm(e, e.shape[-1:], eps=w["eps"])
        self.qkv0 = torch.stack([torch.einsum("tld,hde->tlhe", xn, w[f"W_{m}"][0]) + w[f"b_{m}"][0]
                                 for m in "QKV"], 2).flatten(2)  # [V, n_ctx, 3*H*dh]  # fmt: skip
        # Layer 1 reads centred vectors: its projections with zero-mean columns take the centring.
        W_KV1 = torch.cat([w["W_K"][1], w["W_V"][1]], -1).transpose(0, 1).flatten(1)  # [d, H*2dh]
        W_Q1 = w["W_Q"][1].transpose(0, 1).flatten(1)  # [d, H*dh]
        self.W_KV1, self.W_Q1 = W_KV1 - W_KV1.mean(0), W_Q1 - W_Q1.mean(0)
        self.mean_by_pos = self.mean_sources.transpose(0, 1)  # [n_ctx, S, d]
        self.mean_resid = self.mean_sources.sum(0) + w["b_O"][0]  # [n_ctx, d]
        U = w["W_U"] - w["W_U"].mean(0)  # the unembedding of a centred vector
        self.U, self.W_OU = U, w["W_O"][1] @ U  # [d, V], [H, dh, V]
        self.rows = 2**S * H + H + S + 1  # of a PathRun's table (see the class docstring)

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
        self.mean_sources = sources.mean(0)  # [S, n_ctx, d]
        self.mean_out1 = out1.mean(0)  # [H, n_ctx, d]
        return {"s0": float(scale0.mean()), "s1": float(_scale(x1, w["eps"]).mean()),
                "s_final": float(_scale(final, w["eps"]).mean())}  # fmt: skip

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, positions: list[list[int]] | None = None) -> PathRun:
        """The clean forward of `tokens` [B, L], read at the items `positions[b]` of each sequence b
        (default: its last position); items are numbered sequence by sequence."""
        w, dev_, H, dh, S = self.w, self.device, self.n_heads, self.d_head, self.n_sources
        tokens = tokens.to(dev_)
        B, L = tokens.shape
        positions = [[L - 1]] * B if positions is None else positions
        m = max(len(p) for p in positions)
        slot_pos = torch.tensor([p + [L - 1] * (m - len(p)) for p in positions], device=dev_)  # [B, m]
        valid = torch.tensor([[i < len(p) for i in range(m)] for p in positions], device=dev_)
        slots = torch.full((B, m), -1, dtype=torch.long, device=dev_)
        slots[valid] = torch.arange(int(valid.sum()), device=dev_)
        seq, pos = valid.nonzero(as_tuple=True)[0], slot_pos[valid]
        ar = torch.arange(L, device=dev_)

        q0, k0, v0 = self.qkv0[tokens, ar].view(B, L, 3, H, dh).permute(2, 0, 3, 1, 4)  # [B, H, L, dh] each
        pattern0 = (q0 @ k0.transpose(-1, -2) * dh**-0.5).masked_fill(ar > ar[:, None], -torch.inf).softmax(-1)
        out0 = torch.einsum("bhle,hed->blhd", pattern0 @ v0, w["W_O"][0])  # [B, L, H, d]
        e = w["W_E"][tokens] + w["W_pos"][:L]
        deviation = torch.cat([e[:, :, None], out0], 2) - self.mean_by_pos[:L]  # [B, L, S, d]
        resid = deviation.sum(2) + self.mean_resid[:L]
        parts = _centre(torch.cat([resid[:, :, None], deviation], 2))  # [B, L, 1+S, d]
        gram = (parts @ parts.transpose(-1, -2)).flatten(2) / parts.shape[-1]  # [B, L, (1+S)^2]
        kv = (parts @ self.W_KV1).view(B, L, 1 + S, H, 2 * dh).permute(0, 3, 2, 1, 4).contiguous()
        at = parts[torch.arange(B, device=dev_)[:, None], slot_pos]  # [B, m, 1+S, d]
        q = (at @ self.W_Q1).view(B, m, 1 + S, H, dh).permute(0, 3, 2, 1, 4).contiguous()

        N = len(seq)
        # a head's rows are written when their pattern is first asked for (`have`); the rest below
        table = torch.empty(N, self.rows, resid.shape[-1], dtype=resid.dtype, device=dev_)
        run = PathRun(tokens, seq, pos, slots, slot_pos, pattern0, deviation, gram, kv, q, table,
                      torch.zeros(N, 2**S, dtype=torch.bool, device=dev_))  # fmt: skip
        out, pattern1, scale = self._heads(run, None, [0])
        run.out1 = out[valid][:, 0]  # [N, H, d]
        run.pattern1, run.scale1, run.have[:, 0] = pattern1[:, :, 0], scale[:, 0], True
        final = resid[seq, pos] + run.out1.sum(1) + w["b_O"][1]
        run.logits, run.scale_final = self._logits(final), _scale(final, w["eps"])
        first = 2**S * H
        table[:, first : first + H] = self.mean_out1[:, pos].transpose(0, 1) - run.out1
        table[:, first + H : -1] = -deviation[seq, pos]
        table[:, -1] = final
        return run

    def _heads(self, run: PathRun, seqs: torch.Tensor | None, codes: list[int]):
        """Every layer-1 head's output at the slots of the sequences `seqs` [B'] (None: all) when the sources
        in each drop pattern `codes` [P] (bit s: source s) are read at their means: outputs [B', m, P, H, d],
        attention [B', H, P, m, L] and the input's LayerNorm scale per position [B', P, L]."""
        w, dh, H, S = self.w, self.d_head, self.n_heads, self.n_sources
        pick = (lambda x: x) if seqs is None else (lambda x: x[seqs])
        bits = torch.tensor([[(c >> s) & 1 for s in range(S)] for c in codes], device=self.device)
        coef = torch.cat([torch.ones(len(codes), 1, device=self.device), -bits], 1).to(run.kv.dtype)  # [P, 1+S]
        kv, q, pos = pick(run.kv), pick(run.q), pick(run.slot_pos)  # pos: [B', m]
        Bs, _, A, L, _ = kv.shape
        P, m = len(codes), pos.shape[1]
        # the input's scale from the parts' Gram matrix; keys, values and queries as combinations of the parts'
        scale = (pick(run.gram) @ (coef[:, :, None] * coef[:, None]).flatten(1).T + w["eps"]).sqrt().transpose(1, 2)
        kv = (coef @ kv.view(Bs, H, A, -1)).view(Bs, H, P, L, 2 * dh)
        q = (coef @ q.view(Bs, H, A, -1)).view(Bs, H, P, m, dh)
        q = q / scale.gather(2, pos[:, None].expand(Bs, P, m))[:, None, :, :, None] + w["b_Q"][1][:, None, None]
        # keys' biases add the same amount to every score of a query, so the softmax does not see them
        scores = (q @ kv[..., :dh].transpose(-1, -2)) / scale[:, None, :, None] * dh**-0.5  # [B', H, P, m, L]
        after = torch.arange(L, device=self.device) > pos[..., None]  # [B', m, L]
        pattern = scores.masked_fill(after[:, None, None], -torch.inf).softmax(-1)
        z = (pattern / scale[:, None, :, None]) @ kv[..., dh:] + w["b_V"][1][:, None, None]  # [B', H, P, m, dh]
        return torch.einsum("bhpme,hed->bmphd", z, w["W_O"][1]), pattern, scale

    def _fill(self, run: PathRun, items: torch.Tensor, codes: torch.Tensor) -> None:
        """Fill the table rows of the drop patterns `codes` [M, H] of the items [M] not yet held."""
        need = torch.zeros_like(run.have)
        need[items[:, None], codes] = True
        missing = need & ~run.have
        if not missing.any():
            return
        seqs = run.seq[missing.any(1)].unique()
        if len(seqs) == len(run.slots):
            seqs = None  # every sequence: `_heads` reads the projections without copying them
        todo = missing.any(0).nonzero().flatten()
        out, _, _ = self._heads(run, seqs, todo.tolist())
        slots = run.slots if seqs is None else run.slots[seqs]
        idx = slots[slots >= 0]
        H = self.n_heads
        rows = (todo[:, None] * H + torch.arange(H, device=self.device)).flatten()  # [P*H]
        run.table[idx[:, None], rows] = (out[slots >= 0] - run.out1[idx, None]).flatten(1, 2)
        run.have[idx[:, None], todo] = True

    @torch.no_grad()
    def ablate(self, run: PathRun, rows: torch.Tensor, keep: torch.Tensor, keep_out: torch.Tensor) -> torch.Tensor:
        """Logits at k [M, V] of the variants of `run`'s items `rows` [M], with path keep masks `keep`
        [M, S, D] and layer-1 output keep masks `keep_out` [M, H]; a dropped path reads its source's mean,
        a dropped output is its mean."""
        dev_, H, S = self.device, self.n_heads, self.n_sources
        rows, drop, drop_out = rows.to(dev_), (~keep).to(dev_), (~keep_out).to(dev_)
        codes = (drop[:, :, 1:].long() << torch.arange(S, device=dev_)[:, None]).sum(1)  # [M, H]: drop patterns
        self._fill(run, rows, codes)
        first, R = 2**S * H, self.rows
        heads = torch.arange(H, device=dev_)
        head_rows = torch.where(drop_out, first + heads, torch.where(codes > 0, codes * H + heads, -1))
        direct = torch.where(drop[:, :, 0], first + H + torch.arange(S, device=dev_), -1)
        idx = torch.cat([torch.full_like(rows[:, None], R - 1), head_rows, direct], 1)  # [M, 1+H+S]
        use = idx >= 0
        flat = (idx + rows[:, None] * R)[use]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=dev_), use.sum(1).cumsum(0)[:-1]])
        final = F.embedding_bag(flat, run.table.view(-1, run.table.shape[-1]), offsets, mode="sum")
        return self._logits(final)

    # ---- the linear prediction -------------------------------------------------------------
    @torch.no_grad()
    def attribute(self, run: PathRun) -> dict[str, torch.Tensor]:
        """Each component's contribution to the logits at k relative to its mean, with attention and
        LayerNorm scales frozen at `run`'s: `paths` [N, S, D, V], `heads0` [N, H, V], `heads1` [N, H, V].
        Ablating a set of paths changes the logits by about minus the sum of their rows."""
        dh = self.d_head
        scale = run.scale_final[:, None, None]
        direct = run.deviation[run.seq, run.pos] @ self.U / scale  # [N, S, V]
        # the deviations' value projections, read with the clean attention and the clean LayerNorm scale
        read = (run.pattern1 / run.scale1[:, None, None])[:, :, None] @ run.kv[:, :, 1:, :, dh:]  # [B, H, S, m, dh]
        through = torch.einsum("bhsme,hev->bmshv", read, self.W_OU)[run.slots >= 0] / scale[..., None]
        paths = torch.cat([direct[:, :, None], through], 2)  # [N, S, D, V]
        heads1 = (run.out1 - self.mean_out1[:, run.pos].transpose(0, 1)) @ self.U / scale
        return {"paths": paths, "heads0": paths[:, 1:].sum(2), "heads1": heads1}
