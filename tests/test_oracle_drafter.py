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


def test_propose_edge_batches_and_state_value():
    """No rows, and rows whose references are empty (every draft past the end): the per-row definition's padded
    trees, no numpy shape error; the cached table is not part of the state's value (== and repr as before)."""
    from gdnspec.spec.drafters.oracle import OracleDraftState

    cfg = TreeConfig(builder="chain", num_steps=3, num_draft_tokens=4)
    drafter = OracleDrafter([[1, 2]], vocab_size=50)
    got = drafter.propose(OracleDraftState([], []), torch.zeros(0, dtype=torch.long), cfg)
    assert got.tokens.shape == (0, 4) and got.valid.shape == (0, 4)
    got = drafter.propose(OracleDraftState([[], []], [0, 0]), torch.tensor([7, 8]), cfg)
    assert _same(got, _expected([[], []], [0, 0], [7, 8], cfg))
    wide = TreeConfig(builder="eagle2", topk=3, num_steps=2, num_draft_tokens=6)  # k = num_steps < N - 1
    refs = [list(range(40, 50)), list(range(47, 50))]
    assert _same(drafter.propose(OracleDraftState(refs, [5, 0]), torch.tensor([45, 47]), wide),
                 _expected(refs, [5, 0], [45, 47], wide))
    flip = OracleDrafter(refs, error_rate=1.0, vocab_size=50)  # 49 + 1 wraps to 0
    assert _same(flip.propose(OracleDraftState(refs, [7, 0]), torch.tensor([47, 47]), wide),
                 _expected(refs, [7, 0], [47, 47], wide, flip=True))
    a, b = OracleDraftState([[1, 2, 3]], [0]), OracleDraftState([[1, 2, 3]], [0])
    drafter.propose(a, torch.tensor([1]), cfg)  # builds a's table only
    assert a == b and "_table" not in repr(a)


def test_error_rate_between_zero_and_one_is_seeded():
    """0 < error_rate < 1: the same seed gives the same trees; every drafted token is the reference's or its
    corrupted value; some but not all are corrupted."""
    refs = [list(range(100)), list(range(7, 60))]
    cfg = TreeConfig(builder="chain", num_steps=5, num_draft_tokens=6)
    runs = []
    for _ in range(2):
        drafter = OracleDrafter(refs, error_rate=0.5, vocab_size=200, seed=11)
        state = drafter.begin([torch.tensor(r[:2]) for r in refs])
        runs.append([drafter.propose(state, torch.tensor([2, 9]), cfg).tokens for _ in range(4)])
    assert all(torch.equal(x, y) for x, y in zip(*runs))
    drafted = torch.stack(runs[0])[:, :, 1:]  # (steps, B, 5)
    clean = torch.tensor([refs[0][3:8], refs[1][3:8]])
    assert ((drafted == clean) | (drafted == clean + 1)).all()
    assert 0 < int((drafted != clean).sum()) < drafted.numel()
