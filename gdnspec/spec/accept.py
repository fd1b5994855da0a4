"""Acceptance: which path of the draft tree the target agrees with, and the bonus token after it.

Greedy: from the root, while a valid child's token equals argmax(target logits at the current node), move to it.
Vectorised: node i "matches" when its token is the target's argmax at its parent; a node is accepted when every
node on its path matches; the deepest accepted node ends the path (siblings carry distinct tokens, so it is unique).

Sampling (tree rejection sampling, SpecInfer / EAGLE rule with deterministic drafts, q = one-hot): at the current
node with target distribution p (after temperature / top-k / top-p), try its children in order; accept child x with
probability min(1, p(x) / 1) = p(x); on rejection set p(x) = 0 and renormalise. If no child is accepted, the bonus
token is drawn from the residual p. Each emitted token is then distributed exactly as p: P(c_j) =
prod_{i<j}(1 - p_i(c_i)) * p(c_j) / prod_{i<j}(1 - p(c_i)) = p(c_j), and the residual carries the remaining mass.
The draft tree must not depend on the target's random draws (it doesn't: drafters see only committed tokens).

Result per row: path (B, L) node indices from the root (padded with the last node), counts (B,) nodes on the path
(root included, >= 1), bonus (B,) the next verified id. Emitted tokens = tokens[path[1:counts]] + bonus.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gdnspec.layers.layout import TokenLayout
from gdnspec.sampling import logits_to_probs
from gdnspec.spec.tree import DraftTree


@dataclass
class Acceptance:
    path: torch.Tensor  # (B, L) long, node indices, root first
    counts: torch.Tensor  # (B,) long, >= 1
    bonus: torch.Tensor  # (B,) long

    def path_tokens(self, tree: DraftTree) -> torch.Tensor:
        """(B, L) committed tokens of the step (root first)."""
        return tree.tokens.gather(1, self.path)

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
    """logits (B, N, vocab) of the target at every node. width: fixed path width (see path_to_node)."""
    B, N = tree.tokens.shape
    target = logits.argmax(-1)  # (B, N)
    parent = tree.parents.clamp(min=0)
    match = tree.valid & (tree.tokens == target.gather(1, parent))  # (B, N)
    match[:, 0] = True
    mismatch_on_path = (layout.ancestor_mask & ~match[:, None, :]).any(-1)  # (B, N)
    accepted = ~mismatch_on_path
    deepest = torch.where(accepted, layout.depth, -1).argmax(-1)  # (B,)
    path, counts = path_to_node(layout, deepest, width=width)
    bonus = target.gather(1, deepest[:, None]).squeeze(1)
    return Acceptance(path=path, counts=counts, bonus=bonus)


def accept_sampling(tree: DraftTree, logits: torch.Tensor, layout: TokenLayout, *, temperature: float,
                    top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None
                    ) -> Acceptance:
    """Tree rejection sampling (see module docstring). temperature > 0."""
    B, N = tree.tokens.shape
    probs = logits_to_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)  # (B, N, vocab)
    # p(token of node i) under its parent's distribution, for every node at once; the walk below needs only these
    # scalars: after rejecting siblings with total mass r, the residual gives x the probability p(x) / (1 - r)
    parent = tree.parents.clamp(min=0)
    child_p = probs[torch.arange(B, device=probs.device)[:, None], parent, tree.tokens]  # (B, N)
    child_p = child_p.cpu().tolist()
    tokens = tree.tokens.cpu().tolist()
    parents = tree.parents.cpu().tolist()
    valid = tree.valid.cpu().tolist()
    uniforms = torch.rand(B, N, generator=generator, dtype=torch.float64).tolist()  # at most one draw per node
    last_nodes, bonus = [], []
    for b in range(B):
        children = [[] for _ in range(N)]
        for i in range(1, N):
            if valid[b][i]:
                children[parents[b][i]].append(i)
        cur, draw = 0, 0
        while True:
            rejected_mass, rejected = 0.0, set()
            moved = False
            for c in children[cur]:
                tok = tokens[b][c]
                if tok in rejected:  # a duplicate sibling has no residual mass left
                    continue
                left = 1.0 - rejected_mass
                if left <= 1e-12:  # all mass already rejected: cannot happen with exact arithmetic
                    break
                u = uniforms[b][draw]
                draw += 1
                if u * left < child_p[b][c]:  # accept with probability p(x) / (1 - r)
                    cur, moved = c, True
                    break
                rejected_mass += child_p[b][c]
                rejected.add(tok)
            if not moved:
                break
        residual = probs[b, cur]
        if rejected:
            residual = residual.clone()
            residual[list(rejected)] = 0.0
            if float(residual.sum()) <= 0:
                residual = probs[b, cur]
        last_nodes.append(cur)
        bonus.append(int(torch.multinomial(residual, 1, generator=generator)))
    node = torch.tensor(last_nodes, device=tree.tokens.device)
    path, counts = path_to_node(layout, node)
    return Acceptance(path=path, counts=counts, bonus=torch.tensor(bonus, device=tree.tokens.device))
