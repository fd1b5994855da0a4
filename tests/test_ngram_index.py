"""The n-gram drafter's indexed occurrence lookup (`_continuations_indexed`, incremental per-row index) against its
scanning reference (`_continuations`): same continuations in the same order, over random histories with many repeats,
n ranges, match caps, histories grown by `advance`, and states made by select / cat.

Run: python -m pytest -q tests/test_ngram_index.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gdnspec.spec import NGramDrafter, TreeConfig


def _reference(drafter, history, root, depth):
    return drafter._continuations(np.asarray(history + [root], dtype=np.int64), depth)


@pytest.mark.parametrize("max_ngram,min_ngram,max_matches", [(4, 1, 64), (3, 2, 5), (1, 1, 3), (5, 1, 1)])
def test_indexed_continuations_equal_the_scan(max_ngram, min_ngram, max_matches):
    g = torch.Generator().manual_seed(max_ngram * 10 + max_matches)
    drafter = NGramDrafter(max_ngram=max_ngram, min_ngram=min_ngram, max_matches=max_matches)
    hist = [torch.randint(0, v, (n,), generator=g).tolist() for v, n in ((3, 40), (6, 1), (2, 0), (50, 30), (4, 2))]
    state = drafter.begin([torch.tensor(h, dtype=torch.long) for h in hist])
    for step in range(12):
        roots = torch.randint(0, 6, (len(hist),), generator=g)
        for r, root in enumerate(roots.tolist()):
            for depth in (1, 3, 6):
                got = drafter._continuations_indexed(state.history[r], root, drafter._row_index(state, r), depth)
                assert got == _reference(drafter, state.history[r], root, depth), (step, r, depth)
        toks = torch.randint(0, 6, (len(hist), 4), generator=g)
        drafter.advance(state, tokens=toks, counts=torch.randint(0, 5, (len(hist),), generator=g))
        if step == 5:  # rows moved and merged keep working (their index is rebuilt)
            state = type(state).cat([state.select([3, 0]), state.select([1, 2, 4])])
            assert all(i is None for i in state.index)


def test_propose_uses_the_index_and_matches_the_scan():
    """Whole proposals: the trie from indexed continuations equals the trie from the scanned ones."""
    g = torch.Generator().manual_seed(3)
    drafter = NGramDrafter()
    hist = [torch.randint(0, 5, (200,), generator=g).tolist() for _ in range(3)]
    state = drafter.begin([torch.tensor(h) for h in hist])
    cfg = TreeConfig(topk=3, num_steps=4, num_draft_tokens=12)
    roots = torch.tensor([1, 2, 3])
    tree = drafter.propose(state, roots, cfg)
    assert all(i is not None for i in state.index)
    scan = NGramDrafter()
    scan._continuations_indexed = lambda h, root, idx, depth: _reference(scan, h, root, depth)
    ref = scan.propose(type(state)([list(h) for h in hist]), roots, cfg)
    for a, b in ((tree.tokens, ref.tokens), (tree.parents, ref.parents), (tree.valid, ref.valid), (tree.scores, ref.scores)):
        assert torch.equal(a, b)
    # a drafter with another n range rebuilds the row index instead of reading the wrong grams
    other = NGramDrafter(max_ngram=2)
    other.propose(state, roots, cfg)
    assert set(state.index[0]) == {1, 2}
