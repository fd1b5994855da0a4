"""The draft model's catch-up from its proposal's states (gdnspec/spec/drafters/model.py: ModelDrafter.advance).

After a proposal, `advance` copies in, per row, the state of the deepest committed token the proposal ran and runs at
most one token more, instead of a chain verify + commit (`advance_rows`, the reference). Checked here, float64 on the
CPU: the resulting states equal the reference's (1e-12) for chains and trees (greedy and stochastic), every accepted
depth (root only .. whole path, incl. nodes never expanded), batches whose rows stop at different depths; anything the
trace cannot explain (another root, tokens past the proposal, a hybrid draft with KV caches, sync-free steps, a
state replaced by copy_) takes `advance_rows` (bit-equal to it); mutants (the first slot of a level instead of the
matched one; the last token not run) must fail.

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


MUTANTS = {  # the catch-up's source, deliberately broken: each must fail the comparison with the chain verify
    "first slot": ("[b * F + found[b][1] for b in rows]", "[b * F for b in rows]"),
    "last token not run": ("if c > m]", "if c > m + 1]"),
    "level off by one": ("for j in sorted({m - 1 for m, _ in found})", "for j in sorted({max(m - 2, 0) for m, _ in found})"),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
@torch.inference_mode()
def test_mutants_fail(mutant, tmp_path, monkeypatch):
    import importlib.util
    import inspect
    import sys

    old, new = MUTANTS[mutant]
    src = inspect.getsource(dm)
    assert src.count(old) == 1, old
    path = tmp_path / "mutant_model_drafter.py"
    path.write_text(src.replace(old, new))
    spec = importlib.util.spec_from_file_location("mutant_model_drafter", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    # the mutant's catch-up, called by the real drafter's advance
    monkeypatch.setattr(dm, "catch_up_from_trace", mod.catch_up_from_trace)
    errs = []
    for n in ("tree-3x3", "chain-4"):
        for s in (0, 1):
            try:
                errs.append(_propose_and_compare(_drafter(), CONFIGS[n], seed=s)[1])
            except (IndexError, RuntimeError):  # a broken index may also raise: that fails too
                errs.append(float("inf"))
    assert max(errs) > 1e-6, errs
