"""Tree rejection sampling leaves the output distributed exactly as the target's.

Tiny vocabulary, float64 target, a near-copy draft (so drafts are accepted and rejected often). We sample many
sequences in one batch and compare the empirical joint law of the first three generated tokens (the first comes
from the prefill, the next two from speculative steps, at the root and below it) with the exact law computed from
the target's own distributions, by a chi-square test. With a fixed seed the test is deterministic; the threshold
p > 1e-4 makes a false alarm improbable while a wrong rule (e.g. accepting drafts with probability 1, or
sampling the bonus from p instead of the residual) shifts the law by far more than the sampling noise
(checked: both mistakes give p-values below 1e-30 at this sample size).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from gdnspec import GDNSpeculativeWorker
from gdnspec.sampling import logits_to_probs

from spec_helpers import noisy_copy, tiny_model

VOCAB = 4
SAMPLES = 6000


@torch.no_grad()
def exact_joint(target, prompt, n_tokens, **sampling):
    """{(x1, .., xn): probability} under plain sampling with the same settings."""
    law = {}
    for seq in itertools.product(range(VOCAB), repeat=n_tokens):
        ids = torch.cat([prompt, torch.tensor(seq[:-1], dtype=torch.long)])[None]
        logits = target(ids).logits[0, len(prompt) - 1:]
        probs = logits_to_probs(logits, **sampling)
        law[seq] = math.prod(float(probs[i, t]) for i, t in enumerate(seq))
    return law


def chi_square_pvalue(counts: dict, law: dict, n: int) -> float:
    cells = [k for k, p in law.items() if p * n >= 5]  # pool the rare cells
    rare_p = sum(p for k, p in law.items() if k not in cells)
    rare_c = sum(c for k, c in counts.items() if k not in cells)
    stat = sum((counts.get(k, 0) - n * law[k]) ** 2 / (n * law[k]) for k in cells)
    df = len(cells) - 1
    if rare_p * n >= 5:
        stat += (rare_c - n * rare_p) ** 2 / (n * rare_p)
        df += 1
    else:
        assert rare_c <= max(10, 3 * rare_p * n), "mass appeared where the target has almost none"
    # Wilson-Hilferty approximation of the chi-square upper tail
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7), dict(temperature=1.0, top_p=0.8),
                                      dict(temperature=0.8, top_k=3)])
def test_speculative_sampling_matches_target_distribution(sampling):
    target = tiny_model(seed=4, vocab_size=VOCAB, hybrid=True, init_scale=6.0)
    draft = noisy_copy(target, noise=0.3, seed=2)
    prompt = torch.tensor([1, 3, 0, 2, 1])
    law = exact_joint(target, prompt, 3, **sampling)
    worker = GDNSpeculativeWorker(draft_model=draft, target_model=target, topk=2, num_steps=2, num_draft_tokens=5)
    gen = torch.Generator().manual_seed(1234)
    out = worker.generate(prompt.expand(SAMPLES, -1).clone(), 3, generator=gen, **{k: v for k, v in sampling.items()})
    counts = {}
    for row in out[:, len(prompt):].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    stats = worker.get_statistics()
    assert 0 < stats["total_accepted_tokens"] < stats["total_draft_tokens"]  # both branches of the rule were used
    assert chi_square_pvalue(counts, law, SAMPLES) > 1e-4


# ---------------------------------------------------------------------------------------------- draft-aware rule
# Stochastic trees (children drawn without replacement from the draft's q) accepted with min(1, p/q), residual
# norm(max(p - q, 0)), q renormalised without the rejected token (spec/accept.py). A vocabulary of 6 so that top-k 5
# matters; a pure GDN target so that the static runner needs no KV cache for 4000 rows.
V6 = 6
N6 = 4000
SETTINGS6 = [dict(temperature=1.0), dict(temperature=0.7), dict(temperature=1.0, top_p=0.9),
             dict(temperature=0.9, top_k=5)]


@pytest.fixture(scope="module")
def models6():
    target = tiny_model(seed=5, vocab_size=V6, init_scale=4.0)
    return target, noisy_copy(target, noise=1.5, seed=3)  # far enough for frequent rejections (mutants' power)


@torch.no_grad()
def exact_joint_batched(target, prompt, n_tokens, **sampling):
    """exact_joint with every continuation in one batch."""
    seqs = list(itertools.product(range(target.vocab_size), repeat=n_tokens))
    ids = torch.cat([prompt.expand(len(seqs), -1), torch.tensor([s[:-1] for s in seqs], dtype=torch.long)], 1)
    probs = logits_to_probs(target(ids).logits[:, len(prompt) - 1:], **sampling)
    return {s: math.prod(float(probs[j, i, t]) for i, t in enumerate(s)) for j, s in enumerate(seqs)}


def continuation_counts(eng, prompt, n: int, *, static: bool = False, new_tokens: int = 3) -> dict:
    """{continuation: count} of n rows of `prompt`, each decoded for new_tokens tokens by one session of `eng`."""
    session = eng.session()
    ids = session.add(list(prompt.expand(n, -1)), max_new_tokens=new_tokens)
    if static:
        session.run_static(max_len=16)
    while session.active:
        session.step()
    counts = {}
    for i in ids:
        key = tuple(session.sequence(i)[len(prompt):].tolist())
        counts[key] = counts.get(key, 0) + 1
    return counts


def spec_counts(target, draft, prompt, sampling, *, static: bool, n=N6, seed=77):
    from gdnspec import ModelDrafter, SpeculativeEngine, TreeConfig

    cfg = TreeConfig(topk=2, num_steps=2, num_draft_tokens=5, sample_drafts=True)
    eng = SpeculativeEngine(target, ModelDrafter(draft), cfg, generator=torch.Generator().manual_seed(seed),
                            static=static, **sampling)
    counts = continuation_counts(eng, prompt, n, static=static)
    stats = eng.stats.as_dict()
    assert 0 < stats["total_accepted_tokens"] < stats["total_draft_tokens"]  # both branches of the rule were used
    return counts


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("sampling", SETTINGS6, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_stochastic_trees_match_target_distribution(models6, sampling, static):
    target, draft = models6
    prompt = torch.tensor([1, 3, 0, 2, 5])
    law = exact_joint_batched(target, prompt, 3, **sampling)
    assert chi_square_pvalue(spec_counts(target, draft, prompt, sampling, static=static), law, N6) > 1e-4


@pytest.mark.parametrize("mutant", ["q_with_topk_drafts", "bonus_from_p"])
def test_wrong_rules_fail_the_same_test(models6, monkeypatch, mutant):
    """The chi-square test has the power to see plausible mistakes: the q rule applied to deterministic top-k drafts
    (the tree keeps q but its children are the top-k of q, case (c) of accept.py; p ~ 0), the bonus drawn from p
    instead of the residual (via the reference's `_mutant`; p ~ 1e-26). Skipping q's update for the remaining
    siblings biases by ~1% only: test_rule_at_one_node below has the power for it."""
    from gdnspec.spec import accept, tree

    if mutant == "q_with_topk_drafts":
        def topk_draws(q, uniforms):
            lp, tok = q.log().topk(uniforms.shape[-1], dim=-1)
            return tok, lp

        monkeypatch.setattr(tree, "draw_without_replacement", topk_draws)
    else:
        def wrong(*, max_depth, max_children, **kw):
            return accept.tree_rejection_sample_reference(**kw, _mutant=mutant)

        monkeypatch.setattr(accept, "tree_rejection_sample", wrong)
    target, draft = models6
    prompt = torch.tensor([1, 3, 0, 2, 5])
    sampling = dict(temperature=1.0)
    law = exact_joint_batched(target, prompt, 3, **sampling)
    pvalue = chi_square_pvalue(spec_counts(target, draft, prompt, sampling, static=False), law, N6)
    print(f"{mutant}: p = {pvalue:.3g}")
    assert pvalue < 1e-8


def test_one_hot_rule_on_sampled_trees_is_exact_but_accepts_less(models6, monkeypatch):
    """Ignoring q (accepting a sampled draft x with p(x), the deterministic rule) is NOT a mistake: given the tree,
    which never sees the target's uniforms, the one-hot rule is exact for any tree. It only accepts less often than
    min(1, p/q): the point of carrying q."""
    from gdnspec.spec import accept

    target, draft = models6
    prompt = torch.tensor([1, 3, 0, 2, 5])
    sampling = dict(temperature=1.0)
    law = exact_joint_batched(target, prompt, 3, **sampling)
    rates = {}
    for name in ("q rule", "one-hot"):
        if name == "one-hot":
            def one_hot(*, max_depth, max_children, **kw):
                return accept.tree_rejection_sample_reference(**kw, _mutant="ignore_q")

            monkeypatch.setattr(accept, "tree_rejection_sample", one_hot)
        from gdnspec import ModelDrafter, SpeculativeEngine, TreeConfig

        eng = SpeculativeEngine(target, ModelDrafter(draft), TreeConfig(topk=2, num_steps=2, num_draft_tokens=5,
                                sample_drafts=True), generator=torch.Generator().manual_seed(5), **sampling)
        out = eng.generate(prompt.expand(N6, -1).clone(), 3)
        counts = {}
        for row in out[:, len(prompt):].tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        assert chi_square_pvalue(counts, law, N6) > 1e-4
        st = eng.stats.as_dict()
        rates[name] = st["total_accepted_tokens"] / st["total_draft_tokens"]
    assert rates["q rule"] > rates["one-hot"] + 0.05, rates


def _random_trees(B, N, V, seed):
    """Random trees with distinct sibling tokens, padding nodes (closed under parents), target p with zeros
    (top-k / top-p like), draft q, uniforms."""
    from conftest import random_parents

    g = torch.Generator().manual_seed(seed)
    parents = random_parents(B, N, "random", seed=seed)
    tokens = torch.zeros(B, N, dtype=torch.long)
    valid = torch.rand(B, N, generator=g) < 0.85
    valid[:, 0] = True
    for b in range(B):
        used = {}
        for i in range(1, N):
            p = int(parents[b, i])
            taken = used.setdefault(p, [])
            free = [t for t in range(V) if t not in taken]
            if not valid[b, p] or not free:
                valid[b, i] = False
                continue
            if valid[b, i]:
                tokens[b, i] = free[int(torch.randint(len(free), (1,), generator=g))]
                taken.append(int(tokens[b, i]))
    probs = torch.softmax(2 * torch.randn(B, N, V, generator=g, dtype=torch.float64), -1)
    probs = probs.masked_fill(probs < 0.03, 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    q = torch.softmax(2 * torch.randn(B, N, V, generator=g, dtype=torch.float64), -1)
    return tokens, parents, valid, probs, q, torch.rand(B, N, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_rule_equals_reference(seed):
    """Same uniforms -> same accepted node and bonus token, for the one-hot rule, draws without replacement and
    i.i.d. draws (q indexed through draft_index, E < N rows)."""
    from gdnspec.layers.layout import TokenLayout
    from gdnspec.spec.accept import sibling_rank, tree_rejection_sample, tree_rejection_sample_reference

    B, N, V = 48, 12, 6
    tokens, parents, valid, probs, q, u = _random_trees(B, N, V, seed)
    layout = TokenLayout.from_parents(parents)
    depth = int(torch.where(valid, layout.depth, 0).max())
    kids = int(torch.where(valid, sibling_rank(parents, valid), -1)[:, 1:].max()) + 1
    index = torch.randint(0, 5, (B, N), generator=torch.Generator().manual_seed(seed))
    for draft_probs, without in [(None, True), (q[:, :5], True), (q[:, :5], False)]:
        kw = dict(tokens=tokens, parents=parents, valid=valid, probs=probs, uniforms=u, draft_probs=draft_probs,
                  draft_index=None if draft_probs is None else index, without_replacement=without)
        node, bonus = tree_rejection_sample(**kw, max_depth=depth, max_children=kids)
        ref_node, ref_bonus = tree_rejection_sample_reference(**kw)
        assert torch.equal(node, ref_node) and torch.equal(bonus, ref_bonus)
        assert (node > 0).any() and (node == 0).any()
        # looser loop bounds (a static runner's config bounds) change nothing
        node2, bonus2 = tree_rejection_sample(**kw, max_depth=depth + 2, max_children=kids + 1)
        assert torch.equal(node2, node) and torch.equal(bonus2, bonus)


def test_single_draft_rule_is_exact_by_enumeration():
    """One child drawn from q: P(emit y) = min(p, q)(y) + P(reject) * residual(y) = p(y), computed by integrating
    the vectorised rule over a fine grid of uniforms (bonus and acceptance uniforms both swept)."""
    from gdnspec.spec.accept import tree_rejection_sample

    p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    q = torch.tensor([0.1, 0.6, 0.1, 0.2], dtype=torch.float64)
    grid = (torch.arange(200, dtype=torch.float64) + 0.5) / 200
    law = torch.zeros(4, dtype=torch.float64)
    for x in range(4):  # the drafted token, probability q(x)
        G = grid.numel()
        ua, ub = torch.meshgrid(grid, grid, indexing="ij")
        B = G * G
        node, bonus = tree_rejection_sample(
            tokens=torch.tensor([[0, x]]).expand(B, 2), parents=torch.tensor([[-1, 0]]).expand(B, 2),
            valid=torch.ones(B, 2, dtype=torch.bool), probs=p.expand(B, 2, 4), uniforms=torch.stack([ub.reshape(-1), ua.reshape(-1)], 1),
            draft_probs=q.expand(B, 1, 4), draft_index=torch.zeros(B, 2, dtype=torch.long), max_depth=1, max_children=1)
        emitted = torch.where(node == 1, torch.full_like(bonus, x), bonus)
        law += q[x] * torch.bincount(emitted, minlength=4).double() / B
    torch.testing.assert_close(law, p, atol=0.01, rtol=0)


@pytest.mark.parametrize("rule", ["exact", "no_q_update", "no_q_update_reference"])
def test_rule_at_one_node(rule):
    """One node, three children drawn without replacement from q by the tree builder's own sampler, accepted by the
    vectorised rule (200k rows, every row its own uniforms): the emitted token must follow p. Without q's update
    for the remaining siblings (`without_replacement=False`, i.e. the i.i.d. rule on draws without replacement) the
    law is off by ~1%, which the test sees (p ~ 1e-100)."""
    from gdnspec.spec.accept import tree_rejection_sample, tree_rejection_sample_reference
    from gdnspec.spec.tree import draw_without_replacement

    M, V, k = (200_000, 6, 3) if rule != "no_q_update_reference" else (20_000, 6, 3)
    p = torch.tensor([0.05, 0.40, 0.30, 0.15, 0.10, 0.0], dtype=torch.float64)
    q = torch.tensor([0.45, 0.05, 0.10, 0.25, 0.10, 0.05], dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    kids, _ = draw_without_replacement(q.expand(M, V), torch.rand(M, k, generator=g, dtype=torch.float64))
    kw = dict(tokens=torch.cat([torch.zeros(M, 1, dtype=torch.long), kids], 1),
              parents=torch.tensor([[-1, 0, 0, 0]]).expand(M, 4), valid=torch.ones(M, 4, dtype=torch.bool),
              probs=p.expand(M, 4, V), uniforms=torch.rand(M, 4, generator=g, dtype=torch.float64),
              draft_probs=q.expand(M, 1, V), draft_index=torch.zeros(M, 4, dtype=torch.long))
    if rule == "no_q_update_reference":
        node, bonus = tree_rejection_sample_reference(**kw, _mutant="no_q_update")
    else:
        node, bonus = tree_rejection_sample(**kw, without_replacement=rule == "exact", max_depth=1, max_children=k)
    emitted = torch.where(node > 0, kw["tokens"].gather(1, node[:, None]).squeeze(1), bonus)
    counts = dict(enumerate(torch.bincount(emitted, minlength=V).tolist()))
    pvalue = chi_square_pvalue(counts, dict(enumerate(p.tolist())), M)
    print(f"{rule}: p = {pvalue:.3g}")
    assert (pvalue > 1e-4) if rule == "exact" else (pvalue < 1e-8)


def test_eager_cpu_acceptance_of_few_rows_takes_the_loop_with_the_same_result():
    """accept_sampling on the CPU with <= CPU_LOOP_MAX_ROWS rows runs the per-row loop (fewer ops): for the same
    uniforms it must pick the same nodes and bonus tokens as the vectorised rule, with and without draft q."""
    from gdnspec.layers.layout import TokenLayout
    from gdnspec.spec import accept as A
    from gdnspec.spec.tree import DraftTree

    g = torch.Generator().manual_seed(0)
    B, N, V = 3, 9, 7
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, 3, 3, 5]]).expand(B, N).contiguous()
    tokens = torch.stack([torch.cat([torch.tensor([0]), torch.randperm(V, generator=g)[:2],
                                     torch.randint(0, V, (N - 3,), generator=g)]) for _ in range(B)])
    tokens[:, 3:5] = torch.tensor([1, 2])  # siblings distinct
    lay = TokenLayout.from_parents(parents)
    logits = torch.randn(B, N, V, generator=g, dtype=torch.float64) * 2
    q = torch.softmax(torch.randn(B, N, V, generator=g, dtype=torch.float64), -1).float()
    for draft in (None, q):
        tree = DraftTree(tokens, parents, torch.zeros(B, N), torch.ones(B, N, dtype=torch.bool), draft,
                         None if draft is None else torch.arange(N).expand(B, N).contiguous())
        for trial in range(20):
            u = torch.rand(B, N, generator=g, dtype=torch.float64)
            got = A.accept_sampling(tree, logits, lay, temperature=0.9, uniforms=u)
            probs = A.logits_to_probs(logits, temperature=0.9)
            node, bonus = A.tree_rejection_sample(tokens=tokens, parents=parents, valid=tree.valid, probs=probs,
                                                  uniforms=u, draft_probs=tree.draft_probs,
                                                  draft_index=tree.draft_index, max_depth=4, max_children=2)
            want_path, _ = A.path_to_node(lay, node)
            assert torch.equal(got.bonus, bonus) and torch.equal(got.path, want_path), (draft is None, trial)
