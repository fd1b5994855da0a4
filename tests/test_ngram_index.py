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
from gdnspec.spec.drafters.ngram import _add_ngrams


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
        if step == 5:  # rows moved and merged keep working (they carry their index along)
            state = type(state).cat([state.select([3, 0]), state.select([1, 2, 4])])
            assert all(i is not None for i in state.index)


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


def _fresh(index: dict, history: list[int]) -> dict:
    fresh = {n: {} for n in index}
    _add_ngrams(fresh, history, 0)
    return fresh


def test_select_and_cat_carry_the_index_without_rebuilding_or_sharing():
    """A change of rows (a sequence finishes or joins) keeps the other rows' indexes: without this every select /
    cat rebuilt every row's index at the next proposal, O(history) per row per change of rows. A row taken twice
    (select([0, 0]), cat([s, s])) must not share one index with its copy: both rows are then advanced with
    different tokens, and a shared index would hold the n-grams of both."""
    drafter = NGramDrafter(max_ngram=3)
    g = torch.Generator().manual_seed(5)
    state = drafter.begin([torch.randint(0, 4, (n,), generator=g) for n in (30, 12, 20)])
    cfg = TreeConfig(topk=2, num_steps=3, num_draft_tokens=7)
    drafter.propose(state, torch.tensor([0, 1, 2]), cfg)
    built = list(state.index)
    kept = state.select(torch.tensor([2, 0]))
    assert kept.index[0] is built[2] and kept.index[1] is built[0]  # moved, not rebuilt
    assert state.index[0] is None and state.index[2] is None and state.index[1] is built[1]
    joined = type(state).cat([kept, drafter.begin([torch.tensor([1, 2, 3])])])
    assert joined.index[:2] == [built[2], built[0]] and joined.index[2] is None
    for take_twice in (lambda s: s.select([0, 0, 1]), lambda s: type(s).cat([s, s])):
        drafter.propose(joined, torch.tensor([0, 1, 2]), cfg)  # every row of `joined` has its index
        twice = take_twice(joined)
        ids = [id(i) for i in twice.index if i is not None]
        assert ids and len(ids) == len(set(ids))
        for step in range(4):
            roots = torch.randint(0, 4, (len(twice.history),), generator=g)
            drafter.propose(twice, roots, cfg)
            for r, root in enumerate(roots.tolist()):
                got = drafter._continuations_indexed(twice.history[r], root, drafter._row_index(twice, r), 3)
                assert got == _reference(drafter, twice.history[r], root, 3), (step, r)
                assert twice.index[r] == _fresh(twice.index[r], twice.history[r])
            drafter.advance(twice, tokens=torch.randint(0, 4, (len(twice.history), 3), generator=g),
                            counts=torch.tensor([r % 4 for r in range(len(twice.history))]))
