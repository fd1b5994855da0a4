"""Speculative or plain step: the adaptive fall-back of the engine and the server (issue 10, item 4).

    policy = StepPolicy()                       # adaptive: the faster kind per batch-size bucket, measured
    kind = policy.choose(n)                     # True: a speculative step for these n sequences
    new = session.step(speculate=kind); policy.record(n, kind, seconds, tokens=sum(map(len, new.values())))
    policy.charge(n, False, seconds, steps)     # deferred work of earlier plain steps (the drafter's catch-up)
    policy.summary()                            # how often each kind was chosen, and the measured costs
    kind, token = policy.choose_tentatively(n); policy.retract(token)   # a choice whose step may not be made

    new, kind = session.adaptive_step(policy)   # all of the above for one step of a SpecSession (engine, server)

Speculation pays only when (tokens per step) / (cost of a speculative step) beats 1 / (cost of a plain step); both
depend on the drafter's acceptance on the current text, the batch size and the machine, so they are measured, not
modelled: every kind of step is timed per batch-size bucket, the faster kind runs, and the slower one is re-measured
with a short burst of steps every `explore_every` steps (an interval that grows while the winner keeps winning), so
the choice follows the text.

The estimate of a kind's cost per token is a ratio of averages, (moving average of seconds per step) / (moving
average of tokens per step): throughput is E[tokens] / E[seconds], and a speculative step emits 1 to depth + 1
tokens for about the same seconds, so the average of per-step seconds / tokens would overweight the steps that
accepted little (Jensen) and favour plain decoding. Measured on the 2-core CPU with the default bundle (EAGLE chain-4,
2 threads; benchmarks/results/eval_cpu_threads2_new_bundle*.json): speculation alone 1.23x, the per-step-ratio policy
1.14x with 82% plain steps.
"""
from __future__ import annotations

import statistics
import threading
from collections import deque


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()  # 1, 2, 4, 4, 8, 8, 8, 8, 16...


class StepPolicy:
    """Speculative or plain step for a batch of n sequences.

    speculative False: always plain. disable_by_batch_size N: plain from N sequences on (vLLM's flag). adaptive: per
    batch-size bucket (1, 2, 4, 8...), moving averages of the seconds and of the tokens of each kind of step; the
    kind with fewer seconds per token (ratio of the averages) runs. After two measurements of each kind (the first
    pays one-time costs and is replaced), the losing kind is re-measured every `explore_every` steps of the bucket by
    a burst of `explore_steps` steps whose totals replace its estimate; the interval doubles (up to 16x) each time a
    re-measurement confirms the winner and resets when it does not, so a kind that keeps losing costs ever fewer
    steps while a change of the text is still noticed. Tokens per step average more slowly (token_smoothing 0.1)
    than seconds (smoothing 0.25): a speculative step's tokens vary from 1 to depth + 1 from step to step (most at
    T > 0), and an average that follows them closely dips below plain decoding's cost by chance and hands whole
    exploration intervals to plain steps (H200, EAGLE tree-4x5 at T = 0.7 with one smoothing of 0.25:
    564 plain against 279 speculative steps while the final estimates put speculation at 188 against 324 us per
    token, results/stop25/run5_policy_diag/; with 0.1: 36 plain against 371, run6_token_smoothing/). Greedy output
    does not depend on the choice; seeded sampled output does (plain and speculative steps draw differently), so
    reproducible seeded sampling needs adaptive off."""

    def __init__(self, *, speculative: bool = True, disable_by_batch_size: int | None = None, adaptive: bool = True,
                 explore_every: int = 16, explore_steps: int = 4, smoothing: float = 0.25,
                 token_smoothing: float = 0.1):
        counts_ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (explore_every, explore_steps))
        if not counts_ok or not 0.0 < smoothing <= 1.0 or not 0.0 < token_smoothing <= 1.0:
            raise ValueError(f"explore_every and explore_steps must be ints >= 1 and smoothing, token_smoothing in "
                             f"(0, 1], got {explore_every!r}, {explore_steps!r}, {smoothing!r}, {token_smoothing!r}")
        if disable_by_batch_size is not None and not (isinstance(disable_by_batch_size, int)
                                                      and not isinstance(disable_by_batch_size, bool)
                                                      and disable_by_batch_size >= 1):
            raise ValueError(f"disable_by_batch_size must be None or an int >= 1, got {disable_by_batch_size!r}")
        self.speculative, self.disable_by_batch_size, self.adaptive = speculative, disable_by_batch_size, adaptive
        self.explore_every, self.explore_steps, self.smoothing = explore_every, explore_steps, smoothing
        self.token_smoothing = token_smoothing
        self.per_token: dict[int, dict[bool, float]] = {}  # bucket -> kind -> seconds per token (sec / tok)
        self.sec: dict[tuple[int, bool], float] = {}  # (bucket, kind) -> moving average of seconds per step
        self.extra: dict[tuple[int, bool], float] = {}  # (bucket, kind) -> median of recent deferred seconds per step
        self._charges: dict[tuple[int, bool], deque] = {}  # (bucket, kind) -> the last CHARGE_WINDOW charges per step
        self.tok: dict[tuple[int, bool], float] = {}  # (bucket, kind) -> moving average of tokens per step
        self.samples: dict[tuple[int, bool], int] = {}
        self.choices: dict[tuple[int, bool], int] = {}  # (batch bucket, speculative) -> steps chosen
        self.interval: dict[int, int] = {}  # bucket -> steps between re-measurements of the losing kind
        self.since: dict[int, int] = {}  # bucket -> steps since the last re-measurement
        # bucket -> [winner, loser steps left to pick, seconds, tokens, steps picked, steps recorded] of a burst
        self._burst: dict[int, list] = {}
        self._lock = threading.Lock()

    def choose(self, n: int) -> bool:
        """True: make the next step of n sequences speculative."""
        return self.choose_tentatively(n)[0]

    def choose_tentatively(self, n: int) -> tuple[bool, tuple]:
        """choose(n) for a step that may not happen (a static run decides the next step before it reads whether
        rows finished in the current one): returns (kind, token); `retract(token)` undoes exactly what this choice
        did - its count, the step counter it advanced, the exploration burst it opened or the burst step it picked -
        and nothing recorded since (the steps before it may be recorded between the choice and its retraction)."""
        with self._lock:
            b = _bucket(n)
            since = self.since.get(b)
            kind, effect = self._choose(n)
            key = (b, kind)
            self.choices[key] = self.choices.get(key, 0) + 1
            return kind, (key, since, effect)

    def retract(self, token: tuple) -> None:
        """Undo a `choose_tentatively` whose step was not made (no choice was made since)."""
        key, since, (what, burst) = token
        b = key[0]
        with self._lock:
            self.choices[key] -= 1
            if not self.choices[key]:
                del self.choices[key]
            if what == "picked" and self._burst.get(b) is burst:  # give the burst its step back
                burst[1] += 1
                burst[4] -= 1
            elif what == "opened" and self._burst.get(b) is burst:  # the burst this choice opened never ran
                del self._burst[b]
            if what in ("counted", "opened"):
                if since is None:
                    self.since.pop(b, None)
                else:
                    self.since[b] = since

    def _choose(self, n: int) -> tuple[bool, tuple]:
        """(kind, effect): what the choice changed, for `retract` - ("none", None), ("picked", burst), ("counted",
        None) or ("opened", burst)."""
        if not self.speculative:
            return False, ("none", None)
        if self.disable_by_batch_size is not None and n >= self.disable_by_batch_size:
            return False, ("none", None)
        if not self.adaptive:
            return True, ("none", None)
        b = _bucket(n)
        for kind in (True, False):
            if self.samples.get((b, kind), 0) < 2:  # the first measurement of a kind pays one-time costs
                return kind, ("none", None)
        burst = self._burst.get(b)
        if burst is not None and burst[1] > 0:  # a re-measurement of the loser is under way
            burst[1] -= 1
            burst[4] += 1
            return not burst[0], ("picked", burst)
        per = self.per_token[b]
        best = per[True] <= per[False]
        self.since[b] = self.since.get(b, 0) + 1
        if self.since[b] >= self.interval.get(b, self.explore_every):
            self.since[b] = 0
            burst = self._burst[b] = [best, self.explore_steps - 1, 0.0, 0, 1, 0]
            return not best, ("opened", burst)
        return best, ("counted", None)

    def record(self, n: int, speculative: bool, seconds: float, tokens: int) -> None:
        """The step just made: its kind, wall seconds and tokens emitted over its n sequences."""
        if not self.adaptive:
            return
        with self._lock:
            self._record(n, speculative, seconds, tokens)

    def _record(self, n: int, speculative: bool, seconds: float, tokens: int) -> None:
        b = _bucket(n)
        key = (b, speculative)
        burst = self._burst.get(b)
        if burst is not None and speculative != burst[0]:  # a step of the loser's re-measurement burst
            burst[2] += seconds
            burst[3] += max(tokens, 0)
            burst[5] += 1
            # complete once every step it picked is recorded: a static run picks a burst's steps before it records
            # them (spec/engine.py, _plain_burst), so the count left to pick alone would close it at its first record
            if burst[1] > 0 or burst[5] < burst[4]:
                return
            del self._burst[b]
            if burst[3] <= 0:
                return
            self.samples[key] = self.samples.get(key, 0) + burst[5]
            steps = burst[5]  # the burst's per-step averages replace the stale estimate
            self.sec[key], self.tok[key] = burst[2] / steps, burst[3] / steps
            self._update(b)
            per = self.per_token[b]
            if (per[True] <= per[False]) == burst[0]:  # confirmed: look again later
                self.interval[b] = min(2 * self.interval.get(b, self.explore_every), 16 * self.explore_every)
            else:
                self.interval[b] = self.explore_every
            return
        if tokens <= 0:
            return
        k = self.samples[key] = self.samples.get(key, 0) + 1
        if k <= 2:  # the second measurement replaces the first (warm-up)
            self.sec[key], self.tok[key] = seconds, float(tokens)
        else:
            a, at = self.smoothing, self.token_smoothing
            self.sec[key] = (1 - a) * self.sec[key] + a * seconds
            self.tok[key] = (1 - at) * self.tok[key] + at * tokens
        self._update(b)

    CHARGE_WINDOW = 5  # charges per kind whose median is its deferred cost per step

    def charge(self, n: int, speculative: bool, seconds: float, steps: int) -> None:
        """Work that `steps` earlier steps of a kind deferred, paid now (the drafter's catch-up on the tokens of a run
        of plain steps, made before the next speculative step): seconds / steps joins that kind's cost per step as
        the median of the last CHARGE_WINDOW charges (one-time costs, such as a kernel compiled for a new catch-up
        length, do not stick to the estimate), so a switch back to speculation is not billed for the plain steps'
        debt. A caller whose catch-up costs the same for any count up to some chunk (a graph replay) passes the steps
        a full chunk covers: what a steady run of plain steps pays per step."""
        if not self.adaptive or steps <= 0:
            return
        with self._lock:
            key = (_bucket(n), speculative)
            window = self._charges.setdefault(key, deque(maxlen=self.CHARGE_WINDOW))
            window.append(seconds / steps)
            self.extra[key] = statistics.median(window)
            self._update(key[0])

    def _update(self, b: int) -> None:
        per = self.per_token.setdefault(b, {})
        for kind in (True, False):
            if (b, kind) in self.sec:
                per[kind] = (self.sec[(b, kind)] + self.extra.get((b, kind), 0.0)) / self.tok[(b, kind)]

    def describe(self) -> str:
        if not self.speculative:
            return "plain decoding"
        parts = ["speculative steps"]
        if self.disable_by_batch_size is not None:
            parts.append(f"plain from {self.disable_by_batch_size} running sequences on")
        if self.adaptive:
            parts.append("adaptive (the faster of speculative and plain steps per batch size)")
        return ", ".join(parts)

    def summary(self) -> dict:
        """How often each kind was chosen: {"speculative_steps", "plain_steps", "by_batch_bucket": {bucket:
        {"speculative", "plain", "seconds_per_token": {"speculative", "plain"}}}}."""
        with self._lock:
            by = {}
            for (b, kind), c in sorted(self.choices.items()):
                row = by.setdefault(b, {"speculative": 0, "plain": 0})
                row["speculative" if kind else "plain"] += c
                per = self.per_token.get(b, {})
                row["seconds_per_token"] = {"speculative": per.get(True), "plain": per.get(False)}
            return {"speculative_steps": sum(c for (_, k), c in self.choices.items() if k),
                    "plain_steps": sum(c for (_, k), c in self.choices.items() if not k), "by_batch_bucket": by}
