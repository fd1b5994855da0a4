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


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("drafter_kind", ["model", "ngram"])
def test_static_runner_matches_plain_greedy(models, hybrid, drafter_kind):
    """The sync-free static step (what CUDA graphs replay on the GPU), run eagerly on the CPU, is lossless too,
    including rows finishing at different times (eos) and the move to a smaller batch bucket."""
    from gdnspec import ModelDrafter

    target, draft = models[hybrid]
    prompts = prompts_of([4, 9, 6], target.vocab_size, seed=31)
    free = generate_autoregressive(target, prompts, 18)
    eos = int(free[0][4 + 3])
    ref = generate_autoregressive(target, prompts, 18, eos_token_id=eos)
    drafter = ModelDrafter(draft) if drafter_kind == "model" else NGramDrafter(max_ngram=2)
    eng = SpeculativeEngine(target, drafter, TreeConfig(topk=3, num_steps=3, num_draft_tokens=9), static=True)
    out = eng.generate(prompts, 18, eos_token_id=eos)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    assert len(eng._runners) >= 2  # started in a bucket of 4, moved to a smaller one when row 0 stopped


@pytest.mark.parametrize("hybrid", [False, True])
def test_static_plain_decoding_matches_eager(models, hybrid):
    target, _ = models[hybrid]
    prompts = prompts_of([4, 9, 6], target.vocab_size, seed=41)
    free = generate_autoregressive(target, prompts, 14, static=False)
    eos = int(free[2][6 + 5])
    for eos_id in (None, eos):
        ref = generate_autoregressive(target, prompts, 14, eos_token_id=eos_id, static=False)
        out = generate_autoregressive(target, prompts, 14, eos_token_id=eos_id, static=True)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))


@pytest.mark.parametrize("error_rate", [0.0, 0.3])
def test_oracle_drafter(models, error_rate):
    from gdnspec.spec.drafters import OracleDrafter

    target, _ = models[True]
    prompts = prompts_of([5, 8], target.vocab_size, seed=51)
    ref = generate_autoregressive(target, prompts, 20)
    eng = SpeculativeEngine(target, OracleDrafter(ref, error_rate=error_rate, vocab_size=target.vocab_size),
                            TreeConfig(builder="chain", num_steps=4))
    out = eng.generate(prompts, 20)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    mean = eng.stats.as_dict()["mean_accept_length"]
    if error_rate == 0:
        assert mean > 4.0  # every step accepts the whole chain (the last step may be cut by the budget)
    else:
        assert 1.0 < mean < 4.5


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_eagle_drafter_lossless(models, hybrid, static):
    from gdnspec.models.eagle import EagleHead, eagle_config_for
    from gdnspec.spec.drafters import EagleDrafter

    target, _ = models[hybrid]
    torch.manual_seed(5)
    head = EagleHead(eagle_config_for(target.config, intermediate_size=32), dtype=torch.float64).eval()
    prompts = prompts_of([6, 3, 9], target.vocab_size, seed=61)
    ref = generate_autoregressive(target, prompts, 16)
    eng = SpeculativeEngine(target, EagleDrafter(head, target), TreeConfig(topk=3, num_steps=3, num_draft_tokens=10),
                            static=static)
    out = eng.generate(prompts, 16)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_eagle_drafter_state_follows_target_features(models):
    """After prefill + steps, the head state equals running the head over all (feature, next token) pairs at once."""
    from gdnspec.models.eagle import EagleHead, eagle_config_for
    from gdnspec.spec.drafters import EagleDrafter

    target, draft = models[False]
    torch.manual_seed(6)
    head = EagleHead(eagle_config_for(target.config, intermediate_size=32), dtype=torch.float64).eval()
    drafter = EagleDrafter(head, target)
    prompt = prompts_of([7], target.vocab_size, seed=71)[0]
    eng = SpeculativeEngine(target, drafter, TreeConfig(topk=2, num_steps=3))
    session = eng.session()
    (sid,) = session.add([prompt], max_new_tokens=40)
    for _ in range(4):
        session.step()
    seq = session.sequence(sid)
    committed = seq[:-1]  # the last token (the next root) is not consumed yet
    feats = target(committed[None]).hidden_states  # (1, T, H)
    ref_state = head.new_state(1)
    head(feats[:, :-1], target.embed_tokens(committed[None, 1:]), ref_state)
    got = session.draft_state
    torch.testing.assert_close(got.head_state.layers[0].recurrent, ref_state.layers[0].recurrent, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got.head_state.layers[0].conv, ref_state.layers[0].conv, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got.last_feature, feats[:, -1], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("static", [False, True])
def test_per_sequence_budgets_and_eos(models, static):
    from gdnspec import ModelDrafter

    target, draft = models[True]
    prompts = prompts_of([5, 7, 4], target.vocab_size, seed=81)
    free = generate_autoregressive(target, prompts, 20)
    eos = [None, int(free[1][7 + 3]), None]
    budgets = [6, 20, 0]
    eng = SpeculativeEngine(target, ModelDrafter(draft), TreeConfig(topk=2, num_steps=3), static=static)
    out = eng.generate(prompts, budgets, eos_token_id=eos)
    for p, o, m, e in zip(prompts, out, budgets, eos):
        assert torch.equal(o, generate_autoregressive(target, [p], m, eos_token_id=e)[0])


def test_ngram_session_staggered_rows_keep_their_index(models):
    """The n-gram drafter in a session whose rows join, finish (eos, budgets) and are dropped at different times,
    with plain steps (a pending drafter catch-up) mixed in: output equals plain greedy decoding, and every row's
    n-gram index (moved along by select / cat, extended by advance) equals a fresh build from its history."""
    from gdnspec.spec.drafters.ngram import _add_ngrams

    target, _ = models[True]
    base = prompts_of([5], target.vocab_size, seed=7)[0]
    prompts = [base.repeat(4), torch.cat([base, base[:3]]), prompts_of([9], target.vocab_size, seed=8)[0],
               base.repeat(2), prompts_of([3], target.vocab_size, seed=9)[0]]
    free = generate_autoregressive(target, prompts, 30)
    eos = [None, int(free[1][8 + 6]), None, int(free[3][10 + 12]), None]
    budgets = [30, 30, 7, 30, 20]
    eng = SpeculativeEngine(target, NGramDrafter(max_ngram=4, min_ngram=2, max_matches=2), TreeConfig(topk=2, num_steps=3))
    s = eng.session()
    ids = s.add(prompts[:2], max_new_tokens=budgets[:2], eos_token_id=eos[:2])
    s.step()
    s.step(speculate=False)
    s.step()
    ids += s.add(prompts[2:4], max_new_tokens=budgets[2:4], eos_token_id=eos[2:4])
    s.step(speculate=False)
    ids += s.add(prompts[4:], max_new_tokens=budgets[4:])
    k = 0
    while s.active:
        s.step(speculate=k % 3 != 1)
        k += 1
        state = s._draft_state
        if state is not None and not s._pending_tokens:
            assert all(i is not None for i in state.index)  # carried across changes of rows, not dropped
            for h, idx in zip(state.history, state.index):
                if idx is not None:
                    fresh = {n: {} for n in idx}
                    _add_ngrams(fresh, h, 0)
                    assert idx == fresh
    for sid, p, m, e in zip(ids, prompts, budgets, eos):
        assert torch.equal(s.sequence(sid), generate_autoregressive(target, [p], m, eos_token_id=e)[0]), sid
