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
