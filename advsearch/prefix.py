"""Prefix sharing for exhaustive enumeration.

A prefix's last-position output needs only its last token's computation, given
the per-layer keys and values of its parent prefix. `PrefixStore` keeps the
keys/values of the most recent chunk of prefixes of each length, so a chunk of
one-token extensions of those prefixes costs one token each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .evaluator import FusedWeights


@dataclass
class KV:
    """Keys and values of a batch of prefixes: [layer, batch, head, position, d_head]."""

    keys: torch.Tensor
    values: torch.Tensor


def encode(fw: FusedWeights, tokens: torch.Tensor) -> KV:
    """Keys and values of every position of `tokens` [batch, seq] (a full causal forward)."""
    batch, seq = tokens.shape
    h, dh = fw.n_heads, fw.d_head
    x = fw.W_E[tokens] + fw.W_pos[:seq]
    keys, values = [], []
    for layer in range(fw.W_qkv.shape[0]):
        xn = F.layer_norm(x, x.shape[-1:], eps=fw.eps)
        q, k, v = (xn @ fw.W_qkv[layer] + fw.b_qkv[layer]).view(batch, seq, 3, h, dh).permute(2, 0, 3, 1, 4)
        keys.append(k)
        values.append(v)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, h * dh)
        x = x + z @ fw.W_out[layer] + fw.b_out[layer]
    return KV(torch.stack(keys), torch.stack(values))


def extend(fw: FusedWeights, kv: KV, letters: int, keep: bool = True) -> tuple[torch.Tensor, KV | None]:
    """Last-position logits of every prefix + one letter (parent-major: [parents * letters, vocab]),
    and, when `keep`, the extended prefixes' keys and values."""
    n_layers, parents, h, n, dh = kv.keys.shape
    x = (fw.W_E[:letters] + fw.W_pos[n]).unsqueeze(0)  # [1, T, d]: the same for every parent until layer 0 mixes
    new_k, new_v = [], []
    for layer in range(n_layers):
        rows = x.shape[0]
        xn = F.layer_norm(x, x.shape[-1:], eps=fw.eps)
        qkv = (xn @ fw.W_qkv[layer] + fw.b_qkv[layer]).view(rows, letters, 3, h, dh)
        q, k, v = (qkv[:, :, i].transpose(1, 2).contiguous() for i in range(3))  # [rows, H, T, dh]
        q = q * dh**-0.5
        # softmax over (parent keys, own key) without concatenating
        s_par = q @ kv.keys[layer].transpose(-1, -2)  # [P, H, T, n]
        s_self = (q * k).sum(-1, keepdim=True)  # [rows, H, T, 1]
        top = torch.maximum(s_par.amax(-1, keepdim=True), s_self)
        e_par, e_self = (s_par - top).exp_(), (s_self - top).exp_()
        z = (e_par @ kv.values[layer] + e_self * v) / (e_par.sum(-1, keepdim=True) + e_self)
        x = x + z.transpose(1, 2).reshape(parents, letters, h * dh) @ fw.W_out[layer] + fw.b_out[layer]
        new_k.append(k.expand(parents, -1, -1, -1))
        new_v.append(v.expand(parents, -1, -1, -1))
    logits = F.layer_norm(x, x.shape[-1:], eps=fw.eps) @ fw.W_U + fw.b_U
    if not keep:
        return logits.reshape(parents * letters, -1), None

    def grow(old: torch.Tensor, new: list[torch.Tensor]) -> torch.Tensor:
        old = old.unsqueeze(2).expand(n_layers, parents, letters, h, n, dh)
        new_t = torch.stack(new).permute(0, 1, 3, 2, 4).unsqueeze(4)  # [L, P, T, H, 1, dh]
        return torch.cat([old, new_t], 4).reshape(n_layers, parents * letters, h, n + 1, dh)

    return logits.reshape(parents * letters, -1), KV(grow(kv.keys, new_k), grow(kv.values, new_v))


def prefix_ids(tokens: torch.Tensor, letters: int) -> torch.Tensor:
    """Lexicographic number of each prefix (the tokens after `?` read in base `letters`)."""
    ids = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    for col in range(1, tokens.shape[1]):
        ids = ids * letters + tokens[:, col]
    return ids


class PrefixStore:
    """Evaluates chunks of one-letter extensions, reusing the cached keys/values of their parents."""

    def __init__(self, fw: FusedWeights, letters: int):
        self.fw, self.letters = fw, letters
        self.slots: dict[int, tuple[torch.Tensor, KV]] = {}  # prefix length -> (sorted ids, kv)

    def _parents_kv(self, parents: torch.Tensor) -> KV:
        slot = self.slots.get(parents.shape[1])
        if slot is not None:
            ids, kv = slot
            want = prefix_ids(parents, self.letters)
            start = int(torch.searchsorted(ids, want[:1]))
            stop = start + len(want)
            if stop <= len(ids) and torch.equal(ids[start:stop], want):
                return KV(kv.keys[:, start:stop], kv.values[:, start:stop])
        return encode(self.fw, parents)  # not cached (first chunk after a resume, say)

    def extension_logits(self, tokens: torch.Tensor, keep: bool) -> torch.Tensor:
        """Last-position logits [batch, vocab] of `tokens` [batch, n + 1], whose rows must be every
        one-letter extension of consecutive parents, parent-major (`?ab`, `?ab`+a..j ...)."""
        t = self.letters
        parents = tokens[::t, :-1]
        if tokens.shape[0] % t or not torch.equal(tokens[:t, -1], torch.arange(t, device=tokens.device)):
            raise ValueError("extension batches must hold every one-letter extension of each parent")
        logits, kv = extend(self.fw, self._parents_kv(parents), t, keep)
        if keep:
            self.slots[tokens.shape[1]] = (prefix_ids(tokens, t), kv)
        return logits
