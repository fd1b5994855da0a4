"""Per-step tree size and depth (issue 10, item 4): spec/sizing.TreeSizer, DraftTree.best_nodes and the engine's
sized eager steps.

The sizer picks, per step, how many of the drafter's best nodes the target verifies (argmax of expected tokens /
seconds) and how deep the drafter drafts (min_frontier_prob = t_expand / (kappa * seconds per token)); the tests check
the cut against brute force, the choices against the model's own argmax, and that sized steps stay lossless: greedy
output equal to plain decoding token for token, sampled output distributed as the target's law (chi-square)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from gdnspec import generate_autoregressive
from gdnspec.spec import SpeculativeEngine, TreeConfig
from gdnspec.spec.drafters import ModelDrafter, NGramDrafter
from gdnspec.spec.sizing import TreeSizer, _node_depths
from gdnspec.spec.tree import DraftTree, build_tree

from conftest import random_parents
from spec_helpers import noisy_copy, prompts_of, tiny_model
from test_spec_sampling import chi_square_pvalue, continuation_counts, exact_joint_batched


def _random_tree(B, N, seed, *, pad_rows=True) -> DraftTree:
    """Trees whose scores never increase along a path (as every builder makes), with ties and padded rows."""
    g = torch.Generator().manual_seed(seed)
    parents = random_parents(B, N, seed=seed)
    step = -torch.rand(B, N, generator=g).mul(2).round(decimals=1)  # 0.0, -0.1, ... some exactly tied
    scores = torch.zeros(B, N)
    for i in range(1, N):
        scores[:, i] = scores.gather(1, parents[:, i:i + 1])[:, 0] + step[:, i]
    valid = torch.ones(B, N, dtype=torch.bool)
    if pad_rows and B > 1:  # row 1 drafted fewer nodes: its tail is padding hanging off the root
        cut = N // 2
        valid[1, cut:] = False
        parents[1, cut:] = 0
        scores[1, cut:] = float("-inf")
    tokens = torch.randint(0, 50, (B, N), generator=g)
    tokens = torch.where(valid, tokens, 0)
    return DraftTree(tokens, parents, scores, valid)


def _path_of(tree: DraftTree, b: int, i: int) -> tuple:
    """The token path from below the root to node i of row b."""
    par, tok = tree.parents[b].tolist(), tree.tokens[b].tolist()
    path = []
    while i > 0:
        path.append(tok[i])
        i = par[i]
    return tuple(reversed(path))


def _paths(tree: DraftTree, b: int) -> set:
    """The token paths of row b's valid nodes (what a tree offers the target, independent of node order)."""
    par, tok, val = tree.parents[b].tolist(), tree.tokens[b].tolist(), tree.valid[b].tolist()
    out = set()
    for i in range(1, len(par)):
        if val[i]:
            path, j = [], i
            while j > 0:
                path.append(tok[j])
                j = par[j]
            out.add(tuple(reversed(path)))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [1, 2, 3, 7, 12, 16])
def test_best_nodes_keeps_the_best_subtree_closed_under_parents(seed, n):
    tree = _random_tree(3, 12, seed)
    cut = tree.best_nodes(n)
    cut.validate()
    assert cut.num_nodes == n
    for b in range(3):
        row_valid = int(tree.valid[b, 1:].sum())
        keep = min(n - 1, row_valid)
        assert int(cut.valid[b, 1:].sum()) == keep
        # the kept scores are the `keep` best of the row (a multiset: ties may pick either node)
        best = sorted(tree.scores[b, 1:][tree.valid[b, 1:]].tolist(), reverse=True)[:keep]
        assert sorted(cut.scores[b, 1:][cut.valid[b, 1:]].tolist(), reverse=True) == pytest.approx(best)
        # closed under parents: every kept node's path is a path of the original tree, and its parent is kept
        assert _paths(cut, b) <= _paths(tree, b)
        par = cut.parents[b].tolist()
        assert all(cut.valid[b, par[i]] for i in range(1, n) if cut.valid[b, i])
        assert all(par[i] < i for i in range(1, n))


def test_best_nodes_never_orphans_a_node_when_scores_rise_along_a_path():
    """A plug-in drafter's scores need not be cumulative log-probs: a child scoring above its parent ranks by its
    path's smallest score, so the cut is still a tree (closed under parents)."""
    # row 0: root -> 1 (-3.0) -> 2 (-0.5) -> 3 (-0.6); row 1: root -> 1 (-0.1), root -> 2 (-2.0) -> 3 (-0.2)
    tree = DraftTree.from_lists([7, 8], [[(1, 0, -3.0), (2, 1, -0.5), (3, 2, -0.6)],
                                         [(1, 0, -0.1), (2, 0, -2.0), (3, 2, -0.2)]])
    for n in (2, 3, 4):
        cut = tree.best_nodes(n)
        cut.validate()
        for b in range(2):
            par = cut.parents[b].tolist()
            assert all(cut.valid[b, par[i]] for i in range(1, n) if cut.valid[b, i]), (n, b, par)
            assert _paths(cut, b) <= _paths(tree, b)
    assert _paths(tree.best_nodes(3), 0) == {(1,), (1, 2)}  # node 3 (-0.6) outranks nothing above its path's -3.0
    assert _paths(tree.best_nodes(3), 1) == {(1,), (2,)}


def test_best_nodes_rejects_bad_input():
    tree = _random_tree(2, 6, 0)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            tree.best_nodes(bad)
    stochastic = DraftTree(tree.tokens, tree.parents, tree.scores, tree.valid, torch.ones(2, 3, 50),
                           torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="stochastic tree"):
        stochastic.best_nodes(3)


def _chain(B: int, N: int) -> DraftTree:
    """B identical chains of N nodes, every path probability 1 (score 0)."""
    return DraftTree(torch.zeros(B, N, dtype=torch.long), torch.arange(-1, N - 1).expand(B, N).clone(),
                     torch.zeros(B, N), torch.ones(B, N, dtype=torch.bool))


def _past_warmup(s: TreeSizer, *batch_sizes: int) -> TreeSizer:
    """The next step of these batch sizes is neither a warm-up nor a periodic full-shape step."""
    for b in batch_sizes or (1,):
        s.costs(b).steps = TreeSizer.WARMUP + 1
    return s


def _fed(alpha=0.010, beta=0.001, rest=0.002, draft=0.004) -> TreeSizer:
    """A sizer past its warm-up at batch 1 whose verify line is exactly alpha + beta * n."""
    s = TreeSizer()
    tree = _random_tree(1, 9, 1, pad_rows=False)
    for i in range(TreeSizer.WARMUP + 3):
        n = 3 + 3 * (i % 3)  # 3, 6, 9 nodes
        _, depth = s.cut(tree, draft_seconds=draft)
        s.record(tree=tree.first_nodes(n), accepted=[1], draft_seconds=draft, depth=depth,
                 verify_seconds=alpha + beta * n, rest_seconds=rest)
    return _past_warmup(s)


def test_verify_line_is_fitted_and_needs_spread():
    s = _fed(alpha=0.010, beta=0.0005)
    a, b = s.verify_line()
    assert a == pytest.approx(0.010) and b == pytest.approx(0.0005)
    flat = TreeSizer()
    t = _random_tree(1, 5, 0, pad_rows=False)
    for _ in range(6):
        _, depth = flat.cut(t, draft_seconds=0.001)
        flat.record(tree=t, accepted=[2], draft_seconds=0.001, depth=depth, verify_seconds=0.01, rest_seconds=0.0)
    assert flat.verify_line() is None  # always 5 nodes: no slope can be fitted, so nothing is cut


@pytest.mark.parametrize("beta", [0.0, 0.0002, 0.002, 0.02])
@pytest.mark.parametrize("seed", range(4))
def test_choose_nodes_is_the_argmax_of_tokens_per_second(beta, seed):
    s = _fed(alpha=0.01, beta=beta)
    tree = _random_tree(1, 16, seed)
    scores, valid = tree.scores.tolist(), tree.valid.tolist()
    n = s.choose_nodes(scores, valid, draft_seconds=0.004)
    alpha, b = s.verify_line()
    kappa, rest = s.kappa, s.costs(1).rest

    def rate(m):  # brute force: each row's m - 1 best valid nodes
        tok = 0.0
        for row, ok in zip(scores, valid):
            ps = sorted((math.exp(x) for x, v in zip(row[1:], ok[1:]) if v), reverse=True)[: m - 1]
            tok += 1 + kappa * sum(ps)
        return tok / (0.004 + alpha + b * m + rest)

    best = max(range(1, 17), key=lambda m: (rate(m), -m))
    assert rate(n) == pytest.approx(rate(best))
    if beta == 0.0:
        assert n == 16  # verifying is free per node: keep everything
    if beta == 0.02:
        assert n <= 4  # 20 ms per node against a 10 ms verify: few nodes pay
    # cut() values each node by its depth's kappa (path minimum) and keeps the n best of that choice
    par = tree.parents.tolist()
    n2 = s.choose_nodes(scores, valid, draft_seconds=0.004, parents=par)
    cut, depth = s.cut(tree, draft_seconds=0.004)
    row, ok, p0 = scores[0], valid[0], par[0]
    dep, key = [0] * 16, [0.0] * 16
    for i in range(1, 16):
        dep[i] = dep[p0[i]] + 1
        key[i] = s.kappa_at(dep[i]) * math.exp(row[i]) if ok[i] else -math.inf
        key[i] = min(key[i], key[p0[i]]) if p0[i] > 0 else key[i]
    order = sorted(range(1, 16), key=lambda i: (-key[i], i))[: n2 - 1]
    if n2 >= int(tree.valid.sum()):
        assert cut is tree
    else:
        cut.validate()
        assert cut.num_nodes == n2 and _paths(cut, 0) == {_path_of(tree, 0, i) for i in order}
    assert depth >= 1


def test_exploring_steps_keep_the_full_shape_and_later_steps_cut():
    s = TreeSizer(explore_every=8)
    tree = _random_tree(1, 16, 3, pad_rows=False)
    sc, va = tree.scores.tolist(), tree.valid.tolist()
    chosen = []
    for i in range(24):
        n = s.choose_nodes(sc, va, draft_seconds=0.002)
        chosen.append(n)
        s.record(tree=tree.first_nodes(n), accepted=[0], draft_seconds=0.002, depth=3,
                 verify_seconds=0.005 + 0.004 * n, rest_seconds=0.001)
    assert chosen[:4] == [16, 8, 16, 8]  # warm-up: full, half, full, half
    assert chosen[8] == chosen[16] == 16  # periodic full-shape steps
    assert min(chosen[4:8]) < 8  # nothing is accepted and nodes are dear: the sizer cuts
    assert s.kappa == 0.0  # a drafter that is never accepted is not taken as calibrated


def test_a_drafter_never_accepted_gets_small_trees_and_a_high_floor():
    s = TreeSizer()
    tree = _random_tree(1, 9, 1, pad_rows=False)
    for i in range(TreeSizer.WARMUP + 8):
        n = 3 + 3 * (i % 3)
        s.record(tree=tree.first_nodes(n), accepted=[0], draft_seconds=0.004, depth=3,
                 verify_seconds=0.01 + 0.001 * n, rest_seconds=0.002)
    _past_warmup(s)
    assert s.kappa == 0.0
    assert s.choose_nodes(tree.scores.tolist(), tree.valid.tolist(), draft_seconds=0.004) == 1
    assert s.step_config(TreeConfig(topk=2, num_steps=4, num_draft_tokens=9), batch_size=1).min_frontier_prob == \
        s.max_floor


def test_kappa_is_measured_per_depth_and_values_deep_nodes_by_it():
    """A drafter under-confident at depth (its deep paths accepted more often than their probability says) gets a
    larger kappa there, so its deep nodes are valued, and kept, by that kappa."""
    s = TreeSizer()
    tree = _chain(1, 5)  # depths 1..4
    tree.scores[0, 1:] = torch.log(torch.tensor([0.8, 0.4, 0.2, 0.1]))
    for _ in range(30):
        s.record(tree=tree, accepted=[3], draft_seconds=0.004, depth=4, verify_seconds=0.01, rest_seconds=0.001)
    # every step reaches depth 3 and stops there: kappa_d = 1 / p_d up to 3, 0 at 4
    assert [round(s.kappa_at(d), 6) for d in (1, 2, 3, 4)] == [1.25, 2.5, 5.0, 0.0]
    assert s.kappa_at(9) == 0.0 and TreeSizer().kappa_at(2) == 1.0  # the deepest measured; no data: 1
    par = tree.parents.tolist()
    values = s._values(tree.scores.tolist(), tree.valid.tolist(), par, [_node_depths(p) for p in par])[0]
    assert values[1:] == pytest.approx([1.0, 1.0, 1.0, 0.0])  # each accepted level worth one token, the 4th none
    assert s.summary()["kappa_by_depth"] == pytest.approx({1: 1.25, 2: 2.5, 3: 5.0, 4: 0.0})


def test_costs_are_kept_per_batch_bucket():
    """A verify of n columns for B rows costs about B * n row-products: one line over all batch sizes would be
    wrong for each; the sizer fits one per bucket (1, 2, 4, 8...)."""
    s = TreeSizer()
    for i in range(2 * (TreeSizer.WARMUP + 6)):
        B = 8 if i % 2 else 1
        n = 3 + 3 * (i // 2 % 3)
        s.record(tree=_chain(B, 9).first_nodes(n), accepted=[1] * B, draft_seconds=0.004, depth=3,
                 verify_seconds=0.002 + 0.001 * B * n, rest_seconds=0.001)
    assert s.verify_line(1) == pytest.approx((0.002, 0.001)) and s.verify_line(8) == pytest.approx((0.002, 0.008))
    assert s.verify_line(5) == s.verify_line(8) and s.verify_line(2) is None  # 5 rows share 8's bucket; 2 has none
    assert set(s.summary()["by_batch_bucket"]) == {1, 2, 8}


def test_step_config_sets_the_depth_floor_from_the_costs():
    cfg = TreeConfig(topk=2, num_steps=4, num_draft_tokens=10)
    s = TreeSizer()
    assert s.step_config(cfg, batch_size=1) is cfg  # no data yet
    s = _fed(draft=0.004)
    c = s.costs(1)
    kappa = max([s.kappa] + [s.kappa_at(d) for d in s.predicted_at])  # the deepest levels' calibration, if larger
    assert s.predicted_at and kappa >= s.kappa
    want = s.t_expand() / (kappa * c.sec / c.tok)
    got = s.step_config(cfg, batch_size=1)
    assert got.min_frontier_prob == pytest.approx(want) and got.num_steps == 4 and cfg.min_frontier_prob is None
    assert s.step_config(cfg, batch_size=3) is cfg  # another bucket: no data
    # a configured floor above the computed one stays; an exploring step drafts the configured shape
    high = TreeConfig(topk=2, num_steps=4, num_draft_tokens=10, min_frontier_prob=0.95)
    assert s.step_config(high, batch_size=1) is high
    c.steps = 2 * s.explore_every
    assert s.step_config(cfg, batch_size=1) is cfg
    # the floor is capped below 1 (min_frontier_prob must be < 1)
    c.steps = s.explore_every + 1
    c.per_level = 10.0  # the drafted depths did not spread: t_expand is the average per level
    assert s.step_config(cfg, batch_size=1).min_frontier_prob == s.max_floor


def test_t_expand_is_the_slope_of_drafting_seconds_over_levels():
    s = TreeSizer()
    for i in range(8):
        depth = i % 4 + 1
        t = _chain(1, depth + 1)
        cut, got = s.cut(t, draft_seconds=0.0)
        assert got == depth
        s.record(tree=cut, accepted=[0], draft_seconds=0.003 + 0.0015 * depth, depth=depth,  # 3 ms + 1.5 per level
                 verify_seconds=0.01, rest_seconds=0.0)
    assert s.t_expand() == pytest.approx(0.0015)  # not the 2.5-4.5 ms per level an average would give
    assert s.summary()["by_batch_bucket"][1]["draft_line_ms"] == pytest.approx({"fixed": 3.0, "per_level": 1.5})


@pytest.mark.parametrize("kw, name", [(dict(smoothing=0), "smoothing"), (dict(smoothing="0.5"), "smoothing"),
                                      (dict(smoothing=None), "smoothing"), (dict(smoothing=True), "smoothing"),
                                      (dict(decay=1.0), "decay"), (dict(max_floor=1.0), "max_floor"),
                                      (dict(min_spread=0), "min_spread"), (dict(min_spread=math.inf), "min_spread"),
                                      (dict(explore_every=1), "explore_every"),
                                      (dict(explore_every=True), "explore_every")])
def test_sizer_settings_are_checked(kw, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        TreeSizer(**kw)


def test_size_trees_is_checked():
    target = tiny_model(seed=1)
    with pytest.raises(TypeError, match="size_trees"):
        SpeculativeEngine(target, ModelDrafter(noisy_copy(target)), TreeConfig(), size_trees=1)


def _steep(sizer: TreeSizer, N: int, per_node: float = 0.001, batch_sizes=(1, 2, 3)) -> TreeSizer:
    """Feed `sizer` costs under which only likely nodes pay (`per_node` seconds per verified node against 2 ms per
    verify and 4 ms of drafting) for each batch size, and a calibration of 1, past the warm-up."""
    for B in batch_sizes:
        tree = _chain(B, N)
        for i in range(TreeSizer.WARMUP + 2):
            n = 2 + (i % 2) * (N - 2)
            sizer.record(tree=tree.first_nodes(n), accepted=[0] * B, draft_seconds=0.004, depth=N - 1,
                         verify_seconds=0.002 + per_node * n, rest_seconds=0.001)
    sizer.accepted = sizer.predicted = 1.0  # kappa = 1: the drafter's path probabilities taken as they are
    _past_warmup(sizer, *batch_sizes)
    sizer.reset_counts()  # count the real steps' choices only
    return sizer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", ["tree", "chain", "ngram"])
def test_sized_greedy_output_equals_plain_decoding(dtype, shape):
    target = tiny_model(seed=2, hybrid=True, init_scale=4.0, dtype=dtype)
    prompts = prompts_of([5, 9, 3], target.vocab_size, seed=3)
    cfg = {"tree": TreeConfig(topk=3, num_steps=4, num_draft_tokens=12),
           "chain": TreeConfig(builder="chain", num_steps=5),
           "ngram": TreeConfig(topk=2, num_steps=4, num_draft_tokens=8)}[shape]
    drafter = NGramDrafter() if shape == "ngram" else ModelDrafter(noisy_copy(target, noise=0.05))
    eng = SpeculativeEngine(target, drafter, cfg, static=False, size_trees=True)
    assert eng.policy is None and eng.sizer is not None  # sizing on its own
    _steep(eng.sizer, cfg.num_draft_tokens)
    out = eng.generate(prompts, 40)
    for p, o in zip(prompts, out):
        ref = generate_autoregressive(target, p[None], 40)[0]
        assert torch.equal(o[: ref.numel()], ref)
    summary = eng.sizer.summary()
    assert sum(summary["nodes"].values()) == sum(summary["depth"].values()) == eng.stats.total_steps > 0
    # the costs make most nodes not worth verifying: the sizer cut below the configured size
    assert min(summary["nodes"]) < cfg.num_draft_tokens
    if shape != "ngram":  # the model drafter honours the depth floor (the n-gram drafter looks its tokens up)
        assert min(summary["depth"]) < cfg.num_steps


def test_adaptive_engine_sizes_eager_steps_but_not_stochastic_trees():
    target = tiny_model(seed=2)
    drafter = ModelDrafter(noisy_copy(target, noise=0.05))
    eng = SpeculativeEngine(target, drafter, TreeConfig(topk=2, num_steps=3, num_draft_tokens=6), static=False,
                            adaptive=True)
    eng.generate(prompts_of([6], target.vocab_size), 30)
    assert eng.sizer.steps == eng.stats.total_steps > 0
    assert SpeculativeEngine(target, drafter, TreeConfig(), adaptive=True, size_trees=False).sizer is None
    assert SpeculativeEngine(target, drafter, TreeConfig()).sizer is None
    stoch = SpeculativeEngine(target, drafter, TreeConfig(topk=2, num_steps=3, num_draft_tokens=6, sample_drafts=True),
                              static=False, size_trees=True, temperature=1.0, seed=3)
    stoch.generate(prompts_of([6], target.vocab_size), 20)
    assert stoch.sizer.steps == 0  # stochastic trees keep their draws: never cut


V = 6
N_ROWS = 4000


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=5)],
                         ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_sized_sampling_matches_the_target_distribution(sampling):
    """Deterministic trees cut per step by the sizer, accepted by the one-hot rule: the law of the emitted tokens is
    the target's (chi-square over the 216 three-token continuations)."""
    target = tiny_model(seed=5, vocab_size=V, init_scale=4.0)
    draft = noisy_copy(target, noise=1.0, seed=3)
    prompt = torch.tensor([1, 3, 0, 2, 5])
    law = exact_joint_batched(target, prompt, 3, **sampling)
    eng = SpeculativeEngine(target, ModelDrafter(draft), TreeConfig(topk=2, num_steps=2, num_draft_tokens=5),
                            generator=torch.Generator().manual_seed(9), static=False, size_trees=True, **sampling)
    _steep(eng.sizer, 5)
    counts = continuation_counts(eng, prompt, N_ROWS)
    assert min(eng.sizer.nodes) < 5  # trees were cut
    assert chi_square_pvalue(counts, law, N_ROWS) > 1e-4
