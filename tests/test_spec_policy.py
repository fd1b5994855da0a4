"""Adaptive speculation (issue 10, item 4): spec/policy.StepPolicy and SpeculativeEngine(adaptive=True).

The policy runs the kind of step (speculative or plain) measured faster per emitted token for the batch size, after
two measurements of each, and re-measures the slower kind with a burst of `explore_steps` steps every `explore_every`
steps; greedy output never depends on the choices (every step, either kind, emits the target's greedy tokens)."""
from __future__ import annotations

import pytest
import torch

from gdnspec import generate_autoregressive
from gdnspec.spec import SpeculativeEngine, TreeConfig
from gdnspec.spec.engine import SpecSession
from gdnspec.spec.drafters import ModelDrafter
from gdnspec.spec.policy import StepPolicy

from spec_helpers import noisy_copy, prompts_of, tiny_model


def test_policy_runs_the_faster_kind_and_explores_the_other():
    p = StepPolicy(explore_every=5, explore_steps=2)
    kinds = []
    for _ in range(60):
        k = p.choose(1)
        kinds.append(k)
        # speculative: 4 ms for 2 tokens (2 ms / token); plain: 1 ms for 1 token (1 ms / token): plain wins
        p.record(1, k, 0.004 if k else 0.001, 2 if k else 1)
    assert kinds[:4] == [True, True, False, False]  # two measurements of each kind first
    later = kinds[4:]
    assert later.count(False) > 0.7 * len(later) and later.count(True) >= 1  # plain wins; speculation re-measured
    s = p.summary()
    assert s["speculative_steps"] + s["plain_steps"] == 60 and s["plain_steps"] == kinds.count(False)
    assert s["by_batch_bucket"][1]["seconds_per_token"]["plain"] == pytest.approx(0.001)
    # the loser is re-measured by bursts of explore_steps = 2 steps, ever less often: intervals 5, 10, 20, 40 ...
    starts = [i for i, k in enumerate(later) if k and (i == 0 or not later[i - 1])]
    assert all(later[i:i + 2] == [True, True] for i in starts if i + 2 <= len(later))
    assert later.count(True) == 2 * len(starts) - (1 if later[-1] and not later[-2] else 0)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(gaps) >= 2 and gaps == sorted(gaps) and gaps[-1] > gaps[0] and p.interval[1] >= 20
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


@pytest.mark.parametrize("estimator", ["ratio_of_averages", "average_of_ratios_mutant"])
def test_policy_prefers_speculation_whose_acceptance_varies_when_it_is_faster_on_average(estimator, monkeypatch):
    """A speculative step costs 4 ms and emits 1 or 7 tokens (4 on average: 1 ms per token); a plain step emits 1
    token in 1.25 ms. Speculation is the faster kind (throughput E[tokens] / E[seconds]); an average of per-step
    seconds / tokens (4 ms and 0.57 ms per token: 2.3 on average) would pick plain. The mutant estimator must fail."""
    p = StepPolicy(explore_every=4)
    if estimator != "ratio_of_averages":
        def _update_mutant(b):  # the per-step ratio averaged instead of the ratio of the averages
            per = p.per_token.setdefault(b, {})
            for kind in (True, False):
                if (b, kind) in p.sec:
                    last = p._last[(b, kind)]
                    per[kind] = last if kind not in per else 0.75 * per[kind] + 0.25 * last
        rec = p._record

        def _record_mutant(n, speculative, seconds, tokens):
            p.__dict__.setdefault("_last", {})[(1, speculative)] = seconds / tokens
            rec(n, speculative, seconds, tokens)
        monkeypatch.setattr(p, "_update", _update_mutant)
        monkeypatch.setattr(p, "_record", _record_mutant)
    spec_steps = 0
    for i in range(200):
        k = p.choose(1)
        if k:
            spec_steps += 1
            p.record(1, True, 0.004, 1 if spec_steps % 2 else 7)
        else:
            p.record(1, False, 0.00125, 1)
    share = p.summary()["speculative_steps"] / 200
    if estimator == "ratio_of_averages":
        assert share > 0.7, share
    else:
        assert share < 0.5, share  # the biased estimator loses the faster kind: this test can tell them apart


def test_deferred_catch_up_is_charged_to_the_plain_steps():
    """Plain steps leave the drafter's catch-up for later; its cost belongs to them. Plain 1 ms per token plus 0.5 ms
    of deferred catch-up per step vs speculation 1.3 ms per token: speculation is the faster kind only when the
    charge is counted; without `charge` (the mutant) plain keeps winning."""
    for charged in (True, False):
        p = StepPolicy(explore_every=4)
        pending = 0
        for _ in range(200):
            k = p.choose(1)
            if k:
                if pending and charged:
                    p.charge(1, False, 0.0005 * pending, pending)
                pending = 0
                p.record(1, True, 0.0039, 3)
            else:
                pending += 1
                p.record(1, False, 0.001, 1)
        share = p.summary()["speculative_steps"] / 200
        assert (share > 0.7) if charged else (share < 0.3), (charged, share)
    assert p.extra == {} and StepPolicy(adaptive=False).charge(1, False, 1.0, 3) is None


def test_adaptive_step_charges_the_drafter_catch_up_to_plain_steps():
    target = tiny_model(seed=2, hybrid=True, init_scale=4.0)
    eng = SpeculativeEngine(target, ModelDrafter(noisy_copy(target, noise=0.05)), TreeConfig(builder="chain", num_steps=3),
                            adaptive=True, static=False)
    eng.policy = StepPolicy(explore_every=2, explore_steps=1)  # switch often
    session = eng.session()
    session.add(prompts_of([5], target.vocab_size), max_new_tokens=60)
    kinds = []
    while session.active and not (len(kinds) > 4 and kinds[-1] and not kinds[-2]):
        _, k = session.adaptive_step(eng.policy)
        kinds.append(k)
    assert kinds[:4] == [True, True, False, False]  # the warm-up order: two of each
    assert kinds[-1] and not kinds[-2], kinds  # a speculative step after plain ones happened
    assert eng.policy.extra[(1, False)] > 0  # ... and the plain steps' deferred catch-up was charged to them
    assert not session._pending_tokens  # caught up


def test_a_retracted_choice_leaves_no_trace():
    """choose_tentatively + retract: the counts, the re-measurement interval and an exploration burst it started or
    advanced are as before, so the next choose returns what the retracted one did."""
    p = StepPolicy(explore_every=3, explore_steps=2)
    for _ in range(4):  # the warm-up measurements: two of each kind, plain faster
        k = p.choose(1)
        p.record(1, k, 0.004 if k else 0.001, 2 if k else 1)
    for _ in range(12):
        before = (dict(p.choices), dict(p.since), {b: list(v) for b, v in p._burst.items()})
        kind, token = p.choose_tentatively(1)
        p.retract(token)
        assert (dict(p.choices), dict(p.since), {b: list(v) for b, v in p._burst.items()}) == before
        assert p.choose(1) == kind
        p.record(1, kind, 0.004 if kind else 0.001, 2 if kind else 1)


def test_policy_rejects_bad_settings():
    for kw in (dict(explore_every=0), dict(explore_steps=0), dict(smoothing=0.0), dict(smoothing=1.5),
               dict(token_smoothing=0.0), dict(token_smoothing=2.0)):
        with pytest.raises(ValueError, match="explore_every and explore_steps"):
            StepPolicy(**kw)
    for kw in (dict(explore_every=2.5), dict(explore_steps=True)):
        with pytest.raises(ValueError, match="ints >= 1"):
            StepPolicy(**kw)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="disable_by_batch_size"):
            StepPolicy(disable_by_batch_size=bad)


@torch.inference_mode()
@pytest.mark.parametrize("static", [False, True])
def test_adaptive_engine_output_equals_plain_greedy_and_reports_its_choices(static):
    """The measured policy, eager steps and static (graph-runner) steps: output equal to plain greedy decoding."""
    target = tiny_model(seed=2, hybrid=True, init_scale=4.0)
    draft = noisy_copy(target, noise=0.05)
    prompts = prompts_of([5, 9, 3], target.vocab_size)
    want = generate_autoregressive(target, prompts, 24 if not static else 40)
    eng = SpeculativeEngine(target, ModelDrafter(draft), TreeConfig(topk=2, num_steps=3, num_draft_tokens=6),
                            adaptive=True, static=static)
    if static:  # switch often
        eng.policy = StepPolicy(explore_every=2, explore_steps=1)
    got = eng.generate(prompts, 24 if not static else 40)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    s = eng.policy.summary()
    assert s["speculative_steps"] >= 2 and s["plain_steps"] >= 2  # both kinds ran (and were measured)
    assert eng.stats.total_steps == s["speculative_steps"]  # the statistics count speculative steps only


def test_adaptive_engine_refuses_a_non_bool():
    target = tiny_model(seed=2)
    drafter = ModelDrafter(noisy_copy(target))
    with pytest.raises(TypeError, match="adaptive"):
        SpeculativeEngine(target, drafter, TreeConfig(), adaptive="yes", static=False)


class ScriptedPolicy(StepPolicy):
    """A policy whose choices follow `pattern` (cycled) and that logs what the engine reports."""

    def __init__(self, pattern):
        super().__init__(adaptive=True)
        self.pattern, self.i = list(pattern), 0
        self.records, self.charges = [], []

    def _choose(self, n):  # what choose / choose_tentatively pick (they count it)
        kind = self.pattern[self.i % len(self.pattern)]
        self.i += 1
        return kind, ("none", None)

    def retract(self, token):
        super().retract(token)
        self.i -= 1  # the pattern's entry is used again

    def record(self, n, speculative, seconds, tokens):
        self.records.append((speculative, tokens))

    def charge(self, n, speculative, seconds, steps):
        self.charges.append(steps)


def _drafter(kind, target):
    from gdnspec.models.eagle import EagleHead, eagle_config_for
    from gdnspec.spec.drafters import EagleDrafter, NGramDrafter
    from gdnspec.spec.drafters.null import NullDrafter

    torch.manual_seed(5)
    return {"model": lambda: ModelDrafter(noisy_copy(target, noise=0.05)),
            "eagle": lambda: EagleDrafter(EagleHead(eagle_config_for(target.config, intermediate_size=32),
                                                    dtype=torch.float64).eval(), target),
            "ngram": lambda: NGramDrafter(max_ngram=2),
            "none": lambda: NullDrafter()}[kind]()


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["model", "eagle", "ngram", "none"])
@pytest.mark.parametrize("hybrid", [False, True])
def test_adaptive_static_steps_equal_plain_greedy(kind, hybrid):
    """Static (graph-runner) steps switching between speculative steps and bursts of plain steps in a scripted
    pattern: runs of 1, 3 and 40 plain steps (past the drafter's pending limit and the burst length), rows that finish
    inside a burst (budgets 40 / 7 / 23 and an eos), the drafter caught up before every speculative step: every
    sequence equals plain greedy decoding (in-graph, host and null drafters, hybrid targets with KV caches)."""
    target = tiny_model(seed=3, hybrid=hybrid, init_scale=8.0, ratio=2 if hybrid else 1)
    prompts = prompts_of([6, 3, 9], target.vocab_size, seed=61)
    budgets = [40, 7, 23]
    want = [generate_autoregressive(target, p[None], m)[0] for p, m in zip(prompts, budgets)]
    eos = int(want[2][prompts[2].numel() + 11])  # the third sequence stops at its 12th new token (or earlier)
    stop = prompts[2].numel() + next(j for j, t in enumerate(want[2][prompts[2].numel():].tolist()) if t == eos) + 1
    want[2] = want[2][:stop]
    eng = SpeculativeEngine(target, _drafter(kind, target), TreeConfig(topk=2, num_steps=3, num_draft_tokens=6),
                            adaptive=True, static=True)
    pattern = [True, False, True, False, False, False] + [True] * 2 + [False] * 40 + [True]
    eng.policy = ScriptedPolicy(pattern)  # with a NullDrafter its speculative choices must still step plainly
    bursts = []
    real = SpecSession._plain_burst

    def spy(self, *a, **k):
        out = real(self, *a, **k)
        bursts.append(out)
        return out

    with pytest.MonkeyPatch.context() as m:
        m.setattr(SpecSession, "_plain_burst", spy)
        got = eng.generate(prompts, budgets, eos_token_id=[[], [], [eos]])
    for a, b in zip(got, want):
        assert torch.equal(a, b), (kind, a.tolist(), b.tolist())
    assert eng._runners  # the static runners ran the steps
    plain = [t for k, t in eng.policy.records if not k]
    # every emitted token was recorded once (the first token of each sequence comes from the prefill)
    assert sum(t for _, t in eng.policy.records) + len(prompts) == sum(len(w) - len(p) for w, p in zip(want, prompts))
    assert 0 < len(bursts) < len(plain)  # plain steps ran in bursts of several per host sync
    if kind == "none":
        assert not any(k for k, _ in eng.policy.records)  # a NullDrafter makes plain steps only
    else:
        assert any(k for k, _ in eng.policy.records)  # speculative steps ran
        most = SpecSession.MAX_PENDING_GRAPH if kind in ("model", "eagle") else SpecSession.MAX_PENDING
        assert eng.policy.charges and max(eng.policy.charges) <= most  # catch-ups, each at most the pending limit


@torch.inference_mode()
def test_adaptive_engine_with_a_null_drafter_counts_only_plain_steps():
    """With a NullDrafter every step is a plain step; the adaptive engine's policy counted half of them as speculative
    (the warm-up and every 'speculative' choice ran a plain step), and an adaptive_step of a session without rows
    counted a step that did not happen."""
    from gdnspec.spec.drafters.null import NullDrafter

    target = tiny_model(seed=2, hybrid=True)
    prompts = prompts_of([5, 9, 3], target.vocab_size)
    want = generate_autoregressive(target, prompts, 12)
    eng = SpeculativeEngine(target, NullDrafter(), TreeConfig(), adaptive=True, static=False)
    got = eng.generate(prompts, 12)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    s = eng.policy.summary()
    assert s["speculative_steps"] == 0 and s["plain_steps"] >= 11, s
    before = eng.policy.summary()
    assert eng.session().adaptive_step(eng.policy) == ({}, False)
    assert eng.policy.summary() == before


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["model", "eagle"])
def test_static_plain_burst_leaves_the_drafter_caught_up(kind):
    """Greedy output cannot show a drafter left behind (it only costs acceptance), so this checks the state: after a
    burst of plain steps of a static runner and the catch-up flush, the runner's draft state equals the drafter's
    state built from scratch on the prompt and every committed token but the last (float64, GDN layers)."""
    from gdnspec.runtime import batch_bucket
    from gdnspec.spec.engine import _StaticCatchUp

    target = tiny_model(seed=3, hybrid=False, init_scale=8.0)
    drafter = _drafter(kind, target)
    eng = SpeculativeEngine(target, drafter, TreeConfig(topk=2, num_steps=3, num_draft_tokens=6), adaptive=True,
                            static=True)
    eng.policy = ScriptedPolicy([False] * 5 + [True])
    session = eng.session()
    prompt = prompts_of([7], target.vocab_size, seed=4)[0]
    (sid,) = session.add([prompt], max_new_tokens=30)
    runner = eng.runner(batch_bucket(1), 64)
    runner.load(session.target_state, session.draft_state, session.verified)
    pending = _StaticCatchUp(drafter, runner, on_host=False)
    nxt, _ = session._plain_burst(runner, eng.policy, pending, None, 1)
    assert nxt is True and len(pending) == 6  # five plain choices + the first step, then the policy chose speculative
    pending.flush(session, 1)
    seq = torch.cat([prompt, torch.tensor(session.sequences[sid].new_tokens)])
    assert seq.numel() == prompt.numel() + 7 and int(runner.verified[0]) == int(seq[-1])
    want = generate_autoregressive(target, prompt[None], 7)[0]
    assert torch.equal(seq, want)
    done = seq[:-1]  # every committed token the drafter must have consumed (the last one is the next root)
    if kind == "model":
        ref, got = drafter.begin([done]).model_state, runner.draft_state.model_state
        pairs = [(g.recurrent[:1], r.recurrent) for g, r in zip(got.layers, ref.layers)]
    else:
        hidden = target(done[None]).hidden_states
        ref, got = drafter.begin([done], target_hidden=[hidden[0]]), runner.draft_state
        pairs = [(got.last_feature[:1], ref.last_feature)]
        pairs += [(g.recurrent[:1], r.recurrent) for g, r in zip(got.head_state.layers, ref.head_state.layers)]
    for g, r in pairs:
        assert torch.allclose(g, r, atol=1e-9, rtol=1e-7), (g - r).abs().max()


@torch.inference_mode()
def test_adaptive_static_sampling_is_reproducible_for_the_same_choices():
    """Sampled static runs (temperature 0.8, seeded) that make the same plain / speculative choices give the same
    tokens twice (the choices themselves follow timings: seeded reproducibility needs adaptive off)."""
    target = tiny_model(seed=2, hybrid=True, init_scale=4.0)
    draft = noisy_copy(target, noise=0.05)
    prompts = prompts_of([5, 9, 3], target.vocab_size)
    runs = []
    for _ in range(2):
        eng = SpeculativeEngine(target, ModelDrafter(draft), TreeConfig(topk=2, num_steps=3, num_draft_tokens=6),
                                temperature=0.8, seed=11, adaptive=True, static=True)
        eng.policy = ScriptedPolicy([True, False, False, True, False])
        runs.append(eng.generate(prompts, 20))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert all(r.numel() == p.numel() + 20 for r, p in zip(runs[0], prompts))


@torch.inference_mode()
def test_static_plain_step_samples_with_the_row_streams():
    """A sampling runner's plain step draws each row's token from that row's stream at its counter (greedy rows take
    the argmax), writes it to `verified`, and advances every counter by one, as a speculative step does."""
    from gdnspec.runtime import StaticSpecRunner

    target = tiny_model(seed=2, hybrid=True, init_scale=4.0)
    drafter = ModelDrafter(noisy_copy(target, noise=0.05))
    prompts = prompts_of([6, 6, 6], target.vocab_size, seed=9)
    ids = torch.stack(prompts)
    run = StaticSpecRunner(target, drafter, TreeConfig(topk=2, num_steps=3, num_draft_tokens=6), batch_size=4,
                           max_len=64, sampling=True, filtered=True, use_graph=False)
    out = target(ids, logits_to_keep=1)
    first = out.logits[:, -1].argmax(-1)
    run.load(out.state, drafter.begin(prompts), first)
    run.set_sampling(temperature=[1.0, 0.0, 2.0], top_k=[None, None, 7], seeds=[5, 6, 7])
    for step in range(3):
        fed = run.verified.clone()
        st = run.target_state.clone()
        logits = target(fed[:, None], st, logits_to_keep=1).logits[:, -1]
        want = run.rows.sampling().sample(logits)  # the rows' streams at their counters before the step
        tok, hidden = run.plain_step()
        assert torch.equal(tok, want) and torch.equal(run.verified, want) and hidden is None
        assert int(tok[1]) == int(logits[1].argmax())  # the greedy row
        assert run.rows.counters[:3].tolist() == [step + 1] * 3


def test_a_burst_picked_before_its_steps_are_recorded_measures_all_of_them():
    """A static run picks every step of a plain burst before it records any (one sync per burst): the loser's
    re-measurement must average all the burst's steps. The old bookkeeping closed the burst at its first record and
    divided that one step's seconds and tokens by explore_steps (0.68 tokens per plain step measured on an H200)."""
    p = StepPolicy(explore_every=2, explore_steps=4)
    for k in (True, True, False, False):  # warm-up: two of each; speculation wins (1 ms vs 2 ms per token)
        assert p.choose(1) is k
        p.record(1, k, 0.004 if k else 0.002, 4 if k else 1)
    while p.choose(1):  # speculative steps until the re-measurement of plain starts
        p.record(1, True, 0.004, 4)
    picked = [p.choose_tentatively(1)[0] for _ in range(3)]
    assert picked == [False] * 3  # the burst's other three steps, picked before any record
    for _ in range(4):
        p.record(1, False, 0.003, 1)
    assert p.tok[(1, False)] == pytest.approx(1.0) and p.sec[(1, False)] == pytest.approx(0.003)
    assert p.per_token[1][False] == pytest.approx(0.003) and 1 not in p._burst


def test_a_one_time_charge_does_not_stick():
    """A catch-up that compiled a kernel for a new length (2 s instead of 0.2 ms, seen on an H200) must not make plain
    steps look 10^4 x dearer for the rest of the run: the deferred cost is the median of the last charges."""
    p = StepPolicy()
    p.charge(1, False, 2.0, 4)
    assert p.extra[(1, False)] == pytest.approx(0.5)
    p.charge(1, False, 0.0002, 4)
    p.charge(1, False, 0.0002, 4)
    assert p.extra[(1, False)] == pytest.approx(0.00005)


@torch.inference_mode()
@pytest.mark.parametrize("kind,hybrid", [("model", True), ("model", False), ("eagle", False)])
def test_runner_catch_up_equals_one_chain_advance(kind, hybrid):
    """StaticSpecRunner.catch_up (replays of one chunk of CATCH_UP_WIDTH tokens with counts) leaves the in-graph
    drafter's state equal to one chain advance past all the tokens (the eager reference, float64), for counts below,
    at and past the chunk (a hybrid draft model writes KV past its cache: the runner keeps room for a chunk)."""
    from gdnspec.runtime import StaticSpecRunner
    from gdnspec.spec.engine import _advance_all

    target = tiny_model(seed=4, hybrid=hybrid, init_scale=4.0, ratio=2 if hybrid else 1)
    drafter = _drafter(kind, target)
    config = TreeConfig(topk=2, num_steps=3, num_draft_tokens=6)
    runner = StaticSpecRunner(target, drafter, config, batch_size=2, max_len=64, use_graph=False)
    C = runner.CATCH_UP_WIDTH
    prompts = prompts_of([5, 5], target.vocab_size, seed=9)
    for k in (1, C, C + 1, 2 * C + 3):
        g = torch.Generator().manual_seed(k)
        tokens = torch.randint(0, target.vocab_size, (2, k), generator=g)
        hidden = torch.randn(2, k, target.config.hidden_size, generator=g, dtype=target.dtype)
        hid = hidden if kind == "eagle" else None
        feats = None if kind != "eagle" else [target(p[None]).hidden_states[0] for p in prompts]
        ref = drafter.begin(prompts, target_hidden=feats) if kind == "eagle" else drafter.begin(prompts)
        runner.load(target.new_state(2), ref, None)
        _advance_all(drafter, ref, tokens, hid)  # the reference: one eager chain advance of k tokens
        assert runner.catch_up(tokens, hid) == -(-k // C)
        got = runner.draft_state
        if kind == "model":
            layers = list(zip(got.model_state.layers, ref.model_state.layers))
            pairs = []
        else:
            layers = list(zip(got.head_state.layers, ref.head_state.layers))
            pairs = [(got.last_feature, ref.last_feature)]
        for a, b in layers:
            if hasattr(b, "recurrent"):
                pairs += [(a.recurrent, b.recurrent), (a.conv, b.conv)]
            else:  # an attention layer: the same lengths, the same keys and values at the valid positions
                assert torch.equal(a.lengths, b.lengths) and int(b.lengths.min()) == 5 + k
                L = int(b.lengths.max())
                pairs += [(a.k[:, :, :L], b.k[:, :, :L]), (a.v[:, :, :L], b.v[:, :, :L])]
        assert len(pairs) > 2 and (not hybrid or any(not hasattr(b, "recurrent") for _, b in layers))
        for a, b in pairs:
            assert torch.allclose(a, b, atol=1e-9, rtol=1e-7), (k, (a - b).abs().max())
    with pytest.raises(ValueError, match="tokens must be"):
        runner.catch_up(torch.zeros(3, 2, dtype=torch.long), None)
    if kind == "eagle":  # a drafter that reads features needs them, one per token
        H = target.config.hidden_size
        with pytest.raises(ValueError, match="hidden must be"):
            runner.catch_up(torch.zeros(2, 3, dtype=torch.long), None)
        with pytest.raises(ValueError, match="hidden must be"):
            runner.catch_up(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 1, H, dtype=target.dtype))


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["model", "eagle"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_lookahead_steps_equal_plain_greedy_and_the_unpipelined_run(kind, adaptive, monkeypatch):
    """The static loop's look-ahead (SpecSession.LOOKAHEAD, on by default on CUDA): step k + 1 is replayed before the
    host reads step k's tokens. Rows ending on an eos while a step ran ahead (its tokens go to the other rows only),
    on their budgets (no step is run ahead of a row that may end on its budget), compaction to a smaller batch,
    adaptive plain bursts in between: every sequence equals plain greedy decoding; the engine's statistics, the
    records and the charges equal the run without look-ahead; seeded sampling draws the same tokens."""
    target = tiny_model(seed=3, hybrid=True, init_scale=8.0, ratio=2)
    prompts = prompts_of([6, 3, 9], target.vocab_size, seed=61)
    budgets = [40, 30, 23]  # the eos row ends while the others have more than a step's tokens left
    want = [generate_autoregressive(target, p[None], m)[0] for p, m in zip(prompts, budgets)]
    eos = int(want[2][prompts[2].numel() + 11])
    stop = prompts[2].numel() + next(j for j, t in enumerate(want[2][prompts[2].numel():].tolist()) if t == eos) + 1
    want[2] = want[2][:stop]
    cfg = TreeConfig(topk=2, num_steps=3, num_draft_tokens=6)
    pattern = [True] * 6 + [False] * 3 + [True] * 9 + [False, True]
    runs = {}
    for ahead in (False, True):
        monkeypatch.setattr(SpecSession, "LOOKAHEAD", ahead)
        eng = SpeculativeEngine(target, _drafter(kind, target), cfg, adaptive=adaptive, static=True)
        if adaptive:
            eng.policy = ScriptedPolicy(pattern)
        launches = []
        real_step = type(eng.runner(4, 64)).step

        def spy(self, tree=None):
            launches.append(self.batch_size)
            return real_step(self, tree)

        monkeypatch.setattr(type(eng.runner(4, 64)), "step", spy)
        got = eng.generate(prompts, budgets, eos_token_id=[[], [], [eos]])
        monkeypatch.setattr(type(eng.runner(4, 64)), "step", real_step)
        for a, b in zip(got, want):
            assert torch.equal(a, b), (ahead, a.tolist(), b.tolist())
        samp = SpeculativeEngine(target, _drafter(kind, target), cfg, static=True, temperature=0.9, seed=5)
        runs[ahead] = (eng.stats.as_dict(), len(launches), samp.generate(prompts, budgets),
                       (eng.policy.records, eng.policy.charges) if adaptive else None)
    (st0, n0, s0, p0), (st1, n1, s1, p1) = runs[False], runs[True]
    assert st1 == st0 and p1 == p0
    assert n1 in (n0, n0 + 1)  # at most the step run ahead of the eos row's last one: the others got its tokens
    assert all(torch.equal(a, b) for a, b in zip(s0, s1))


@torch.inference_mode()
@pytest.mark.parametrize("adaptive", [False, True])
def test_a_host_tree_without_drafts_runs_a_plain_step(adaptive, monkeypatch):
    """Static steps of the n-gram drafter: a step whose tree drafted nothing for any row runs the runner's plain step
    (SpecSession.EMPTY_TREE_PLAIN) instead of verifying a root-only tree. Greedy output equals plain decoding and the
    run without the rule; such steps are counted as plain steps of their sequences; seeded sampling reproduces."""
    from gdnspec.spec.drafters import NGramDrafter

    target = tiny_model(seed=5, hybrid=True, init_scale=8.0, ratio=2)
    prompts = prompts_of([7, 4], target.vocab_size, seed=8)
    want = [generate_autoregressive(target, p[None], 30)[0] for p in prompts]
    cfg = TreeConfig(topk=2, num_steps=3, num_draft_tokens=6)
    plain_steps, accepted, records = {}, {}, {}
    for rule in (True, False):
        monkeypatch.setattr(SpecSession, "EMPTY_TREE_PLAIN", rule)
        eng = SpeculativeEngine(target, NGramDrafter(max_ngram=2), cfg, static=True, adaptive=adaptive)
        if adaptive:  # every pick speculative: the plain steps are the rule's only
            eng.policy = ScriptedPolicy([True])
        session = eng.session()
        ids = session.add(prompts, max_new_tokens=30)
        session.run_static(max_len=64)
        got = [session.sequence(i) for i in ids]
        for a, b in zip(got, want):
            assert torch.equal(a, b), (rule, a.tolist(), b.tolist())
        plain_steps[rule] = sum(session.sequences[i].plain_steps for i in ids)
        accepted[rule] = [session.sequences[i].accepted_tokens for i in ids]
        records[rule] = eng.policy.records if adaptive else None
    # the drafter saw every committed token: its later trees, and what they earned, are the same
    assert plain_steps[True] > 0 and plain_steps[False] == 0 and accepted[True] == accepted[False]
    if adaptive:  # the rule's plain steps are recorded as what the speculative picks cost: one token per row
        assert all(k for k, _ in records[True]) and sum(t == 2 for _, t in records[True]) >= 1
    monkeypatch.setattr(SpecSession, "EMPTY_TREE_PLAIN", True)  # seeded sampling through the rule reproduces
    runs = [SpeculativeEngine(target, NGramDrafter(max_ngram=2), cfg, static=True, temperature=0.9, seed=s).generate(
        prompts, 20) for s in (3, 3)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_retract_after_records_undoes_only_the_choice():
    """The look-ahead chooses step k + 1 tentatively before it records step k, and retracts when a row ended: the
    records made in between stay. A re-measurement burst closed by them must stay closed (restoring a snapshot of
    the burst reopened it, and the next record was folded in twice: the estimate overwritten, the interval doubled
    twice); a burst step picked by the retracted choice is given back; a burst it opened is removed."""
    p = StepPolicy(explore_every=4, explore_steps=2)
    for kind, sec, tok in [(True, 1.0, 2), (True, 1.0, 2), (False, .1, 1), (False, .1, 1)]:  # plain wins
        assert p.choose(1) == kind
        p.record(1, kind, sec, tok)
    while True:  # plain steps until the speculative re-measurement burst opens
        k, _ = p.choose_tentatively(1)
        if k:
            break
        p.record(1, False, .1, 1)
    k2, _ = p.choose_tentatively(1)  # the burst's second step, replayed ahead
    assert k2 and p._burst[1][1] == 0
    p.record(1, True, 1.0, 2)
    k3, undo = p.choose_tentatively(1)  # the step after it: plain, not launched
    assert not k3
    p.record(1, True, 1.0, 2)  # the burst's second step is read: the burst closes
    closed = (dict(p.interval), dict(p.sec), dict(p.samples))
    assert 1 not in p._burst
    p.retract(undo)  # a row ended: the plain step is not made
    assert 1 not in p._burst and (dict(p.interval), dict(p.sec), dict(p.samples)) == closed
    p.record(1, True, 5.0, 1)  # a later speculative step is an ordinary record
    assert p.interval == closed[0] and 1 not in p._burst
    # a retracted choice that picked a burst step gives it back; one that opened a burst removes it
    q = StepPolicy(explore_every=2, explore_steps=3)
    for kind, sec, tok in [(True, 1.0, 2), (True, 1.0, 2), (False, .1, 1), (False, .1, 1)]:
        q.choose(1)
        q.record(1, kind, sec, tok)
    while True:
        k, tok = q.choose_tentatively(1)
        if k:
            break
        q.record(1, False, .1, 1)
    opened = q._burst[1]
    k, tok2 = q.choose_tentatively(1)
    assert k and opened[1] == 1 and opened[4] == 2
    q.retract(tok2)
    assert q._burst[1] is opened and opened[1] == 2 and opened[4] == 1
    q.retract(tok)
    assert 1 not in q._burst


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["model", "eagle"])
def test_lookahead_when_every_row_ends_on_eos(kind, monkeypatch):
    """The only row ends on eos while the next step already ran ahead: that step emits nothing and is not counted
    (the engine's statistics equal the run without look-ahead; it counted one step more)."""
    target = tiny_model(seed=3, hybrid=True, init_scale=8.0, ratio=2)
    prompts = prompts_of([9], target.vocab_size, seed=61)
    full = generate_autoregressive(target, prompts[0][None], 40)[0]
    eos = int(full[prompts[0].numel() + 11])
    cfg = TreeConfig(topk=2, num_steps=3, num_draft_tokens=6)
    out = {}
    for ahead in (False, True):
        monkeypatch.setattr(SpecSession, "LOOKAHEAD", ahead)
        eng = SpeculativeEngine(target, _drafter(kind, target), cfg, static=True)
        got = eng.generate(prompts, 40, eos_token_id=eos)
        out[ahead] = (got[0].tolist(), eng.stats.as_dict())
    assert out[True] == out[False]


@torch.inference_mode()
def test_lookahead_retracts_a_plain_choice_when_a_row_ends(monkeypatch):
    """Under a policy the look-ahead picks the step after step k before reading step k; when that pick is plain
    nothing is launched, and when a row then ends in step k the pick is retracted (the step is not made for these
    rows). Scripted patterns that put plain picks right after speculative steps: outputs equal plain greedy decoding,
    the records equal the run without look-ahead, and the look-ahead's retract branch ran."""
    target = tiny_model(seed=3, hybrid=True, init_scale=8.0, ratio=2)
    prompts = prompts_of([6, 3, 9], target.vocab_size, seed=61)
    budgets = [40, 30, 23]
    want = [generate_autoregressive(target, p[None], m)[0] for p, m in zip(prompts, budgets)]
    eos = int(want[2][prompts[2].numel() + 11])
    stop = prompts[2].numel() + next(j for j, t in enumerate(want[2][prompts[2].numel():].tolist()) if t == eos) + 1
    want[2] = want[2][:stop]
    cfg = TreeConfig(topk=2, num_steps=3, num_draft_tokens=6)
    extra = 0
    for pattern in ([True, False], [True, True, False], [True, False, False]):
        seen = {}
        for ahead in (False, True):
            monkeypatch.setattr(SpecSession, "LOOKAHEAD", ahead)
            eng = SpeculativeEngine(target, _drafter("model", target), cfg, adaptive=True, static=True)
            eng.policy = ScriptedPolicy(pattern)
            calls = []
            real = eng.policy.retract
            eng.policy.retract = lambda token: (calls.append(1), real(token))[1]
            got = eng.generate(prompts, budgets, eos_token_id=[[], [], [eos]])
            for a, b in zip(got, want):
                assert torch.equal(a, b), (pattern, ahead, a.tolist(), b.tolist())
            seen[ahead] = (eng.policy.records, len(calls))
        assert seen[True][0] == seen[False][0], pattern
        extra += seen[True][1] - seen[False][1]
    assert extra > 0  # the look-ahead retracted at least one pick



def _plain_share(policy: StepPolicy, steps: int = 600) -> float:
    """Drive `policy` with a speculative step that costs 0.6 ms and emits 1 .. 5 tokens (mean 3.4, fixed random draws,
    as EAGLE tree-4x5 at T = 0.7: 0.18 ms per token) against a plain step of 0.3 ms: the share of plain steps."""
    import random

    rng = random.Random(7)
    plain = 0
    for _ in range(steps):
        kind = policy.choose(1)
        plain += not kind
        if kind:
            policy.record(1, True, 6e-4, rng.choices([1, 2, 3, 4, 5], weights=[2, 1, 1, 2, 4])[0])
        else:
            policy.record(1, False, 3e-4, 1)
    return plain / steps


def test_noisy_speculative_tokens_do_not_hand_steps_to_plain_decoding():
    """Tokens per speculative step vary from 1 to depth + 1; averaged as fast as the seconds (0.25, the previous
    policy) they dipped below plain decoding's cost by chance and handed whole exploration intervals to plain steps
    (H200, T = 0.7: 67% plain steps while speculation was 1.7x cheaper per token). token_smoothing 0.1 (the default)
    keeps speculating; the old setting is measurably worse on the same draws."""
    new, old = _plain_share(StepPolicy()), _plain_share(StepPolicy(token_smoothing=0.25))
    assert new < 0.15 and new < old, (new, old)
