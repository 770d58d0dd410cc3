import pytest
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


@pytest.mark.parametrize("parts", [2, 3, 5])
def test_parts_of_a_chunk_of_leaves_give_the_whole_chunks_logits(challenge, parts):
    """`ExhaustiveStrategy.split_leaves` cuts a chunk of leaves at parent blocks: evaluated from the same
    cached parents, the parts give the whole chunk's logits bit for bit, in order."""
    from advsearch.search.configs import ExhaustiveConfig
    from strategies import make_strategy

    strategy = make_strategy("exhaustive", challenge.spec, ExhaustiveConfig(max_len=5, batch_size=65_536))
    strategy.todo = [(5, 65_530, 100_000), (5, 0, 65_530)]  # the two chunks of leaves `run` makes
    strategy.split_leaves(parts)
    items = strategy.pending()
    assert items[0][1] == 0 and items[-1][2] == 100_000 and all(a[2] == b[1] for a, b in zip(items, items[1:]))
    assert 2 < len(items) <= 2 * parts and all((hi - lo) // 10 >= 512 for _, lo, hi in items)
    fw = Evaluator(challenge.weights, "cpu").fused
    with eval_threads(), torch.inference_mode():
        kv = encode(fw, prefixes(4, 0, 10_000, 10, 10))
        for chunk in ((0, 65_530), (65_530, 100_000)):
            whole, _ = extend(fw, KV(kv.keys[:, chunk[0] // 10 : chunk[1] // 10], kv.values[:, chunk[0] // 10 : chunk[1] // 10]), 10, keep=False)
            cut = [extend(fw, KV(kv.keys[:, lo // 10 : hi // 10], kv.values[:, lo // 10 : hi // 10]), 10, keep=False)[0]
                   for _, lo, hi in items if chunk[0] <= lo < chunk[1]]  # fmt: skip
            assert torch.equal(torch.cat(cut), whole)


def test_prefixes_of_whole_parents_equal_the_digit_arithmetic():
    """`prefixes` builds runs of whole parents from their parents' rows: the same tensor as base-n digits."""

    def digits(n, start, stop, letters, qmark):
        idx = torch.arange(start, stop).unsqueeze(1)
        body = idx // letters ** torch.arange(n - 1, -1, -1) % letters
        return torch.cat([torch.full((stop - start, 1), qmark), body], 1)

    for n, start, stop in [(1, 0, 10), (2, 0, 100), (3, 10, 50), (3, 13, 57), (5, 0, 100000), (4, 0, 1),
                           (8, 655300, 720830), (8, 99934470, 100000000), (6, 999990, 1000000)]:  # fmt: skip
        for letters in (10, 3):
            if stop <= letters**n:
                got, want = prefixes(n, start, stop, letters, letters), digits(n, start, stop, letters, letters)
                assert got.dtype == want.dtype and got.is_contiguous() and torch.equal(got, want), (n, start, stop)


def test_the_census_files_are_those_of_the_plain_computation(challenge, tmp_path, monkeypatch):
    """census.csv and failures.csv of `run --strategy exhaustive --max-len 5`, byte for byte, against the same
    run computed the plain way: the one-shot extension above, `judge`'s general path, prefixes from their
    digits and rows written by `csv.DictWriter` (so every fast path of the census is compared)."""
    import csv

    from advsearch.model import prefix
    from advsearch.search import results, runner, steps
    from advsearch.search.configs import ExhaustiveConfig
    from strategies import exhaustive, make_strategy

    from .test_judge import _reference_judge

    def census(out):
        strategy = make_strategy("exhaustive", challenge.spec, ExhaustiveConfig(max_len=5))
        runner.run_search(challenge, strategy, out, Evaluator(challenge.weights, "cpu"), progress=False)
        return {name: (out / name).read_bytes() for name in ("census.csv", "failures.csv")}

    fast = census(tmp_path / "fast")

    def plain_extend(fw, kv, letters, keep=True, out=None):
        logits, grown = _reference_extend(fw, kv, letters)
        return logits, (grown if keep else None)

    def digits(n, start, stop, letters, qmark):
        idx = torch.arange(start, stop).unsqueeze(1)
        body = idx // letters ** torch.arange(n - 1, -1, -1) % letters
        return torch.cat([torch.full((stop - start, 1), qmark), body], 1)

    def dict_write(self, rows):
        writer = csv.DictWriter(self.file, fieldnames=self.columns)
        for row in rows:
            self.confident += row["confident"] is True
            writer.writerow({c: results.fmt(row.get(c, "")) for c in self.columns})
        self.file.flush()
        self.offset = self.file.tell()

    monkeypatch.setattr(prefix, "extend", plain_extend)
    monkeypatch.setattr(steps, "judge", _reference_judge)
    monkeypatch.setattr(exhaustive, "prefixes", digits)
    monkeypatch.setattr(results.FailureLog, "write", dict_write)
    plain = census(tmp_path / "plain")
    assert fast["failures.csv"].count(b"\n") > 50  # the run has failures to compare
    assert fast == plain
