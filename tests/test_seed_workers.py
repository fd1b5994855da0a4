"""The seed document's tests for the draft, verify and speculative workers, same class and method names and
configurations (hidden 128, 2 k heads, 2 v heads, head dims 32, vocab 1000), asserting semantics, not only shapes."""
from __future__ import annotations

import pytest
import torch

from gdnspec import GDNDraftWorker, GDNSpeculativeWorker, GDNVerifyWorker, SimpleLMWithGDN, generate_autoregressive

VOCAB = 1000


def simple_model(seed, hidden=128, dtype=torch.float32):
    torch.manual_seed(seed)
    return SimpleLMWithGDN(VOCAB, hidden, 2, 2, 32, 32, dtype=dtype).eval()


@pytest.fixture(scope="module")
def target():
    return simple_model(0)


@pytest.fixture(scope="module")
def draft():
    return simple_model(1, hidden=64)


class TestGDNDraftWorker:
    def test_draft_step(self, draft):
        worker = GDNDraftWorker(draft, topk=4)
        input_ids = torch.randint(0, VOCAB, (2, 10))
        scores, token_ids, hidden_states, past_state = worker.draft_step(input_ids)
        assert scores.shape == (2, 4) and token_ids.shape == (2, 4) and hidden_states.shape == (2, 10, 64)
        probs = torch.softmax(draft(input_ids).logits[:, -1].float(), -1)
        top = probs.topk(4, dim=-1)
        assert torch.equal(token_ids, top.indices)
        torch.testing.assert_close(scores, top.values)
        # the returned state continues the sequence: one more step == a forward over 11 tokens
        nxt = token_ids[:, :1]
        s2, t2, _, _ = worker.draft_step(nxt, past_state)
        full = torch.softmax(draft(torch.cat([input_ids, nxt], 1)).logits[:, -1].float(), -1).topk(4, dim=-1)
        assert torch.equal(t2, full.indices)

    def test_generate_draft_tree(self, draft):
        worker = GDNDraftWorker(draft, topk=4, num_steps=2, num_draft_tokens=8)
        input_ids = torch.randint(0, VOCAB, (2, 10))
        verified_id = torch.tensor([5, 7])
        draft_tokens, parent_list, top_scores_index = worker.generate_draft_tree(input_ids, verified_id)
        assert draft_tokens.shape == (2, 7) and parent_list.shape == (2, 7) and top_scores_index.shape == (2, 7)
        node = torch.arange(1, 8)
        assert bool(((parent_list >= 0) & (parent_list < node)).all())  # parents precede children
        # depth-1 nodes are the draft's top-4 after (context, verified_id)
        ctx = torch.cat([input_ids, verified_id[:, None]], 1)
        top4 = draft(ctx).logits[:, -1].topk(4, -1).indices
        for b in range(2):
            first = draft_tokens[b][parent_list[b] == 0]
            assert set(first.tolist()) <= set(top4[b].tolist()) and len(first) >= 1
            assert len(set(top_scores_index[b].tolist())) == 7  # distinct pool entries


class TestGDNVerifyWorker:
    def test_verify(self, target):
        seq_lens = [10, 15]
        contexts = [torch.randint(0, VOCAB, (n,)) for n in seq_lens]
        verified_id = torch.tensor([11, 12])
        greedy = [generate_autoregressive(target, torch.cat([c, v[None]])[None], 3)[0, -3:] for c, v in zip(contexts, verified_id)]
        # 19 drafted nodes (4 children of the root, 15 grandchildren); row 0 hides the greedy path in it
        parent_list = torch.cat([torch.zeros(4, dtype=torch.long), torch.arange(1, 5).repeat_interleave(4)[:15]])
        parent_list = parent_list.expand(2, 19).clone()
        draft_tokens = torch.randint(0, VOCAB, (2, 19))
        draft_tokens[0, 2] = greedy[0][0]  # node 3: child of the root
        kids = (parent_list[0] == 3).nonzero().flatten()  # children of node 3 (drafted index = node - 1)
        draft_tokens[0, kids[1]] = greedy[0][1]
        draft_tokens[0, kids[0]] = (greedy[0][1] + 1) % VOCAB
        for j in range(19):  # row 1: no drafted token matches the target
            if parent_list[1, j] == 0 and draft_tokens[1, j] == greedy[1][0]:
                draft_tokens[1, j] = (greedy[1][0] + 1) % VOCAB
        state = target.new_state(2)
        for b, c in enumerate(contexts):
            state.assign_rows_([b], target(c[None]).state)
        accepted_tokens, accept_length = GDNVerifyWorker(target).verify(verified_id, draft_tokens, parent_list, seq_lens, state=state)
        assert accept_length.tolist() == [3, 1]
        assert accepted_tokens[0].tolist() == greedy[0].tolist()
        assert accepted_tokens[1, 0] == greedy[1][0] and bool((accepted_tokens[1, 1:] == -1).all())


class TestGDNSpeculativeWorker:
    def test_generate_step(self, target, draft):
        worker = GDNSpeculativeWorker(draft, target, topk=4, num_steps=2)
        input_ids = torch.randint(0, VOCAB, (2, 10))
        verified_id = torch.tensor([3, 4])
        accepted_tokens, accept_length = worker.generate_step(input_ids, verified_id, torch.tensor([10, 10]))
        assert accept_length.shape == (2,) and bool(((accept_length >= 1) & (accept_length <= 3)).all())
        for b in range(2):
            n = int(accept_length[b])
            ref = generate_autoregressive(target, torch.cat([input_ids[b], verified_id[b:b + 1]])[None], n)[0, -n:]
            assert accepted_tokens[b, :n].tolist() == ref.tolist()
        stats = worker.get_statistics()
        assert stats["total_steps"] == 1 and stats["total_row_steps"] == 2

    def test_multi_step_generation(self, target, draft):
        worker = GDNSpeculativeWorker(draft, target, topk=4, num_steps=2)
        input_ids = torch.randint(0, VOCAB, (1, 10))
        out = worker.generate(input_ids, max_new_tokens=20)
        assert torch.equal(out, generate_autoregressive(target, input_ids, 20))
        stats = worker.get_statistics()
        for key in ("total_steps", "total_accepted_tokens", "total_draft_tokens", "mean_acceptance_rate", "speedup_ratio",
                    "mean_accept_length", "accept_length_histogram"):
            assert key in stats
        assert stats["total_emitted_tokens"] == 19 and stats["speedup_ratio"] == stats["mean_accept_length"] >= 1
        worker.reset_statistics()
        assert worker.get_statistics()["total_steps"] == 0
