"""Per-step draft depth and verified tree size, from the drafter's confidence and the measured step costs (issue 10,
item 4: "per step, choose tree size / depth from the drafter's confidence and the measured costs").

    sizer = TreeSizer()
    config = sizer.step_config(engine.config)              # this step's drafting (its depth rule, min_frontier_prob)
    tree = propose(..., config); draft_s = ...             # timed
    tree = sizer.cut(tree, draft_seconds=draft_s)          # the n best nodes of each row (n chosen for this step)
    ... verify (timed: verify_s) ... accept, commit, catch-up (timed: rest_s) ...
    sizer.record(tree=tree, accepted=counts - 1, verify_seconds=verify_s, rest_seconds=rest_s)
    sizer.summary()                                        # how often each size and depth was chosen, the model

SpeculativeEngine(adaptive=True) runs it on its eager steps (the CPU path; spec/engine.py); CUDA-graph steps keep the
configured shape (their graphs are captured for one shape).

The model (all on the host, a few dozen float ops per step):
  * Tokens. A drafted node is accepted iff every token on its path is the one the target emits, so the expected
    number of accepted draft tokens of a tree is the sum over its nodes of P(path accepted) (each accepted path has
    one node per depth). With the drafter's path probability exp(score) for P this is the EAGLE-2 "value" of a tree
    (Li et al., 2024, arXiv:2406.16858); drafters are not calibrated, so the sum is scaled by `kappa`, the ratio of
    the moving averages of accepted draft tokens and of that predicted sum over the verified nodes:
        E(n) = sum over rows of (1 + kappa * sum of exp(score) over the row's n - 1 best nodes).
  * Seconds. verify(n) = alpha + beta * n (n = node columns verified), a line fitted by exponentially weighted least
    squares over recent steps (on the 2-core CPU a verify of 16 nodes costs ~1.5x one of 5: the products over the
    weights grow with their rows, ops/cpu_linear.py); plus this step's drafting seconds (measured, already spent) and
    the rest of a step (accept, commit, catch-up; a moving average).
  * Size. n* = argmax over n in [1, N] of E(n) / (draft_seconds + verify(n) + rest): a node is verified when what it
    is expected to add is worth its verify cost at the step's own rate (tokens per second).
  * Depth. One more expansion adds at most what the best frontier path is worth, kappa * exp(best frontier score)
    tokens, and costs t_expand seconds (the slope of a line of drafting seconds against levels drafted, fitted as
    the verify's: a drafting step's fixed part is no level's cost; the average per level until the depths spread,
    an upper bound); it pays when that
    gain is worth t_expand at the step's measured seconds per token s, so the builder's `min_frontier_prob` (stop a
    row whose best frontier path is less likely; spec/tree.py) is set per step to t_expand / (kappa * s).
  * Exploration. The line needs steps at different sizes: the first WARMUP steps alternate the full tree and half of
    it, and every `explore_every`-th step later drafts and verifies the full configured shape (no floor, no cut), so
    kappa and the costs of large trees stay measured.

Losslessness does not depend on the choice: the cut keeps a subtree (closed under parents: a child's score never
exceeds its parent's, ties keep the parent, which comes first) chosen from the drafter's outputs and measured times
only, never from the target's logits of this step, and greedy acceptance / the one-hot sampling rule is exact for any
such tree. Stochastic trees (TreeConfig.sample_drafts at temperature > 0) must keep their draws in draw order, so the
engine does not size them (spec/tree.py's module docstring).
"""
from __future__ import annotations

import dataclasses
import math
import threading
from collections import Counter

from gdnspec.spec.tree import DraftTree, TreeConfig


class _Line:
    """y = a + b * x fitted by exponentially weighted least squares (each new point multiplies the old weights by
    `decay`); `fit()` is None while the x seen spread by less than `min_spread` (weighted standard deviation)."""

    def __init__(self, decay: float, min_spread: float):
        self.decay, self.min_spread = decay, min_spread
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.w, self.x, self.y = d * self.w + 1, d * self.x + x, d * self.y + y
        self.xx, self.xy = d * self.xx + x * x, d * self.xy + x * y

    def fit(self) -> tuple[float, float] | None:
        """(a, b >= 0) or None."""
        if self.w <= 0:
            return None
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        if var < self.min_spread ** 2:
            return None
        b = max((self.xy / self.w - mx * my) / var, 0.0)
        return my - b * mx, b


def _depths(parents: list[int], valid: list[bool]) -> int:
    """Deepest valid node of one row (parents in topological order, root -1)."""
    depth = [0] * len(parents)
    best = 0
    for i in range(1, len(parents)):
        depth[i] = depth[parents[i]] + 1
        if valid[i]:
            best = max(best, depth[i])
    return best


class TreeSizer:
    """Chooses, per speculative step, how deep the drafter drafts and how many of its best nodes the target verifies.

    smoothing: weight of the newest step in the moving averages (kappa, t_expand, rest, seconds per token);
    decay: per-step forgetting factor of the verify-cost regression; explore_every: steps between full-shape steps;
    min_spread: the smallest weighted standard deviation of the verified node counts (nodes) for which the fitted
    slope is used (below it the verify is taken as flat: no cut). ValueError for out-of-range settings."""

    WARMUP = 4

    def __init__(self, *, smoothing: float = 0.1, decay: float = 0.97, explore_every: int = 16,
                 min_spread: float = 0.75, max_floor: float = 0.9):
        if not (0.0 < smoothing <= 1.0 and 0.0 < decay < 1.0 and 0.0 <= max_floor < 1.0 and min_spread > 0):
            raise ValueError(f"smoothing must be in (0, 1], decay in (0, 1), max_floor in [0, 1) and min_spread > 0, "
                             f"got {smoothing!r}, {decay!r}, {max_floor!r}, {min_spread!r}")
        if not (isinstance(explore_every, int) and not isinstance(explore_every, bool) and explore_every >= 2):
            raise ValueError(f"explore_every must be an int >= 2, got {explore_every!r}")
        self.smoothing, self.decay, self.explore_every = smoothing, decay, explore_every
        self.min_spread, self.max_floor = min_spread, max_floor
        self._lock = threading.Lock()
        self.steps = 0
        self._verify = _Line(decay, min_spread)  # verify seconds against node columns verified
        self._draft = _Line(decay, min_spread)  # drafting seconds against levels drafted
        self.accepted = self.predicted = None  # moving averages per step (kappa = accepted / predicted)
        self.per_level = self.rest = None  # seconds: drafting per level drafted (average); accept + commit + catch-up
        self.sec = self.tok = None  # seconds and tokens of a whole speculative step (moving averages)
        self.nodes: Counter = Counter()  # node columns verified -> steps
        self.depth: Counter = Counter()  # deepest drafted level -> steps
        self._pending: dict | None = None  # what this step chose, until record()
        self.last: tuple[int, int] | None = None  # (node columns verified, levels drafted) of the last recorded step

    # ------------------------------------------------------------------ estimates
    @property
    def kappa(self) -> float:
        """Calibration of the drafter's path probabilities: accepted / predicted draft tokens (1.0 before data)."""
        if not self.accepted or not self.predicted:
            return 1.0
        return self.accepted / self.predicted

    def verify_line(self) -> tuple[float, float] | None:
        """(alpha, beta) of verify seconds = alpha + beta * nodes, or None while the nodes seen do not spread enough
        to fit a slope."""
        return self._verify.fit()

    @property
    def t_expand(self) -> float | None:
        """Seconds one more drafted level costs: the slope of drafting seconds against levels drafted (the drafting
        step's fixed part - tree assembly, checks - is not a level's cost), or, while the levels seen do not spread
        enough for a slope, the average per level (an upper bound). None before data."""
        line = self._draft.fit()
        return self.per_level if line is None else line[1]

    def _explore(self) -> str | None:
        """'full' or 'half' for the steps that measure (warm-up, periodic), None otherwise."""
        if self.steps < self.WARMUP:
            return "full" if self.steps % 2 == 0 else "half"
        return "full" if self.steps % self.explore_every == 0 else None

    # ------------------------------------------------------------------ per step
    def step_config(self, config: TreeConfig) -> TreeConfig:
        """The config this step drafts with: `config` with min_frontier_prob = t_expand / (kappa * seconds per token)
        (the larger of it and the configured one), or `config` itself on exploring steps and before any data."""
        with self._lock:
            if self._explore() is not None or self.t_expand is None or not self.sec or not self.tok:
                return config
            per_token = self.sec / self.tok
            floor = min(self.t_expand / max(self.kappa * per_token, 1e-12), self.max_floor)
        if config.min_frontier_prob is not None and config.min_frontier_prob >= floor:
            return config
        return dataclasses.replace(config, min_frontier_prob=floor)

    def choose_nodes(self, scores: list[list[float]], valid: list[list[bool]], *, draft_seconds: float) -> int:
        """n (node columns, root included, >= 1) that maximizes expected tokens / seconds for rows of drafted scores
        (B lists of N cumulative log-probs, root first) and their valid flags; the full N while the costs are
        unknown."""
        N = len(scores[0])
        with self._lock:
            line, rest = self.verify_line(), self.rest
            kappa = self.kappa
            explore = self._explore()
        if explore == "full" or N <= 2:
            return N
        if explore == "half":
            return max(2, (N + 1) // 2)
        if line is None or rest is None:
            return N
        alpha, beta = line
        # per row: path probabilities of the valid drafted nodes, best first; E(n) sums the n - 1 best of each row
        probs = [sorted((math.exp(s) for s, v in zip(row[1:], ok[1:]) if v), reverse=True)
                 for row, ok in zip(scores, valid)]
        gain = [0.0] * N  # gain[j] = sum over rows of the (j)-th best node's probability (j = 1..N-1)
        for row in probs:
            for j, p in enumerate(row, start=1):
                gain[j] += p
        best_n, best_rate, tokens = 1, -1.0, float(len(scores))
        for n in range(1, N + 1):
            if n > 1:
                tokens += kappa * gain[n - 1]
            rate = tokens / max(draft_seconds + alpha + beta * n + rest, 1e-12)
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n

    def cut(self, tree: DraftTree, *, draft_seconds: float) -> DraftTree:
        """`tree` cut to the n best nodes of each row (`choose_nodes`; `tree` itself when n keeps every valid node).
        Remembers the step's drafting seconds and depth for `record`."""
        scores, valid, parents = tree.scores.tolist(), tree.valid.tolist(), tree.parents.tolist()
        depth = max(_depths(p, v) for p, v in zip(parents, valid))
        n = self.choose_nodes(scores, valid, draft_seconds=draft_seconds)
        with self._lock:
            self._pending = {"draft_seconds": draft_seconds, "depth": depth}
        used = max(sum(v) for v in valid)
        return tree if n >= used else tree.best_nodes(n)

    def record(self, *, tree: DraftTree, accepted: list[int], verify_seconds: float, rest_seconds: float) -> None:
        """The step just made with `tree` (as verified, after `cut`): accepted draft tokens per row, the verify's
        seconds and those of accept + commit + catch-up."""
        scores, valid = tree.scores.tolist(), tree.valid.tolist()
        predicted = sum(math.exp(s) for row, ok in zip(scores, valid) for s, v in zip(row[1:], ok[1:]) if v)
        n = tree.num_nodes
        with self._lock:
            pend, self._pending = self._pending or {}, None
            a = self.smoothing

            def avg(old, new):
                return new if old is None else (1 - a) * old + a * new

            self.accepted = avg(self.accepted, float(sum(accepted)))
            self.predicted = avg(self.predicted, predicted)
            self._verify.add(n, verify_seconds)
            self.rest = avg(self.rest, rest_seconds)
            draft = pend.get("draft_seconds")
            depth = pend.get("depth", 0)
            if draft is not None and depth > 0:
                self.per_level = avg(self.per_level, draft / depth)
                self._draft.add(depth, draft)
            total = (draft or 0.0) + verify_seconds + rest_seconds
            self.sec = avg(self.sec, total)
            self.tok = avg(self.tok, float(sum(accepted) + len(accepted)))
            self.nodes[n] += 1
            self.depth[depth] += 1
            self.last = (n, depth)
            self.steps += 1

    def summary(self) -> dict:
        """How often each verified size and drafted depth was chosen, and the fitted model (seconds as ms)."""
        with self._lock:
            line = self.verify_line()
            steps = max(self.steps, 1)
            return {
                "steps": self.steps,
                "nodes": dict(sorted(self.nodes.items())),
                "depth": dict(sorted(self.depth.items())),
                "mean_nodes": sum(k * v for k, v in self.nodes.items()) / steps,
                "mean_depth": sum(k * v for k, v in self.depth.items()) / steps,
                "kappa": self.kappa,
                "verify_ms": None if line is None else {"alpha": 1e3 * line[0], "beta_per_node": 1e3 * line[1]},
                "expand_ms": None if self.t_expand is None else 1e3 * self.t_expand,
                "draft_line_ms": None if (dl := self._draft.fit()) is None else {"fixed": 1e3 * dl[0],
                                                                                 "per_level": 1e3 * dl[1]},
                "rest_ms": None if self.rest is None else 1e3 * self.rest,
            }
