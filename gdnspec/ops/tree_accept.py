"""Tree rejection sampling of deterministic drafts (spec/accept.tree_rejection_sample without draft q) as ONE Triton
kernel: one program per row walks the tree and draws the bonus token.

    node, bonus = tree_rejection_sample_fused(tokens=t, parents=p, valid=v, probs=probs, uniforms=u,
                                              max_depth=D, max_children=K)     # (B,) long each
    tok = draw_from_probs(probs, u)     # sampling.sample_from_probs (a plain sampled step's draw) in one launch

Why: the vectorised torch form loops over depth x children (the static runner's bounds: 5 x 4 for tree-4x5) with
~15 elementwise kernels per iteration, plus the inverse-CDF draw: ~330 launches in every sampled speculative step
of a CUDA graph, each a ~1.5-2 us launch on an H200 (the sampled EAGLE tree-4x5 step of the 1.7B model cost 1.47x
its greedy step). Here the row's nodes, parents and uniforms sit in registers, the sibling ranks come from one
N x N comparison, rejected tokens are kept as a short list (at most K per node) instead of a zeroed copy of the
distribution, and the bonus is the first token whose float64 running sum of the residual exceeds u * its mass.

The rule is the torch form's, step for step (the same comparisons in the probabilities' dtype, the same residual
and mass updates, sample_from_probs' clamp to the last token of positive weight); sums run in another order, so a
decision can differ only when a uniform lands within rounding of a boundary (never in the tests, which compare
against tree_rejection_sample_reference in float64 under TRITON_INTERPRET=1: tests/test_tree_accept.py).
Deterministic drafts only (draft_probs None: the static runner's trees unless config.sample_drafts); N <= MAX_NODES.
GDNSPEC_TREE_ACCEPT=0 keeps the torch form (A/B).
"""
from __future__ import annotations

import os

import torch

from gdnspec.ops._env import flag
from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON, available

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["MAX_NODES", "draw_from_probs", "enabled", "runs_on", "tree_rejection_sample_fused"]

MAX_NODES = 128  # one program holds an N x N comparison for the sibling ranks
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DISPATCH_ON_CPU = False  # CPU tensors take the kernel (through the interpreter) only when a test sets this


def enabled() -> bool:
    """GDNSPEC_TREE_ACCEPT: "1" (default) or "0"; anything else raises a ValueError naming the variable."""
    return flag("GDNSPEC_TREE_ACCEPT", default=True)


def runs_on(probs: torch.Tensor, num_nodes: int) -> bool:
    """Whether tree_rejection_sample takes the kernel for probs like these: Triton, a CUDA tensor (CPU tensors only
    in the kernel tests), float32 / float64, num_nodes <= MAX_NODES, GDNSPEC_TREE_ACCEPT not 0."""
    if not (HAS_TRITON and enabled()) or num_nodes > MAX_NODES or probs.dtype not in (torch.float32, torch.float64):
        return False
    return probs.is_cuda or (DISPATCH_ON_CPU and _INTERPRETED and available(probs))


if HAS_TRITON:
    @triton.jit
    def _row_sum(ptr, V, BV: tl.constexpr):
        """Sum of the V values at ptr, in their dtype."""
        acc = tl.zeros([BV], dtype=ptr.dtype.element_ty)
        for v0 in range(0, V, BV):
            o = v0 + tl.arange(0, BV)
            acc += tl.load(ptr + o, mask=o < V, other=0.0)
        return tl.sum(acc)

    @triton.jit
    def _weights(base, o, rej, V):
        """The weights at tokens o (float64), 0 past V and at the tokens listed in rej (-1: no token)."""
        p = tl.load(base + o, mask=o < V, other=0.0).to(tl.float64)
        hit = tl.sum(tl.where(rej[None, :] == o[:, None].to(tl.int64), 1, 0), axis=1) > 0
        return tl.where(hit, 0.0, p)

    @triton.jit
    def _inverse_cdf(base, u, rej, V, BV: tl.constexpr):
        """sample_from_probs for the V weights at base with the tokens in rej zeroed: the first token whose float64
        running sum exceeds u * total, clamped to the last token of positive weight (0 when none has weight)."""
        tot = tl.zeros([BV], dtype=tl.float64)
        for v0 in range(0, V, BV):
            tot += _weights(base, v0 + tl.arange(0, BV), rej, V)
        total = tl.sum(tot)
        target = u * total
        running = total * 0.0  # loop-carried scalars keep one type: float64 and int32 tensors from the start
        first = V + 0
        last = V * 0
        for v0 in range(0, V, BV):
            o = v0 + tl.arange(0, BV)
            p = _weights(base, o, rej, V)
            cdf = running + tl.cumsum(p, axis=0)
            first = tl.minimum(first, tl.min(tl.where((cdf > target) & (o < V), o, V)))
            last = tl.maximum(last, tl.max(tl.where(p > 0, o, 0)))
            running += tl.sum(p)
        return tl.minimum(first, last)

    @triton.jit
    def _tree_accept_kernel(tokens_ptr, parents_ptr, valid_ptr, probs_ptr, u_ptr, node_ptr, bonus_ptr, N, V,
                            DEPTH: tl.constexpr, KIDS: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr,
                            BV: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BN)
        inb = offs < N
        tok = tl.load(tokens_ptr + b * N + offs, mask=inb, other=0)
        par = tl.load(parents_ptr + b * N + offs, mask=inb, other=-2)
        val = tl.load(valid_ptr + b * N + offs, mask=inb, other=0) != 0
        uu = tl.load(u_ptr + b * N + offs, mask=inb, other=0.0)  # float64
        # sibling rank (accept.sibling_rank): valid earlier nodes with the same parent
        same = (par[:, None] == par[None, :]) & val[None, :] & (offs[None, :] < offs[:, None])
        rank = tl.sum(same.to(tl.int32), axis=1)
        cand = val & (offs > 0)
        row = probs_ptr + b * N * V
        kp = tl.arange(0, KP)
        rej = tl.full([KP], -1, tl.int64)  # the tokens rejected at the current node (zeroed in its residual)
        nrej = 0
        cur = 0
        active = 1
        p_mass = _row_sum(row, V, BV)
        for d in tl.static_range(DEPTH):
            moved = 0
            nxt = cur
            for r in tl.static_range(KIDS):
                match = cand & (par == cur) & (rank == r)  # cur's child of rank r
                c = tl.min(tl.where(match, offs, BN))
                exists = (c < BN) & (active != 0) & (moved == 0)
                x = tl.sum(tl.where(offs == c, tok, 0))
                u = tl.sum(tl.where(offs == c, uu, 0.0))
                px = tl.load(row + cur * V + x, mask=exists, other=0.0)
                px = tl.where(tl.sum(tl.where(rej == x, 1, 0)) > 0, 0.0, px)
                accept = exists & (u.to(px.dtype) * p_mass < px)
                reject = exists & (accept == 0)
                nxt = tl.where(accept, c, nxt)
                moved = tl.where(accept, 1, moved)
                ok = reject & (p_mass - px > 0)  # zero residual mass: the rejection had probability 0 (rounding)
                rej = tl.where(ok & (kp == nrej), x, rej)
                nrej = tl.where(ok, nrej + 1, nrej)
                p_mass = tl.where(ok, p_mass - px, p_mass)
            active = active & moved
            cur = nxt
            fresh = _row_sum(row + cur * V, V, BV)  # the accepted child's full distribution
            p_mass = tl.where(moved != 0, fresh, p_mass)
            rej = tl.where(moved != 0, -1, rej)
            nrej = tl.where(moved != 0, 0, nrej)
        tl.store(node_ptr + b, cur.to(tl.int64))
        # bonus: sample_from_probs(residual at cur, uniforms[:, 0])
        u0 = tl.sum(tl.where(offs == 0, uu, 0.0))
        tl.store(bonus_ptr + b, _inverse_cdf(row + cur * V, u0, rej, V, BV).to(tl.int64))


if HAS_TRITON:
    @triton.jit
    def _draw_kernel(probs_ptr, u_ptr, out_ptr, V, BV: tl.constexpr):
        """sampling.sample_from_probs for one row (_inverse_cdf with no token zeroed)."""
        b = tl.program_id(0).to(tl.int64)
        none = tl.full([2], -1, tl.int64)
        tl.store(out_ptr + b, _inverse_cdf(probs_ptr + b * V, tl.load(u_ptr + b), none, V, BV).to(tl.int64))


def draw_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """sampling.sample_from_probs in one launch: probs (..., V) float32 / float64 weights, uniforms (...) in [0, 1)
    of probs' leading shape, on its device -> token ids (...) long. Raises ValueError for other shapes."""
    if probs.dim() < 1 or tuple(uniforms.shape) != tuple(probs.shape[:-1]) or uniforms.device != probs.device:
        raise ValueError(f"uniforms must have probs' leading shape {tuple(probs.shape[:-1])} on {probs.device}, got "
                         f"{tuple(uniforms.shape)} on {uniforms.device}")
    lead, V = probs.shape[:-1], probs.shape[-1]
    p = probs.reshape(-1, V).contiguous()
    out = torch.empty(p.shape[0], dtype=torch.long, device=probs.device)
    if p.shape[0]:
        u = uniforms.to(torch.float64).reshape(-1).contiguous()
        _draw_kernel[(p.shape[0],)](p, u, out, V, BV=min(2048, max(16, triton.next_power_of_2(V))))
    return out.reshape(lead)


def tree_rejection_sample_fused(*, tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor,
                                probs: torch.Tensor, uniforms: torch.Tensor, max_depth: int,
                                max_children: int) -> tuple[torch.Tensor, torch.Tensor]:
    """accept.tree_rejection_sample for deterministic drafts in one launch (module docstring): tokens, parents (B, N)
    long, valid (B, N) bool, probs (B, N, V) float32 / float64, uniforms (B, N) float64; max_depth / max_children the
    loop bounds. Returns (last accepted node (B,), bonus token (B,)) long. Raises ValueError for mismatched shapes."""
    B, N = tokens.shape
    if (tuple(parents.shape) != (B, N) or tuple(valid.shape) != (B, N) or tuple(uniforms.shape) != (B, N)
            or probs.dim() != 3 or tuple(probs.shape[:2]) != (B, N)):
        raise ValueError(f"tokens, parents, valid, uniforms must be (B, N) = {(B, N)} and probs (B, N, V), got "
                         f"{tuple(parents.shape)}, {tuple(valid.shape)}, {tuple(uniforms.shape)}, {tuple(probs.shape)}")
    V = probs.shape[-1]
    node = torch.empty(B, dtype=torch.long, device=probs.device)
    bonus = torch.empty(B, dtype=torch.long, device=probs.device)
    if B == 0:
        return node, bonus
    BN = max(2, triton.next_power_of_2(N))
    KP = max(2, triton.next_power_of_2(max(max_children, 1)))
    BV = min(2048, max(16, triton.next_power_of_2(V)))
    _tree_accept_kernel[(B,)](tokens.long().contiguous(), parents.long().contiguous(),
                              valid.to(torch.int8).contiguous(), probs.contiguous(),
                              uniforms.to(torch.float64).contiguous(), node, bonus, N, V,
                              DEPTH=max(max_depth, 0), KIDS=max(max_children, 0), BN=BN, KP=KP, BV=BV)
    return node, bonus
