"""Lossless greedy speculative decoding: GDNSpeculativeWorker.generate == generate_autoregressive token for token
(float64), over tree shapes, drafters, GDN-only and hybrid targets, batches of different prompt lengths, and eos."""
from __future__ import annotations

import pytest
import torch

from gdnspec import GDNSpeculativeWorker, NGramDrafter, generate_autoregressive
from gdnspec.spec import SpeculativeEngine, TreeConfig

from spec_helpers import noisy_copy, prompts_of, tiny_model

# (topk, num_steps, num_draft_tokens, builder)
GRID = [
    (1, 1, None, "eagle2"), (1, 6, None, "eagle2"), (2, 3, 6, "eagle2"), (4, 2, None, "eagle2"),
    (8, 1, None, "eagle2"), (3, 4, 13, "eagle2"), (8, 6, 64, "eagle2"), (5, 5, 40, "eagle2"),
    (4, 2, None, "seed"), (6, 3, None, "seed"), (1, 5, None, "chain"), (7, 2, 30, "eagle2"),
]


@pytest.fixture(scope="module")
def models():
    out = {}
    for hybrid in (False, True):
        target = tiny_model(seed=3, hybrid=hybrid, init_scale=8.0, ratio=2 if hybrid else 1)
        out[hybrid] = (target, noisy_copy(target, noise=0.05))
    return out


@pytest.mark.parametrize("topk,num_steps,num_draft_tokens,builder", GRID)
@pytest.mark.parametrize("hybrid", [False, True])
def test_model_drafter_lossless(models, topk, num_steps, num_draft_tokens, builder, hybrid):
    target, draft = models[hybrid]
    batch = 1 + (topk + num_steps) % 4  # 1..4 rows
    prompts = prompts_of([3 + 4 * i for i in range(batch)], target.vocab_size, seed=topk * 10 + num_steps)
    ref = generate_autoregressive(target, prompts, 24)
    worker = GDNSpeculativeWorker(draft_model=draft, target_model=target, topk=topk, num_steps=num_steps,
                                  num_draft_tokens=num_draft_tokens, builder=builder)
    out = worker.generate(prompts, 24)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    stats = worker.get_statistics()
    assert stats["total_emitted_tokens"] == batch * 23  # the first token comes from the prefill
    assert stats["total_accepted_tokens"] > 0  # the near-copy draft is accepted sometimes: the accept path ran


@pytest.mark.parametrize("hybrid", [False, True])
def test_eos_and_tensor_input(models, hybrid):
    target, draft = models[hybrid]
    prompts = torch.stack(prompts_of([6, 6, 6], target.vocab_size, seed=5))
    free = generate_autoregressive(target, prompts, 20)
    eos = int(free[1, 6 + 4])  # a token that row 1 emits at step 5
    ref = generate_autoregressive(target, prompts, 20, eos_token_id=eos)
    worker = GDNSpeculativeWorker(draft_model=draft, target_model=target, topk=3, num_steps=4, num_draft_tokens=12)
    out = worker.generate(prompts, 20, eos_token_id=eos)
    assert torch.equal(out, ref)
    assert int(out[1, 6 + 4]) == eos and bool((out[1, 6 + 5:] == eos).all())  # padded with eos after stopping


@pytest.mark.parametrize("max_ngram,topk,num_steps", [(3, 4, 4), (1, 2, 6), (4, 1, 3)])
def test_ngram_drafter_lossless(models, max_ngram, topk, num_steps):
    target, _ = models[True]
    base = prompts_of([5], target.vocab_size, seed=7)[0]
    prompts = [base.repeat(4), torch.cat([base, base[:3]]), prompts_of([9], target.vocab_size, seed=8)[0]]
    ref = generate_autoregressive(target, prompts, 30)
    worker = GDNSpeculativeWorker(target_model=target, drafter=NGramDrafter(max_ngram=max_ngram), topk=topk,
                                  num_steps=num_steps, num_draft_tokens=min(16, 1 + topk * num_steps))
    out = worker.generate(prompts, 30)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


def test_draft_equals_target_accepts_best_path(models):
    target, _ = models[True]
    prompts = prompts_of([7, 4], target.vocab_size, seed=11)
    for builder, topk, steps in (("chain", 1, 5), ("seed", 3, 4)):
        eng = SpeculativeEngine(target, __import__("gdnspec").ModelDrafter(target), TreeConfig(topk=topk, num_steps=steps, builder=builder))
        out = eng.generate(prompts, 1 + 4 * (steps + 1))  # an exact number of full steps
        ref = generate_autoregressive(target, prompts, 1 + 4 * (steps + 1))
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
        hist = eng.stats.as_dict()["accept_length_histogram"]
        assert hist == {steps + 1: 8}, hist  # every step accepted the whole top-1 path plus its bonus


def test_session_add_and_drop_between_steps(models):
    target, draft = models[False]
    eng = SpeculativeEngine(target, __import__("gdnspec").ModelDrafter(draft), TreeConfig(topk=2, num_steps=3))
    session = eng.session()
    p = prompts_of([5, 8, 3], target.vocab_size, seed=21)
    a = session.add(p[:2], max_new_tokens=15)
    session.step()
    session.step()
    b = session.add(p[2:], max_new_tokens=15)
    session.step()
    session.drop([a[0]])
    while session.active:
        session.step()
    ref = generate_autoregressive(target, p, 15)
    assert torch.equal(session.sequence(a[1]), ref[1])
    assert torch.equal(session.sequence(b[0]), ref[2])
    dropped = session.sequence(a[0])
    assert torch.equal(dropped, ref[0][: dropped.numel()])  # a prefix of its greedy output
