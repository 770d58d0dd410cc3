import torch
import torch.nn.functional as F

from advsearch.model.determinism import eval_threads
from advsearch.model.evaluator import Evaluator
from advsearch.model.prefix import KV, blocks, encode, extend
from strategies.exhaustive import prefixes


def _reference_extend(fw, kv: KV, letters: int):
    """`extend` as it was before blocks: the whole chunk in one go, every intermediate materialised."""
    n_layers, parents, h, n, dh = kv.keys.shape
    x = (fw.W_E[:letters] + fw.W_pos[n]).unsqueeze(0)
    new_k, new_v = [], []
    for layer in range(n_layers):
        rows = x.shape[0]
        xn = F.layer_norm(x, x.shape[-1:], eps=fw.eps)
        qkv = (xn @ fw.W_qkv[layer] + fw.b_qkv[layer]).view(rows, letters, 3, h, dh)
        q, k, v = (qkv[:, :, i].transpose(1, 2).contiguous() for i in range(3))
        q = q * dh**-0.5
        s_par = q @ kv.keys[layer].transpose(-1, -2)
        s_self = (q * k).sum(-1, keepdim=True)
        top = torch.maximum(s_par.amax(-1, keepdim=True), s_self)
        e_par, e_self = (s_par - top).exp_(), (s_self - top).exp_()
        z = (e_par @ kv.values[layer] + e_self * v) / (e_par.sum(-1, keepdim=True) + e_self)
        x = x + z.transpose(1, 2).reshape(parents, letters, h * dh) @ fw.W_out[layer] + fw.b_out[layer]
        new_k.append(k.expand(parents, -1, -1, -1))
        new_v.append(v.expand(parents, -1, -1, -1))
    logits = F.layer_norm(x, x.shape[-1:], eps=fw.eps) @ fw.W_U + fw.b_U

    def grow(old, new):
        old = old.unsqueeze(2).expand(n_layers, parents, letters, h, n, dh)
        new_t = torch.stack(new).permute(0, 1, 3, 2, 4).unsqueeze(4)
        return torch.cat([old, new_t], 4).reshape(n_layers, parents * letters, h, n + 1, dh)

    return logits.reshape(parents * letters, -1), KV(grow(kv.keys, new_k), grow(kv.values, new_v))


def test_blocks_start_at_multiples_of_the_block_and_merge_the_remainder():
    assert blocks(1) == [(0, 1)]
    assert blocks(1023, 512) == [(0, 1023)]
    assert blocks(1024, 512) == [(0, 512), (512, 1024)]
    assert blocks(6553, 512)[-2:] == [(5120, 5632), (5632, 6553)]
    for parents in (1, 7, 600, 6553):
        spans = blocks(parents, 64)
        assert spans[0][0] == 0 and spans[-1][1] == parents
        assert all(a[1] == b[0] and b[0] % 64 == 0 for a, b in zip(spans, spans[1:]))


def test_blocked_extension_is_bit_identical_to_the_whole_chunk(challenge):
    """The census's values must not move: blocks, in-place sums and reused storage give the logits and
    keys/values of the one-shot computation bit for bit (a chunk of 6,553 parents, as `run` makes)."""
    fw = Evaluator(challenge.weights, "cpu").fused
    with eval_threads(), torch.inference_mode():
        for depth, parents in ((4, 6553), (2, 37)):
            kv = encode(fw, prefixes(depth, 0, parents, 10, 10))
            want_logits, want_kv = _reference_extend(fw, kv, 10)
            size = want_kv.keys.numel() + 5  # a replaced slot's storage, larger than needed
            scratch = KV(torch.full((size,), float("nan")), torch.full((size,), float("nan")))
            for out in (None, scratch):
                logits, got = extend(fw, kv, 10, keep=True, out=out)
                assert torch.equal(logits, want_logits)
                assert torch.equal(got.keys, want_kv.keys) and torch.equal(got.values, want_kv.values)
            logits, none = extend(fw, kv, 10, keep=False)
            assert none is None and torch.equal(logits, want_logits)
