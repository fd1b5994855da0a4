"""Per-sequence sampling settings in one SpecSession (spec/rows.py) and plain steps (step(speculate=False),
NullDrafter): greedy rows stay identical to generate_autoregressive whatever their neighbours sample, a seeded row gets
the tokens it gets alone, and plain and speculative steps mix freely."""
from __future__ import annotations

import pytest
import torch

from gdnspec import NGramDrafter, generate_autoregressive
from gdnspec.spec import ModelDrafter, SpeculativeEngine, TreeConfig
from gdnspec.spec.drafters import NullDrafter

from spec_helpers import noisy_copy, prompts_of, tiny_model

CONFIG = TreeConfig(topk=3, num_steps=3, num_draft_tokens=8)


@pytest.fixture(scope="module")
def models():
    target = tiny_model(seed=3, hybrid=True, init_scale=8.0, ratio=2)
    return target, noisy_copy(target, noise=0.05)


def run(session, steps=None):
    i = 0
    while session.active:
        session.step(speculate=steps(i) if steps else True)
        i += 1


def alone(engine, prompt, n, **kw):
    s = engine.session()
    (sid,) = s.add([prompt], max_new_tokens=n, **kw)
    run(s)
    return s.sequences[sid].new_tokens


@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_mixed_settings_each_row_gets_its_own_result(models, drafter):
    target, draft = models
    engine = SpeculativeEngine(target, ModelDrafter(draft) if drafter == "model" else NGramDrafter(), CONFIG)
    prompts = prompts_of([3, 7, 5, 9, 4], target.vocab_size, seed=1)
    settings = [{}, {"temperature": 0.8, "seed": 11}, {"temperature": 0.0}, {"temperature": 1.2, "top_k": 5, "seed": 3},
                {"temperature": 0.7, "top_p": 0.8, "seed": 5}]
    greedy_ref = generate_autoregressive(target, prompts, 20)
    refs = [alone(engine, p, 20, **kw) for p, kw in zip(prompts, settings)]
    session = engine.session()
    ids = [session.add([p], max_new_tokens=20, **kw)[0] for p, kw in zip(prompts[:3], settings[:3])]
    session.step()
    ids += [session.add([p], max_new_tokens=20, **kw)[0] for p, kw in zip(prompts[3:], settings[3:])]  # join later
    run(session)
    for i, (sid, ref, kw) in enumerate(zip(ids, refs, settings)):
        got = session.sequences[sid].new_tokens
        assert got == ref, i
        if not kw.get("temperature"):
            assert got == greedy_ref[i][prompts[i].numel():].tolist(), i


def test_list_settings_and_validation(models):
    target, draft = models
    engine = SpeculativeEngine(target, ModelDrafter(draft), CONFIG)
    prompts = prompts_of([4, 6], target.vocab_size, seed=2)
    session = engine.session()
    ids = session.add(prompts, max_new_tokens=12, temperature=[0.0, 0.9], seed=[None, 4])
    run(session)
    assert session.sequences[ids[1]].new_tokens == alone(engine, prompts[1], 12, temperature=0.9, seed=4)
    for bad, needle in [({"temperature": -1.0}, "temperature"), ({"top_k": 0, "temperature": 1.0}, "top_k"),
                        ({"top_p": 1.5}, "top_p"), ({"seed": 1.5}, "seed"), ({"temperature": [0.0]}, "temperature")]:
        with pytest.raises(ValueError, match=needle):
            session.add(prompts, max_new_tokens=4, **bad)
    assert not session.active


@pytest.mark.parametrize("drafter", ["model", "null"])
def test_plain_steps_match_generate_autoregressive(models, drafter):
    target, draft = models
    engine = SpeculativeEngine(target, ModelDrafter(draft) if drafter == "model" else NullDrafter(), CONFIG)
    prompts = prompts_of([5, 8, 3], target.vocab_size, seed=4)
    ref = generate_autoregressive(target, prompts, 18, eos_token_id=7)
    session = engine.session()
    ids = session.add(prompts, max_new_tokens=18, eos_token_id=7)
    run(session, steps=lambda i: i % 3 == 1)  # plain, speculative, plain, plain, speculative...
    for sid, p, r in zip(ids, prompts, ref):
        assert session.sequence(sid).tolist() == r.tolist()
    seq = session.sequences[ids[0]]
    assert seq.plain_steps > 0 and (seq.verify_steps > 0) == (drafter == "model")
    summary = seq.spec_summary()
    assert summary["plain_steps"] == seq.plain_steps and summary["accepted_tokens"] <= summary["draft_tokens"]


def test_static_steps_refuse_sequences_that_sample(models):
    target, draft = models
    engine = SpeculativeEngine(target, ModelDrafter(draft), CONFIG, static=False)
    session = engine.session()
    session.add(prompts_of([4], target.vocab_size), max_new_tokens=6, temperature=0.9, seed=1)
    with pytest.raises(ValueError, match="settings of their own"):
        session.run_static(max_len=256)


@pytest.mark.parametrize("kind", ["model", "eagle"])
def test_drafter_state_after_plain_steps_equals_a_fresh_prefill(models, kind):
    """After mixed plain and speculative steps the drafter's state is the one a prefill of the committed tokens
    gives: its next tree is the same (plain steps catch the drafter up on each token, with the target's features)."""
    from gdnspec.models.eagle import EagleHead, eagle_config_for
    from gdnspec.spec.drafters import EagleDrafter

    target, draft = models
    if kind == "eagle":
        torch.manual_seed(5)
        head = EagleHead(eagle_config_for(target.config, intermediate_size=32), dtype=torch.float64).eval()
        drafter = EagleDrafter(head, target)
    else:
        drafter = ModelDrafter(draft)
    engine = SpeculativeEngine(target, drafter, CONFIG)
    (prompt,) = prompts_of([6], target.vocab_size, seed=9)
    a = engine.session()
    (sid,) = a.add([prompt], max_new_tokens=100)
    for i in range(7):
        a.step(speculate=i % 3 != 0)
    committed = a.sequence(sid)[:-1]  # the last emitted token is the next root, not consumed yet
    b = engine.session()
    b.add([committed], max_new_tokens=100)
    assert torch.equal(a.verified, b.verified)
    with torch.inference_mode():
        ta = drafter.propose(a.draft_state, a.verified, CONFIG)
        tb = drafter.propose(b.draft_state, b.verified, CONFIG)
    assert torch.equal(ta.tokens, tb.tokens) and torch.equal(ta.parents, tb.parents)
    torch.testing.assert_close(ta.scores, tb.scores)
