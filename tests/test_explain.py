"""Per-failure explanations: the path forward against the bridge, the search and its control, the
categories against a plain reading of the prefix, measured rates, and the CLI."""

import json
from collections import Counter

import click
import pytest
import torch
from click.testing import CliRunner

from advsearch.cli.mechanism import explain_cmd, mechanism_cmd
from advsearch.errors import AdvsearchError
from advsearch.mechanism.explain import CATEGORIES, CSV_COLUMNS, Components, Explainer, failing_positions
from advsearch.mechanism.tables import reference_batch
from advsearch.model.evaluator import Evaluator
from advsearch.model.oracle import first_unique

N_SEQUENCES = 10_000  # fixture seed 7; the rates the README quotes come from other seeds


@pytest.fixture(scope="module")
def explainer(challenge):
    return Explainer(challenge)


def random_failures(model, n: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """One (tokens, k) per distinct failing prefix of n random sequences."""
    toks = model.spec.random_tokens(n, seed)
    pred = Evaluator(model.weights, "cpu").logits(toks).argmax(-1)
    seen, items = set(), []
    for i, k in (pred != first_unique(toks)).nonzero().tolist():
        key = tuple(toks[i, : k + 1].tolist())
        if key not in seen:
            seen.add(key)
            items.append((toks[i], k))
    return items


@pytest.fixture(scope="module")
def explained(challenge, explainer):
    items = random_failures(challenge, N_SEQUENCES, seed=7)
    return items, explainer.explain_many(items)


# ---- an independent reference: path ablation through the TransformerLens bridge ----------------


class BridgeAblation:
    """Mean ablation of paths and layer-1 outputs computed with the bridge's own forward and hooks:
    sources from its cache, each layer-1 head run by the bridge on its own residual (a
    `blocks.1.hook_resid_pre` replacement), means over the reference batch from the bridge too."""

    def __init__(self, model):
        self.model, self.bridge, self.H = model, model.bridge, model.spec.n_heads
        ref = reference_batch(model.spec)
        src, _ = self.sources(ref)
        self.mean = src.mean(0)  # [S, L, d]
        names = ("blocks.1.attn.hook_z",)
        _, cache = self.bridge.run_with_cache(ref, names_filter=lambda n: n in names)
        W_O = self.bridge.blocks[1].attn.W_O  # [H, dh, d]
        self.mean_out = torch.einsum("blhe,hed->hld", cache["blocks.1.attn.hook_z"], W_O) / len(ref)

    def sources(self, toks):
        names = ("hook_embed", "hook_pos_embed", "blocks.0.attn.hook_z")
        _, cache = self.bridge.run_with_cache(toks, names_filter=lambda n: n in names)
        W_O = self.bridge.blocks[0].attn.W_O
        out0 = torch.einsum("blhe,hed->bhld", cache["blocks.0.attn.hook_z"], W_O)
        emb = cache["hook_embed"] + cache["hook_pos_embed"]
        return torch.cat([emb[:, None], out0], 1), self.bridge.blocks[0].attn.b_O

    @torch.no_grad()
    def logits(self, toks, keep, keep_out):
        src, b0 = self.sources(toks)
        B, S, L, d = src.shape
        mean = self.mean[:, :L]
        per_dest = []
        for dst in range(1 + self.H):
            k = keep[:, :, dst].float()[:, :, None, None]
            per_dest.append((k * src + (1 - k) * mean).sum(1) + b0)
        outs = []
        W_O = self.bridge.blocks[1].attn.W_O
        for j in range(self.H):
            resid = per_dest[1 + j]
            z = {}

            def grab(x, hook, z=z):
                z["z"] = x[:, -1, j]

            self.bridge.run_with_hooks(toks, fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook, r=resid: r),
                                                        ("blocks.1.attn.hook_z", grab)])  # fmt: skip
            out = z["z"] @ W_O[j]
            ko = keep_out[:, j].float()[:, None]
            outs.append(ko * out + (1 - ko) * self.mean_out[j, L - 1])
        final = per_dest[0][:, -1] + sum(outs) + self.bridge.blocks[1].attn.b_O
        xn = torch.nn.functional.layer_norm(final, (d,), eps=self.model.weights.eps)
        return xn @ self.bridge.W_U + self.bridge.b_U


@pytest.fixture(scope="module")
def reference(challenge):
    return BridgeAblation(challenge)


def test_path_forward_matches_the_bridge(challenge, explainer, reference):
    toks = challenge.spec.random_tokens(64, 3)[:, :12]
    clean = explainer.paths.run(toks)
    assert (clean.logits - challenge.bridge(toks)[:, -1]).abs().max() < 1e-3
    comp = Components(challenge.spec.n_heads)
    sets = [(c,) for c in range(len(comp.names))] + [(0, 5), (17, 21), (3, 6, 9, 12)]
    keep, keep_out = comp.masks(sets)
    rows = torch.arange(len(toks)).repeat_interleave(len(sets))
    ours = explainer.paths.ablate(clean, rows, keep.repeat(len(toks), 1, 1), keep_out.repeat(len(toks), 1))
    theirs = reference.logits(toks[rows], keep.repeat(len(toks), 1, 1), keep_out.repeat(len(toks), 1))
    assert (ours - theirs).abs().max() < 1e-3
    # the ablations do something: most change some logit by more than 1
    assert ((ours - clean.logits[rows]).abs().amax(-1) > 1).float().mean() > 0.5


def test_checks_and_controls_agree_with_the_bridge(challenge, explained, reference):
    """Every check and control outcome and effect, recomputed with the bridge reference."""
    items, exs = explained
    comp = Components(challenge.spec.n_heads)
    index = {n: i for i, n in enumerate(comp.names)}
    picks = [i for i in range(0, len(items), max(1, len(items) // 40))]
    for i in picks:
        ex, (toks, k) = exs[i], items[i]
        t, p = challenge.spec.vocab.index(ex.true), challenge.spec.vocab.index(ex.predicted)
        prefix = toks[None, : k + 1]
        for named, verdict, effect, fixed_word in ((ex.components, ex.check, ex.effect, "confirmed"),
                                                   (ex.control_components, ex.control, ex.control_effect, "fixed")):
            if not named:
                continue
            keep, keep_out = comp.masks([tuple(index[n] for n in named)])
            logits = reference.logits(prefix, keep, keep_out)[0]
            assert (logits.argmax() == t) == (verdict == fixed_word), (ex.sequence, named)
            assert (logits[t] - logits[p]) - (ex.logit_true - ex.logit_pred) == pytest.approx(effect, abs=2e-3)


def test_items_of_one_run_equal_their_prefixes_run_alone(challenge, explainer):
    """The path forward reads several positions of a sequence from one run (the model is causal): the
    clean logits and every single ablation equal those of each prefix run on its own."""
    pm, comp = explainer.paths, explainer.comp
    toks = challenge.spec.random_tokens(6, 13)
    positions = [[1, 7, 19], [19], [4, 5, 6, 12], [0, 19], [10], [2, 18]]
    run = pm.run(toks, positions)
    C = len(comp.names)
    ours = pm.ablate(run, torch.arange(len(run.seq)).repeat_interleave(C), comp.single_keep.repeat(len(run.seq), 1, 1),
                     comp.single_keep_out.repeat(len(run.seq), 1)).view(-1, C, run.logits.shape[-1])  # fmt: skip
    n = 0
    for b, ks in enumerate(positions):
        for k in ks:
            alone = pm.run(toks[b : b + 1, : k + 1])
            assert (run.logits[n] - alone.logits[0]).abs().max() < 1e-9
            single = pm.ablate(alone, torch.zeros(C, dtype=torch.long), comp.single_keep, comp.single_keep_out)
            assert (ours[n] - single).abs().max() < 1e-9
            n += 1
    assert n == len(run.seq)


def test_explain_many_reads_prefixes_from_longer_items(challenge, explainer):
    """Items that are prefixes of other items, repeated items and items of other lengths come back in
    order, each as explained alone."""
    toks = challenge.spec.random_tokens(40, 17)
    pred = Evaluator(challenge.weights, "cpu").logits(toks).argmax(-1)
    fails = (pred != first_unique(toks)).nonzero().tolist()
    items = [(toks[i], k) for i, k in fails[:30]] + [(toks[i, : k + 1], k) for i, k in fails[:5]]
    items += [(toks[0], 19), (toks[0], 3)]  # may be correct positions
    assert len({i for i, _ in fails[:30]}) < 30  # some sequences give several items
    exs = explainer.explain_many(items)
    for (t, k), ex in zip(items, exs):
        alone = explainer.explain(t, k)
        assert (ex.sequence, ex.position, ex.columns()) == (alone.sequence, alone.position, alone.columns())


# ---- the search and the control, on a model whose answers the test decides ------------------------


def scripted(comp: Components, fixes: set[int]):
    """Stands in for `Explainer._ablate`: the truth wins exactly when a component in `fixes` is dropped."""

    def ablate(clean, truth, pred, gap, rows, keep, keep_out):
        fixed = torch.tensor([any(not (keep[i] | comp.single_keep[c]).all() or not (keep_out[i] | comp.single_keep_out[c]).all()
                                  for c in fixes) for i in range(len(rows))], dtype=torch.bool)  # fmt: skip
        return fixed.double(), fixed

    return ablate


@pytest.mark.parametrize("fixes, check, control", [
    ({"0.1->1.2"}, "confirmed", "not_fixed"),              # only the named path matters
    ({"0.1->1.2", "0.0->1.2", "0.2->1.2", "embed->1.2"}, "confirmed", "fixed"),  # any path into 1.2 would do
    (set(), "refuted", "not_fixed"),                        # nothing fixes it
    ({"1.0"}, "confirmed", "not_fixed"),                    # a head, when no path suffices
])  # fmt: skip
def test_check_and_control_can_each_come_out_either_way(challenge, fixes, check, control):
    explainer = Explainer(challenge)
    comp = explainer.comp
    explainer._ablate = scripted(comp, {comp.names.index(n) for n in fixes})
    for toks, k in random_failures(challenge, 300, seed=5)[:3]:
        ex = explainer.explain(toks, k)
        assert ex.check == check, (fixes, ex.components)
        if check == "confirmed":
            assert set(ex.components) <= fixes and len(ex.components) == 1
            assert ex.control == control and not set(ex.control_components) & set(ex.components)
            # the control is of the same kind: a path into the same destination, or a head of the same layer
            (named,), (ctrl,) = ex.components, ex.control_components
            if "->" in named:
                assert named.split("->")[1] == ctrl.split("->")[1] and named != ctrl
            else:
                assert named[0] == ctrl[0] and named != ctrl
        else:
            assert len(ex.components) == 4 and ex.control in ("not_fixed", "none")


# ---- structure and categories, read off the prefix independently -------------------------------


def plain_category(seq: str, truth: str, pred: str, responsible: dict[str, int]) -> str:
    letters = seq[1:]
    n = Counter(letters)
    first = {c: letters.index(c) for c in n}
    if truth == "?":
        return "qmark_expected" if n[pred] >= 2 else "absent_letter_predicted"
    if pred == "?":
        return "first_instance_missed" if letters[-1] == truth and n[truth] == 1 else "unique_missed_qmark"
    if letters[-1] == truth and n[truth] == 1:
        return "first_instance_missed"
    if n[pred] >= 2:
        return "duplicate_not_suppressed"
    if n[pred] == 1:
        assert first[pred] > first[truth]
        load = any(n[c] >= 2 and responsible[c] == responsible[truth] for c in n)
        return "overloaded_head" if load and responsible[pred] != responsible[truth] else "later_unique_preferred"
    return "set_mate_predicted" if responsible[pred] == responsible[truth] else "other"


def test_categories_and_structure(challenge, explainer, explained):
    items, exs = explained
    V = challenge.spec.vocab
    responsible = {V[x]: h for x, h in enumerate(explainer.tables.responsible_head)}
    for (toks, k), ex in zip(items, exs):
        seq = challenge.spec.decode(toks[: k + 1])
        assert ex.sequence == seq and ex.position == k and ex.true != ex.predicted
        assert ex.category == plain_category(seq, ex.true, ex.predicted, responsible), seq
        n = Counter(seq[1:])
        assert set(ex.duplicated) == {c for c in n if n[c] >= 2} and set(ex.unique) == {c for c in n if n[c] == 1}
        assert ex.load_letters == [c for c in ex.duplicated if ex.true != "?" and responsible[c] == responsible[ex.true]]
        assert ex.resp_head_true == responsible.get(ex.true) and ex.resp_head_pred == responsible.get(ex.predicted)
        cols = ex.columns()
        assert tuple(cols) == CSV_COLUMNS and cols["components"] == "+".join(ex.components)
    assert Counter(ex.category for ex in exs).keys() <= set(CATEGORIES)


def test_detectors_name_what_the_attention_shows(challenge, explainer, explained):
    """Every layer-0 head the text calls a flagger attends from the latest copy to the earlier ones at
    least the tables' threshold (the bridge's pattern); every one it says missed is a detector of the
    letter in the tables and stays below."""
    items, exs = explained
    thr, diag = explainer.tables.dup_threshold, explainer.tables.l0_diag
    shown = [(ex, items[i]) for i, ex in enumerate(exs) if ex.detectors][:25]
    assert shown
    for ex, (toks, k) in shown:
        _, cache = challenge.bridge.run_with_cache(toks[None, : k + 1],
                                                   names_filter=lambda n: n == "blocks.0.attn.hook_pattern")
        att = cache["blocks.0.attn.hook_pattern"][0]  # [H, L, L]
        for part in ex.detectors.split("; "):
            letter, notes = part.split(": ")
            assert letter in ex.duplicated
            where = [i for i, c in enumerate(ex.sequence) if c == letter]
            for note in notes.split(", "):
                if note == "no head flagged":
                    continue
                head, verdict, value = note.split()
                h = int(head[2:])
                a = float(att[h, where[-1], where[:-1]].sum())
                assert a == pytest.approx(float(value), abs=0.01)
                assert (a >= thr) == (verdict == "flagged")
                if verdict == "missed":
                    assert diag[h][challenge.spec.vocab.index(letter)] > thr


def test_correct_position_and_bad_input(challenge, explainer):
    toks = challenge.spec.encode("?abc")
    assert failing_positions(challenge, toks) == []
    ex = explainer.explain(toks, 2)
    assert ex.category == "correct" and ex.check == "none" and ex.control == "none" and ex.components == []
    with pytest.raises(AdvsearchError):
        explainer.explain(toks, 7)
    with pytest.raises(AdvsearchError):
        explainer.explain(torch.tensor([1, 2, 3]), 1)


def test_batched_equals_single(explainer, explained):
    items, exs = explained
    for i in (0, len(items) // 3, len(items) - 1):
        a, b = explainer.explain(*items[i]), exs[i]
        assert a.columns() == b.columns()


def test_explain_columns_equal_the_explanations_columns(challenge, explainer, explained, other_seed):
    """The runner's path (`explain_columns`, no `Explanation` objects) gives exactly `columns()`, on every
    random failure of the fixture, correct positions and a batch smaller than its sequences' items, on
    both checkpoints."""
    items, exs = explained
    assert explainer.explain_columns(items) == [e.columns() for e in exs]
    assert len({e.category for e in exs}) >= 6 and {e.check for e in exs} >= {"confirmed", "refuted"}
    toks = challenge.spec.encode("?abcabd")
    mixed = [(toks, k) for k in range(len(toks))] + items[:50]
    columns = explainer.explain_columns(mixed, batch_size=7)
    assert columns == [e.columns() for e in explainer.explain_many(mixed)]
    assert columns[1]["category"] == "correct" and columns[1]["check"] == "none"
    as_text = [(challenge.spec.decode(t[: k + 1].tolist()), k) for t, k in mixed]
    assert explainer.explain_columns(as_text, batch_size=7) == columns
    with pytest.raises(AdvsearchError):
        explainer.explain_columns([("?abz", 2)])
    with pytest.raises(AdvsearchError):
        explainer.explain_columns([("a?b", 1)])
    other = Explainer(other_seed)
    some = random_failures(other_seed, 3_000, seed=11)
    assert len(some) > 50
    assert other.explain_columns(some) == [e.columns() for e in other.explain_many(some)]


# ---- measured rates (fixture seeds; the README's figures come from other seeds) ---------------


def rates(exs) -> tuple[float, float, float]:
    n = len(exs)
    return (sum(e.check != "none" for e in exs) / n, sum(e.check == "confirmed" for e in exs) / n,
            sum(e.specific for e in exs) / n)  # fmt: skip


def test_rates_on_random_failures_of_the_challenge_checkpoint(explained):
    _, exs = explained
    checked, confirmed, specific = rates(exs)
    print(f"\n{len(exs)} failures: checked {checked:.3f}, confirmed {confirmed:.3f}, specific {specific:.3f}")
    assert checked == 1.0 and confirmed >= 0.98 and specific >= 0.85  # measured 0.995 and 0.880


def test_rates_on_a_checkpoint_trained_with_another_seed(other_seed):
    """tests/data/seed1.pt: `advsearch train --seed 1`, whose responsibility sets differ from the challenge's."""
    explainer = Explainer(other_seed)
    exs = explainer.explain_many(random_failures(other_seed, 10_000, seed=7))
    checked, confirmed, specific = rates(exs)
    print(f"\n{len(exs)} failures: checked {checked:.3f}, confirmed {confirmed:.3f}, specific {specific:.3f}")
    assert len(exs) > 100 and checked == 1.0 and confirmed >= 0.98 and specific >= 0.85  # measured 0.993, 0.892


def test_the_other_seed_has_other_tables(challenge, other_seed):
    from advsearch.mechanism.tables import compute_tables

    a, b = compute_tables(challenge), compute_tables(other_seed)
    assert sorted(map(sorted, a.responsibility_sets)) != sorted(map(sorted, b.responsibility_sets))


# ---- CLI ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    @click.group()
    def main():
        pass

    main.add_command(mechanism_cmd)
    main.add_command(explain_cmd)
    return main


def test_cli_explain(cli, challenge_path):
    r = CliRunner().invoke(cli, ["explain", "?jeejjfhadc", "--model", str(challenge_path)])
    assert r.exit_code == 0, r.output
    assert "control" in r.output and "detectors" in r.output and "check" in r.output
    r = CliRunner().invoke(cli, ["explain", "?abc", "--model", str(challenge_path)])
    assert r.exit_code == 0 and "no failing position" in r.output
    r = CliRunner().invoke(cli, ["explain", "?jeejjfhadc", "--pos", "3", "--json", "--model", str(challenge_path)])
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["failing_positions"] == [10] and d["explanations"][0]["position"] == 3
    bads = (["explain", "?abx"], ["explain", "abc"], ["explain", "?" + "ab" * 12], ["explain", "?ab", "--pos", "5"])
    for bad in bads:
        r = CliRunner().invoke(cli, [*bad, "--model", str(challenge_path)])
        assert r.exit_code == 2 and "advsearch: error:" in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_mechanism(cli, challenge_path):
    r = CliRunner().invoke(cli, ["mechanism", "--json", "--model", str(challenge_path)])
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert sorted("".join("".join(s) for s in d["layer1"]["responsibility_sets"])) == list("abcdefghij")
    r = CliRunner().invoke(cli, ["mechanism", "--model", str(challenge_path), "--dup-threshold", "0.5"])
    assert r.exit_code == 0 and "Responsibility sets" in r.output
    r = CliRunner().invoke(cli, ["mechanism", "--model", "/nonexistent.pt"])
    assert r.exit_code == 2
