"""OracleDrafter.propose (the benchmarks' near-free drafter, vectorised over rows) against the per-row definition:
the chain ref[pos + 1 : pos + 1 + k] below each root, shorter where the reference ends, padded like
DraftTree.from_lists; error_rate 1 corrupts every drafted token.

Run: python -m pytest -q tests/test_oracle_drafter.py
"""
from __future__ import annotations

import torch

from gdnspec.spec import TreeConfig
from gdnspec.spec.drafters import OracleDrafter
from gdnspec.spec.tree import DraftTree


def _expected(refs, committed, roots, cfg, flip=False, vocab=50):
    k = min(cfg.num_draft_tokens - 1, cfg.num_steps)
    rows = []
    for ref, pos in zip(refs, committed):
        chain = ref[pos + 1: pos + 1 + k]
        rows.append([((t + 1) % vocab if flip else t, i, 0.0) for i, t in enumerate(chain)])
    return DraftTree.from_lists(roots, rows, num_nodes=cfg.num_draft_tokens)


def _same(a: DraftTree, b: DraftTree) -> bool:
    return (torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents) and torch.equal(a.valid, b.valid)
            and torch.equal(a.scores, b.scores))


def test_propose_matches_per_row_chains():
    g = torch.Generator().manual_seed(0)
    refs = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (12, 7, 9, 30, 5)]
    drafter = OracleDrafter(refs, vocab_size=50)
    state = drafter.begin([torch.tensor(r[:3]) for r in refs])
    for steps, nodes in ((3, 4), (5, 4), (5, 6), (1, 2)):
        cfg = TreeConfig(builder="chain", num_steps=steps, num_draft_tokens=nodes)
        for committed in ([2, 2, 2, 2, 2], [8, 4, 8, 20, 4], [11, 6, 3, 29, 0]):  # incl. rows at their reference's end
            state.committed = list(committed)
            roots = [r[c] for r, c in zip(refs, committed)]
            got = drafter.propose(state, torch.tensor(roots), cfg)
            assert _same(got, _expected(refs, committed, roots, cfg)), (steps, nodes, committed)
            got.validate()
    drafter.advance(state, tokens=None, counts=torch.tensor([1, 2, 0, 3, 1]))
    assert state.committed == [12, 8, 3, 32, 1]
    sub = state.select([3, 0])
    assert sub.refs == [refs[3], refs[0]] and sub.committed == [32, 12]
    sub.committed = [20, 2]
    cfg = TreeConfig(builder="chain", num_steps=3, num_draft_tokens=4)
    roots = [refs[3][20], refs[0][2]]
    assert _same(drafter.propose(sub, torch.tensor(roots), cfg), _expected([refs[3], refs[0]], [20, 2], roots, cfg))


def test_error_rate_one_corrupts_every_drafted_token():
    refs = [list(range(40)), list(range(10, 50))]
    drafter = OracleDrafter(refs, error_rate=1.0, vocab_size=50)
    state = drafter.begin([torch.tensor(r[:5]) for r in refs])
    cfg = TreeConfig(builder="chain", num_steps=3)
    assert state.committed == [5, 5]  # the root is the token at position len(prompt)
    roots = [refs[0][5], refs[1][5]]
    got = drafter.propose(state, torch.tensor(roots), cfg)
    assert _same(got, _expected(refs, [5, 5], roots, cfg, flip=True))
