"""Per-step draft depth and verified tree size, from the drafter's confidence and the measured step costs (issue 10,
item 4: "per step, choose tree size / depth from the drafter's confidence and the measured costs").

    sizer = TreeSizer()
    config = sizer.step_config(engine.config, batch_size=B)   # this step's drafting (its depth rule, min_frontier_prob)
    tree = propose(..., config); draft_s = ...                 # timed
    tree, depth = sizer.cut(tree, draft_seconds=draft_s)       # the n best nodes of each row (n chosen for this step)
    ... verify (timed: verify_s) ... accept, commit, catch-up (timed: rest_s) ...
    sizer.record(tree=tree, accepted=counts - 1, draft_seconds=draft_s, depth=depth, verify_seconds=verify_s,
                 rest_seconds=rest_s)
    sizer.summary()                                        # how often each size and depth was chosen, the model

SpeculativeEngine(adaptive=True) runs it on its eager steps (the CPU path; spec/engine.py); CUDA-graph steps keep the
configured shape (their graphs are captured for one shape).

The model (on the host: Python work per drafted node, tens of microseconds per step on the CPU, between the timed
stages and so charged to none of them; costs kept per batch-size bucket):
  * Tokens. A drafted node is accepted iff every token on its path is the one the target emits, so the expected
    number of accepted draft tokens of a tree is the sum over its nodes of P(path accepted) (each accepted path has
    one node per depth). With the drafter's path probability exp(score) for P this is the EAGLE-2 "value" of a tree
    (Li et al., 2024, arXiv:2406.16858); drafters are not calibrated, and less so the deeper (the shipped ones are
    under-confident: accepted / predicted 1.1-1.2 at depth 1, 1.7-1.9 at depth 5, benchmarks/draft_calibration.py),
    so a node at depth d is valued kappa_d * exp(score), kappa_d the ratio of the moving averages of the rows whose
    accepted path reached d and of the predicted sum at d over the verified nodes:
        E(n) = sum over rows of (1 + sum of the row's n - 1 best values), a value taken as the smallest on its path.
  * Seconds. verify(n) = alpha + beta * n (n = node columns verified), a line fitted by exponentially weighted least
    squares over recent steps (on the 2-core CPU a verify of 16 nodes costs ~1.5x one of 5: the products over the
    weights grow with their rows, ops/cpu_linear.py); plus this step's drafting seconds (measured, already spent) and
    the rest of a step (accept, commit, catch-up; a moving average).
  * Size. n* = argmax over n in [1, N] of E(n) / (draft_seconds + verify(n) + rest): a node is verified when what it
    is expected to add is worth its verify cost at the step's own rate (tokens per second).
  * Depth. One more expansion adds at most what the best frontier path is worth, kappa * exp(best frontier score)
    (kappa: the largest kappa_d measured)
    tokens, and costs t_expand seconds (the slope of a line of drafting seconds against levels drafted, fitted as
    the verify's: a drafting step's fixed part is no level's cost; the average per level until the depths spread,
    an upper bound); it pays when that
    gain is worth t_expand at the step's measured seconds per token s, so the builder's `min_frontier_prob` (stop a
    row whose best frontier path is less likely; spec/tree.py) is set per step to t_expand / (kappa * s).
  * Exploration. The lines need steps at different sizes: the first WARMUP steps of a batch bucket alternate the full
    tree and half of it, and every `explore_every`-th step later drafts and verifies the full configured shape (no
    floor, no cut), so kappa and the costs of large trees stay measured.

Losslessness does not depend on the choice: the cut keeps a subtree (closed under parents: nodes are ranked by the
smallest score on their path, which never exceeds a parent's, and ties keep the parent, which comes first;
DraftTree.best_nodes) chosen from the drafter's outputs and measured times only, never from the target's logits of this step, and greedy acceptance / the one-hot sampling rule is exact for any
such tree. Stochastic trees (TreeConfig.sample_drafts at temperature > 0) must keep their draws in draw order, so the
engine does not size them (spec/tree.py's module docstring). Eager CUDA steps that get a floor draft with build_tree's
torch loop (its fused eagle2 builder takes no min_frontier_prob); CUDA-graph steps are not sized.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from collections import Counter

import torch

from gdnspec.spec.policy import _bucket
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


def _node_depths(parents: list[int]) -> list[int]:
    """Depth of every node of one row (parents in topological order, root -1 at depth 0)."""
    depth = [0] * len(parents)
    for i in range(1, len(parents)):
        depth[i] = depth[parents[i]] + 1
    return depth


def _check_real(name: str, value, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
    """ValueError naming `name` unless value is a real number (not a bool) in the interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be a number in {lo}{low:g}, {high:g}{hi}, got {value!r}")


class _Costs:
    """The measured costs of one batch-size bucket (a verify of n node columns for B rows runs B * n rows through the
    products, so the costs are fitted per bucket, as spec/policy.py measures its step kinds)."""

    def __init__(self, decay: float, min_spread: float):
        self.verify = _Line(decay, min_spread)  # verify seconds against node columns verified
        self.draft = _Line(decay, min_spread)  # drafting seconds against levels drafted
        self.per_level = self.rest = None  # seconds: drafting per level drafted (average); accept + commit + catch-up
        self.sec = self.tok = None  # seconds and tokens of a whole speculative step (moving averages)
        self.steps = 0

    @property
    def t_expand(self) -> float | None:
        """Seconds one more drafted level costs: the slope of drafting seconds against levels drafted (the drafting
        step's fixed part - tree assembly, checks - is not a level's cost), or, while the levels seen do not spread
        enough for a slope, the average per level (an upper bound). None before data."""
        line = self.draft.fit()
        return self.per_level if line is None else line[1]

    def explore(self, every: int) -> str | None:
        """'full' or 'half' for the steps that measure (warm-up, periodic), None otherwise."""
        if self.steps < TreeSizer.WARMUP:
            return "full" if self.steps % 2 == 0 else "half"
        return "full" if self.steps % every == 0 else None

    def summary(self) -> dict:
        v, d = self.verify.fit(), self.draft.fit()
        return {"steps": self.steps,
                "verify_ms": None if v is None else {"alpha": 1e3 * v[0], "beta_per_node": 1e3 * v[1]},
                "expand_ms": None if self.t_expand is None else 1e3 * self.t_expand,
                "draft_line_ms": None if d is None else {"fixed": 1e3 * d[0], "per_level": 1e3 * d[1]},
                "rest_ms": None if self.rest is None else 1e3 * self.rest}


class TreeSizer:
    """Chooses, per speculative step, how deep the drafter drafts and how many of its best nodes the target verifies.

    smoothing: weight of the newest step in the moving averages (kappa, rest, seconds and tokens per step), in (0, 1];
    decay: per-step forgetting factor of the two fitted lines (verify seconds over node columns, drafting seconds over
    levels), in (0, 1); explore_every: steps of a batch bucket between full-shape steps, an int >= 2; min_spread: the
    smallest weighted standard deviation of a line's x (node columns, levels) for which its fitted slope is used
    (below it the verify is taken as flat, no cut, and a level costs the average per level), finite and > 0;
    max_floor: the largest per-step min_frontier_prob, in [0, 1). ValueError naming the argument otherwise.

    The costs are kept per batch-size bucket (1, 2, 4, 8...); kappa is the drafter's and shared. The choices depend
    on measured times, and a cut tree is accepted with fewer uniforms than the full one: seeded sampled output is
    reproducible only with sizing off (size_trees=False), as with the plain/speculative fall-back. Thread-safe: one
    sizer may serve several sessions (each step hands its own numbers from `cut` to `record`)."""

    WARMUP = 4

    def __init__(self, *, smoothing: float = 0.1, decay: float = 0.97, explore_every: int = 16,
                 min_spread: float = 0.75, max_floor: float = 0.9):
        _check_real("smoothing", smoothing, 0.0, 1.0, low_open=True, high_open=False)
        _check_real("decay", decay, 0.0, 1.0, low_open=True, high_open=True)
        _check_real("min_spread", min_spread, 0.0, math.inf, low_open=True, high_open=True)
        _check_real("max_floor", max_floor, 0.0, 1.0, low_open=False, high_open=True)
        if not (isinstance(explore_every, int) and not isinstance(explore_every, bool) and explore_every >= 2):
            raise ValueError(f"explore_every must be an int >= 2, got {explore_every!r}")
        self.smoothing, self.decay, self.explore_every = smoothing, decay, explore_every
        self.min_spread, self.max_floor = min_spread, max_floor
        self._lock = threading.Lock()
        self.steps = 0
        self._costs: dict[int, _Costs] = {}  # batch bucket -> its measured costs
        self.accepted = self.predicted = None  # moving averages per step (kappa = accepted / predicted)
        # per depth d: moving averages of the rows whose accepted path reached d and of the predicted sum at d
        self.accepted_at: dict[int, float] = {}
        self.predicted_at: dict[int, float] = {}
        self.nodes: Counter = Counter()  # node columns verified -> steps
        self.depth: Counter = Counter()  # deepest drafted level -> steps
        self.last: tuple[int, int] | None = None  # (node columns verified, levels drafted) of the last recorded step

    def costs(self, batch_size: int) -> _Costs:
        """The measured costs of batch_size's bucket (created empty on first use)."""
        b = _bucket(batch_size)
        if b not in self._costs:
            self._costs[b] = _Costs(self.decay, self.min_spread)
        return self._costs[b]

    # ------------------------------------------------------------------ estimates
    @property
    def kappa(self) -> float:
        """Calibration of the drafter's path probabilities: accepted / predicted draft tokens (1.0 before data; 0.0
        for a drafter whose predicted nodes were never accepted)."""
        if self.accepted is None or not self.predicted:
            return 1.0
        return self.accepted / self.predicted

    def kappa_at(self, depth: int) -> float:
        """Calibration at one depth: accepted / predicted over the verified nodes at that depth (drafters are more
        under-confident the deeper: benchmarks/draft_calibration.py); the nearest shallower depth measured, else the
        overall kappa, where that depth has no data."""
        for d in range(depth, 0, -1):
            p = self.predicted_at.get(d)
            if p:
                return self.accepted_at[d] / p
        return self.kappa

    def verify_line(self, batch_size: int = 1) -> tuple[float, float] | None:
        """(alpha, beta) of verify seconds = alpha + beta * nodes for batch_size's bucket, or None while the nodes
        seen do not spread enough to fit a slope."""
        with self._lock:
            return self.costs(batch_size).verify.fit()

    def t_expand(self, batch_size: int = 1) -> float | None:
        """Seconds one more drafted level costs at batch_size (_Costs.t_expand)."""
        with self._lock:
            return self.costs(batch_size).t_expand

    # ------------------------------------------------------------------ per step
    def step_config(self, config: TreeConfig, *, batch_size: int) -> TreeConfig:
        """The config this step of batch_size rows drafts with: `config` with min_frontier_prob = t_expand / (kappa *
        seconds per token) (the larger of it and the configured one), or `config` itself on exploring steps and
        before any data."""
        with self._lock:
            c = self.costs(batch_size)
            t_expand = c.t_expand
            if c.explore(self.explore_every) is not None or t_expand is None or not c.sec or not c.tok:
                return config
            per_token = c.sec / c.tok
            # another level's nodes are worth kappa_d x their probability: the largest kappa measured (the deepest
            # levels', where drafting stops) so as not to stop a level early
            kappa = max([self.kappa] + [self.kappa_at(d) for d in self.predicted_at])
            floor = min(t_expand / max(kappa * per_token, 1e-12), self.max_floor)
        if config.min_frontier_prob is not None and config.min_frontier_prob >= floor:
            return config
        return dataclasses.replace(config, min_frontier_prob=floor)

    def choose_nodes(self, scores: list[list[float]], valid: list[list[bool]], *, draft_seconds: float,
                     parents: list[list[int]] | None = None) -> int:
        """n (node columns, root included, >= 1) that maximizes expected tokens / seconds for B rows of drafted scores
        (B lists of N cumulative log-probs, root first), their valid flags and parents (None: every node valued with
        the overall kappa instead of its depth's); the full N while the costs of B's bucket are unknown."""
        depths = None if parents is None else [_node_depths(p) for p in parents]
        return self._choose(scores, valid, parents, depths, draft_seconds)[0]

    def _values(self, scores, valid, parents, depths) -> list[list[float]]:
        """Per row and node: kappa_depth x exp(score) (expected accepted count), the root +inf, padding -inf; then the
        minimum along each node's path, so that ranking by it keeps parents (DraftTree.best_nodes). parents and
        depths (`_node_depths`) per row, or both None: every node valued with the overall kappa."""
        out = []
        for b, (row, ok) in enumerate(zip(scores, valid)):
            par = parents[b] if parents is not None else None
            vals = [math.inf] + [0.0] * (len(row) - 1)  # the root is always kept: it never bounds a path's minimum
            for i in range(1, len(row)):
                if not ok[i]:
                    vals[i] = -math.inf
                    continue
                k = self.kappa if par is None else self.kappa_at(depths[b][i])
                vals[i] = k * math.exp(row[i])
                if par is not None and par[i] > 0:
                    vals[i] = min(vals[i], vals[par[i]])
            out.append(vals)
        return out

    def _choose(self, scores, valid, parents, depths, draft_seconds: float) -> tuple[int, list[list[float]] | None]:
        N = len(scores[0])
        with self._lock:
            c = self.costs(len(scores))
            line, rest = c.verify.fit(), c.rest
            explore = c.explore(self.explore_every)
            values = None if explore is not None or N <= 2 or line is None or rest is None else \
                self._values(scores, valid, parents, depths)
        if explore == "full" or N <= 2:
            return N, None
        if explore == "half":
            return max(2, (N + 1) // 2), None
        if values is None:
            return N, None
        alpha, beta = line
        # per row: the valid drafted nodes' values, best first; E(n) sums the n - 1 best of each row
        gain = [0.0] * N  # gain[j] = sum over rows of the (j)-th best node's value (j = 1..N-1)
        for row, ok in zip(values, valid):
            for j, v in enumerate(sorted((v for v, o in zip(row[1:], ok[1:]) if o), reverse=True), start=1):
                gain[j] += v
        best_n, best_rate, tokens = 1, -1.0, float(len(scores))
        for n in range(1, N + 1):
            if n > 1:
                tokens += gain[n - 1]
            rate = tokens / max(draft_seconds + alpha + beta * n + rest, 1e-12)
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n, values

    def cut(self, tree: DraftTree, *, draft_seconds: float) -> tuple[DraftTree, int]:
        """(`tree` cut to the n best nodes of each row by expected accepted count (`choose_nodes`; `tree` itself when
        n keeps every valid node), the levels drafted: the deepest valid node of the uncut tree), for `record`."""
        scores, valid, parents = tree.scores.tolist(), tree.valid.tolist(), tree.parents.tolist()
        depths = [_node_depths(p) for p in parents]  # computed once: the levels drafted and each node's kappa
        depth = max(d for row, ok in zip(depths, valid) for d, v in zip(row, ok) if v)
        n, values = self._choose(scores, valid, parents, depths, draft_seconds)
        used = max(sum(v) for v in valid)
        if n >= used:
            return tree, depth
        key = None if values is None else torch.tensor(values, dtype=tree.scores.dtype, device=tree.scores.device)
        return tree.best_nodes(n, key=key), depth

    def record(self, *, tree: DraftTree, accepted: list[int], draft_seconds: float, depth: int,
               verify_seconds: float, rest_seconds: float) -> None:
        """The step just made with `tree` (as verified, after `cut`): accepted draft tokens per row, the drafting
        seconds and levels drafted (`cut`'s), the verify's seconds and those of accept + commit + catch-up."""
        scores, valid, parents = tree.scores.tolist(), tree.valid.tolist(), tree.parents.tolist()
        pred_at: Counter = Counter()  # depth -> sum of the verified nodes' path probabilities
        for row, ok, par in zip(scores, valid, parents):
            for d, sc, v in zip(_node_depths(par)[1:], row[1:], ok[1:]):
                if v:
                    pred_at[d] += math.exp(sc)
        predicted = sum(pred_at.values())
        n = tree.num_nodes
        a = self.smoothing

        def avg(old, new):
            return new if old is None else (1 - a) * old + a * new

        with self._lock:
            c = self.costs(len(accepted))
            self.accepted = avg(self.accepted, float(sum(accepted)))
            self.predicted = avg(self.predicted, predicted)
            for d, p in pred_at.items():  # the depths this tree verified nodes at
                self.accepted_at[d] = avg(self.accepted_at.get(d), float(sum(a >= d for a in accepted)))
                self.predicted_at[d] = avg(self.predicted_at.get(d), p)
            c.verify.add(n, verify_seconds)
            c.rest = avg(c.rest, rest_seconds)
            if depth > 0:
                c.per_level = avg(c.per_level, draft_seconds / depth)
                c.draft.add(depth, draft_seconds)
            c.sec = avg(c.sec, draft_seconds + verify_seconds + rest_seconds)
            c.tok = avg(c.tok, float(sum(accepted) + len(accepted)))
            c.steps += 1
            self.nodes[n] += 1
            self.depth[depth] += 1
            self.last = (n, depth)
            self.steps += 1

    def reset_counts(self) -> None:
        """Forget how often each size and depth was chosen (not the measured costs): count a timed run only."""
        with self._lock:
            self.nodes.clear()
            self.depth.clear()
            self.steps = 0

    def summary(self) -> dict:
        """How often each verified size and drafted depth was chosen, kappa, and per batch bucket the fitted model
        (seconds as ms)."""
        with self._lock:
            steps = max(self.steps, 1)
            return {
                "steps": self.steps,
                "nodes": dict(sorted(self.nodes.items())),
                "depth": dict(sorted(self.depth.items())),
                "mean_nodes": sum(k * v for k, v in self.nodes.items()) / steps,
                "mean_depth": sum(k * v for k, v in self.depth.items()) / steps,
                "kappa": self.kappa,
                "kappa_by_depth": {d: self.kappa_at(d) for d in sorted(self.predicted_at)},
                "by_batch_bucket": {b: c.summary() for b, c in sorted(self._costs.items())},
            }
