"""Bad input to the speculative API raises clear errors that name the argument."""
from __future__ import annotations

import pytest
import torch

from gdnspec import GDNSpeculativeWorker, NGramDrafter
from gdnspec.spec import DraftTree, TreeConfig

from spec_helpers import tiny_model


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0)


def test_vocab_mismatch(target):
    with pytest.raises(ValueError, match="vocab_size"):
        GDNSpeculativeWorker(draft_model=tiny_model(seed=1, vocab_size=40), target_model=target)


def test_tree_config_errors():
    with pytest.raises(ValueError, match="topk"):
        TreeConfig(topk=0)
    with pytest.raises(ValueError, match="num_steps"):
        TreeConfig(num_steps=0)
    with pytest.raises(ValueError, match="larger than the tree can hold"):
        TreeConfig(topk=2, num_steps=2, num_draft_tokens=8)  # at most 1 + 2 + 4 = 7 nodes
    with pytest.raises(ValueError, match="builder"):
        TreeConfig(builder="beam")


def test_worker_argument_errors(target):
    with pytest.raises(ValueError, match="topk"):
        GDNSpeculativeWorker(target_model=target, drafter=NGramDrafter(), topk=0)
    with pytest.raises(ValueError, match="exactly one of draft_model"):
        GDNSpeculativeWorker(target_model=target)
    worker = GDNSpeculativeWorker(target_model=target, drafter=NGramDrafter())
    with pytest.raises(ValueError, match="prompt 0"):
        worker.generate([torch.tensor([], dtype=torch.long)], 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        worker.generate(torch.ones(1, 4, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="vocab_size"):
        worker.generate(torch.full((1, 4), 10_000), 3)
    with pytest.raises(ValueError, match="temperature"):
        worker.generate(torch.ones(1, 4, dtype=torch.long), 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        worker.generate(torch.ones(1, 4, dtype=torch.long), 3, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="min_ngram"):
        NGramDrafter(max_ngram=1, min_ngram=2)


def test_draft_tree_validation():
    tree = DraftTree(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[-1, 2, 0]]), torch.zeros(1, 3),
                     torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="topological"):
        tree.validate()
