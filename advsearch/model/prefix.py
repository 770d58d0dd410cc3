"""Prefix sharing for exhaustive enumeration.

A prefix's last-position output needs only its last token's computation, given
the per-layer keys and values of its parent prefix. `PrefixStore` keeps the
keys/values of the most recent chunk of prefixes of each length, so a chunk of
one-token extensions of those prefixes costs one token each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from advsearch.model.evaluator import FusedWeights


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


# Parents per block of `extend`: its intermediates (block * letters rows) stay in the CPU's caches. A
# multiple of 64, so that every block's rows start at a multiple of 64 rows of the chunk's.
BLOCK_PARENTS = 512


def blocks(parents: int, block: int = BLOCK_PARENTS) -> list[tuple[int, int]]:
    """`extend`'s parent blocks: [0, block), [block, 2 block), ..., the last one taking the remainder
    (so every block but a lone one holds at least `block` parents)."""
    starts = list(range(0, max(parents - block, 0) + 1, block)) if parents >= block else [0]
    return list(zip(starts, starts[1:] + [parents]))


def extend(fw: FusedWeights, kv: KV, letters: int, keep: bool = True,
           out: KV | None = None) -> tuple[torch.Tensor, KV | None]:
    """Last-position logits of every prefix + one letter (parent-major: [parents * letters, vocab]),
    and, when `keep`, the extended prefixes' keys and values (written into `out`'s storage when it
    is given and large enough: the slot they replace, so that no fresh memory is touched).

    The parents are computed in blocks (`blocks`), each with exactly the operations the whole chunk
    would get, so every value is the chunk's bit for bit: the elementwise operations, reductions,
    layer norms and per-(parent, head) products do not depend on how many rows they are given, and
    the matrix products' rows do not either when each block starts at a multiple of 64 rows and holds
    many rows (measured with MKL; small products take other kernels, hence the remainder's merge;
    tests/test_prefix.py checks it on the machine it runs on). What the blocks save is memory
    traffic: a chunk's intermediates (tens of MB) no longer leave the caches between operations.
    Within a block the products write into reused buffers and the sums are done in place, in the
    order the expressions `a @ w + b`, `x + m + b`, `(e @ v + s * v) / (e.sum() + s)` evaluate.
    """
    n_layers, parents, h, n, dh = kv.keys.shape
    d, vocab, device, dtype = fw.W_E.shape[1], fw.W_U.shape[1], kv.keys.device, kv.keys.dtype
    x0 = (fw.W_E[:letters] + fw.W_pos[n]).unsqueeze(0)  # [1, T, d]: the same for every parent until layer 0 mixes
    # Layer 0's q, k, v of the new token depend only on (letter, position): once for all parents.
    qkv = (F.layer_norm(x0, x0.shape[-1:], eps=fw.eps) @ fw.W_qkv[0] + fw.b_qkv[0]).view(1, letters, 3, h, dh)
    q0, k0, v0 = (qkv[:, :, i].transpose(1, 2).contiguous() for i in range(3))  # [1, H, T, dh]
    q0 = q0 * dh**-0.5
    s_self0 = (q0 * k0).sum(-1, keepdim=True)  # [1, H, T, 1]
    logits = torch.empty(parents, letters, vocab, device=device, dtype=dtype)
    if keep:
        shape = (n_layers, parents, letters, h, n + 1, dh)
        size = n_layers * parents * letters * h * (n + 1) * dh
        if out is not None and out.keys.numel() >= size and out.keys.is_contiguous() and out.values.is_contiguous():
            new_keys, new_values = out.keys.view(-1)[:size].view(shape), out.values.view(-1)[:size].view(shape)
        else:
            new_keys, new_values = torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype)
    spans = blocks(parents)
    most = max(hi - lo for lo, hi in spans)

    def buffer(*tail):
        return torch.empty(most * letters * math.prod(tail), device=device, dtype=dtype)

    b_qkv, b_heads, b_heads2, b_scores, b_model, b_model2 = buffer(3 * h * dh), buffer(h * dh), buffer(h * dh), \
        buffer(h * n), buffer(d), buffer(d)  # fmt: skip
    b_q = buffer(h * dh)
    # Layer 0's queries are the same for every parent: the batched product gets them as one contiguous
    # [parents, H, T, dh] tensor (the copy it made of their broadcast view in every block), made once.
    q0_rows = q0.expand(most, -1, -1, -1).contiguous()
    for lo, hi in spans:
        rows = hi - lo
        m = rows * letters

        def take(buf, *shape):
            return buf[: math.prod(shape)].view(shape)

        x = x0
        for layer in range(n_layers):
            if layer == 0:
                q, k, v, s_self = q0_rows[:rows], k0, v0, s_self0
            else:
                xn = F.layer_norm(x, x.shape[-1:], eps=fw.eps)
                qkv = torch.mm(xn.view(m, d), fw.W_qkv[layer], out=take(b_qkv, m, 3 * h * dh))
                qkv = qkv.add_(fw.b_qkv[layer]).view(rows, letters, 3, h, dh)
                # k and v are only read elementwise (and copied): views do; q feeds a batched product
                q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [rows, H, T, dh]
                q = torch.mul(q, dh**-0.5, out=take(b_q, rows, h, letters, dh))
                s_self = torch.mul(q, k, out=take(b_heads, rows, h, letters, dh)).sum(-1, keepdim=True)
            keys, values = kv.keys[layer, lo:hi], kv.values[layer, lo:hi]
            # softmax over (parent keys, own key) without concatenating
            e_par = torch.matmul(q.expand(rows, -1, -1, -1), keys.transpose(-1, -2),
                                 out=take(b_scores, rows, h, letters, n))  # fmt: skip  # [rows, H, T, n]
            top = torch.maximum(e_par.amax(-1, keepdim=True), s_self)
            e_par, e_self = e_par.sub_(top).exp_(), (s_self - top).exp_()
            z = torch.matmul(e_par, values, out=take(b_heads, rows, h, letters, dh))
            z = z.add_(torch.mul(e_self, v, out=take(b_heads2, rows, h, letters, dh)))
            z = z.div_(e_par.sum(-1, keepdim=True) + e_self)
            zt = take(b_heads2, rows, letters, h, dh).copy_(z.transpose(1, 2))
            mixed = torch.mm(zt.view(m, h * dh), fw.W_out[layer], out=take(b_model, m, d)).view(rows, letters, d)
            if layer == 0:
                x = torch.add(x, mixed, out=take(b_model2, rows, letters, d))
            else:
                x = x.add_(mixed)
            x = x.add_(fw.b_out[layer])
            if keep:
                for new, old, own in ((new_keys, keys, k), (new_values, values, v)):
                    new[layer, lo:hi, :, :, :n] = old.unsqueeze(1)
                    new[layer, lo:hi, :, :, n] = own.transpose(1, 2)
        xn = F.layer_norm(x, x.shape[-1:], eps=fw.eps)
        torch.mm(xn.view(m, d), fw.W_U, out=logits[lo:hi].view(m, vocab)).add_(fw.b_U)
    logits = logits.view(parents * letters, vocab)
    if not keep:
        return logits, None
    flat = (n_layers, parents * letters, h, n + 1, dh)
    return logits, KV(new_keys.view(flat), new_values.view(flat))


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
        # prefix length -> flat storage of that length's slot, reused by the next chunk of that length
        self.storage: dict[int, KV] = {}
        self.restored = False  # set by `restore`: every chunk's parents must then be held

    def _parents_kv(self, parents: torch.Tensor) -> KV:
        slot = self.slots.get(parents.shape[1])
        if slot is not None:
            ids, kv = slot
            want = prefix_ids(parents, self.letters)
            start = int(torch.searchsorted(ids, want[:1]))
            stop = start + len(want)
            if stop <= len(ids) and torch.equal(ids[start:stop], want):
                return KV(kv.keys[:, start:stop], kv.values[:, start:stop])
        if self.restored:  # a copy that must compute exactly what the store it copies would have
            raise RuntimeError("the parents of a chunk are not in the restored prefix store")
        return encode(self.fw, parents)  # not cached (first chunk after a resume, say)

    def snapshot(self) -> dict:
        """What the store holds now, to `restore` after other chunks were evaluated (in a process of its own)."""
        return dict(self.slots)

    def restore(self, snapshot: dict) -> None:
        """Hold what `snapshot` held. Its tensors are never reused as storage afterwards (they are
        read-only from now on), so a snapshot can be restored again and again."""
        kept = {t.data_ptr() for _, kv in snapshot.values() for t in (kv.keys, kv.values)}
        reusable = {length: kv for length, kv in self.storage.items() if kv.keys.data_ptr() not in kept}
        self.slots, self.storage, self.restored = dict(snapshot), reusable, True

    def extension_logits(self, tokens: torch.Tensor, keep: bool) -> torch.Tensor:
        """Last-position logits [batch, vocab] of `tokens` [batch, n + 1], whose rows must be every
        one-letter extension of consecutive parents, parent-major (`?ab`, `?ab`+a..j ...)."""
        t = self.letters
        parents = tokens[::t, :-1]
        if tokens.shape[0] % t or not torch.equal(tokens[:t, -1], torch.arange(t, device=tokens.device)):
            raise ValueError("extension batches must hold every one-letter extension of each parent")
        length = tokens.shape[1]
        # The slot these prefixes replace is dead (the parents have another length): its storage takes
        # their keys/values, so that a chunk does not page in hundreds of MB of fresh memory.
        self.slots.pop(length, None)
        out = self.storage.get(length) if keep else None
        logits, kv = extend(self.fw, self._parents_kv(parents), t, keep, out=out)
        if keep:
            self.slots[length] = (prefix_ids(tokens, t), kv)
            if out is None or kv.keys.data_ptr() != out.keys.data_ptr():
                self.storage[length] = KV(kv.keys.view(-1), kv.values.view(-1))
        return logits
