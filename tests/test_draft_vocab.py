"""Reduced draft vocabulary of the EAGLE head (issue 10, item 1; the EAGLE-3 idea): models/eagle.py.

The head drafts over draft_ids only (logits from those rows of the target's lm_head); the drafter scatters its
log-probabilities back onto the target's ids (-inf elsewhere), so the tree, stochastic drafts and the acceptance rule
see a draft law q that is zero outside draft_ids. Checked here: logits equal the full logits' draft_ids columns on
every path (module, CPU fast path), the scatter, greedy speculative output == plain decoding (float64, eager and
static), sampled output distributed as the target law (chi-square; a mutant that forgets the scatter must fail),
save / load, the most-frequent-token choice, and the errors.

    python -m pytest -q tests/test_draft_vocab.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gdnspec import generate_autoregressive
from gdnspec.models.eagle import EagleHead, eagle_config_for
from gdnspec.spec import SpeculativeEngine, TreeConfig
from gdnspec.spec.tree import DraftLogits
from gdnspec.spec.drafters import EagleDrafter

from conftest import randomize_
from spec_helpers import prompts_of, tiny_model
from test_spec_sampling import N6, V6, chi_square_pvalue, exact_joint_batched


def _head(target, dtype=torch.float64, seed=5):
    torch.manual_seed(seed)
    return EagleHead(eagle_config_for(target.config, intermediate_size=32), dtype=dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@torch.inference_mode()
def test_reduced_logits_are_the_full_logits_columns_on_every_path(dtype):
    target = tiny_model(seed=3, hybrid=True).to(dtype)
    head = randomize_(EagleHead(eagle_config_for(target.config)), seed=3).to(dtype).eval()
    V = target.vocab_size
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(1))[: V // 3]
    g = torch.Generator().manual_seed(2)
    B, H = 3, target.config.hidden_size
    f, e = torch.randn(B, 1, H, generator=g).to(dtype), torch.randn(B, 1, H, generator=g).to(dtype)
    for fused in (False, True):  # module path / CPU fast path
        target.fused_steps = fused
        head.set_draft_vocab(None)
        st = head.new_state(B)
        out_full, full = head.decode_step(f, e, st.clone(), target=target)
        head.set_draft_vocab(ids)
        out, red = head.decode_step(f, e, st, target=target)
        assert red.shape == (B, ids.numel()) and full.shape == (B, V)
        assert torch.equal(out, out_full)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert (red - full[:, ids]).abs().max() <= tol * full.abs().max()
        drafted = DraftLogits(red[:, None], V, head.draft_ids)  # what the drafter hands the tree builder
        lp = drafted.logprobs()[:, 0]  # float32, on the target's ids
        assert lp.shape == (B, V) and torch.isinf(lp).sum() == B * (V - ids.numel())
        assert torch.allclose(lp[:, ids], torch.log_softmax(full[:, ids].float(), -1), atol=1e-5)
        top_lp, top_tok = drafted.topk(4)  # ranked over the Vd columns, mapped to the target's ids
        ref_lp, ref_tok = lp.topk(4, dim=-1)
        assert torch.equal(top_tok[:, 0], ref_tok) and torch.allclose(top_lp[:, 0], ref_lp, atol=1e-6)


@pytest.mark.parametrize("static", [False, True])
def test_greedy_output_equals_plain_decoding_with_a_reduced_vocabulary(static):
    target = tiny_model(seed=2, hybrid=True, init_scale=4.0).to(torch.float64)
    prompts = prompts_of([6, 3, 9], target.vocab_size, seed=61)
    ref = generate_autoregressive(target, prompts, 16)
    head = _head(target)
    # half the vocabulary, chosen so that the target's greedy tokens are sometimes outside it (then the draft misses)
    ids = torch.arange(0, target.vocab_size, 2)
    head.set_draft_vocab(ids)
    eng = SpeculativeEngine(target, EagleDrafter(head, target), TreeConfig(topk=3, num_steps=3, num_draft_tokens=10),
                            static=static)
    out = eng.generate(prompts, 16)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    drafted = eng.stats.as_dict()["total_draft_tokens"]
    assert drafted > 0


def _sampled_counts(target, head, prompt, *, n=N6, seed=11):
    eng = SpeculativeEngine(target, EagleDrafter(head, target), TreeConfig(topk=2, num_steps=2, num_draft_tokens=5,
                            sample_drafts=True), generator=torch.Generator().manual_seed(seed), temperature=1.0,
                            static=False)
    out = eng.generate(prompt.expand(n, -1).clone(), 3)
    counts = {}
    for row in out[:, len(prompt):].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    st = eng.stats.as_dict()
    return counts, st


def test_sampled_output_follows_the_target_law_with_a_reduced_vocabulary():
    """Stochastic trees drafted from q over draft_ids (zero elsewhere), accepted with min(1, p/q), residual
    max(p - q, 0): the target law exactly (chi-square against the exact joint law of 3 tokens). The drafted tokens and
    the q the acceptance divides by come from the same scattered tensor, so a reduced vocabulary cannot make them
    disagree (a wrong id map or an unnormalised q drafts worse, still exactly: the tree renormalises q and keeps it
    with its draws); the power of this chi-square test against wrong acceptance rules is shown by the mutants of
    tests/test_spec_sampling.py, which use the same helper and sample size."""
    target = tiny_model(seed=5, vocab_size=V6, init_scale=4.0)
    head = randomize_(EagleHead(eagle_config_for(target.config, intermediate_size=16)), seed=7).eval()
    head.set_draft_vocab(torch.tensor([4, 1, 3]))  # not sorted, not a prefix: the id map matters
    prompt = torch.tensor([1, 3, 0, 2, 5])
    law = exact_joint_batched(target, prompt, 3, temperature=1.0)
    counts, st = _sampled_counts(target, head, prompt)
    assert 0 < st["total_accepted_tokens"] < st["total_draft_tokens"]
    assert chi_square_pvalue(counts, law, N6) > 1e-4
    drafted = {t for seq in counts for t in seq}
    assert drafted >= {0, 2, 5}  # tokens outside draft_ids still come out (from rejections' residual and bonuses)


def test_save_load_keeps_the_draft_vocabulary(tmp_path):
    from gdnspec.models.checkpoint import load_checkpoint, save_checkpoint

    target = tiny_model(seed=2)
    head = _head(target, dtype=torch.float32)
    ids = torch.tensor([7, 0, 3, 11])
    head.set_draft_vocab(ids)
    save_checkpoint(head, tmp_path / "eagle", dtype=torch.float16)
    back, _ = load_checkpoint(tmp_path / "eagle")
    assert back.config.draft_vocab_size == 4 and torch.equal(back.draft_ids, ids)
    plain = _head(target, dtype=torch.float32)
    save_checkpoint(plain, tmp_path / "plain")
    assert load_checkpoint(tmp_path / "plain")[0].draft_ids is None


def test_draft_lm_head_forms_are_cached_per_weight_version():
    target = tiny_model(seed=2)
    head = _head(target, dtype=torch.float32)
    w = target.lm_head.weight
    assert head.draft_lm_head(target)[0] is w  # no reduced vocabulary: the lm_head itself
    wt = head.draft_lm_head(target, transposed=True)[0]
    assert torch.equal(wt, w.t()) and wt.is_contiguous() and head.draft_lm_head(target, transposed=True)[0] is wt
    ids = torch.tensor([5, 1, 9])
    head.set_draft_vocab(ids)
    rows, rows_t = head.draft_lm_head(target)[0], head.draft_lm_head(target, transposed=True)[0]
    assert torch.equal(rows, w[ids]) and torch.equal(rows_t, w[ids].t()) and head.draft_lm_head(target)[0] is rows
    with torch.no_grad():
        w.add_(1.0)  # a new weight version: rebuilt
    assert torch.equal(head.draft_lm_head(target)[0], w[ids])


def test_bad_draft_vocabularies_are_refused():
    target = tiny_model(seed=2)
    head = _head(target, dtype=torch.float32)
    V = target.vocab_size
    for bad, match in ((torch.tensor([1, 1, 2]), "distinct"), (torch.tensor([0, V]), "in \\[0, vocab_size"),
                       (torch.tensor([-1, 2]), "in \\[0, vocab_size"), (torch.tensor([]), "non-empty"),
                       (torch.tensor([1.0, 2.0]), "integer"), (torch.tensor([[1, 2]]), "1-D")):
        with pytest.raises(ValueError, match=match):
            head.set_draft_vocab(bad)
    from gdnspec.models.config import GDNConfig

    with pytest.raises(ValueError, match="draft_vocab_size"):
        GDNConfig(vocab_size=10, draft_vocab_size=11)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        GDNConfig(vocab_size=10, draft_vocab_size=0)


def test_frequent_tokens_counts_the_train_split(tmp_path):
    from gdnspec.train.data import TokenData

    train = np.array([5, 5, 5, 2, 2, 9, 9, 1, 0, 0, 0, 0], dtype=np.uint16)
    data = TokenData(tmp_path, train, train[:2], {"vocab_size": 12})
    assert data.frequent_tokens(3).tolist() == [0, 5, 2]  # counts 4, 3, 2 (2 and 9 tie: the smaller id first)
    assert data.frequent_tokens(12)[:5].tolist() == [0, 5, 2, 9, 1]
    for bad in (0, 13):
        with pytest.raises(ValueError, match="vocab_size"):
            data.frequent_tokens(bad)


def test_replacing_the_draft_vocabulary_never_reuses_stale_lm_head_rows():
    """The gathered lm_head rows are cached by the ids tensor's data pointer and version: a new ids tensor allocated
    where a freed one lived (set_draft_vocab twice with temporaries, version 0 again) must not hit the old cache entry;
    and the head keeps its own copy of the ids (editing the caller's tensor afterwards changes nothing)."""
    target = tiny_model(seed=2)
    head = _head(target, dtype=torch.float32)
    V = target.vocab_size
    g = torch.Generator().manual_seed(0)
    for k in (5, 20, V // 2):  # whether the allocator hands the freed block back depends on its size
        for _ in range(40):
            head.set_draft_vocab(torch.randperm(V, generator=g)[:k].clone())
            head.draft_lm_head(target)
            head.set_draft_vocab(torch.randperm(V, generator=g)[:k].clone())
            head.set_draft_vocab(torch.randperm(V, generator=g)[:k].clone())  # often where the first one was
            w, _ = head.draft_lm_head(target)
            assert torch.equal(w, target.lm_head.weight.index_select(0, head.draft_ids))
    ids = torch.tensor([3, 1, 4])
    head.set_draft_vocab(ids)
    ids[0] = 1  # now repeated: the head must not see it
    assert head.draft_ids.tolist() == [3, 1, 4]
    assert torch.equal(head.draft_lm_head(target)[0], target.lm_head.weight[[3, 1, 4]])


def test_non_integer_dtypes_are_refused_as_draft_vocabularies():
    head = _head(tiny_model(seed=2), dtype=torch.float32)
    for bad in (torch.tensor([True, False]), torch.tensor([1 + 0j, 2 + 0j]), torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match=f"integer.*{bad.dtype}"):
            head.set_draft_vocab(bad)
    assert head.draft_ids is None


def test_cpu_ranking_of_a_reduced_vocabulary_is_the_full_vocabulary_rank_ties_included(monkeypatch):
    """Where the fused top-k kernel does not run (the CPU), DraftLogits ranks a reduced vocabulary exactly as the
    builder always did, over the full-vocabulary log-probs: exact ties keep torch's order over the target's ids."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ids = torch.tensor([900, 5, 300, 2, 700, 1])
    logits = torch.tensor([[[1.0, 1.0, 2.0, 0.5, 1.0, 2.0]]])  # ties between ids 300 / 1 and 900 / 5 / 700
    d = DraftLogits(logits, 1000, ids)
    got_lp, got_tok = d.topk(3)
    ref_lp, ref_tok = d.logprobs().topk(3, dim=-1)
    assert torch.equal(got_tok, ref_tok) and torch.equal(got_lp, ref_lp)
