"""Sampling in the static (CUDA-graph) steps, run eagerly on the CPU (use_graph=False is the same code path).

Per-row settings in (B,) buffers (temperature 0 = greedy row, exactly the greedy output), per-row counter-based
uniforms drawn inside the step (same seed -> same tokens; a sequence's tokens do not depend on its neighbours), the
tensor form of logits_to_probs against the scalar one, and plain static sampling against the exact target law.
"""
from __future__ import annotations

import math

import pytest
import torch

from gdnspec import ModelDrafter, NGramDrafter, SpeculativeEngine, TreeConfig, generate_autoregressive
from gdnspec.sampling import (counter_uniforms, logits_to_probs, row_seeds, sample_from_probs)

from spec_helpers import noisy_copy, prompts_of, tiny_model
from test_spec_sampling import SETTINGS6, V6, chi_square_pvalue, exact_joint_batched


@pytest.fixture(scope="module")
def models():
    target = tiny_model(seed=7, hybrid=True, init_scale=3.0)
    return target, noisy_copy(target, noise=0.3, seed=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_row_settings_equal_the_scalar_form(dtype):
    """logits_to_probs with (B,) tensors == the scalar form row by row (float64 reference); temperature 0 rows give
    the one-hot of the argmax; top_k >= vocab and top_p = 1 switch the filters off."""
    g = torch.Generator().manual_seed(0)
    B, N, V = 6, 3, 11
    logits = (3 * torch.randn(B, N, V, generator=g, dtype=torch.float64)).to(dtype)
    temps = [0.7, 1.0, 0.0, 1.3, 0.5, 2.0]
    ks = [3, V, 5, 1, 20, None]
    ps = [0.9, 0.5, 1.0, 0.8, None, 0.3]
    got = logits_to_probs(logits, temperature=torch.tensor(temps, dtype=torch.float64),
                          top_k=torch.tensor([V if k is None else k for k in ks]),
                          top_p=torch.tensor([1.0 if p is None else p for p in ps], dtype=torch.float64))
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for b in range(B):
        if temps[b] == 0:
            want = torch.nn.functional.one_hot(logits[b].argmax(-1), V).double()
        else:
            want = logits_to_probs(logits[b].double(), temperature=temps[b], top_k=ks[b], top_p=ps[b])
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got[b].double(), want, atol=tol, rtol=tol)
    # only temperature per row: no sort, same result
    got_t = logits_to_probs(logits, temperature=torch.tensor(temps, dtype=torch.float64))
    torch.testing.assert_close(got_t[1].double(), logits_to_probs(logits[1].double(), temperature=1.0),
                               atol=1e-5, rtol=1e-5)


def test_counter_uniforms_are_a_pure_function_of_seed_counter_slot():
    seeds, counters = torch.tensor([1, 2, 1 << 40, 1]), torch.tensor([0, 0, 0, 1])
    u = counter_uniforms(seeds, counters, slot=1, n=4096)
    assert u.dtype == torch.float64 and bool((u >= 0).all()) and bool((u < 1).all())
    assert torch.equal(u, counter_uniforms(seeds, counters, slot=1, n=4096))
    assert torch.equal(u[:2], counter_uniforms(seeds[:2], counters[:2], slot=1, n=4096))  # rows are independent
    assert not torch.equal(u[0], u[3]) and not torch.equal(u[0], counter_uniforms(seeds, counters, slot=2, n=4096)[0])
    # a crude check of uniformity and independence of neighbouring draws
    flat = counter_uniforms(torch.arange(64), torch.zeros(64, dtype=torch.long), slot=0, n=4096).flatten()
    assert abs(float(flat.mean()) - 0.5) < 0.005 and abs(float(flat.var()) - 1 / 12) < 0.002
    assert abs(float(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1])) < 0.01
    assert row_seeds(3, [0, 1]).tolist() == row_seeds(3, [0, 1]).tolist() != row_seeds(4, [0, 1]).tolist()


def test_inverse_cdf_sampling_follows_the_weights():
    w = torch.tensor([0.0, 2.0, 0.0, 1.0, 1.0, 0.0])
    u = counter_uniforms(torch.tensor([5]), torch.tensor([0]), slot=0, n=40000)[0]
    tok = sample_from_probs(w.expand(40000, -1), u)
    counts = dict(enumerate(torch.bincount(tok, minlength=6).tolist()))
    assert chi_square_pvalue(counts, dict(enumerate((w / w.sum()).tolist())), 40000) > 1e-4
    assert sample_from_probs(w[None], torch.tensor([1 - 2 ** -53], dtype=torch.float64)).item() == 4  # never a 0


# ---------------------------------------------------------------------------------------------- plain decoding
def test_a_generator_on_another_device_samples_by_inverse_cdf():
    """sample_next with a generator on another device than the logits (a CPU torch.Generator() with a CUDA model:
    torch.multinomial refuses it) draws one uniform per row from that generator and samples by inverse CDF:
    sample_with_generator follows the processed distribution (chi-square; here on one device, the code path is the
    same), is reproducible from the generator's seed, and matches sample_from_probs of the same uniforms."""
    from gdnspec.sampling import sample_with_generator

    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0, -3.0, 1.0]])
    probs = logits_to_probs(logits, temperature=0.7, top_k=None, top_p=0.9)
    g = torch.Generator().manual_seed(11)
    n = 20000
    toks = sample_with_generator(probs.expand(n, -1), g)
    counts = torch.bincount(toks, minlength=probs.shape[-1]).tolist()
    assert counts[4] == 0  # cut by top_p: never drawn
    assert chi_square_pvalue(dict(enumerate(counts)), dict(enumerate(probs[0].tolist())), n) > 1e-4
    a = sample_with_generator(probs.expand(50, -1), torch.Generator().manual_seed(5))
    u = torch.rand(50, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(a, sample_from_probs(probs.expand(50, -1), u))


def test_sample_next_routes_a_generator_on_another_device(monkeypatch):
    """sample_next takes sample_with_generator exactly when the generator's device type differs from the logits'
    (stands in for a CPU generator with CUDA logits on this CPU-only machine), torch.multinomial otherwise."""
    import types

    from gdnspec import sampling

    calls = []
    monkeypatch.setattr(sampling, "sample_with_generator",
                        lambda probs, gen: calls.append(gen) or torch.zeros(probs.shape[0], dtype=torch.long))
    logits = torch.randn(3, 6)
    other = types.SimpleNamespace(device=torch.device("cuda"))
    assert sampling.sample_next(logits, temperature=0.7, generator=other).tolist() == [0, 0, 0]
    assert calls == [other]
    sampling.sample_next(logits, temperature=0.7, generator=torch.Generator().manual_seed(1))
    sampling.sample_next(logits, temperature=0.7)
    assert calls == [other]  # same device / no generator: torch.multinomial


@pytest.mark.parametrize("sampling", SETTINGS6, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_static_plain_sampling_matches_target_distribution(sampling):
    target = tiny_model(seed=5, vocab_size=V6, init_scale=4.0)
    prompt = torch.tensor([1, 3, 0, 2, 5])
    law = exact_joint_batched(target, prompt, 3, **sampling)
    n = 4000
    out = generate_autoregressive(target, prompt.expand(n, -1).clone(), 3, static=True, seed=123, **sampling)
    counts = {}
    for row in out[:, len(prompt):].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert chi_square_pvalue(counts, law, n) > 1e-4


def test_static_plain_sampling_is_seeded_and_per_sequence(models):
    target, _ = models
    prompts = prompts_of([4, 9, 6], target.vocab_size, seed=3)
    kw = dict(temperature=0.9, top_p=0.95, static=True)
    a = generate_autoregressive(target, prompts, 12, seed=11, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, generate_autoregressive(target, prompts, 12, seed=11, **kw)))
    assert not all(torch.equal(x, y) for x, y in zip(a, generate_autoregressive(target, prompts, 12, seed=12, **kw)))
    # sequence 0's tokens depend on (seed, its index, its prompt) only: not on the other rows of the batch
    alone = generate_autoregressive(target, prompts[:1], 12, seed=11, **kw)
    assert torch.equal(alone[0], a[0])
    # the same with stop ids, rows finishing early and moving to a smaller bucket
    free = a[1]
    eos = int(free[9 + 2])
    b = generate_autoregressive(target, prompts, 12, seed=11, eos_token_id=eos, **kw)
    for x, y in zip(a, b):
        stop = (x[-12:] == eos).nonzero()
        cut = x.numel() - 12 + (int(stop[0]) + 1 if len(stop) else 12)
        assert torch.equal(y, x[:cut])


def test_static_decoder_rows_mix_greedy_and_sampling(models):
    """temperature 0 rows of a sampling decoder are exactly the greedy decoding; settings change without rebuild."""
    from gdnspec.runtime import StaticDecoder

    target, _ = models
    prompt = torch.randint(0, target.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1))
    greedy = generate_autoregressive(target, prompt, 8, static=False)
    dec = StaticDecoder(target, batch_size=4, max_len=32, sampling=True, filtered=True, use_graph=False)
    for temps in ([0.0, 1.0, 0.0], [0.0, 0.0, 0.0]):
        out = target(prompt, logits_to_keep=1)
        dec.load(out.state)
        dec.set_sampling(temperature=temps, top_k=[None, 4, None], top_p=None, seeds=[1, 2, 3])
        tok = out.logits[:, -1].argmax(-1)  # the greedy first token (row 1 may differ from here on)
        toks = [tok]
        for _ in range(7):
            tok = dec.sample_step(torch.nn.functional.pad(tok, (0, 1)))[:3].clone()
            toks.append(tok)
        rows = torch.stack(toks, 1)
        for r in range(3):
            if temps[r] == 0:
                assert torch.equal(rows[r], greedy[r, 5:])
    assert dec.counters[:3].tolist() == [7, 7, 7]


# ---------------------------------------------------------------------------------------------- speculative
def _spec(target, draft, prompts, *, seed, sample_drafts=True, drafter="model", **sampling):
    d = ModelDrafter(draft) if drafter == "model" else NGramDrafter(max_ngram=2)
    cfg = TreeConfig(topk=3, num_steps=3, num_draft_tokens=8, sample_drafts=sample_drafts and drafter == "model")
    return SpeculativeEngine(target, d, cfg, static=True, seed=seed, **sampling).generate(prompts, 14)


@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_static_speculative_sampling_is_seeded(models, drafter):
    target, draft = models
    prompts = prompts_of([4, 9, 6], target.vocab_size, seed=5)
    kw = dict(temperature=0.8, top_k=10, drafter=drafter)
    a = _spec(target, draft, prompts, seed=21, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, _spec(target, draft, prompts, seed=21, **kw)))
    assert not all(torch.equal(x, y) for x, y in zip(a, _spec(target, draft, prompts, seed=22, **kw)))


def test_static_speculative_greedy_rows_are_greedy(models):
    """A sampling runner with per-row settings: temperature-0 rows follow the greedy output token for token (their
    trees are deterministic, their acceptance accept_greedy), the sampling rows sample (stochastic trees)."""
    from gdnspec.runtime import StaticSpecRunner

    target, draft = models
    prompts = torch.randint(0, target.vocab_size, (3, 6), generator=torch.Generator().manual_seed(4))
    greedy = generate_autoregressive(target, prompts, 16, static=False)
    drafter = ModelDrafter(draft)
    cfg = TreeConfig(topk=3, num_steps=3, num_draft_tokens=8, sample_drafts=True)
    run = StaticSpecRunner(target, drafter, cfg, batch_size=4, max_len=64, sampling=True, filtered=True, use_graph=False)
    out = target(prompts, logits_to_keep=1)
    first = out.logits[:, -1].argmax(-1)
    run.load(out.state, drafter.begin(list(prompts)), first)
    run.set_sampling(temperature=[0.0, 1.0, 0.0], top_p=[None, 0.9, None], seeds=[5, 6, 7])
    emitted = [[int(t)] for t in first]
    for _ in range(8):
        run.step()
        W = run.path_width
        pk = run.packed[:3]
        for r in range(3):
            c = int(pk[r, W])
            emitted[r] += pk[r, 1:c].tolist() + [int(pk[r, W + 1])]
    for r in (0, 2):
        assert emitted[r][:16] == greedy[r, 6:].tolist()
    assert emitted[1][:16] != greedy[1, 6:].tolist()


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, err, name", [
    (dict(seeds=[1.5]), TypeError, r"seeds\[0\]"), (dict(seeds=[-1]), ValueError, r"seeds\[0\]"),
    (dict(seeds=[1], temperature=-0.1), ValueError, "temperature"), (dict(seeds=[1], top_p=0.0), ValueError, "top_p"),
    (dict(seeds=[1], top_p=1.5), ValueError, "top_p"), (dict(seeds=[1], top_k=0), ValueError, "top_k"),
    (dict(seeds=[1, 2], temperature=[1.0]), ValueError, "temperature"),
])
def test_static_set_sampling_bad_input(models, kw, err, name):
    from gdnspec.runtime import StaticDecoder, StaticSpecRunner

    target, draft = models
    kw = dict(dict(temperature=1.0), **kw)
    dec = StaticDecoder(target, batch_size=2, max_len=16, sampling=True, filtered=True, use_graph=False)
    run = StaticSpecRunner(target, ModelDrafter(draft), TreeConfig(topk=2, num_steps=2), batch_size=2, max_len=16,
                           sampling=True, filtered=True, use_graph=False)
    for step in (dec, run):
        with pytest.raises(err, match=name):
            step.set_sampling(**kw)


def test_unfiltered_or_greedy_static_steps_refuse_what_they_cannot_do(models):
    from gdnspec.runtime import StaticDecoder

    target, _ = models
    with pytest.raises(ValueError, match="filtered=False"):
        StaticDecoder(target, batch_size=2, max_len=16, sampling=True, use_graph=False).set_sampling(
            temperature=1.0, top_k=3, seeds=[1])
    with pytest.raises(ValueError, match="sampling=False"):
        StaticDecoder(target, batch_size=2, max_len=16, use_graph=False).set_sampling(temperature=1.0, seeds=[1])


@pytest.mark.parametrize("seed, err", [(1.5, TypeError), ("7", TypeError), (True, TypeError), (-3, ValueError),
                                       (1 << 63, ValueError)])
def test_seed_that_is_not_an_int(models, seed, err):
    target, draft = models
    prompt = torch.tensor([[1, 2, 3]])
    for static in (False, True):
        with pytest.raises(err, match="seed"):
            generate_autoregressive(target, prompt, 2, temperature=1.0, seed=seed, static=static)
        with pytest.raises(err, match="seed"):
            SpeculativeEngine(target, ModelDrafter(draft), TreeConfig(), temperature=1.0, seed=seed, static=static)
    with pytest.raises(ValueError, match="seed or generator"):
        generate_autoregressive(target, prompt, 2, temperature=1.0, seed=1, generator=torch.Generator())


def test_sample_drafts_needs_a_sampling_drafter(models):
    target, _ = models
    with pytest.raises(ValueError, match="sample_drafts"):
        SpeculativeEngine(target, NGramDrafter(), TreeConfig(sample_drafts=True), temperature=1.0)
    with pytest.raises(ValueError, match="sample_drafts"):
        TreeConfig(sample_drafts=1)
