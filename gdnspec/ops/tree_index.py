"""The index bookkeeping of one verify step as two Triton kernels: the tree layout, and greedy acceptance.

    mask, depth, window = tree_layout(parents, conv_width=4)        # one launch per verify (all layers share it)
    path, counts, bonus = greedy_accept(target, tokens=t, parents=p, valid=v, ancestor_mask=mask, depth=depth,
                                        width=L)                     # one launch per verify, after the argmax

Both replace a few dozen small torch kernels of a CUDA-graph step (on an H200 each costs ~1.5-3 us of a 1.3-2 ms
step at batch 1, more of the ~0.3 ms step of a small model): `TokenLayout.from_parents` (log2(N) boolean matrix
squarings, a sum), `ops.conv1d.tree.tree_conv_window_index` (W gathers, a cat, a stack) and `spec.accept.accept_greedy`
(a gather, comparisons, an any, a masked argmax, a sort for the path). The torch forms stay the references (and the
path everywhere these kernels do not run); tests compare the two under TRITON_INTERPRET=1 on chains, stars, padded
trees, N = 1 .. 64 and B not a power of two.

tree_layout: one program per row climbs every node's ancestor chain at once (N steps of a gathered load), so
    ancestor_mask[b, i, j] = j is i or an ancestor of i, depth[b, i] = its ancestors, and, with conv_width = W, the
    tree conv's window index (B, N, W) into [committed window (W-1) | nodes] (`tree_conv_window_index`'s definition:
    the W-1 newest inputs on the node's path, oldest first, then the node; past the root the committed window).
    parents must be in topological order (-1 <= parents[b, i] < i, the root -1), as validate=False promises: an
    out-of-order parent ends the chain there instead of looping.
greedy_accept: one program per row; node i matches when it is valid and its token is the target's argmax at its
    parent (the root always matches); a node is accepted when every node of its path matches; the deepest accepted
    node (first in index order on ties, like torch.argmax) ends the path. Outputs path (B, L) (root first, padded with
    the last node), counts (B,) and bonus (B,) = the target's argmax there: `accept_greedy`'s result, bit for bit.
"""
from __future__ import annotations

import os

import torch

from gdnspec.ops._env import flag
from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON, available

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["MAX_TREE_NODES", "enabled", "greedy_accept", "runs_on", "tree_layout"]

MAX_TREE_NODES = 64  # the verify kernels' limit (triton_tree.MAX_NODES); one program holds an N x N tile

# the kernels below were decorated for the interpreter (this module imported, or re-imported by the tests, with
# TRITON_INTERPRET=1): only then may they run on CPU tensors
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# CPU tensors take the kernels (through the interpreter) only when a test sets this: the kernel tests switch it on for
# the dispatch they check, while the rest of a test session, which may run with TRITON_INTERPRET=1 set, keeps the
# torch forms (interpreting these loops for every tree of the suite made it ~2x slower)
DISPATCH_ON_CPU = False


def runs_on(t: torch.Tensor) -> bool:
    """Whether TokenLayout.from_parents / accept_greedy take these kernels for the (B, N) tensor `t`: Triton, at most
    64 nodes, and a CUDA tensor (CPU tensors only in the kernel tests: DISPATCH_ON_CPU under TRITON_INTERPRET=1).
    GDNSPEC_TREE_INDEX=0 keeps the torch forms (A/B switch)."""
    if not (HAS_TRITON and t.dim() == 2 and 1 <= t.shape[1] <= MAX_TREE_NODES):
        return False
    if not enabled():
        return False
    return t.is_cuda or (DISPATCH_ON_CPU and _INTERPRETED and available(t))


def enabled() -> bool:
    """GDNSPEC_TREE_INDEX: "1" (default) or "0"; anything else raises a ValueError naming the variable."""
    return flag("GDNSPEC_TREE_INDEX", default=True)


if HAS_TRITON:

    @triton.jit
    def _tree_layout_kernel(parents, mask, depth, window, N, BN: tl.constexpr, W: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BN)
        j = tl.arange(0, BN)
        mi = i < N
        prow = parents + b * N
        cur = tl.where(mi, i, -1)  # (BN,) the ancestor of node i reached so far (-1: past the root)
        anc = tl.zeros((BN, BN), dtype=tl.int32)
        d = tl.full((BN,), -1, dtype=tl.int32)
        for s in range(0, N):
            alive = cur >= 0
            anc = anc | ((j[None, :] == cur[:, None]) & alive[:, None]).to(tl.int32)
            d += alive.to(tl.int32)
            if W > 0:  # the s-th ancestor fills window slot W-1-s
                tl.store(window + (b * N + i) * W + (W - 1 - s), (cur + (W - 1)).to(tl.int64),
                         mask=mi & alive & (s < W))
            nxt = tl.load(prow + tl.maximum(cur, 0), mask=alive, other=-1).to(tl.int32)
            cur = tl.where(alive & (nxt < cur), nxt, -1)  # an out-of-order parent ends the chain
        if W > 0:  # above the root: the committed window, newest first, clamped at its oldest entry
            for s in tl.static_range(W):
                tl.store(window + (b * N + i) * W + (W - 1 - s), tl.maximum((W - 1) - (s - d), 0).to(tl.int64),
                         mask=mi & (s > d))
        tl.store(mask + b * N * N + i[:, None] * N + j[None, :], anc.to(tl.int8),
                 mask=mi[:, None] & (j < N)[None, :])
        tl.store(depth + b * N + i, d.to(tl.int64), mask=mi)

    @triton.jit
    def _greedy_accept_kernel(target, tokens, parents, valid, mask, depth, path, counts, bonus, last_out, path_tokens,
                              packed, N, L, BN: tl.constexpr, BL: tl.constexpr, EXTRA: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BN)
        j = tl.arange(0, BN)
        mi = i < N
        row = b * N
        par = tl.load(parents + row + i, mask=mi, other=0)
        tok = tl.load(tokens + row + i, mask=mi, other=-1)
        val = tl.load(valid + row + i, mask=mi, other=0) != 0
        t_at_parent = tl.load(target + row + tl.maximum(par, 0), mask=mi, other=-2)
        match = (val & (tok == t_at_parent)) | (i == 0)
        anc = tl.load(mask + b * N * N + i[:, None] * N + j[None, :], mask=mi[:, None] & (j < N)[None, :],
                      other=0) != 0
        bad = tl.sum((anc & ~match[None, :]).to(tl.int32), 1)  # (BN,) mismatching nodes on each node's path
        dep = tl.load(depth + row + i, mask=mi, other=0)
        key = tl.where(mi & (bad == 0), dep, -1)
        best = tl.max(key, 0)
        last = tl.min(tl.where(key == best, i, BN), 0)  # the first deepest accepted node (torch.argmax's tie rule)
        on = tl.load(mask + b * N * N + last * N + j, mask=j < N, other=0) != 0  # (BN,) the nodes of its path
        n = tl.sum(on.to(tl.int32), 0)
        pos = tl.cumsum(on.to(tl.int32), 0) - 1  # place in the path (ancestors precede in index order)
        p = tl.arange(0, BL)
        hit = on[None, :] & (pos[None, :] == p[:, None])  # (BL, BN)
        node = tl.sum(tl.where(hit, j[None, :], 0), 1)
        node = tl.where(p < n, node, last)
        tl.store(path + b * L + p, node.to(tl.int64), mask=p < L)
        tl.store(counts + b, n.to(tl.int64))
        bon = tl.load(target + row + last)
        tl.store(bonus + b, bon)
        if EXTRA:  # what the static step reads: the last node, the path's tokens, [path tokens | count | bonus | drafted]
            tl.store(last_out + b, last.to(tl.int64))
            ptok = tl.load(tokens + row + node, mask=p < L, other=0)
            tl.store(path_tokens + b * L + p, ptok, mask=p < L)
            tl.store(packed + b * (L + 3) + p, ptok, mask=p < L)
            tl.store(packed + b * (L + 3) + L, n.to(tl.int64))
            tl.store(packed + b * (L + 3) + L + 1, bon)
            tl.store(packed + b * (L + 3) + L + 2, tl.sum((val & mi & (i > 0)).to(tl.int64), 0))


def _pow2(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def _check_parents(parents: torch.Tensor) -> None:
    if parents.dim() != 2 or parents.dtype != torch.long:
        raise ValueError(f"parents must be a long tensor (B, N), got {parents.dtype} {tuple(parents.shape)}")
    if not 1 <= parents.shape[1] <= MAX_TREE_NODES:
        raise ValueError(f"the tree index kernels take 1 <= N <= {MAX_TREE_NODES} nodes, got N = {parents.shape[1]}")


def tree_layout(parents: torch.Tensor, *, conv_width: int | None = None):
    """parents (B, N) long, topological (-1 for the root), 1 <= N <= 64 -> (ancestor_mask (B, N, N) bool, depth (B, N)
    long, window index (B, N, conv_width) long or None). See the module docstring; no host sync."""
    _check_parents(parents)
    if conv_width is not None and not (isinstance(conv_width, int) and conv_width >= 1):
        raise ValueError(f"conv_width must be an int >= 1 or None, got {conv_width!r}")
    B, N = parents.shape
    dev = parents.device
    mask = torch.empty(B, N, N, dtype=torch.int8, device=dev)
    depth = torch.empty(B, N, dtype=torch.long, device=dev)
    W = conv_width or 0
    window = torch.empty(B, N, max(W, 1), dtype=torch.long, device=dev)
    if B > 0:
        _tree_layout_kernel[(B,)](parents.contiguous(), mask, depth, window, N, BN=_pow2(N), W=W)
    return mask.view(torch.bool), depth, (window if W else None)


def greedy_accept(target: torch.Tensor, *, tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor,
                  ancestor_mask: torch.Tensor, depth: torch.Tensor, width: int, extra: bool = False):
    """target (B, N) long = the target's argmax at every node; tokens, parents (B, N) long; valid (B, N) bool;
    ancestor_mask (B, N, N) bool and depth (B, N) long (`tree_layout` / TokenLayout); width = the path width L >= 1.
    Returns (path (B, L), counts (B,), bonus (B,)) long, as `spec.accept.accept_greedy`; with extra=True also
    (last (B,) = the path's last node, path_tokens (B, L) = tokens along the path, packed (B, L + 3) = [path_tokens |
    counts | bonus | valid drafted nodes]). No host sync."""
    _check_parents(parents)
    B, N = parents.shape
    for name, t, shape in (("target", target, (B, N)), ("tokens", tokens, (B, N)), ("valid", valid, (B, N)),
                           ("ancestor_mask", ancestor_mask, (B, N, N)), ("depth", depth, (B, N))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    for name, t in (("valid", valid), ("ancestor_mask", ancestor_mask)):  # read as bytes: another dtype would be
        if t.dtype != torch.bool:                                         # reinterpreted, not converted
            raise ValueError(f"{name} must be a bool tensor, got {t.dtype}")
    if not (isinstance(width, int) and width >= 1):
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    dev = parents.device
    path = torch.empty(B, width, dtype=torch.long, device=dev)
    counts = torch.empty(B, dtype=torch.long, device=dev)
    bonus = torch.empty(B, dtype=torch.long, device=dev)
    last = torch.empty(B if extra else 1, dtype=torch.long, device=dev)
    path_tokens = torch.empty(B if extra else 1, width, dtype=torch.long, device=dev)
    packed = torch.empty(B if extra else 1, width + 3, dtype=torch.long, device=dev)
    if B > 0:
        _greedy_accept_kernel[(B,)](target.contiguous(), tokens.contiguous(), parents.contiguous(),
                                    valid.contiguous().view(torch.int8), ancestor_mask.contiguous().view(torch.int8),
                                    depth.contiguous(), path, counts, bonus, last, path_tokens, packed, N, width,
                                    BN=_pow2(N), BL=_pow2(width), EXTRA=extra)
    if extra:
        return path, counts, bonus, last, path_tokens, packed
    return path, counts, bonus
