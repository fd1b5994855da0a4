"""Adaptive speculation (issue 10, item 4): spec/policy.StepPolicy and SpeculativeEngine(adaptive=True).

The policy runs the kind of step (speculative or plain) measured faster per emitted token for the batch size, after
two measurements of each, and re-measures the slower kind every `explore_every` steps; greedy output never depends
on the choices (every step, either kind, emits the target's greedy tokens)."""
from __future__ import annotations

import pytest
import torch

from gdnspec import generate_autoregressive
from gdnspec.spec import SpeculativeEngine, TreeConfig
from gdnspec.spec.drafters import ModelDrafter
from gdnspec.spec.policy import StepPolicy

from spec_helpers import noisy_copy, prompts_of, tiny_model


def test_policy_runs_the_faster_kind_and_explores_the_other():
    p = StepPolicy(explore_every=5)
    kinds = []
    for _ in range(40):
        k = p.choose(1)
        kinds.append(k)
        # speculative: 4 ms for 2 tokens (2 ms / token); plain: 1 ms for 1 token (1 ms / token): plain wins
        p.record(1, k, 0.004 if k else 0.001, 2 if k else 1)
    assert kinds[:4] == [True, True, False, False]  # two measurements of each kind first
    later = kinds[4:]
    assert later.count(False) > 0.7 * len(later) and later.count(True) >= 1  # plain wins; speculation re-measured
    s = p.summary()
    assert s["speculative_steps"] + s["plain_steps"] == 40 and s["plain_steps"] == kinds.count(False)
    assert s["by_batch_bucket"][1]["seconds_per_token"]["plain"] == pytest.approx(0.001)
    # a loser confirmed again and again is re-measured ever less often: intervals 5, 10, 20, 40 ...
    explored = [i for i, k in enumerate(later) if k]
    gaps = [b - a for a, b in zip(explored, explored[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0] and p.interval[1] >= 20
    # when speculation is the faster kind it runs almost every step
    q = StepPolicy(explore_every=5)
    for _ in range(40):
        k = q.choose(3)
        q.record(3, k, 0.002 if k else 0.001, 4 if k else 1)
    assert q.summary()["speculative_steps"] > 0.7 * 40
    # when the text changes and the loser becomes the winner, the next re-measurement notices and resets the interval
    r = StepPolicy(explore_every=4)
    slow_spec = True
    kinds = []
    for i in range(120):
        k = r.choose(1)
        kinds.append(k)
        if i == 60:
            slow_spec = False  # from here speculation is 4x cheaper per token
        r.record(1, k, (0.004 if slow_spec else 0.001) if k else 0.002, 1)
    assert kinds[-20:].count(True) > 15  # speculating again at the end


@torch.inference_mode()
def test_adaptive_engine_output_equals_plain_greedy_and_reports_its_choices():
    target = tiny_model(seed=2, hybrid=True, init_scale=4.0)
    draft = noisy_copy(target, noise=0.05)
    prompts = prompts_of([5, 9, 3], target.vocab_size)
    want = generate_autoregressive(target, prompts, 24)
    eng = SpeculativeEngine(target, ModelDrafter(draft), TreeConfig(topk=2, num_steps=3, num_draft_tokens=6),
                            adaptive=True, static=False)
    got = eng.generate(prompts, 24)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    s = eng.policy.summary()
    assert s["speculative_steps"] >= 2 and s["plain_steps"] >= 2  # both kinds ran (and were measured)
    assert eng.stats.total_steps == s["speculative_steps"]  # the statistics count speculative steps only


def test_adaptive_engine_refuses_static_steps_and_a_non_bool():
    target = tiny_model(seed=2)
    drafter = ModelDrafter(noisy_copy(target))
    with pytest.raises(ValueError, match="static=False"):
        SpeculativeEngine(target, drafter, TreeConfig(), adaptive=True, static=True)
    with pytest.raises(TypeError, match="adaptive"):
        SpeculativeEngine(target, drafter, TreeConfig(), adaptive="yes", static=False)
