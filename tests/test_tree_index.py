"""The verify step's index kernels (gdnspec/ops/tree_index.py) against their torch forms, under the Triton interpreter.

tree_layout (ancestor mask, depth, conv window index) against TokenLayout.from_parents_reference and
tree_conv_window_index; greedy_accept against spec.accept's torch form and a per-row Python walk, on chains, stars,
random trees, padded (invalid) nodes, N = 1 .. 64, B not a power of two; the dispatch of TokenLayout.from_parents /
accept_greedy / the static runner onto them.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from conftest import interpreter_modules, random_parents  # noqa: E402

(ti,) = interpreter_modules(["gdnspec.ops.tree_index"])

from gdnspec.layers.layout import TokenLayout  # noqa: E402
from gdnspec.ops.conv1d.tree import tree_conv_window_index  # noqa: E402
from gdnspec.spec import accept as accept_mod  # noqa: E402
from gdnspec.spec.tree import DraftTree  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpret_env")

SHAPES = [(1, 1, "chain"), (3, 2, "chain"), (2, 5, "star"), (5, 17, "random"), (3, 16, "chain"), (2, 33, "random"),
          (1, 64, "random"), (2, 64, "chain")]


@pytest.mark.parametrize("B,N,kind", SHAPES)
@pytest.mark.parametrize("W", [None, 1, 2, 4, 5])
def test_tree_layout_matches_the_reference(B, N, kind, W):
    parents = random_parents(B, N, kind, seed=N + B)
    mask, depth, window = ti.tree_layout(parents, conv_width=W)
    ref = TokenLayout.from_parents_reference(parents)
    assert mask.dtype == torch.bool and depth.dtype == torch.long
    assert torch.equal(mask, ref.ancestor_mask)
    assert torch.equal(depth, ref.depth)
    if W is None:
        assert window is None
    else:
        assert torch.equal(window, tree_conv_window_index(parents, W))


def test_tree_layout_ends_a_chain_at_an_out_of_order_parent():
    """validate=False promises topological parents; a parent >= the node must not loop or read out of bounds."""
    parents = torch.tensor([[-1, 0, 5, 1]])
    mask, depth, _ = ti.tree_layout(parents, conv_width=3)
    assert mask[0, 2].tolist() == [False, False, True, False] and int(depth[0, 2]) == 0
    assert mask[0, 3].tolist() == [True, True, False, True] and int(depth[0, 3]) == 2


def test_from_parents_dispatches_to_the_kernel_and_keeps_the_window_index(monkeypatch):
    monkeypatch.setattr(ti, "DISPATCH_ON_CPU", True)  # CPU tensors through the interpreter (CUDA takes it always)
    calls = []
    real = ti.tree_layout
    monkeypatch.setattr(ti, "tree_layout", lambda *a, **k: calls.append(1) or real(*a, **k))
    parents = random_parents(3, 9, "random", seed=1)
    lay = TokenLayout.from_parents(parents, validate=False, conv_width=4)  # interpreter: the kernel path
    assert calls == [1] and lay.window_index is not None and torch.equal(lay.window_index, tree_conv_window_index(parents, 4))
    ref = TokenLayout.from_parents_reference(parents)
    assert torch.equal(lay.ancestor_mask, ref.ancestor_mask) and torch.equal(lay.depth, ref.depth)
    assert lay.conv_window_index(4) is lay.window_index
    assert torch.equal(lay.conv_window_index(3), tree_conv_window_index(parents, 3))


@pytest.mark.parametrize("T,W", [(1, 4), (5, 4), (7, 2)])
def test_chain_layout_window_index_closed_form(T, W):
    lay = TokenLayout.chain(3, T)
    assert torch.equal(lay.conv_window_index(W), tree_conv_window_index(lay.parents.contiguous(), W))


def _walk(tokens, parents, valid, target, width):
    """Per-row greedy walk from the root (the definition): follow the first valid child whose token is the target's
    argmax at the current node."""
    B, N = tokens.shape
    paths, counts, bonus = [], [], []
    for b in range(B):
        node, path = 0, [0]
        while True:
            nxt = [i for i in range(1, N) if int(parents[b, i]) == node and bool(valid[b, i])
                   and int(tokens[b, i]) == int(target[b, node])]
            if not nxt:
                break
            node = nxt[0]
            path.append(node)
        counts.append(len(path))
        bonus.append(int(target[b, node]))
        paths.append((path + [node] * width)[:width])
    return torch.tensor(paths), torch.tensor(counts), torch.tensor(bonus)


def _case(B, N, kind, seed, vocab=3, p_invalid=0.2):
    """A tree whose tokens often agree with a small-vocabulary target (deep acceptance) with some padding nodes.
    Siblings may carry the same token: the first in index order is the one accepted (deepest, then first)."""
    gen = torch.Generator().manual_seed(seed)
    parents = random_parents(B, N, kind, seed=seed)
    tokens = torch.randint(0, vocab, (B, N), generator=gen)
    target = torch.randint(0, vocab, (B, N), generator=gen)
    valid = torch.rand(B, N, generator=gen) > p_invalid
    valid[:, 0] = True
    return tokens, parents, valid, target


@pytest.mark.parametrize("B,N,kind", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_accept_matches_the_torch_form(B, N, kind, seed):
    tokens, parents, valid, target = _case(B, N, kind, seed)
    ref_lay = TokenLayout.from_parents_reference(parents)
    tree = DraftTree(tokens, parents, torch.zeros(B, N), valid)
    for width in sorted({1, min(N, 4), N}):
        want = accept_mod._accept_greedy_torch(tree, target, ref_lay, width=width)
        path, counts, bonus = ti.greedy_accept(target, tokens=tokens, parents=parents, valid=valid,
                                               ancestor_mask=ref_lay.ancestor_mask, depth=ref_lay.depth, width=width)
        assert torch.equal(path, want.path) and torch.equal(counts, want.counts) and torch.equal(bonus, want.bonus)
        out = ti.greedy_accept(target, tokens=tokens, parents=parents, valid=valid, ancestor_mask=ref_lay.ancestor_mask,
                               depth=ref_lay.depth, width=width, extra=True)
        assert all(torch.equal(a, w) for a, w in zip(out[:3], (want.path, want.counts, want.bonus)))
        last, toks, packed = out[3:]
        fits = want.counts <= width  # rows whose whole path fits the width (always, in the engines)
        end = want.path.gather(1, (want.counts - 1).clamp(max=width - 1)[:, None])[:, 0]
        assert torch.equal(last[fits], end[fits])
        assert torch.equal(toks, tokens.gather(1, want.path))
        assert torch.equal(packed, torch.cat([toks, want.counts[:, None], want.bonus[:, None],
                                              valid[:, 1:].sum(-1)[:, None]], 1))


@pytest.mark.parametrize("B,N,kind", [(3, 6, "chain"), (4, 9, "random"), (2, 12, "star")])
def test_greedy_accept_equals_the_walk_when_siblings_differ(B, N, kind):
    """With distinct sibling tokens the accepted path is the greedy walk itself."""
    tokens, parents, valid, target = _case(B, N, kind, seed=7, vocab=50, p_invalid=0.0)
    for b in range(B):  # make siblings distinct and the walk deep: child token = target at the parent, mostly
        for i in range(1, N):
            tokens[b, i] = int(target[b, int(parents[b, i])]) if i % 3 else 1000 + i
    lay = TokenLayout.from_parents_reference(parents)
    path, counts, bonus = ti.greedy_accept(target, tokens=tokens, parents=parents, valid=valid,
                                           ancestor_mask=lay.ancestor_mask, depth=lay.depth, width=N)
    seen = [(int(parents[b, i]), int(tokens[b, i])) for b in range(B) for i in range(1, N)]
    if len(seen) == len(set(seen)):
        wp, wc, wb = _walk(tokens, parents, valid, target, N)
        assert torch.equal(path, wp) and torch.equal(counts, wc) and torch.equal(bonus, wb)
    assert int(counts.max()) >= 2  # the case accepts something (the test can fail)


def test_accept_greedy_dispatches_to_the_kernel_only_with_a_width(monkeypatch):
    monkeypatch.setattr(ti, "DISPATCH_ON_CPU", True)
    B, N = 2, 7
    tokens, parents, valid, target = _case(B, N, "random", seed=3)
    logits = torch.nn.functional.one_hot(target, 3).float()
    tree = DraftTree(tokens, parents, torch.zeros(B, N), valid)
    lay = TokenLayout.from_parents(parents)
    calls = []
    real = ti.greedy_accept
    monkeypatch.setattr(ti, "greedy_accept", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = accept_mod.accept_greedy(tree, logits, lay, width=N)
    assert calls == [1]
    b = accept_mod.accept_greedy(tree, logits, lay)  # no width: torch (the path width comes from the counts)
    assert calls == [1]
    assert torch.equal(a.counts, b.counts) and torch.equal(a.bonus, b.bonus)
    assert torch.equal(a.path[:, :b.path.shape[1]], b.path)
    monkeypatch.setenv("GDNSPEC_TREE_INDEX", "0")
    accept_mod.accept_greedy(tree, logits, lay, width=N)
    assert calls == [1]
    monkeypatch.delenv("GDNSPEC_TREE_INDEX")
    monkeypatch.setattr(ti, "DISPATCH_ON_CPU", False)  # the rest of a test session: CPU tensors keep the torch forms
    accept_mod.accept_greedy(tree, logits, lay, width=N)
    assert calls == [1]


def test_tree_index_errors_name_the_argument(monkeypatch):
    p = random_parents(2, 5, "chain")
    with pytest.raises(ValueError, match="parents"):
        ti.tree_layout(p.int())
    with pytest.raises(ValueError, match="N = 65"):
        ti.tree_layout(random_parents(1, 65, "chain"))
    with pytest.raises(ValueError, match="conv_width"):
        ti.tree_layout(p, conv_width=0)
    lay = TokenLayout.from_parents_reference(p)
    t = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="depth"):
        ti.greedy_accept(t, tokens=t, parents=p, valid=t.bool(), ancestor_mask=lay.ancestor_mask, depth=t[:, :4],
                         width=3)
    for bad in (dict(valid=t), dict(ancestor_mask=lay.ancestor_mask.long())):  # bytes reinterpreted: wrong paths
        args = dict(tokens=t, parents=p, valid=t.bool(), ancestor_mask=lay.ancestor_mask, depth=lay.depth, width=3)
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a bool"):
            ti.greedy_accept(t, **{**args, **bad})
    with pytest.raises(ValueError, match="width"):
        ti.greedy_accept(t, tokens=t, parents=p, valid=t.bool(), ancestor_mask=lay.ancestor_mask, depth=lay.depth,
                         width=0)
    monkeypatch.setenv("GDNSPEC_TREE_INDEX", "yes")
    with pytest.raises(ValueError, match="GDNSPEC_TREE_INDEX"):
        ti.runs_on(p)
