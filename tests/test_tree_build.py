"""The tree builder's fused bookkeeping (ops/tree_build.py) against the torch builder of spec/tree.py, on the CPU
through the Triton interpreter: whole trees (eagle2 and chains, B = 1 .. 5, topk 1 .. 5, pools of 2 to 106 nodes,
-inf candidates, frontiers that die early so that the pool is smaller than N, NaN log-probs) bit for bit; exact ties
(where torch.topk's order is unspecified) by their rule, lower index first; each kernel against its torch form, the
rows handed to a drafter's expand, both drafters end to end, bad arguments, and mutants of the kernels that must
fail.

Run: python -m pytest -q tests/test_tree_build.py   (skipped when triton is not installed)
"""
from __future__ import annotations

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch  # noqa: E402

from conftest import interpreter_modules, load_source_module  # noqa: E402

(tb,) = interpreter_modules(["gdnspec.ops.tree_build"])
import gdnspec.spec.tree as tree_mod  # noqa: E402
from gdnspec.spec.tree import TreeConfig, build_tree  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpret_env")


@pytest.fixture
def fused(monkeypatch):
    """build_tree on CPU tensors through the kernels (the interpreter-loaded module)."""
    monkeypatch.setattr(tb, "DISPATCH_ON_CPU", True)
    monkeypatch.setattr(tree_mod, "_tb", tb)
    return tb


def table_expand(vocab: int, seed: int, *, ties: bool = False, neg_inf: bool = False, record=None):
    """A fake drafter: log-probs of a child depend on its parent's token through a fixed random table (float32);
    ties=True rounds them so that equal cumulative scores occur, neg_inf=True forbids some children."""
    g = torch.Generator().manual_seed(seed)
    table = torch.log_softmax(3 * torch.randn(vocab, vocab, generator=g), -1)
    if ties:
        table = (table * 2).round() / 2
    if neg_inf:
        table[torch.rand(vocab, vocab, generator=g) < 0.5] = float("-inf")
        table[:, 0] = torch.where(torch.isinf(table).all(-1), -1.0, table[:, 0])

    def expand(tokens, parent_slot, *, parent_rows=None):
        if record is not None:
            record.append((parent_slot, parent_rows))
        return table[tokens]  # (B, F, vocab)

    return expand


def _same(a, b):
    for name in ("tokens", "parents", "scores", "valid"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), (name, x, y)


@pytest.mark.parametrize("B,topk,steps,n", [(1, 1, 1, 2), (3, 2, 3, 7), (5, 4, 5, 16), (2, 3, 2, 13),
                                            (3, 4, 4, 64), (1, 5, 5, 30), (4, 2, 4, 14)])
@pytest.mark.parametrize("kind", ["plain", "ties", "neg_inf"])
def test_eagle2_tree_equals_torch(B, topk, steps, n, kind, fused, monkeypatch):
    cfg = TreeConfig(topk=topk, num_steps=steps, num_draft_tokens=min(n, TreeConfig(topk=topk, num_steps=steps).max_nodes()))
    roots = torch.randint(0, 40, (B,), generator=torch.Generator().manual_seed(B * 7 + topk))
    kw = dict(ties=kind == "ties", neg_inf=kind == "neg_inf")
    for sync_free in (True, False):
        got, got_order = build_tree(roots, table_expand(40, topk + steps, **kw), cfg, sync_free=sync_free)
        with monkeypatch.context() as m:
            m.setattr(tb, "DISPATCH_ON_CPU", False)
            ref, ref_order = build_tree(roots, table_expand(40, topk + steps, **kw), cfg, sync_free=sync_free)
        if kind != "ties":  # exact ties: both pick equally scored nodes, possibly different ones (torch.topk's order)
            _same(got, ref)
            assert torch.equal(got_order, ref_order)
        got.validate(40)


def test_early_stop_and_nan_trees_equal_torch(fused, monkeypatch):
    """Rows whose frontier dies (every child -inf) at the first or second step, host-sync mode (the builder stops
    early, the pool is smaller than N), and draft rows of NaN log-probs (NaN ranks first, as in torch, and its nodes
    are invalid): the same trees and kept pool indices as the torch builder, and no write past a row."""
    V = 12
    cfg = TreeConfig(topk=3, num_steps=4, num_draft_tokens=20)

    def dead(tokens, slot):
        return torch.full((*tokens.shape, V), float("-inf"))

    def dead_after_one(tokens, slot):
        if slot is None:
            return torch.log_softmax(torch.arange(V, dtype=torch.float32).expand(*tokens.shape, V), -1)
        return torch.full((*tokens.shape, V), float("-inf"))

    table = torch.log_softmax(3 * torch.randn(V, V, generator=torch.Generator().manual_seed(0)), -1)
    table[5, :] = float("nan")  # the children of token 5: NaN (e.g. an overflow in the draft)
    cases = [(dead, cfg, False), (dead_after_one, cfg, False), (dead_after_one, cfg, True)]
    cases += [(lambda t, s: table[t], TreeConfig(topk=3, num_steps=3, num_draft_tokens=8), True)]
    for roots in (torch.tensor([1, 2]), torch.tensor([5, 3]), torch.tensor([1, 5])):
        for expand, c, sync_free in cases:
            got = build_tree(roots, expand, c, sync_free=sync_free)
            with monkeypatch.context() as m:
                m.setattr(tb, "DISPATCH_ON_CPU", False)
                ref = build_tree(roots, expand, c, sync_free=sync_free)
            _same(got[0], ref[0])
            assert torch.equal(got[1], ref[1])
    # the selection kernel alone on NaN scores: a permutation of ranks (n_keep kept, nothing past the row)
    B, P = 2, 9
    pool = (torch.arange(B * P).view(B, P), torch.zeros(B, P, dtype=torch.long),
            torch.tensor([[0.0, float("nan"), -1.0, float("nan"), -2.0, float("nan"), -3.0, float("nan"), -0.5]] * B))
    got = tb.select_best(pool, num_draft_tokens=4)
    ref = tree_mod._select_best(*pool, 4)
    _same(tree_mod.DraftTree(*got[:4]), ref[0])
    assert torch.equal(got[4], ref[1])


def test_ties_go_to_the_lower_index(fused):
    """Every child equally likely: the fused frontier keeps the first children of the first nodes, and the final
    selection the first pool nodes (stable: ties to the lower pool index, as _select_best)."""
    def expand(tokens, parent_slot):
        return torch.full((*tokens.shape, 10), -1.0)

    tree, order = build_tree(torch.tensor([3, 4]), expand, TreeConfig(topk=3, num_steps=3, num_draft_tokens=10),
                             sync_free=True)
    assert order[0].tolist() == list(range(1, 10))
    assert tree.parents[0].tolist() == [-1, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    ref = tree_mod._select_best(*_pool_of(torch.tensor([3, 4]), expand, 3, 3), 10)
    _same(tree, ref[0])


def _pool_of(roots, expand, k, steps):
    """The torch builder's pool (tokens, parents, scores) for a deterministic eagle2 tree, by the reference loop."""
    cfg = TreeConfig(topk=k, num_steps=steps)
    B = roots.shape[0]
    pool_t, pool_p, pool_s = [roots[:, None]], [torch.full((B, 1), -1)], [torch.zeros(B, 1)]
    ft, fp, fs, slot = roots[:, None], torch.zeros(B, 1, dtype=torch.long), torch.zeros(B, 1), None
    size = 1
    for step in range(cfg.num_steps):
        lp, tok = expand(ft, slot).float().topk(k, dim=-1)
        F = lp.shape[1]
        cand = fs[..., None] + lp
        pool_t.append(tok.reshape(B, -1))
        pool_p.append(fp[..., None].expand(B, F, k).reshape(B, -1))
        pool_s.append(cand.reshape(B, -1))
        base, size = size, size + F * k
        if step == cfg.num_steps - 1:
            break
        fs, sel = torch.sort(cand.reshape(B, -1), dim=-1, descending=True, stable=True)
        fs, sel = fs[:, :k], sel[:, :k]
        ft, slot, fp = tok.reshape(B, -1).gather(1, sel), sel // k, sel + base
    return torch.cat(pool_t, 1), torch.cat(pool_p, 1), torch.cat(pool_s, 1)


def test_frontier_step_against_torch(fused):
    g = torch.Generator().manual_seed(3)
    B, F, K, P = 3, 4, 3, 40
    lp = torch.randn(B, F, K, generator=g).sort(-1, descending=True).values
    tok = torch.randint(0, 99, (B, F, K), generator=g)
    fs = torch.randn(B, F, generator=g)
    fs[1, 2] = float("-inf")
    fp = torch.randint(1, 9, (B, F), generator=g)
    pool = tuple(t.fill_(7) for t in tb.new_pool(B, P, "cpu"))
    nt, slot, npool, nsc, rows = tb.frontier_step(lp, tok, pool, base=11, width=5, frontier=(fs, fp))
    cand = (fs[..., None] + lp).reshape(B, F * K)
    assert torch.equal(pool[2][:, 11:11 + F * K], cand)
    assert torch.equal(pool[0][:, 11:11 + F * K], tok.reshape(B, -1))
    assert torch.equal(pool[1][:, 11:11 + F * K], fp[..., None].expand(B, F, K).reshape(B, -1))
    assert bool((pool[0][:, :11] == 7).all() and (pool[0][:, 11 + F * K:] == 7).all())  # nothing else written
    ref_sc, sel = torch.sort(cand, dim=-1, descending=True, stable=True)
    sel = sel[:, :5]
    assert torch.equal(nsc, ref_sc[:, :5]) and torch.equal(npool, sel + 11) and torch.equal(slot, sel // K)
    assert torch.equal(nt, tok.reshape(B, -1).gather(1, sel))
    assert torch.equal(rows, (torch.arange(B)[:, None] * F + sel // K).reshape(-1))
    # the root layer: score 0, pool index 0, the roots into column 0; width 0 returns nothing
    roots = torch.tensor([5, 6, 7])
    assert tb.frontier_step(lp[:, :1], tok[:, :1], pool, base=1, width=0, roots=roots) is None
    assert pool[0][:, 0].tolist() == [5, 6, 7] and pool[1][:, 0].tolist() == [-1] * 3
    assert torch.equal(pool[2][:, 0], torch.zeros(3)) and torch.equal(pool[2][:, 1:1 + K], 0.0 + lp[:, 0])


@pytest.mark.parametrize("S,N", [(1, 2), (4, 5), (3, 4), (6, 7)])
def test_chain_tree_against_torch(S, N, fused, monkeypatch):
    B = 3
    g = torch.Generator().manual_seed(S * 10 + N)
    lps = -torch.rand(B, S, generator=g) * 3
    lps[1, min(2, S - 1)] = float("-inf")  # the chain ends there: invalid nodes below
    toks = torch.randint(1, 50, (B, S), generator=g)
    roots = torch.tensor([9, 8, 7])
    calls = iter(range(S))

    def expand(tokens, parent_slot):
        s = next(calls)
        out = torch.full((B, 1, 50), float("-inf"))
        out[torch.arange(B), 0, toks[:, s]] = lps[:, s]
        out[:, 0, 0] = torch.where(torch.isinf(lps[:, s]), -5.0, float("-inf"))  # -inf row: another token wins
        return out

    cfg = TreeConfig(builder="chain", num_steps=S, num_draft_tokens=N)
    got, got_order = build_tree(roots, expand, cfg, sync_free=True)
    calls = iter(range(S))
    monkeypatch.setattr(tb, "DISPATCH_ON_CPU", False)
    ref, ref_order = build_tree(roots, expand, cfg, sync_free=True)
    _same(got, ref)
    assert torch.equal(got_order, ref_order)


def test_chain_scores_are_summed_in_order(fused):
    """Scores whose sum depends on the order of the additions: the kernel adds step by step like the builder."""
    lp = torch.tensor([[-1e8, -1.0, 1e8 - 3.0, -0.25]])
    tok = torch.tensor([[1, 2, 3, 4]])
    _, _, scores, valid, order = tb.chain_tree(torch.tensor([0]), lp, tok, num_draft_tokens=6)
    acc, ref = torch.zeros((), dtype=torch.float32), []
    for s in range(4):
        acc = lp[0, s] if s == 0 else acc + lp[0, s]
        ref.append(acc.item())
    assert scores[0, 1:5].tolist() == ref and scores[0, 5].item() == float("-inf")
    assert valid[0].tolist() == [True] * 5 + [False] and order[0].tolist() == [1, 2, 3, 4]


def test_drafter_gets_the_kernel_rows(fused):
    rec = []
    cfg = TreeConfig(topk=3, num_steps=3, num_draft_tokens=12)
    build_tree(torch.tensor([1, 2]), table_expand(30, 1, record=rec), cfg, sync_free=True)
    expand = table_expand(30, 1, record=rec)
    rec.clear()
    expand.takes_parent_rows = True
    build_tree(torch.tensor([1, 2]), expand, cfg, sync_free=True)
    assert rec[0] == (None, None)
    for step, (slot, rows) in enumerate(rec[1:]):  # b * (the width of the frontier the slots index) + slot
        assert torch.equal(rows, (torch.arange(2)[:, None] * (1 if step == 0 else 3) + slot).reshape(-1))
    assert len(rec) == 3


def test_bad_arguments_name_them(fused):
    lp, tok = torch.zeros(2, 1, 3), torch.zeros(2, 1, 3, dtype=torch.long)
    pool = tb.new_pool(2, 10, "cpu")
    with pytest.raises(ValueError, match="top_lp must be a torch.float32"):
        tb.frontier_step(lp.double(), tok, pool, base=1, width=1, roots=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="base must be"):
        tb.frontier_step(lp, tok, pool, base=8, width=1, roots=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="width must be"):
        tb.frontier_step(lp, tok, pool, base=1, width=4, roots=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="roots must be"):
        tb.frontier_step(lp, tok, pool, base=1, width=1)
    with pytest.raises(ValueError, match="pool_size must be"):
        tb.new_pool(1, tb.MAX_POOL + 2, "cpu")
    with pytest.raises(ValueError, match="num_draft_tokens must be"):
        tb.select_best(pool, num_draft_tokens=1)
    with pytest.raises(ValueError, match="lp must have"):
        tb.chain_tree(torch.zeros(2, dtype=torch.long), torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long),
                      num_draft_tokens=5)


def _checks(m, monkeypatch) -> list[str]:
    """The checks a mutant of module m must fail (and m itself pass): tie-free eagle2 trees and a chain against the
    torch builder, the all-ties tree's expected shape, the chain's in-order sums. Returns the failed ones."""
    monkeypatch.setattr(tree_mod, "_tb", m)
    failed = []
    for builder, k, steps, n in (("eagle2", 3, 3, 12), ("eagle2", 2, 4, 9), ("chain", 1, 4, 5)):
        cfg = TreeConfig(builder=builder, topk=k, num_steps=steps, num_draft_tokens=n)
        roots = torch.tensor([1, 5, 9])
        monkeypatch.setattr(m, "DISPATCH_ON_CPU", True)
        got, _ = build_tree(roots, table_expand(30, 2), cfg, sync_free=True)
        monkeypatch.setattr(m, "DISPATCH_ON_CPU", False)
        ref, _ = build_tree(roots, table_expand(30, 2), cfg, sync_free=True)
        try:
            _same(got, ref)
        except AssertionError:
            failed.append(f"{builder} {k}x{steps}")
    monkeypatch.setattr(m, "DISPATCH_ON_CPU", True)
    tree, _ = build_tree(torch.tensor([3]), lambda t, s: torch.full((*t.shape, 10), -1.0),
                         TreeConfig(topk=3, num_steps=3, num_draft_tokens=10), sync_free=True)
    if tree.parents[0].tolist() != [-1, 0, 0, 0, 1, 1, 1, 2, 2, 2]:
        failed.append("ties")
    lp = torch.tensor([[-1e8, -1.0, 1e8 - 3.0, -0.25]])
    scores = m.chain_tree(torch.tensor([0]), lp, torch.tensor([[1, 2, 3, 4]]), num_draft_tokens=6)[2]
    if scores[0, 3].item() != ((lp[0, 0] + lp[0, 1]) + lp[0, 2]).item():
        failed.append("chain sums")
    nan = float("nan")
    pool = (torch.arange(9)[None], torch.zeros(1, 9, dtype=torch.long),
            torch.tensor([[0.0, nan, -1.0, nan, -2.0, nan, -3.0, nan, -0.5]]))
    got, ref = m.select_best(pool, num_draft_tokens=4), tree_mod._select_best(*pool, 4)
    if not (torch.equal(got[0], ref[0].tokens) and torch.equal(got[4], ref[1])):
        failed.append("NaN selection")
    return failed


def test_checks_pass_on_the_kernels(monkeypatch):
    assert _checks(tb, monkeypatch) == []


@pytest.mark.parametrize("old,new", [
    ("return greater | (same & (ia < ib))", "return greater | (same & (ia > ib))"),  # ties to the higher index
    ("greater = (a > b) | (nan_a & ~nan_b)", "greater = (a > b) | (nan_b & ~nan_a)"),  # NaN last, not first
    ("cand = tl.load(fscore + b * F + f, mask=mi, other=0.0) + v", "cand = v"),  # parent score dropped
    ("pos = tl.sum((keptj[None, :] & (j[None, :] < i[:, None]))",
     "pos = tl.sum((keptj[None, :] & (j[None, :] > i[:, None]))"),  # not in topological order
    ("acc = tl.where(s == 0, x, acc + x)", "acc = x"),  # no running sum
])
def test_mutants_fail(old, new, tmp_path, monkeypatch):
    import inspect

    src = inspect.getsource(tb)
    assert old in src, old
    m = load_source_module(tmp_path, "tree_build_mutant", src.replace(old, new))
    assert _checks(m, monkeypatch), f"the mutant {new!r} passed"


@pytest.mark.parametrize("kind", ["eagle", "model"])
@pytest.mark.parametrize("cfg", [TreeConfig(topk=3, num_steps=3, num_draft_tokens=10),
                                 TreeConfig(builder="chain", num_steps=4)])
def test_drafters_propose_the_same_trees(kind, cfg, monkeypatch):
    """The EAGLE and draft-model drafters (float32, sync-free as in the CUDA-graph step) propose the same trees with
    the fused builder (and the rows it hands to their expand) as with the torch builder."""
    from spec_helpers import prompts_of, tiny_model

    from gdnspec.models.eagle import EagleHead, eagle_config_for
    from gdnspec.spec.drafters import EagleDrafter, ModelDrafter

    target = tiny_model(seed=3, hybrid=False, init_scale=8.0).float()
    torch.manual_seed(5)
    if kind == "eagle":
        drafter = EagleDrafter(EagleHead(eagle_config_for(target.config, intermediate_size=32)).eval(), target)
        prompts = prompts_of([6, 3], target.vocab_size, seed=61)
        hidden = [target(p[None]).hidden_states[0] for p in prompts]
        begin = lambda: drafter.begin(prompts, target_hidden=hidden)  # noqa: E731
    else:
        drafter = ModelDrafter(tiny_model(seed=4, hybrid=False).float())
        prompts = prompts_of([6, 3], target.vocab_size, seed=61)
        begin = lambda: drafter.begin(prompts)  # noqa: E731
    roots = torch.tensor([p[-1].item() for p in prompts])
    trees, calls = [], []
    for name in ("select_best", "chain_tree"):
        fn = getattr(tb, name)
        monkeypatch.setattr(tb, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    monkeypatch.setattr(tree_mod, "_tb", tb)
    for on in (True, False):
        monkeypatch.setattr(tb, "DISPATCH_ON_CPU", on)
        trees.append(drafter.propose(begin(), roots, cfg, sync_free=True))
    _same(*trees)
    assert calls == ["chain_tree" if cfg.builder == "chain" else "select_best"]  # the kernels built the first
