"""`DraftTree`: the one draft-tree structure every drafter fills, plus the tree builders.

    tokens  (B, N) long   node 0 = root = verified_id (the last accepted token, not yet consumed by the target)
    parents (B, N) long   root -1; parents[b, i] < i (topological order)
    scores  (B, N) float  cumulative draft log-prob along the path (root 0); -inf for padding
    valid   (B, N) bool   False for padding nodes (rows that drafted fewer than N - 1 tokens); never accepted
    draft_probs (B, E, V) float32 or None, draft_index (B, N) long or None: stochastic trees only (see below) - node
            i's children were drawn, in index order and without replacement, from draft_probs[b, draft_index[b, i]]
            (the distribution AT node i, shared by all its children; E = the nodes that were expanded, about
            1 + (num_steps - 1) * frontier width, so the memory is B * E * V * 4 bytes, e.g. 8 x 13 x 151936 x 4 =
            60 MB, not B * N * V). None: deterministic drafts (top-k, n-gram, oracle), accepted by the one-hot rule.

Derived for verification: `layout()` (ancestor mask, depth; positions = prefix length + depth) and `paths()`.

Builders (all return N = num_draft_tokens nodes; `expand` gives draft log-probs for the current frontier):
    "eagle2": EAGLE-2 dynamic tree - each step expands the topk best nodes of the newest layer into topk children
              each, scores = cumulative log-prob; finally the best num_draft_tokens - 1 nodes of all steps are kept.
    "seed":   the seed's simplified tree - each step adds the topk children of the best node of the previous step
              (topk * num_steps drafted tokens).
    "chain":  topk = 1, num_steps tokens.
Stochastic trees (TreeConfig.sample_drafts=True, with a `RowSampling` from the engine; lossless with the rule of
accept.py): each frontier node's children are drawn WITHOUT replacement from q = the draft's distribution processed
with the target's own temperature / top-k / top-p (logits_to_probs), in draw order (one inverse-CDF uniform per
draw, slot SLOT_DRAFT + step); a draw past q's support makes an invalid node. Exactness needs the tree's shape to
never depend on a node's own draw or its subtree, only on earlier information: which nodes get children may depend
on their own scores (the frontier choice), but the final pruning to num_draft_tokens may not rank a node by its own
score. So sample mode keeps the first N - 1 valid pool nodes in pool order (layer by layer, frontier rank, draw
order) and, for eagle2, narrows the frontier (`sample_frontier_width`, from the config alone) so that deeper layers
still fit. Rows with temperature 0 draft deterministically (top-k, best-score pruning) in the same call.
Optional: confidence-based dynamic topk (a node keeps children only while their cumulative draft probability
mass stays under `dynamic_topk_mass`) and adaptive num_steps (stop expanding a row when the best frontier's
cumulative draft probability drops below `min_frontier_prob`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from gdnspec.layers.layout import TokenLayout
from gdnspec.ops import tree_build as _tb
from gdnspec.ops.fused import topk as _topk
from gdnspec.sampling import SLOT_DRAFT, RowSampling, sample_from_probs

BUILDERS = ("eagle2", "seed", "chain")


def _is_count(x, low: int = 1) -> bool:
    """An int >= low that is not a bool (True would pass as 1)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


@dataclass
class TreeConfig:
    """Shape of the draft trees. num_draft_tokens counts the root (None = the largest tree the builder can make,
    capped at 64)."""

    topk: int = 4
    num_steps: int = 2
    num_draft_tokens: int | None = None
    builder: str = "eagle2"
    dynamic_topk_mass: float | None = None
    min_frontier_prob: float | None = None
    sample_drafts: bool = False  # stochastic trees when sampling (temperature > 0): see the module docstring

    def __post_init__(self):
        if not isinstance(self.sample_drafts, bool):
            raise ValueError(f"sample_drafts must be a bool, got {self.sample_drafts!r}")
        if not _is_count(self.topk):
            raise ValueError(f"topk must be an int >= 1, got {self.topk!r}")
        if not _is_count(self.num_steps):
            raise ValueError(f"num_steps must be an int >= 1, got {self.num_steps!r}")
        if self.builder not in BUILDERS:
            raise ValueError(f"builder must be one of {BUILDERS}, got {self.builder!r}")
        if self.builder == "chain":
            self.topk = 1
        cap = self.max_nodes()
        if self.num_draft_tokens is None:
            self.num_draft_tokens = min(cap, 64) if self.builder != "seed" else cap
        if not _is_count(self.num_draft_tokens, 2):
            raise ValueError(f"num_draft_tokens must be an int >= 2 (root + at least one draft), got {self.num_draft_tokens!r}")
        if self.num_draft_tokens > cap:
            raise ValueError(f"num_draft_tokens={self.num_draft_tokens} is larger than the tree can hold: builder "
                             f"{self.builder!r} with topk={self.topk}, num_steps={self.num_steps} makes at most {cap} nodes (root included)")
        if self.dynamic_topk_mass is not None and not (0 < self.dynamic_topk_mass <= 1):
            raise ValueError(f"dynamic_topk_mass must be in (0, 1], got {self.dynamic_topk_mass!r}")
        if self.min_frontier_prob is not None and not (0 <= self.min_frontier_prob < 1):
            raise ValueError(f"min_frontier_prob must be in [0, 1), got {self.min_frontier_prob!r}")

    def sample_frontier_width(self) -> int:
        """Frontier width of stochastic trees: eagle2 expands w nodes per layer, the largest w <= topk with
        topk + (num_steps - 1) * w * topk <= num_draft_tokens - 1 (at least 1), so the kept prefix reaches depth."""
        if self.builder == "chain":
            return 1
        if self.builder == "seed" or self.num_steps == 1:
            return self.topk
        room = (self.num_draft_tokens - 1 - self.topk) // ((self.num_steps - 1) * self.topk)
        return max(1, min(self.topk, room))

    def max_nodes(self) -> int:
        """Nodes (root included) the builder can produce."""
        if self.builder == "chain":
            return 1 + self.num_steps
        if self.builder == "seed":
            return 1 + self.topk * self.num_steps
        return 1 + self.topk + (self.num_steps - 1) * self.topk * self.topk


@dataclass
class DraftTree:
    tokens: torch.Tensor
    parents: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor
    draft_probs: torch.Tensor | None = None  # (B, E, V): stochastic trees only (module docstring)
    draft_index: torch.Tensor | None = None  # (B, N) long

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def layout(self) -> TokenLayout:
        return TokenLayout.from_parents(self.parents)

    def num_drafted(self) -> torch.Tensor:
        """(B,) number of real drafted nodes (root excluded)."""
        return self.valid[:, 1:].sum(-1)

    def validate(self, vocab_size: int | None = None) -> None:
        B, N = self.tokens.shape
        for name in ("parents", "scores", "valid"):
            if tuple(getattr(self, name).shape) != (B, N):
                raise ValueError(f"DraftTree.{name} must have shape {(B, N)}, got {tuple(getattr(self, name).shape)}")
        if N < 1 or bool((self.parents[:, 0] != -1).any()):
            raise ValueError("DraftTree: node 0 must be the root (parent -1)")
        idx = torch.arange(N, device=self.parents.device)
        if N > 1 and bool(((self.parents[:, 1:] < 0) | (self.parents[:, 1:] >= idx[1:])).any()):
            raise ValueError("DraftTree.parents must be in topological order: 0 <= parents[b, i] < i for i >= 1")
        if vocab_size is not None and (int(self.tokens.min()) < 0 or int(self.tokens.max()) >= vocab_size):
            raise ValueError(f"DraftTree.tokens must lie in [0, {vocab_size})")
        if (self.draft_probs is None) != (self.draft_index is None):
            raise ValueError("DraftTree.draft_probs and draft_index go together (both None for deterministic drafts)")
        if self.draft_probs is not None:
            if self.draft_probs.dim() != 3 or self.draft_probs.shape[0] != B or tuple(self.draft_index.shape) != (B, N):
                raise ValueError(f"DraftTree.draft_probs must be (B, E, V) and draft_index {(B, N)}, got "
                                 f"{tuple(self.draft_probs.shape)} and {tuple(self.draft_index.shape)}")

    def select(self, rows) -> "DraftTree":
        q = None if self.draft_probs is None else self.draft_probs[rows]
        qi = None if self.draft_index is None else self.draft_index[rows]
        return DraftTree(self.tokens[rows], self.parents[rows], self.scores[rows], self.valid[rows], q, qi)

    def first_nodes(self, n: int) -> "DraftTree":
        """The tree cut to its first n node columns (the caller knows the rest is padding)."""
        qi = None if self.draft_index is None else self.draft_index[:, :n]
        return DraftTree(self.tokens[:, :n], self.parents[:, :n], self.scores[:, :n], self.valid[:, :n],
                         self.draft_probs, qi)

    def best_nodes(self, n: int, *, key: torch.Tensor | None = None) -> "DraftTree":
        """The tree cut to its root and the n - 1 best nodes of each row (n columns, topological order, padded with
        invalid nodes where a row has fewer). A node ranks by the smallest score on its path (its own score for every
        builder here, whose scores never increase along a path; a drafter whose scores do rise cannot orphan a node),
        ties by index, so the kept set is closed under parents (spec/sizing.py). key: (B, N) float values to rank by
        instead of the scores (the same path minimum applies); padding nodes stay padding. Deterministic trees only:
        a stochastic tree's kept nodes must not be ranked by their own draws (ValueError)."""
        if not _is_count(n):
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if self.draft_probs is not None:
            raise ValueError("best_nodes: a stochastic tree (draft_probs set) cannot be cut by its nodes' scores")
        if n == 1:
            return self.first_nodes(1)
        if key is not None and tuple(key.shape) != tuple(self.scores.shape):
            raise ValueError(f"key must have the scores' shape {tuple(self.scores.shape)}, got {tuple(key.shape)}")
        base = self.scores if key is None else key.to(self.scores.dtype).masked_fill(~self.valid, float("-inf"))
        above = base[:, 1:] > base.gather(1, self.parents[:, 1:].clamp(min=0))
        if bool((above & self.valid[:, 1:]).any()):  # a value rose along a path: rank by the path's minimum
            base = base.clone()
            for i in range(1, self.num_nodes):
                base[:, i] = torch.minimum(base[:, i], base.gather(1, self.parents[:, i:i + 1].clamp(min=0))[:, 0])
        return _select_best(self.tokens, self.parents, self.scores, n, key=None if base is self.scores else base)[0]

    @staticmethod
    def from_lists(roots: list[int], nodes: list[list[tuple[int, int, float]]], *, num_nodes: int | None = None,
                   device=None) -> "DraftTree":
        """Build from per-row lists of (token, parent, score) for the drafted nodes (parents index the full node list,
        0 = root), padding rows to the same node count with invalid nodes."""
        N = num_nodes or 1 + max((len(n) for n in nodes), default=0)
        tok_rows, par_rows, sc_rows, val_rows = [], [], [], []
        for b, (root, row) in enumerate(zip(roots, nodes)):  # plain lists, one tensor per field (few host ops)
            if len(row) > N - 1:
                raise ValueError(f"row {b} has {len(row)} drafted nodes, the tree holds {N - 1}")
            pad = N - 1 - len(row)
            tok_rows.append([root] + [t for t, _, _ in row] + [0] * pad)
            par_rows.append([-1] + [p for _, p, _ in row] + [0] * pad)
            sc_rows.append([0.0] + [float(c) for _, _, c in row] + [float("-inf")] * pad)
            val_rows.append([True] * (1 + len(row)) + [False] * pad)
        return DraftTree(torch.tensor(tok_rows, dtype=torch.long, device=device).view(-1, N),
                         torch.tensor(par_rows, dtype=torch.long, device=device).view(-1, N),
                         torch.tensor(sc_rows, dtype=torch.float32, device=device).view(-1, N),
                         torch.tensor(val_rows, dtype=torch.bool, device=device).view(-1, N))


@dataclass
class DraftLogits:
    """What a drafter's `expand` may return instead of log-probs: the raw draft logits, so that the builder ranks the
    children in ONE fused log-softmax + top-k launch (ops/fused/topk.py; torch's softmax + radix top-k took 14-30 us
    per expansion on an H200) and builds the full log-probs only where it needs q (stochastic trees).

    logits (B, F, Vd) in any float dtype; ids (Vd,) int64 the target token ids of the columns (a reduced draft
    vocabulary, models/eagle.py) or None (Vd = vocab_size, column = token id); vocab_size the target's."""

    logits: torch.Tensor
    vocab_size: int
    ids: torch.Tensor | None = None
    _lp: torch.Tensor | None = field(default=None, repr=False)  # logprobs(), once: the torch rank and q share it

    def topk(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs (B, F, k) float32, target token ids (B, F, k) int64), best first: logprobs().topk(k), by the
        fused kernel on CUDA (`_kernel_ranks`; exact ties then come lowest column first, i.e. in draft_ids order with
        a reduced vocabulary), elsewhere by torch exactly as the builder always ranked them (the CPU's trees are
        unchanged, and the Triton interpreter, which is not thread-safe, never runs in an engine's step)."""
        if k > self.logits.shape[-1] or not _kernel_ranks(self.logits, k):
            return self.logprobs().topk(k, dim=-1)  # torch, or more children than draft tokens: the full-vocab rank
        lp, col = _topk.log_softmax_topk(self.logits, k)
        return lp, (col if self.ids is None else self.ids[col])

    def logprobs(self) -> torch.Tensor:
        """(B, F, vocab_size) float32 log-probs on the target's ids (-inf outside a reduced vocabulary); computed
        once (a stochastic tree's q and the torch ranking of the same expansion read the same tensor)."""
        if self._lp is None:
            x = self.logits
            lp = torch.log_softmax(x if x.dtype == torch.float32 else x.float(), dim=-1)
            if self.ids is not None:
                lp = lp.new_full((*lp.shape[:-1], self.vocab_size), float("-inf")).index_copy_(-1, self.ids, lp)
            self._lp = lp
        return self._lp


def _kernel_ranks(logits: torch.Tensor, k: int) -> bool:
    """Whether DraftLogits ranks with the fused kernel: CUDA logits it takes (tests under the interpreter patch this
    to ops/fused/topk.kernel_applies to run the builder through the kernel on the CPU)."""
    return logits.is_cuda and _topk.kernel_applies(logits, k)


ExpandFn = Callable[[torch.Tensor, torch.Tensor | None], "torch.Tensor | DraftLogits"]


def _top(out: "torch.Tensor | DraftLogits", k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best children of each frontier node from what `expand` returned: (log-probs, token ids) (B, F, k)."""
    if isinstance(out, DraftLogits):
        return out.topk(k)
    return (out if out.dtype == torch.float32 else out.float()).topk(k, dim=-1)


def _logprobs(out: "torch.Tensor | DraftLogits") -> torch.Tensor:
    """The full draft log-probs (B, F, vocab) float32 from what `expand` returned."""
    if isinstance(out, DraftLogits):
        return out.logprobs()
    return out if out.dtype == torch.float32 else out.float()


def draw_without_replacement(q: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k sequential draws without replacement: q (..., V) probabilities, uniforms (..., k) -> (tokens (..., k),
    log q(token) (..., k), -inf for draws past q's support). Draw r is the inverse CDF of q with draws 1..r-1 removed."""
    q_r = q
    toks, lps = [], []
    for r in range(uniforms.shape[-1]):
        left = q_r.sum(-1)
        x = sample_from_probs(q_r, uniforms[..., r])
        qx = q.gather(-1, x[..., None]).squeeze(-1)
        lps.append(torch.where(left > 0, qx.clamp(min=1e-38).log(), float("-inf")))
        toks.append(x)
        q_r = q_r.scatter(-1, x[..., None], 0.0)
    return torch.stack(toks, -1), torch.stack(lps, -1)


def build_tree(root_tokens: torch.Tensor, expand: ExpandFn, config: TreeConfig, *, sync_free: bool = False,
               draft: RowSampling | None = None) -> tuple[DraftTree, torch.Tensor]:
    """Grow a draft tree from root_tokens (B,) with a draft model.

    expand(frontier_tokens (B, F), parent_slot (B, F) or None) -> draft log-probs (B, F, vocab) for the children of the
    frontier nodes, or a `DraftLogits` (the raw logits: ranked by one fused log-softmax + top-k kernel); parent_slot[b, f] is the index, in the previous call's frontier, of node f's parent (None when
    there is nothing to gather: the first call, whose frontier is the root, and every call of a greedy chain, whose
    one frontier node is the child of the previous one). The drafter keeps whatever per-node state it needs and
    gathers it by parent_slot. sync_free=True never reads device values on the host (no early stop): CUDA graphs. Returns (tree, selected pool indices (B, N-1) of the kept nodes, for the seed's top_scores_index).
    draft: per-row sampling settings and uniforms; with config.sample_drafts the tree is stochastic for the rows
    with temperature > 0 (module docstring) and carries draft_probs / draft_index.
    """
    sample = draft is not None and config.sample_drafts
    if config.builder == "chain" and not sample:
        return _build_chain(root_tokens, expand, config, sync_free=sync_free)
    if not sample and _fused_eagle2(root_tokens, config):
        return _build_eagle2_fused(root_tokens, expand, config, sync_free=sync_free)
    B = root_tokens.shape[0]
    device = root_tokens.device
    k, N = config.topk, config.num_draft_tokens
    pool_tokens = [root_tokens[:, None]]
    pool_parents = [torch.full((B, 1), -1, dtype=torch.long, device=device)]
    pool_scores = [torch.zeros(B, 1, device=device)]
    frontier_tokens = root_tokens[:, None]  # (B, F)
    frontier_pool = torch.zeros(B, 1, dtype=torch.long, device=device)  # pool index of each frontier node
    frontier_scores = torch.zeros(B, 1, device=device)
    parent_slot = None
    pool_size = 1
    sampled_rows = draft.temperature > 0 if sample else None  # (B,)
    pool_q, pool_q_at = [], []  # per step: q at the frontier nodes (B, F, V), their pool indices (B, F)
    for step in range(config.num_steps):
        out = expand(frontier_tokens, parent_slot)  # (B, F, vocab) log-probs or DraftLogits
        top_lp, top_tok = _top(out, k)  # (B, F, k)
        F = top_lp.shape[1]
        if sample:  # draws without replacement from q, in draw order (module docstring)
            q = draft.probs(_logprobs(out))  # (B, F, vocab): logp = logits - const per row, the same processed law
            s_tok, s_lp = draw_without_replacement(q, draft.uniforms(SLOT_DRAFT + step, F * k).view(B, F, k))
            top_tok = torch.where(sampled_rows[:, None, None], s_tok, top_tok)
            top_lp = torch.where(sampled_rows[:, None, None], s_lp, top_lp)
            pool_q.append(q)
            pool_q_at.append(frontier_pool)
        cand_scores = frontier_scores[..., None] + top_lp  # (B, F, k)
        if config.dynamic_topk_mass is not None:  # keep a child while the mass of its better siblings is below the bar
            mass_before = top_lp.exp().cumsum(-1) - top_lp.exp()
            cand_scores = cand_scores.masked_fill(mass_before >= config.dynamic_topk_mass, float("-inf"))
        if config.builder == "seed" and step > 0:  # only the best node of the previous step has children
            best = frontier_scores.argmax(-1, keepdim=True)  # (B, 1)
            keep_slot = torch.zeros_like(frontier_scores, dtype=torch.bool).scatter(1, best, True)
            cand_scores = cand_scores.masked_fill(~keep_slot[..., None], float("-inf"))
        cand_parent_pool = frontier_pool[..., None].expand(B, F, k)
        cand_slot = torch.arange(F, device=device)[None, :, None].expand(B, F, k)
        pool_tokens.append(top_tok.reshape(B, F * k))
        pool_parents.append(cand_parent_pool.reshape(B, F * k))
        pool_scores.append(cand_scores.reshape(B, F * k))
        layer_base = pool_size
        pool_size += F * k
        if step == config.num_steps - 1:
            break
        # next frontier: the best nodes of this layer (k for eagle2 / seed; 1 for chain)
        width = 1 if config.builder == "chain" else (config.sample_frontier_width() if sample else k)
        flat = cand_scores.reshape(B, F * k)
        sel_scores, sel = flat.topk(min(width, F * k), dim=-1)  # (B, F')
        if config.min_frontier_prob is not None:  # adaptive depth: stop rows whose best path got unlikely
            alive = sel_scores[:, :1] >= math.log(max(config.min_frontier_prob, 1e-30))
            sel_scores = sel_scores.masked_fill(~alive, float("-inf"))
        frontier_tokens = top_tok.reshape(B, F * k).gather(1, sel)
        parent_slot = cand_slot.reshape(B, F * k).gather(1, sel)
        frontier_pool = sel + layer_base
        frontier_scores = sel_scores
        if not sync_free and bool(torch.isinf(frontier_scores).all()):
            break
    tokens = torch.cat(pool_tokens, 1)
    parents = torch.cat(pool_parents, 1)
    scores = torch.cat(pool_scores, 1)  # (B, P)
    if not sample:
        return _select_best(tokens, parents, scores, N)
    # stochastic rows keep the first N - 1 valid nodes in pool order: a rank that ignores each node's own draw
    P = scores.shape[1]
    first = -torch.arange(P, device=device, dtype=scores.dtype).expand(B, P)
    key = torch.where(sampled_rows[:, None], torch.where(torch.isfinite(scores), first, float("-inf")), scores)
    tree, order = _select_best(tokens, parents, scores, N, key=key)
    slot = torch.zeros(B, P, dtype=torch.long, device=device)  # pool index -> row of draft_probs
    base = 0
    for at in pool_q_at:
        slot.scatter_(1, at, base + torch.arange(at.shape[1], device=device).expand_as(at))
        base += at.shape[1]
    index = torch.cat([slot[:, :1], slot.gather(1, order)], 1)
    tree.draft_index = torch.nn.functional.pad(index, (0, N - index.shape[1]))
    tree.draft_probs = torch.cat(pool_q, 1)  # (B, E, vocab)
    return tree, order


def frontier_rows(parent_slot: torch.Tensor, width: int, given: torch.Tensor | None = None) -> torch.Tensor:
    """(B * F,) long: the flat row b * width + parent_slot[b, f] of each new frontier node's parent among the
    previous frontier's B * width per-node states (what a drafter's expand gathers its states by); `given` when the
    builder handed them over (expand's parent_rows, from the fused frontier kernel)."""
    if given is not None:
        return given
    B = parent_slot.shape[0]
    return (torch.arange(B, device=parent_slot.device)[:, None] * width + parent_slot).reshape(-1)


def _call(expand: ExpandFn, frontier_tokens: torch.Tensor, parent_slot: torch.Tensor | None,
          parent_rows: torch.Tensor | None):
    """expand(frontier_tokens, parent_slot), with parent_rows= (the flat rows b * F_prev + parent_slot, (B * F,)) when
    the drafter's expand declares `takes_parent_rows` and the builder has them (the fused frontier kernel writes them:
    the drafter then gathers its per-node state without computing them, 3 kernels less per step)."""
    if parent_rows is not None and getattr(expand, "takes_parent_rows", False):
        return expand(frontier_tokens, parent_slot, parent_rows=parent_rows)
    return expand(frontier_tokens, parent_slot)


def _fused_eagle2(root_tokens: torch.Tensor, config: TreeConfig) -> bool:
    """Whether a deterministic tree takes the fused builder (ops/tree_build.py): eagle2 without the per-step options
    (dynamic_topk_mass, min_frontier_prob), a pool of at most MAX_POOL + 1 nodes, long roots on a device the kernels
    run on (CUDA; the CPU keeps the torch loop below, which is also the reference)."""
    return (config.builder == "eagle2" and config.dynamic_topk_mass is None and config.min_frontier_prob is None
            and config.max_nodes() <= _tb.MAX_POOL + 1 and config.topk * config.topk <= _tb.MAX_POOL
            and root_tokens.dim() == 1 and root_tokens.dtype == torch.long and _tb.runs_on(root_tokens))


def _build_eagle2_fused(root_tokens: torch.Tensor, expand: ExpandFn, config: TreeConfig, *, sync_free: bool
                        ) -> tuple[DraftTree, torch.Tensor]:
    """build_tree's deterministic eagle2 loop with its bookkeeping in Triton kernels: one `frontier_step` launch per
    step (the layer's scores into a preallocated pool, the next frontier) and one `select_best` launch at the end,
    instead of ~10 torch kernels per step and ~25 at the end. The same tree as the torch loop, NaN and -inf scores
    included (tests/test_tree_build.py), except where scores tie exactly: the kernels keep the lower candidate index,
    torch.topk leaves that order unspecified."""
    B = root_tokens.shape[0]
    k, N = config.topk, config.num_draft_tokens
    P = config.max_nodes()
    pool = _tb.new_pool(B, P, root_tokens.device)
    frontier_tokens, parent_slot, rows, frontier = root_tokens[:, None], None, None, None
    base = 1
    for step in range(config.num_steps):
        top_lp, top_tok = _top(_call(expand, frontier_tokens, parent_slot, rows), k)  # (B, F, k)
        F = top_lp.shape[1]
        last = step == config.num_steps - 1
        nxt = _tb.frontier_step(top_lp, top_tok, pool, base=base, width=0 if last else min(k, F * k),
                                frontier=frontier, roots=root_tokens)
        base += F * k
        if last:
            break
        frontier_tokens, parent_slot, fpool, fscores, rows = nxt
        frontier = (fscores, fpool)
        if not sync_free and bool(torch.isinf(fscores).all()):
            break
    if base < P:  # stopped early: the filled columns only
        pool = tuple(t[:, :base].contiguous() for t in pool)
    tokens, parents, scores, valid, order = _tb.select_best(pool, num_draft_tokens=N)
    return DraftTree(tokens, parents, scores, valid), order


def _build_chain(root_tokens: torch.Tensor, expand: ExpandFn, config: TreeConfig, *, sync_free: bool
                 ) -> tuple[DraftTree, torch.Tensor]:
    """build_tree for a greedy chain in the fewest ops (the general loop's frontier top-k, gathers and the final sort
    are identities for one node per layer): node s + 1 is the top token below node s, score = its cumulative
    log-prob; a node is valid while the scores stay finite (and above min_frontier_prob); the first N - 1 are kept
    (scores never increase along the chain, so they are also the best). Equal to the general builder (tested)."""
    B = root_tokens.shape[0]
    device = root_tokens.device
    n_keep = config.num_draft_tokens - 1
    floor = math.log(max(config.min_frontier_prob, 1e-30)) if config.min_frontier_prob is not None else None
    if floor is None and sync_free and root_tokens.dim() == 1 and root_tokens.dtype == torch.long \
            and _tb.runs_on(root_tokens):
        # the fused assembly (ops/tree_build.chain_tree): two cats and one kernel instead of a score add per step
        # and ~17 kernels at the end; the scores are summed in the same order (bit-equal, tests/test_tree_build.py)
        lps, toks, frontier = [], [], root_tokens[:, None]
        for step in range(min(config.num_steps, n_keep)):
            top_lp, top_tok = _top(expand(frontier, None), 1)  # (B, 1, 1)
            lps.append(top_lp[:, 0])
            toks.append(top_tok[:, 0])
            frontier = top_tok[:, 0]
        tokens, parents, scores, valid, order = _tb.chain_tree(root_tokens, torch.cat(lps, 1), torch.cat(toks, 1),
                                                               num_draft_tokens=config.num_draft_tokens)
        return DraftTree(tokens, parents, scores, valid), order
    toks, scores = [], []
    frontier, score = root_tokens[:, None], None  # (B, 1)
    for step in range(min(config.num_steps, n_keep)):
        top_lp, top_tok = _top(expand(frontier, None), 1)  # (B, 1, 1)
        top_lp, top_tok = top_lp[:, 0], top_tok[:, 0]  # (B, 1); topk as the general builder (same tie rule)
        score = top_lp if score is None else score + top_lp
        toks.append(top_tok)
        scores.append(score)
        if floor is not None:  # adaptive depth: the children of an unlikely node are not drafted
            score = score.masked_fill(score < floor, float("-inf"))
        frontier = top_tok
        if not sync_free and step + 1 < min(config.num_steps, n_keep) and bool(torch.isinf(score).all()):
            break
    kept = torch.cat(scores, 1)  # (B, S)
    S = kept.shape[1]
    valid = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=device), torch.isfinite(kept)], 1)  # (B, S + 1)
    # valid is a prefix of each row: below a -inf score every score is -inf; invalid nodes hang off the root
    tree = DraftTree(
        tokens=torch.where(valid, torch.cat([root_tokens[:, None], *toks], 1), 0),
        parents=torch.where(valid, torch.arange(-1, S, device=device), 0),
        scores=torch.where(valid, torch.cat([torch.zeros(B, 1, device=device), kept], 1), float("-inf")),
        valid=valid,
    )
    tree = _pad_nodes(tree, config.num_draft_tokens)  # stopped early (host-sync mode) or fewer steps than nodes
    return tree, torch.arange(1, S + 1, device=device).expand(B, S)


def _select_best(tokens, parents, scores, N, *, key=None) -> tuple[DraftTree, torch.Tensor]:
    """Keep the root and the N-1 best pool nodes by `key` (default: the scores), in topological (pool) order,
    remapping parents.

    Scores never increase along a path and ties are broken by pool order (parents first), so the kept set is closed
    under taking parents (the same holds for sample mode's key, -pool index among valid nodes)."""
    B, P = tokens.shape
    device = tokens.device
    n_keep = min(N - 1, P - 1)
    cand = (scores if key is None else key)[:, 1:]
    # stable "best first" ordering: sort by score descending, ties by pool index ascending
    order = torch.sort(cand, dim=-1, descending=True, stable=True).indices[:, :n_keep] + 1  # (B, n_keep) pool idx
    kept_scores = scores.gather(1, order)
    order, perm = torch.sort(order, dim=-1)  # topological order
    kept_scores = kept_scores.gather(1, perm)
    valid = torch.isfinite(kept_scores)
    # map pool index -> node index
    node_of_pool = torch.full((B, P), -1, dtype=torch.long, device=device)
    node_of_pool[:, 0] = 0
    node_of_pool.scatter_(1, order, torch.arange(1, n_keep + 1, device=device).expand(B, n_keep))
    kept_parents = node_of_pool.gather(1, parents.gather(1, order))
    # padding nodes (invalid) hang off the root; a valid node's parent is always kept (see docstring)
    kept_parents = torch.where(valid, kept_parents, torch.zeros_like(kept_parents))
    kept_tokens = torch.where(valid, tokens.gather(1, order), torch.zeros_like(order))
    tree = DraftTree(
        tokens=torch.cat([tokens[:, :1], kept_tokens], 1),
        parents=torch.cat([torch.full((B, 1), -1, dtype=torch.long, device=device), kept_parents], 1),
        scores=torch.cat([torch.zeros(B, 1, device=device), kept_scores.masked_fill(~valid, float("-inf"))], 1),
        valid=torch.cat([torch.ones(B, 1, dtype=torch.bool, device=device), valid], 1),
    )
    return _pad_nodes(tree, N), order  # the pool may be smaller than asked


def _pad_nodes(tree: DraftTree, N: int) -> DraftTree:
    """The tree padded to N nodes with invalid ones (token 0, parent 0, score -inf)."""
    if tree.num_nodes >= N:
        return tree
    B, pad, device = tree.batch_size, N - tree.num_nodes, tree.tokens.device
    return DraftTree(
        torch.cat([tree.tokens, torch.zeros(B, pad, dtype=torch.long, device=device)], 1),
        torch.cat([tree.parents, torch.zeros(B, pad, dtype=torch.long, device=device)], 1),
        torch.cat([tree.scores, torch.full((B, pad), float("-inf"), device=device)], 1),
        torch.cat([tree.valid, torch.zeros(B, pad, dtype=torch.bool, device=device)], 1),
    )
