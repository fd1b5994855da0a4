"""Draft-tree builders, n-gram proposals and greedy acceptance on hand-made trees."""
from __future__ import annotations

import math

import pytest
import torch

from gdnspec.layers import TokenLayout
from gdnspec.spec import DraftTree, NGramDrafter, TreeConfig, accept_greedy, build_tree


def fixed_expand(vocab=12, seed=0):
    """A fake draft whose log-probs depend on (token, parent path) through a fixed random table."""
    g = torch.Generator().manual_seed(seed)
    table = torch.log_softmax(3 * torch.randn(vocab, vocab, generator=g, dtype=torch.float64), -1)
    calls = []

    def expand(tokens, parent_slot):
        calls.append((tokens.clone(), None if parent_slot is None else parent_slot.clone()))
        return table[tokens]  # (B, F, vocab)

    return expand, table, calls


def all_candidates(table, root, topk, steps):
    """Brute-force EAGLE-2 pool: list of (score, path tokens)."""
    pool, frontier = [], [(0.0, [root])]
    for _ in range(steps):
        layer = []
        for sc, path in frontier:
            lp, tok = table[path[-1]].topk(topk)
            for l, t in zip(lp.tolist(), tok.tolist()):
                layer.append((sc + l, path + [t]))
        pool += layer
        frontier = sorted(layer, key=lambda x: -x[0])[:topk]
    return pool


@pytest.mark.parametrize("topk,steps,n", [(2, 3, 7), (3, 2, 10), (4, 4, 16), (1, 5, 6)])
def test_eagle2_tree_keeps_the_best_scored_candidates(topk, steps, n):
    expand, table, _ = fixed_expand()
    roots = torch.tensor([3, 7])
    tree, _ = build_tree(roots, expand, TreeConfig(topk=topk, num_steps=steps, num_draft_tokens=n))
    tree.validate()
    assert tree.num_nodes == n and bool(tree.valid.all())
    layout = tree.layout()
    for b, root in enumerate(roots.tolist()):
        pool = all_candidates(table, root, topk, steps)
        best = sorted(sc for sc, _ in pool)[::-1][: n - 1]
        got = sorted(tree.scores[b, 1:].tolist())[::-1]
        assert got == pytest.approx(best)
        for i in range(1, n):  # the score of a node is the sum of the table log-probs along its path
            path = [j for j in range(n) if layout.ancestor_mask[b, i, j]]
            toks = tree.tokens[b, path].tolist()
            assert tree.scores[b, i].item() == pytest.approx(sum(table[a, c].item() for a, c in zip(toks, toks[1:])))


def test_seed_and_chain_builders():
    expand, table, _ = fixed_expand()
    roots = torch.tensor([1])
    seed, _ = build_tree(roots, expand, TreeConfig(topk=3, num_steps=3, builder="seed"))
    assert seed.num_nodes == 10
    depth = seed.layout().depth[0]
    assert (depth == 1).sum() == 3 and (depth == 2).sum() == 3 and (depth == 3).sum() == 3
    parents_of_depth2 = seed.parents[0][depth == 2]
    assert len(set(parents_of_depth2.tolist())) == 1  # only the best node of the step was expanded
    chain, _ = build_tree(roots, expand, TreeConfig(builder="chain", num_steps=4))
    assert chain.parents[0].tolist() == [-1, 0, 1, 2, 3]
    cur = 1
    for i in range(1, 5):  # each token is the argmax after the previous one
        assert chain.tokens[0, i] == table[cur].argmax()
        cur = int(chain.tokens[0, i])


def test_dynamic_topk_and_adaptive_depth():
    vocab = 6
    table = torch.full((vocab, vocab), -20.0, dtype=torch.float64)
    table[:, 0] = math.log(0.97)  # a confident draft: one child carries almost all mass
    table[:, 1] = math.log(0.02)

    def expand(tokens, parent_slot):
        return table[tokens]

    cfg = TreeConfig(topk=3, num_steps=3, num_draft_tokens=10, dynamic_topk_mass=0.9)
    tree, _ = build_tree(torch.tensor([2]), expand, cfg)
    assert tree.num_drafted().item() == 3 and tree.layout().depth[0][tree.valid[0]].max() == 3  # a chain of 3
    cfg = TreeConfig(topk=2, num_steps=4, num_draft_tokens=10, min_frontier_prob=0.5)
    table[:, 0] = math.log(0.6)
    table[:, 1] = math.log(0.4)
    tree, _ = build_tree(torch.tensor([2]), expand, cfg)
    depth = tree.layout().depth[0][tree.valid[0]]
    assert depth.max() == 2  # 0.6 * 0.6 < 0.5: the row stopped expanding after two steps


def test_ngram_drafter_proposes_continuations_of_the_suffix():
    drafter = NGramDrafter(max_ngram=3)
    history = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6]
    state = drafter.begin([torch.tensor(history)])
    tree = drafter.propose(state, torch.tensor([7]), TreeConfig(topk=2, num_steps=3, num_draft_tokens=7))
    tree.validate()
    toks, parents = tree.tokens[0].tolist(), tree.parents[0].tolist()
    children_of_root = {toks[i] for i in range(1, 7) if tree.valid[0, i] and parents[i] == 0}
    assert children_of_root == {1, 8}  # "5 6 7" was followed by 1 (most recent) and by 8
    first = toks.index(1)
    assert toks[first + 1] == 2 and parents[first + 1] == first  # then "1 2 ..."
    drafter.advance(state, tokens=torch.tensor([[7, 1, 0]]), counts=torch.tensor([2]))
    assert state.history[0][-2:] == [7, 1]


def test_accept_greedy_on_a_hand_made_tree():
    #        0(root)
    #      /    \
    #    1(a)   2(b)
    #    |        \
    #   3(c)      4(d)
    tokens = torch.tensor([[9, 1, 2, 3, 4]])
    parents = torch.tensor([[-1, 0, 0, 1, 2]])
    tree = DraftTree(tokens, parents, torch.zeros(1, 5), torch.ones(1, 5, dtype=torch.bool))
    layout = TokenLayout.from_parents(parents)
    logits = torch.zeros(1, 5, 10)
    target_argmax = [2, 7, 4, 7, 6]  # root -> b matches, b -> d matches, d -> bonus 6
    logits[0, torch.arange(5), torch.tensor(target_argmax)] = 1.0
    acc = accept_greedy(tree, logits, layout)
    assert acc.path[0].tolist() == [0, 2, 4] and acc.counts.tolist() == [3] and acc.bonus.tolist() == [6]
    assert acc.emitted(tree) == [[2, 4, 6]]
    tree.valid[0, 4] = False  # a padding node is never accepted
    acc = accept_greedy(tree, logits, layout)
    assert acc.emitted(tree) == [[2, 4]] and acc.counts.tolist() == [2]


@pytest.mark.parametrize("builder,topk,steps,n", [("eagle2", 3, 3, 12), ("eagle2", 2, 2, 5), ("seed", 3, 3, 8),
                                                  ("chain", 1, 4, 5)])
def test_stochastic_tree_shape_and_q(builder, topk, steps, n):
    """sample_drafts: every valid node was drawn from the q stored at its parent (q(token) > 0, score increment =
    log q(token)), siblings are distinct (draws without replacement) and come in draw order, the kept set is the
    first valid pool nodes (a node's own draw never decides whether it is kept: rows with the same uniforms up to a
    layer share that layer's shape), and q is the processed draft distribution. Temperature-0 rows draft as always."""
    from gdnspec.sampling import RowSampling, generator_uniforms, logits_to_probs

    expand, table, _ = fixed_expand(vocab=12, seed=1)
    B = 6
    roots = torch.tensor([3, 7, 3, 1, 5, 3])
    cfg = TreeConfig(topk=topk, num_steps=steps, num_draft_tokens=n, builder=builder, sample_drafts=True)
    temps = torch.tensor([0.8, 1.0, 0.0, 1.2, 0.8, 0.8], dtype=torch.float64)
    draft = RowSampling(temps, torch.tensor([12, 12, 12, 12, 4, 12]), torch.tensor([1.0, 0.9, 1.0, 1.0, 1.0, 1.0],
                        dtype=torch.float64), generator_uniforms(torch.Generator().manual_seed(0), B, "cpu"))
    tree, _ = build_tree(roots, expand, cfg, draft=draft)
    tree.validate()
    det, _ = build_tree(roots, expand, TreeConfig(topk=topk, num_steps=steps, num_draft_tokens=n, builder=builder))
    E = tree.draft_probs.shape[1]
    assert E <= 1 + (steps - 1) * cfg.sample_frontier_width() * (topk if builder == "seed" else 1)
    for b in range(B):
        if temps[b] == 0:  # greedy rows: the deterministic tree (scores, tokens) of the same builder
            if builder != "eagle2" or cfg.sample_frontier_width() == topk:
                assert torch.equal(tree.tokens[b], det.tokens[b]) and torch.equal(tree.parents[b], det.parents[b])
            continue
        for i in range(1, n):
            if not tree.valid[b, i]:
                continue
            par = int(tree.parents[b, i])
            q = tree.draft_probs[b, tree.draft_index[b, par]]
            want = logits_to_probs(table[tree.tokens[b, par]], temperature=float(temps[b]),
                                   top_k=int(draft.top_k[b]), top_p=float(draft.top_p[b]))
            torch.testing.assert_close(q.double(), want, atol=1e-6, rtol=1e-6)
            tok = int(tree.tokens[b, i])
            assert q[tok] > 0
            assert float(tree.scores[b, i] - tree.scores[b, par]) == pytest.approx(math.log(float(q[tok])), abs=1e-5)
            sibs = [j for j in range(1, n) if tree.valid[b, j] and int(tree.parents[b, j]) == par]
            assert len({int(tree.tokens[b, j]) for j in sibs}) == len(sibs)
        # kept = a prefix of the valid pool: every layer is filled before the next one starts (BFS order)
        depth = tree.layout().depth[b]
        valid_depths = depth[tree.valid[b]].tolist()
        assert valid_depths == sorted(valid_depths)


@pytest.mark.parametrize("steps,n,floor,sync_free", [(4, None, None, True), (5, 4, None, True), (6, None, 0.3, True),
                                                     (6, None, 0.3, False), (1, None, None, False), (3, 3, 0.9, True)])
def test_chain_fast_builder_equals_the_general_loop(steps, n, floor, sync_free):
    """The greedy chain's own builder (no frontier top-k, gathers or final sort) gives the tree of the general EAGLE-2
    loop with topk = 1, which builds the same chain through the generic machinery; rows stop at different depths."""
    vocab = 9
    g = torch.Generator().manual_seed(steps)
    table = torch.log_softmax(2.5 * torch.randn(vocab, vocab, generator=g, dtype=torch.float64), -1)
    roots = torch.arange(vocab)
    calls = []

    def expand(tokens, parent_slot):
        calls.append(parent_slot)
        return table[tokens]

    chain, order = build_tree(roots, expand, TreeConfig(builder="chain", num_steps=steps, num_draft_tokens=n,
                                                        min_frontier_prob=floor), sync_free=sync_free)
    assert all(c is None for c in calls)  # nothing to gather along a chain
    ref, ref_order = build_tree(roots, expand, TreeConfig(builder="eagle2", topk=1, num_steps=steps, num_draft_tokens=n,
                                                          min_frontier_prob=floor), sync_free=sync_free)
    for f in ("tokens", "parents", "scores", "valid"):
        assert torch.equal(getattr(chain, f), getattr(ref, f)), f
    assert torch.equal(order, ref_order)
    if floor is not None and floor < 0.5:
        assert 0 < int(chain.valid.sum(1).min()) < int(chain.valid.sum(1).max())  # rows did stop at different depths
