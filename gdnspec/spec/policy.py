"""Speculative or plain step: the adaptive fall-back of the engine and the server (issue 10, item 4).

    policy = StepPolicy()                       # adaptive: the faster kind per batch-size bucket, measured
    kind = policy.choose(n)                     # True: a speculative step for these n sequences
    new = session.step(speculate=kind); policy.record(n, kind, seconds, tokens=sum(map(len, new.values())))
    policy.summary()                            # how often each kind was chosen, and the measured costs

Speculation pays only when (tokens per step) / (cost of a speculative step) beats 1 / (cost of a plain step); both
depend on the drafter's acceptance on the current text, the batch size and the machine, so they are measured, not
modelled: every kind of step is timed per batch-size bucket (a moving average of seconds per emitted token), the
faster kind runs, and the slower one is re-measured every `explore_every` steps so the choice follows the text.
"""
from __future__ import annotations

import threading


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()  # 1, 2, 4, 4, 8, 8, 8, 8, 16...


class StepPolicy:
    """Speculative or plain step for a batch of n sequences.

    speculative False: always plain. disable_by_batch_size N: plain from N sequences on (vLLM's flag). adaptive: per
    batch-size bucket (1, 2, 4, 8...), the measured seconds per generated token of each kind of step (moving
    average); the faster kind runs, the other is re-measured after `explore_every` steps of the bucket, an interval
    that doubles (up to 16x) each time a re-measurement confirms the winner and resets when it does not, so a kind
    that keeps losing costs ever fewer steps while a change of the text is still noticed. Greedy output
    does not depend on the choice; seeded sampled output does (plain and speculative steps draw differently), so
    reproducible seeded sampling needs adaptive off."""

    def __init__(self, *, speculative: bool = True, disable_by_batch_size: int | None = None, adaptive: bool = True,
                 explore_every: int = 16, smoothing: float = 0.25):
        self.speculative, self.disable_by_batch_size, self.adaptive = speculative, disable_by_batch_size, adaptive
        self.explore_every, self.smoothing = explore_every, smoothing
        self.per_token: dict[int, dict[bool, float]] = {}
        self.samples: dict[tuple[int, bool], int] = {}
        self.choices: dict[tuple[int, bool], int] = {}  # (batch bucket, speculative) -> steps chosen
        self.interval: dict[int, int] = {}  # bucket -> steps between re-measurements of the losing kind
        self.since: dict[int, int] = {}  # bucket -> steps since the last re-measurement
        self._exploring: dict[int, bool] = {}  # bucket -> the winner when the losing kind was last picked
        self._lock = threading.Lock()

    def choose(self, n: int) -> bool:
        """True: make the next step of n sequences speculative."""
        with self._lock:
            kind = self._choose(n)
            key = (_bucket(n), kind)
            self.choices[key] = self.choices.get(key, 0) + 1
            return kind

    def _choose(self, n: int) -> bool:
        if not self.speculative:
            return False
        if self.disable_by_batch_size is not None and n >= self.disable_by_batch_size:
            return False
        if not self.adaptive:
            return True
        b = _bucket(n)
        seen = self.per_token.get(b, {})
        for kind in (True, False):
            if self.samples.get((b, kind), 0) < 2:  # the first measurement of a kind pays one-time costs
                return kind
        best = seen[True] <= seen[False]
        self.since[b] = self.since.get(b, 0) + 1
        if self.since[b] >= self.interval.get(b, self.explore_every):
            self.since[b] = 0
            self._exploring[b] = best
            return not best
        return best

    def record(self, n: int, speculative: bool, seconds: float, tokens: int) -> None:
        """The step just made: its kind, wall seconds and tokens emitted over its n sequences."""
        if not self.adaptive or tokens <= 0:
            return
        with self._lock:
            self._record(n, speculative, seconds, tokens)

    def _record(self, n: int, speculative: bool, seconds: float, tokens: int) -> None:
        b = _bucket(n)
        per = self.per_token.setdefault(b, {})
        k = self.samples[(b, speculative)] = self.samples.get((b, speculative), 0) + 1
        value = seconds / tokens
        winner = self._exploring.get(b)
        exploring = winner is not None and speculative != winner and len(per) == 2  # re-measuring the loser
        if k <= 2:  # the second measurement replaces the first (warm-up)
            per[speculative] = value
        elif exploring and value < per[winner]:  # the loser now beats the winner: believe it at once (the text
            per[speculative] = value  # changed); if it was luck, its own steps pull the average back up
        else:
            per[speculative] = (1 - self.smoothing) * per[speculative] + self.smoothing * value
        if exploring:
            del self._exploring[b]
            if (per[True] <= per[False]) == winner:  # confirmed: look again later
                self.interval[b] = min(2 * self.interval.get(b, self.explore_every), 16 * self.explore_every)
            else:
                self.interval[b] = self.explore_every

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
