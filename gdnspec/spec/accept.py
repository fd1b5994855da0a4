"""Acceptance: which path of the draft tree the target agrees with, and the bonus token after it.

Greedy: from the root, while a valid child's token equals argmax(target logits at the current node), move to it.
Vectorised: node i "matches" when its token is the target's argmax at its parent; a node is accepted when every
node on its path matches; the deepest accepted node ends the path (siblings carry distinct tokens, so it is unique).

Sampling: tree rejection sampling, the multi-draft rule of SpecInfer (Miao et al. 2023, "SpecInfer", Alg. 2 /
Thm. 4.2), which generalises the single-draft rule of Leviathan et al. 2023 and Chen et al. 2023 (also EAGLE's tree
rule). At the current node let p be the target's distribution (after temperature / top-k / top-p) and q the
distribution the node's children were drawn from; try the children x_1, x_2, ... in order:

    accept x_i with probability min(1, p_i(x_i) / q_i(x_i))  -> move to x_i, start again there with fresh p, q
    on rejection:  p_{i+1} = norm(max(p_i - q_i, 0))
                   q_{i+1} = norm(q_i with q_i(x_i) = 0)      (draws WITHOUT replacement; q_{i+1} = q_i for i.i.d.)
    no child left: the bonus token is drawn from the final residual p_i.

Why it is exact (every emitted token is distributed as p, and the walk below an accepted child is the same procedure
for the target's next distribution): by induction on the number of children left. With none, the token is drawn
from p. Otherwise P(emit y via x_1) = q_1(y) min(1, p_1(y)/q_1(y)) = min(p_1(y), q_1(y)); rejection has probability
r = sum_y max(p_1(y) - q_1(y), 0), and given rejection the rejected token z had probability max(q_1(z) - p_1(z), 0)/r,
so whatever z was, the rest is the same procedure with target p_2 (independent of z) and drafts that are
  (a) i.i.d. from q:                   still draws from q_2 = q_1,
  (b) sampled without replacement:     draws from q_1 conditioned on != z, i.e. q_2 = norm(q_1 with z removed),
which by induction emits p_2; in total min(p_1, q_1) + r p_2 = min(p_1, q_1) + max(p_1 - q_1, 0) = p_1.
  (c) deterministic drafts (top-k of q, n-gram, oracle): the drafts are not random, so their "q" is the one-hot of
      the drafted token: accept x with probability p(x), on rejection p <- norm(p with p(x) = 0). Using the draft's
      softmax as q here is NOT exact (a single top-1 draft x would be emitted with probability p(x) but any other y
      with max(p(y) - q(y), 0)), so deterministic trees carry no q (DraftTree.draft_probs None = one-hot rule).
The rule also needs: the children a node has (how many, which are valid) may depend on anything but the children's
own draws and their subtrees (tree.py's stochastic builder guarantees it), and the tree never sees the target's
uniforms (drafters see only committed tokens).

Implementations (same uniforms -> same result, tested):
    tree_rejection_sample           vectorised: tensor ops over (B, N, vocab), a loop over depth x sibling rank
                                    bounded by the tree config, fixed shapes, no host sync (CUDA graphs)
    tree_rejection_sample_reference per-row float64 Python loop, with `_mutant` switches for the tests
Uniforms are explicit: u (B, N) float64; u[:, i] (i >= 1) is node i's acceptance test, u[:, 0] draws the bonus
(inverse CDF of the residual). `accept_sampling` (eager: settings shared by all rows, torch.Generator) and
`accept_rows` (static: per-row settings, greedy rows exactly `accept_greedy`) wrap the vectorised form.

Result per row: path (B, L) node indices from the root (padded with the last node), counts (B,) nodes on the path
(root included, >= 1), bonus (B,) the next verified id. Emitted tokens = tokens[path[1:counts]] + bonus.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gdnspec.layers.layout import TokenLayout
from gdnspec.ops import tree_index
from gdnspec.sampling import SLOT_ACCEPT, RowSampling, generator_uniforms, logits_to_probs, sample_from_probs
from gdnspec.spec.tree import DraftTree


@dataclass
class Acceptance:
    path: torch.Tensor  # (B, L) long, node indices, root first
    counts: torch.Tensor  # (B,) long, >= 1
    bonus: torch.Tensor  # (B,) long
    # computed on the way by the fused greedy kernel (None otherwise): the last node (B,), the path's tokens (B, L),
    # packed (B, L + 3) = [path tokens | counts | bonus | valid drafted nodes] (what a static step hands the host)
    last: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    packed: torch.Tensor | None = None

    def path_tokens(self, tree: DraftTree) -> torch.Tensor:
        """(B, L) committed tokens of the step (root first)."""
        return self.tokens if self.tokens is not None else tree.tokens.gather(1, self.path)

    def emitted(self, tree: DraftTree) -> list[list[int]]:
        """Per row: accepted draft tokens then the bonus token."""
        toks = self.path_tokens(tree).tolist()
        counts = self.counts.tolist()
        bonus = self.bonus.tolist()
        return [row[1:c] + [b] for row, c, b in zip(toks, counts, bonus)]


def path_to_node(layout: TokenLayout, node: torch.Tensor, *, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestors of `node` (B,) ordered root first: (path (B, L) padded with the node itself, counts (B,)).

    L = the longest path, or `width` when given (no host sync: CUDA graphs)."""
    B, N, _ = layout.ancestor_mask.shape
    rows = torch.arange(B, device=node.device)
    on_path = layout.ancestor_mask[rows, node]  # (B, N)
    counts = on_path.sum(-1)
    L = int(counts.max()) if width is None else width
    idx = torch.arange(N, device=node.device).expand(B, N)
    keyed = torch.where(on_path, idx, N + idx)  # path nodes first, in topological (= depth) order
    path = keyed.sort(dim=-1).values[:, :L]
    path = torch.where(path < N, path, node[:, None].expand(B, L))
    return path, counts


def accept_greedy(tree: DraftTree, logits: torch.Tensor, layout: TokenLayout, *, width: int | None = None) -> Acceptance:
    """logits (B, N, vocab) of the target at every node. width: fixed path width (see path_to_node).

    With a width (the static steps) on CUDA, everything after the argmax is one Triton kernel
    (ops.tree_index.greedy_accept, tested equal to the torch ops below)."""
    B, N = tree.tokens.shape
    target = logits.argmax(-1)  # (B, N)
    if width is not None and tree_index.runs_on(target):
        path, counts, bonus, last, toks, packed = tree_index.greedy_accept(
            target, tokens=tree.tokens, parents=tree.parents, valid=tree.valid, ancestor_mask=layout.ancestor_mask,
            depth=layout.depth, width=width, extra=True)
        return Acceptance(path=path, counts=counts, bonus=bonus, last=last, tokens=toks, packed=packed)
    return _accept_greedy_torch(tree, target, layout, width=width)


def _accept_greedy_torch(tree: DraftTree, target: torch.Tensor, layout: TokenLayout, *, width: int | None
                         ) -> Acceptance:
    """accept_greedy's torch form from the argmax target (B, N)."""
    parent = tree.parents.clamp(min=0)
    match = tree.valid & (tree.tokens == target.gather(1, parent))  # (B, N)
    match[:, 0] = True
    mismatch_on_path = (layout.ancestor_mask & ~match[:, None, :]).any(-1)  # (B, N)
    accepted = ~mismatch_on_path
    deepest = torch.where(accepted, layout.depth, -1).argmax(-1)  # (B,)
    path, counts = path_to_node(layout, deepest, width=width)
    bonus = target.gather(1, deepest[:, None]).squeeze(1)
    return Acceptance(path=path, counts=counts, bonus=bonus)


def sibling_rank(parents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, N) long: the order of each node among the valid children of its parent (index order = draw order)."""
    N = parents.shape[1]
    same = (parents[:, :, None] == parents[:, None, :]) & valid[:, None, :]  # [b, i, j]: j shares i's parent
    earlier = torch.ones(N, N, dtype=torch.bool, device=parents.device).tril(-1)  # j < i
    return (same & earlier).sum(-1)


def tree_rejection_sample(*, tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor, probs: torch.Tensor,
                          uniforms: torch.Tensor, draft_probs: torch.Tensor | None = None,
                          draft_index: torch.Tensor | None = None, without_replacement: bool = True,
                          max_depth: int, max_children: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised tree rejection sampling (module docstring). Returns (last accepted node (B,), bonus token (B,)).

    tokens, parents (B, N) long; valid (B, N) bool; probs (B, N, V) float: the target's processed distribution at
    every node; uniforms (B, N) float64 in [0, 1); draft_probs (B, E, V) float and draft_index (B, N) long: node i's
    children were drawn from draft_probs[b, draft_index[b, i]] (None: deterministic drafts, one-hot rule);
    without_replacement: the q update of draws without replacement (False: i.i.d. draws, q never changes).
    max_depth >= the deepest valid node's depth and max_children >= the most valid children of a node: loop bounds
    (from the tree config on static paths; no host sync). Residuals are kept unnormalised with their mass. On CUDA,
    deterministic drafts (draft_probs None) with float32 / float64 probs and N <= 128 nodes take one Triton kernel
    with the same rule (ops/tree_accept.py, unless GDNSPEC_TREE_ACCEPT=0)."""
    B, N = tokens.shape
    if draft_probs is None:
        from gdnspec.ops import tree_accept  # the kernels' layer sits below this module; imported on use

        if tree_accept.runs_on(probs, N):
            return tree_accept.tree_rejection_sample_fused(tokens=tokens, parents=parents, valid=valid, probs=probs,
                                                           uniforms=uniforms, max_depth=max_depth,
                                                           max_children=max_children)
    dev = probs.device
    rows = torch.arange(B, device=dev)
    idx = torch.arange(N, device=dev)
    rank = sibling_rank(parents, valid)
    candidate = valid & (idx > 0)
    use_q = draft_probs is not None
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    p_res = probs[:, 0].clone()  # (B, V)
    p_mass = p_res.sum(-1)
    if use_q:
        q_res = draft_probs[rows, draft_index[:, 0]].to(p_res.dtype)
        q_mass = q_res.sum(-1)
    for _ in range(max_depth):
        moved = torch.zeros(B, dtype=torch.bool, device=dev)
        nxt = cur
        for r in range(max_children):
            match = candidate & (parents == cur[:, None]) & (rank == r)  # (B, N): cur's child of rank r
            exists = match.any(-1) & active & ~moved
            c = match.to(torch.uint8).argmax(-1)
            x = tokens[rows, c]
            px = p_res[rows, x]
            u = uniforms[rows, c].to(p_res.dtype)
            if use_q:
                qx = q_res[rows, x]
                accept = exists & (u * qx * p_mass < px * q_mass)  # u < (px / p_mass) / (qx / q_mass)
            else:
                accept = exists & (u * p_mass < px)
            reject = exists & ~accept
            nxt = torch.where(accept, c, nxt)
            moved = moved | accept
            if use_q:
                new_p = (p_res / p_mass[:, None] - q_res / q_mass[:, None]).clamp(min=0)
                new_mass = new_p.sum(-1)
                ok = reject & (new_mass > 0)  # zero residual mass: rejection had probability 0 (rounding only)
                p_res = torch.where(ok[:, None], new_p, p_res)
                p_mass = torch.where(ok, new_mass, p_mass)
                if without_replacement:
                    q_res = q_res.clone()
                    q_res[rows, x] = torch.where(reject, torch.zeros_like(qx), qx)
                    q_mass = torch.where(reject, q_res.sum(-1), q_mass)
            else:
                ok = reject & (p_mass - px > 0)
                p_res = p_res.clone()
                p_res[rows, x] = torch.where(ok, torch.zeros_like(px), px)
                p_mass = torch.where(ok, p_mass - px, p_mass)
        active = active & moved
        cur = nxt
        fresh = probs[rows, cur]
        p_res = torch.where(moved[:, None], fresh, p_res)
        p_mass = torch.where(moved, fresh.sum(-1), p_mass)
        if use_q:
            fresh_q = draft_probs[rows, draft_index[rows, cur]].to(p_res.dtype)
            q_res = torch.where(moved[:, None], fresh_q, q_res)
            q_mass = torch.where(moved, fresh_q.sum(-1), q_mass)
    bonus = sample_from_probs(p_res, uniforms[:, 0])
    return cur, bonus


def tree_rejection_sample_reference(*, tokens, parents, valid, probs, uniforms, draft_probs=None, draft_index=None,
                                    without_replacement: bool = True, _mutant: str | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rule, one row and one child at a time in float64 (the reference for `tree_rejection_sample`).

    _mutant (tests only: wrong rules that the chi-square test must reject): "ignore_q" accepts with p(x) and updates
    p as if q were one-hot although the drafts were sampled from q; "bonus_from_p" draws the bonus from the node's
    full p instead of the residual; "no_q_update" keeps q for the remaining siblings of draws without replacement."""
    B, N = tokens.shape
    tok, par, val = tokens.tolist(), parents.tolist(), valid.tolist()
    P = probs.detach().to(torch.float64).cpu()
    Q = None if draft_probs is None or _mutant == "ignore_q" else draft_probs.detach().to(torch.float64).cpu()
    qi = None if draft_index is None else draft_index.tolist()
    U = uniforms.detach().to(torch.float64).cpu().tolist()
    last, bonus = [], []
    for b in range(B):
        children = [[] for _ in range(N)]
        for i in range(1, N):
            if val[b][i]:
                children[par[b][i]].append(i)
        cur = 0
        while True:
            p = P[b, cur] / P[b, cur].sum()
            q = None if Q is None else Q[b, qi[b][cur]] / Q[b, qi[b][cur]].sum()
            moved = False
            for c in children[cur]:
                x = tok[b][c]
                px, qx = float(p[x]), (1.0 if q is None else float(q[x]))
                if U[b][c] * qx < px:  # accept with probability min(1, p(x) / q(x))
                    cur, moved = c, True
                    break
                if q is None:
                    new_p = p.clone()
                    new_p[x] = 0.0
                else:
                    new_p = (p - q).clamp(min=0)
                if float(new_p.sum()) > 0:
                    p = new_p / new_p.sum()
                if q is not None and without_replacement and _mutant != "no_q_update":
                    q = q.clone()
                    q[x] = 0.0
                    q = q / q.sum() if float(q.sum()) > 0 else q
            if not moved:
                break
        if _mutant == "bonus_from_p":
            p = P[b, cur]
        cdf = p.cumsum(0)
        j = int(torch.searchsorted(cdf, torch.tensor([U[b][0] * float(cdf[-1])], dtype=torch.float64), right=True))
        last_pos = int(torch.nonzero(p > 0).max())
        last.append(cur)
        bonus.append(min(j, last_pos))
    dev = tokens.device
    return torch.tensor(last, device=dev), torch.tensor(bonus, device=dev)


def _tree_bounds(tree: DraftTree, layout: TokenLayout) -> tuple[int, int]:
    """(deepest valid node's depth, most valid children of a node) of an eager tree (one host sync)."""
    depth = int(torch.where(tree.valid, layout.depth, 0).max())
    rank = sibling_rank(tree.parents, tree.valid)
    kids = int(torch.where(tree.valid, rank, -1)[:, 1:].max()) + 1 if tree.num_nodes > 1 else 0
    return depth, max(kids, 0)


CPU_LOOP_MAX_ROWS = 8  # eager CPU acceptance of at most this many rows takes the per-row loop


def accept_sampling(tree: DraftTree, logits: torch.Tensor, layout: TokenLayout, *, temperature: float,
                    top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                    uniforms: torch.Tensor | None = None) -> Acceptance:
    """Tree rejection sampling (module docstring) with one setting for every row; temperature > 0. The drafts'
    distribution is tree.draft_probs (None: deterministic drafts). uniforms (B, N) float64, default drawn from
    `generator`. Eager: the loop bounds are read from the tree (one host sync)."""
    B, N = tree.tokens.shape
    probs = logits_to_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)  # (B, N, vocab)
    if uniforms is None:
        uniforms = generator_uniforms(generator, B, probs.device)(SLOT_ACCEPT, N)
    if probs.device.type == "cpu" and B <= CPU_LOOP_MAX_ROWS:
        # the per-row loop: same result for the same uniforms (tested), ~10x fewer torch ops than the vectorised
        # form at small batches, where every op costs tens of microseconds on the CPU (0.3 ms vs 3.5 ms, B=1, N=16)
        node, bonus = tree_rejection_sample_reference(tokens=tree.tokens, parents=tree.parents, valid=tree.valid,
                                                      probs=probs, uniforms=uniforms, draft_probs=tree.draft_probs,
                                                      draft_index=tree.draft_index)
    else:
        depth, kids = _tree_bounds(tree, layout)
        node, bonus = tree_rejection_sample(tokens=tree.tokens, parents=tree.parents, valid=tree.valid, probs=probs,
                                            uniforms=uniforms, draft_probs=tree.draft_probs,
                                            draft_index=tree.draft_index, max_depth=depth, max_children=kids)
    path, counts = path_to_node(layout, node)
    return Acceptance(path=path, counts=counts, bonus=bonus)


def accept_rows(tree: DraftTree, logits: torch.Tensor, layout: TokenLayout, *, sampling: RowSampling, width: int,
                max_children: int) -> Acceptance:
    """Static (CUDA-graph) acceptance with per-row settings: rows with temperature 0 get exactly `accept_greedy`,
    the others tree rejection sampling with uniforms sampling.uniforms(SLOT_ACCEPT, N). width: the fixed path width
    (max depth + 1); max_children: the most children a node can have (the tree config's topk). No host sync."""
    greedy = accept_greedy(tree, logits, layout, width=width)
    probs = sampling.probs(logits)  # (B, N, vocab)
    u = sampling.uniforms(SLOT_ACCEPT, tree.num_nodes)
    node, bonus = tree_rejection_sample(tokens=tree.tokens, parents=tree.parents, valid=tree.valid, probs=probs,
                                        uniforms=u, draft_probs=tree.draft_probs, draft_index=tree.draft_index,
                                        max_depth=width - 1, max_children=max_children)
    path, counts = path_to_node(layout, node, width=width)
    g = sampling.temperature <= 0
    return Acceptance(path=torch.where(g[:, None], greedy.path, path), counts=torch.where(g, greedy.counts, counts),
                      bonus=torch.where(g, greedy.bonus, bonus))
