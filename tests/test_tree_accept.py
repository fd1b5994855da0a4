"""The fused tree rejection sampling of deterministic drafts (ops/tree_accept.py) against the per-row float64
reference (spec/accept.tree_rejection_sample_reference) and the vectorised torch form, on the CPU through the Triton
interpreter: random trees (invalid nodes, repeated tokens among cousins, probability-0 tokens, rows that accept
nothing and rows that accept deep paths), the same uniforms -> the same accepted node and bonus token; float32
probabilities against the torch form; vocabularies across the kernel's block size; loose loop bounds; the accept
path's dispatch and the switch; mutants of the rule (bonus from the node's full distribution, the first child
always tried first, acceptance with p(x) > u without the residual's mass) must fail.

Run: python -m pytest -q tests/test_tree_accept.py   (skipped when triton is not installed)
"""
from __future__ import annotations

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch  # noqa: E402

from conftest import interpreter_modules  # noqa: E402

(ta,) = interpreter_modules(["gdnspec.ops.tree_accept"])
from gdnspec.layers.layout import TokenLayout  # noqa: E402
from gdnspec.spec import accept as A  # noqa: E402
from test_spec_sampling import _random_trees as _spec_sampling_trees  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpret_env")


def _random_trees(B, N, V, seed, *, dtype=torch.float64):
    """test_spec_sampling's random trees (distinct sibling tokens, ~15% invalid nodes, distributions with exact
    zeros), with mass added at each drafted child's token (as a drafter's guesses have) so that rows accept anything
    from nothing to deep paths whatever V is; probs in `dtype`."""
    tokens, parents, valid, probs, _, u = _spec_sampling_trees(B, N, V, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    for b in range(B):
        for i in range(1, N):
            if valid[b, i]:
                probs[b, parents[b, i], tokens[b, i]] += 0.4 * float(torch.rand(1, generator=g))
    return tokens, parents, valid, (probs / probs.sum(-1, keepdim=True)).to(dtype), u


def _bounds(parents, valid):
    layout = TokenLayout.from_parents(parents)
    depth = int(torch.where(valid, layout.depth, 0).max())
    kids = int(torch.where(valid, A.sibling_rank(parents, valid), -1)[:, 1:].max()) + 1
    return depth, kids


@pytest.mark.parametrize("B,N,V,seed", [(24, 12, 6, 0), (20, 12, 6, 1), (12, 17, 37, 2), (4, 33, 2100, 3),
                                        (3, 2, 5, 4), (16, 1, 9, 5)])
def test_kernel_equals_the_reference(B, N, V, seed):
    tokens, parents, valid, probs, u = _random_trees(B, N, V, seed)
    depth, kids = _bounds(parents, valid) if N > 1 else (0, 0)
    kw = dict(tokens=tokens, parents=parents, valid=valid, probs=probs, uniforms=u)
    ref_node, ref_bonus = A.tree_rejection_sample_reference(**kw)
    node, bonus = ta.tree_rejection_sample_fused(**kw, max_depth=depth, max_children=kids)
    assert torch.equal(node, ref_node) and torch.equal(bonus, ref_bonus)
    if N > 8:  # the trees exercise acceptance (and, over many rows, rows that accept nothing)
        assert (node > 0).any() and (B < 20 or (node == 0).any())
    if seed == 0:  # looser loop bounds (a static runner's config bounds) change nothing
        node2, bonus2 = ta.tree_rejection_sample_fused(**kw, max_depth=depth + 2, max_children=kids + 1)
        assert torch.equal(node2, node) and torch.equal(bonus2, bonus)


@pytest.mark.parametrize("seed", range(2))
def test_float32_probabilities_equal_the_torch_form(seed, monkeypatch):
    """float32 probabilities (what the runner's sampling gives a float32 or bf16 target): the kernel against
    accept.tree_rejection_sample's torch form, and tree_rejection_sample dispatching to the kernel."""
    tokens, parents, valid, probs, u = _random_trees(12, 16, 50, 10 + seed, dtype=torch.float32)
    depth, kids = _bounds(parents, valid)
    kw = dict(tokens=tokens, parents=parents, valid=valid, probs=probs, uniforms=u, max_depth=depth,
              max_children=kids)
    want = A.tree_rejection_sample(**kw)  # the torch form (the kernel is not dispatched on the CPU by default)
    got = ta.tree_rejection_sample_fused(**kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    monkeypatch.setattr(ta, "DISPATCH_ON_CPU", True)
    assert ta.runs_on(probs, 16) and not ta.runs_on(probs.half(), 16) and not ta.runs_on(probs, ta.MAX_NODES + 1)
    calls = []
    real = ta.tree_rejection_sample_fused
    monkeypatch.setattr(ta, "tree_rejection_sample_fused", lambda **k: calls.append(1) or real(**k))
    via = A.tree_rejection_sample(**kw)
    assert calls and torch.equal(via[0], want[0]) and torch.equal(via[1], want[1])
    monkeypatch.setenv("GDNSPEC_TREE_ACCEPT", "0")
    assert not ta.runs_on(probs, 16)
    monkeypatch.setenv("GDNSPEC_TREE_ACCEPT", "on")
    with pytest.raises(ValueError, match="GDNSPEC_TREE_ACCEPT"):
        ta.runs_on(probs, 16)


def _mutant_reference(tokens, parents, valid, probs, uniforms, mutant):
    """tree_rejection_sample_reference with one rule changed, one row at a time (float64)."""
    B, N = tokens.shape
    rank = A.sibling_rank(parents, valid)
    nodes, bonuses = [], []
    for b in range(B):
        cur, p = 0, probs[b, 0].clone()
        while True:
            kids = [i for i in range(1, N) if valid[b, i] and int(parents[b, i]) == cur]
            kids.sort(key=lambda i: int(rank[b, i]) if mutant != "last child first" else -int(rank[b, i]))
            moved = False
            for c in kids:
                x = int(tokens[b, c])
                ok = float(uniforms[b, c]) < float(p[x]) if mutant == "no residual mass" else \
                    float(uniforms[b, c]) * float(p.sum()) < float(p[x])
                if ok:
                    cur, p, moved = c, probs[b, c].clone(), True
                    break
                if float(p.sum() - p[x]) > 0:
                    p[x] = 0.0
            if not moved:
                break
        full = probs[b, cur] if mutant == "bonus from p" else p
        nodes.append(cur)
        bonuses.append(int(A.sample_from_probs(full[None], uniforms[b, :1])[0]))
    return torch.tensor(nodes), torch.tensor(bonuses)


@pytest.mark.parametrize("mutant", ["bonus from p", "last child first", "no residual mass"])
def test_mutants_of_the_rule_differ_from_the_kernel(mutant):
    """Each mutant rule, written as a per-row loop, disagrees with the kernel on these trees, while the same loop
    without the mutation agrees: the comparison can tell the rule apart."""
    tokens, parents, valid, probs, u = _random_trees(24, 12, 6, 7)
    depth, kids = _bounds(parents, valid)
    got = ta.tree_rejection_sample_fused(tokens=tokens, parents=parents, valid=valid, probs=probs, uniforms=u,
                                         max_depth=depth, max_children=kids)
    same = _mutant_reference(tokens, parents, valid, probs, u, None)
    assert torch.equal(got[0], same[0]) and torch.equal(got[1], same[1])
    bad = _mutant_reference(tokens, parents, valid, probs, u, mutant)
    assert not (torch.equal(got[0], bad[0]) and torch.equal(got[1], bad[1]))


@pytest.mark.parametrize("shape,V,dtype", [((7,), 5, torch.float64), ((3, 4), 37, torch.float32), ((2,), 2100, torch.float64),
                                           ((), 9, torch.float32)])
def test_draw_equals_sample_from_probs(shape, V, dtype, monkeypatch):
    """draw_from_probs (a sampled plain step's draw) against sample_from_probs' torch form: peaked weights with exact
    zeros, a row of zeros (-> 0), a row whose only weight is its last token, uniforms near 0 and 1; the dispatch."""
    import gdnspec.sampling as S

    g = torch.Generator().manual_seed(V)
    probs = torch.softmax(3 * torch.randn(*shape, V, generator=g, dtype=torch.float64), -1)
    probs = probs.masked_fill(probs < 0.03, 0.0).to(dtype)
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    if probs.dim() == 2:
        probs[0] = 0.0
        probs[1] = 0.0
        probs[1, -1] = 2.0
        u[2 % probs.shape[0]] = 1.0 - 2.0 ** -53
        u[-1] = 0.0
    want = S.sample_from_probs(probs, u)
    got = ta.draw_from_probs(probs, u)
    assert got.shape == want.shape and torch.equal(got, want)
    monkeypatch.setattr(ta, "DISPATCH_ON_CPU", True)
    assert torch.equal(S.sample_from_probs(probs, u), want)


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _row_sum_is_max(ptr, V, BV: tl.constexpr):  # kernel mutant: the largest weight instead of the mass
    acc = tl.zeros([BV], dtype=ptr.dtype.element_ty)
    for v0 in range(0, V, BV):
        o = v0 + tl.arange(0, BV)
        acc = tl.maximum(acc, tl.load(ptr + o, mask=o < V, other=0.0))
    return tl.max(acc)


@triton.jit
def _row_sum_halved(ptr, V, BV: tl.constexpr):  # kernel mutant: a wrong residual mass
    acc = tl.zeros([BV], dtype=ptr.dtype.element_ty)
    for v0 in range(0, V, BV):
        o = v0 + tl.arange(0, BV)
        acc += tl.load(ptr + o, mask=o < V, other=0.0)
    return tl.sum(acc) * 0.5


@pytest.mark.parametrize("mutant,V", [(_row_sum_halved, 6), (_row_sum_is_max, 37)])
def test_kernel_mutants_fail(mutant, V, monkeypatch):
    """The kernel with its mass helper mutated (the interpreter reads jit helpers from the module's globals at
    launch) no longer equals the reference on the same trees."""
    tokens, parents, valid, probs, u = _random_trees(12 if V < 100 else 4, 12, V, 21)
    depth, kids = _bounds(parents, valid)
    kw = dict(tokens=tokens, parents=parents, valid=valid, probs=probs, uniforms=u)
    want = A.tree_rejection_sample_reference(**kw)
    got = ta.tree_rejection_sample_fused(**kw, max_depth=depth, max_children=kids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    monkeypatch.setattr(ta, "_row_sum", mutant)
    bad = ta.tree_rejection_sample_fused(**kw, max_depth=depth, max_children=kids)
    assert not (torch.equal(bad[0], want[0]) and torch.equal(bad[1], want[1]))


def test_bad_shapes_are_refused():
    tokens, parents, valid, probs, u = _random_trees(3, 5, 7, 0)
    kw = dict(tokens=tokens, parents=parents, valid=valid, probs=probs, uniforms=u, max_depth=2, max_children=2)
    with pytest.raises(ValueError, match="must be"):
        ta.tree_rejection_sample_fused(**{**kw, "uniforms": u[:, :3]})
    with pytest.raises(ValueError, match="must be"):
        ta.tree_rejection_sample_fused(**{**kw, "probs": probs[:2]})
    with pytest.raises(ValueError, match="leading shape"):
        ta.draw_from_probs(probs[:, 0], u[:1, 0])


def test_sample_from_probs_dispatches_to_the_draw_kernel(monkeypatch):
    import gdnspec.sampling as S

    probs = torch.softmax(torch.randn(4, 9, dtype=torch.float64), -1)
    u = torch.rand(4, dtype=torch.float64)
    want = S.sample_from_probs(probs, u)
    monkeypatch.setattr(ta, "DISPATCH_ON_CPU", True)
    calls = []
    real = ta.draw_from_probs
    monkeypatch.setattr(ta, "draw_from_probs", lambda p, v: calls.append(1) or real(p, v))
    assert torch.equal(S.sample_from_probs(probs, u), want) and calls
    calls.clear()
    assert torch.equal(S.sample_from_probs(probs, u[:1].expand(4).clone()[:1]), S.sample_from_probs(
        probs, u[:1].expand(4).clone()[:1])) and not calls  # broadcast uniforms keep the torch form
