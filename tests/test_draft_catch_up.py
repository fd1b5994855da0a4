"""The draft model's catch-up from its proposal's states (gdnspec/spec/drafters/model.py: ModelDrafter.advance).

After a proposal, `advance` copies in, per row, the state of the deepest committed token the proposal ran and runs at
most one token more, instead of a chain verify + commit (`advance_rows`, the reference). Checked here, float64 on the
CPU: the resulting states equal the reference's (1e-12) for chains and trees (greedy and stochastic), every accepted
depth (root only .. whole path, incl. nodes never expanded), batches whose rows stop at different depths; anything the
trace cannot explain (another root, tokens past the proposal, a hybrid draft with KV caches, sync-free steps, a
state replaced by copy_) takes `advance_rows` (bit-equal to it); a hand-built trace with the same token under two
parents, and rows exactly two tokens past the trace; mutants (the first slot of a level instead of the matched one;
the last token not run; the parent slot ignored; two tokens past the trace accepted) must fail.

    python -m pytest -q tests/test_draft_catch_up.py
"""
from __future__ import annotations

import pytest
import torch

from gdnspec.sampling import RowSampling, generator_uniforms
from gdnspec.spec.drafters import ModelDrafter
from gdnspec.spec.drafters import model as dm
from gdnspec.spec.tree import TreeConfig

from conftest import randomize_
from spec_helpers import prompts_of, tiny_model

CONFIGS = {
    "chain-4": TreeConfig(builder="chain", num_steps=4, num_draft_tokens=5),
    "tree-3x3": TreeConfig(topk=3, num_steps=3, num_draft_tokens=9),
    "tree-2x4": TreeConfig(topk=2, num_steps=4, num_draft_tokens=8),
}


def _drafter(hybrid=False, seed=3):
    model = randomize_(tiny_model(seed=seed, hybrid=hybrid), seed=seed)
    return ModelDrafter(model)


def _paths(tree, seed):
    """Per row: a random tree node and the root-to-node path tokens (B, L) with counts (B,); row 0 takes the deepest
    node (a leaf the proposal never ran), row 1 the root alone."""
    g = torch.Generator().manual_seed(seed)
    B, N = tree.tokens.shape
    rows, counts = [], []
    for b in range(B):
        valid = [i for i in range(N) if bool(tree.valid[b, i])]
        depth = {0: 0}
        for i in range(1, N):
            depth[i] = depth[int(tree.parents[b, i])] + 1 if i in valid else -1
        if b == 0:
            node = max(valid, key=lambda i: (depth[i], i))
        elif b == 1:
            node = 0
        else:
            node = valid[int(torch.randint(0, len(valid), (1,), generator=g))]
        path = []
        while node >= 0:
            path.append(int(tree.tokens[b, node]))
            node = int(tree.parents[b, node])
        rows.append(path[::-1])
        counts.append(len(path))
    L = max(counts)
    tokens = torch.tensor([r + [0] * (L - len(r)) for r in rows])
    return tokens, torch.tensor(counts)


def _max_rel(a, b):
    worst = 0.0
    for la, lb in zip(a.layers, b.layers):
        for x, y in ((la.recurrent, lb.recurrent), (la.conv, lb.conv)):
            worst = max(worst, float((x - y).norm() / y.norm().clamp(min=1e-300)))
    return worst


def _propose_and_compare(drafter, cfg, B=4, seed=0, draft=None):
    V = drafter.vocab_size
    state = drafter.begin(prompts_of([7] * B, V, seed=seed))
    roots = torch.randint(0, V, (B,), generator=torch.Generator().manual_seed(seed + 1))
    tree = drafter.propose(state, roots, cfg, draft=draft)
    tokens, counts = _paths(tree, seed)
    ref = state.model_state.clone()
    dm.advance_rows(drafter.model, ref, tokens, counts)
    used = state.trace is not None
    drafter.advance(state, tokens=tokens, counts=counts)
    assert state.trace is None  # consumed
    return used, _max_rel(state.model_state, ref), state, ref


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
@torch.inference_mode()
def test_catch_up_from_the_proposal_equals_the_chain_verify(name, seed):
    used, err, _, _ = _propose_and_compare(_drafter(), CONFIGS[name], seed=seed)
    assert used and err < 1e-12, err


@torch.inference_mode()
def test_stochastic_trees_catch_up_too():
    B = 4
    cfg = TreeConfig(topk=3, num_steps=3, num_draft_tokens=9, sample_drafts=True)
    draft = RowSampling.constant(B, "cpu", temperature=1.0, top_k=None, top_p=None,
                                 uniforms=generator_uniforms(torch.Generator().manual_seed(7), B, "cpu"))
    used, err, _, _ = _propose_and_compare(_drafter(), cfg, B=B, draft=draft)
    assert used and err < 1e-12, err


@torch.inference_mode()
def test_what_the_trace_cannot_explain_takes_the_chain_verify():
    d = _drafter()
    V = d.vocab_size
    cfg = CONFIGS["tree-3x3"]
    for case in ("other root", "too long", "copied over", "sync_free"):
        state = d.begin(prompts_of([6, 6], V, seed=4))
        roots = torch.tensor([1, 2])
        tree = d.propose(state, roots, cfg)
        tokens, counts = _paths(tree, 5)
        if case == "other root":
            tokens[1, 0] = (tokens[1, 0] + 1) % V
        elif case == "too long":  # two tokens past the proposal's deepest node
            tokens = torch.cat([tokens, torch.tensor([[3, 4], [5, 6]])], 1)
            counts = counts.clone()
            counts[0] = tokens.shape[1]
            tokens[0, counts[0] - 2:] = torch.tensor([3, 4])
        elif case == "copied over":
            state.copy_(d.begin(prompts_of([6, 6], V, seed=9)))
        ref = state.model_state.clone()
        dm.advance_rows(d.model, ref, tokens, counts)
        d.advance(state, tokens=tokens, counts=counts, sync_free=case == "sync_free")
        for a, b in zip(state.model_state.layers, ref.layers):
            assert torch.equal(a.recurrent, b.recurrent) and torch.equal(a.conv, b.conv), case


@torch.inference_mode()
def test_hybrid_drafts_keep_no_trace():
    d = _drafter(hybrid=True)
    state = d.begin(prompts_of([6, 6], d.vocab_size, seed=4))
    d.propose(state, torch.tensor([1, 2]), CONFIGS["chain-4"])
    assert state.trace is None
    assert state.select([0]).trace is None



def _hand_trace(d, B=2):
    """A proposal's trace built by hand, as `propose` records it: level 1 = two children (a, b) of the root, level 2
    = the SAME token c under each of them (parent slots 0 and 1), so only the parent slot tells the two apart."""
    V = d.vocab_size
    state = d.begin(prompts_of([6] * B, V, seed=4))
    roots, (a, b, c) = torch.tensor([1, 2][:B]), (3, 4, 5)
    s0 = state.model_state.clone()
    d.model(roots[:, None], s0)
    t1, p1 = torch.tensor([[a, b]] * B), torch.zeros(B, 2, dtype=torch.long)
    s1 = s0.select((torch.arange(B)[:, None] + p1).reshape(-1))
    d.model(t1.reshape(-1, 1), s1)
    t2, p2 = torch.tensor([[c, c]] * B), torch.tensor([[0, 1]] * B)
    s2 = s1.select((torch.arange(B)[:, None] * 2 + p2).reshape(-1))
    d.model(t2.reshape(-1, 1), s2)
    return state, dm.ProposalTrace(roots, [(roots[:, None], None, s0), (t1, p1, s1), (t2, p2, s2)]), (a, b, c)


@torch.inference_mode()
def test_equal_tokens_under_different_parents_are_told_apart_by_the_parent_slot():
    d = _drafter()
    state, trace, (a, b, c) = _hand_trace(d)
    tokens = torch.tensor([[1, b, c, 0], [2, b, c, 7]])  # row 0 ends on the traced (b, c), row 1 runs one more token
    counts = torch.tensor([3, 4])
    assert dm.deepest_traced(trace, tokens.tolist(), counts.tolist()) == [(3, 1), (3, 1)]
    ref = state.model_state.clone()
    dm.advance_rows(d.model, ref, tokens, counts)
    state.trace = trace
    called = []
    real = dm.catch_up_from_trace
    try:
        dm.catch_up_from_trace = lambda *args: called.append(real(*args)) or called[-1]
        d.advance(state, tokens=tokens, counts=counts)
    finally:
        dm.catch_up_from_trace = real
    assert called == [True]
    assert _max_rel(state.model_state, ref) < 1e-12


@torch.inference_mode()
def test_two_tokens_past_the_traced_states_take_the_chain_verify():
    d = _drafter()
    state, trace, (a, b, c) = _hand_trace(d)
    tokens = torch.tensor([[1, a, 9, 8], [2, 9, 8, 0]])  # past the trace: row 0 by two tokens (9, 8), row 1 too
    counts = torch.tensor([4, 3])
    assert dm.deepest_traced(trace, tokens.tolist(), counts.tolist()) == [(2, 0), (1, 0)]
    assert not dm.catch_up_from_trace(d.model, state.model_state.clone(), trace, tokens, counts)
    ref = state.model_state.clone()
    dm.advance_rows(d.model, ref, tokens, counts)
    state.trace = trace
    d.advance(state, tokens=tokens, counts=counts)
    for x, y in zip(state.model_state.layers, ref.layers):
        assert torch.equal(x.recurrent, y.recurrent) and torch.equal(x.conv, y.conv)

MUTANTS = {  # the catch-up's source, deliberately broken: each must fail the comparison with the chain verify
    "first slot": ("[b * F + found[b][1] for b in rows]", "[b * F for b in rows]"),
    "last token not run": ("if c > m]", "if c > m + 1]"),
    "level off by one": ("for j in sorted({m - 1 for m, _ in found})", "for j in sorted({max(m - 2, 0) for m, _ in found})"),
}
# killed by the two hand-built-trace tests above (the proposals of test_mutants_fail never hold them)
HAND_MUTANTS = {
    "parent slot ignored": ("(par is None or par[b][f] == slot)", "True"),
    "two tokens past the trace accepted": ("any(c - m > 1 for", "any(c - m > 2 for"),
}


def _load_mutant(old, new, tmp_path, monkeypatch):
    """The catch-up's source with `old` replaced by `new`, patched into dm (the real drafter's advance calls it)."""
    import importlib.util
    import inspect
    import sys

    src = inspect.getsource(dm)
    assert src.count(old) == 1, old
    path = tmp_path / "mutant_model_drafter.py"
    path.write_text(src.replace(old, new))
    spec = importlib.util.spec_from_file_location("mutant_model_drafter", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    monkeypatch.setattr(dm, "catch_up_from_trace", mod.catch_up_from_trace)
    monkeypatch.setattr(dm, "deepest_traced", mod.deepest_traced)


@pytest.mark.parametrize("mutant", list(MUTANTS))
@torch.inference_mode()
def test_mutants_fail(mutant, tmp_path, monkeypatch):
    _load_mutant(*MUTANTS[mutant], tmp_path, monkeypatch)
    errs = []
    for n in ("tree-3x3", "chain-4"):
        for s in (0, 1):
            try:
                errs.append(_propose_and_compare(_drafter(), CONFIGS[n], seed=s)[1])
            except (IndexError, RuntimeError):  # a broken index may also raise: that fails too
                errs.append(float("inf"))
    assert max(errs) > 1e-6, errs


@pytest.mark.parametrize("mutant", list(HAND_MUTANTS))
def test_hand_trace_mutants_fail(mutant, tmp_path, monkeypatch):
    _load_mutant(*HAND_MUTANTS[mutant], tmp_path, monkeypatch)
    failed = 0
    for test in (test_equal_tokens_under_different_parents_are_told_apart_by_the_parent_slot,
                 test_two_tokens_past_the_traced_states_take_the_chain_verify):
        try:
            test()
        except AssertionError:
            failed += 1
    assert failed, mutant


def test_only_cpu_states_keep_a_trace():
    """Off the CPU (CUDA; here the meta device stands in) and for sync-free steps, proposals keep no states."""
    from gdnspec.cache import GDNLayerState, ModelState

    def state(device):
        return ModelState([GDNLayerState(torch.empty(1, 2, 4, 4, device=device), torch.empty(1, 6, 3, device=device))])

    assert dm._traceable(state("cpu"), False)
    assert not dm._traceable(state("cpu"), True)
    assert not dm._traceable(state("meta"), False)
