"""Triton commit after tree verification: move each row's state to the state after its accepted node.

Recurrent state (one read and one write of the state, in place allowed):

    S_a = exp(gamma_a) S0 + sum_{j in path(a)} (k_j exp(gamma_a - gamma_j)) v_new_j^T

from the cached terms of `triton_tree_gated_delta_rule` (`TritonTreeCache`); one program per (K-tile x V-tile,
batch row, value head). Rows may accept different nodes; node < 0 leaves that row's state unchanged.

Conv window (`triton_tree_conv_commit_state`): the newest W-1 inputs on the accepted node's path, gathered from
[committed window | tree node inputs] with the window index of `tree_causal_conv1d`; in place allowed.

References / CPU path: `tree.tree_commit_state` and `gdnspec.ops.conv1d.tree.tree_conv_commit_state`.

    triton_tree_commit_state(state=S, cache=cache, node=node)                      # S updated in place
    triton_tree_conv_commit_state(x=conv_input, state=conv, window_index=idx, node=node)   # conv updated in place
"""
from __future__ import annotations

import torch

from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON, TritonTreeCache, available, default_precision

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["available", "triton_tree_commit_state", "triton_tree_conv_commit_state"]


if HAS_TRITON:

    @triton.jit
    def _commit_kernel(
        s0, out, k, vnew, gamma, amask, node, N,
        H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    ):
        i_kv = tl.program_id(0)
        i_bh = tl.program_id(1)
        NV: tl.constexpr = (V + BV - 1) // BV
        i_k = i_kv // NV
        i_v = i_kv % NV
        i_b = i_bh // HV
        i_hv = i_bh % HV
        i_h = i_hv // (HV // H)
        rn = tl.arange(0, BN)
        rk = i_k * BK + tl.arange(0, BK)
        rv = i_v * BV + tl.arange(0, BV)
        mn = rn < N
        mk = rk < K
        mv = rv < V

        a = tl.load(node + i_b)
        has = a >= 0
        a_c = tl.maximum(a, 0)
        path = (tl.load(amask + (i_b * N + a_c) * N + rn, mask=mn, other=0) != 0) & has  # (BN,)
        b_gam = tl.load(gamma + (i_b * N + rn) * HV + i_hv, mask=mn, other=0.0)  # (BN,)
        gam_a = tl.sum(tl.where(rn == a_c, b_gam, 0.0), 0)
        gam_a = tl.where(has, gam_a, 0.0)
        coeff = tl.where(path, tl.exp(gam_a - b_gam), 0.0)  # (BN,)

        b_k = tl.load(k + ((i_b * N + rn[:, None]) * H + i_h) * K + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        b_vn = tl.load(vnew + ((i_b * N + rn[:, None]) * HV + i_hv) * V + rv[None, :], mask=mn[:, None] & mv[None, :], other=0.0)
        s_off = ((i_b * HV + i_hv) * K + rk[:, None]) * V + rv[None, :]
        m_kv = mk[:, None] & mv[None, :]
        b_S = tl.load(s0 + s_off, mask=m_kv, other=0.0)
        b_kc = b_k * coeff[:, None]  # (BN, BK)
        b_S = tl.exp(gam_a) * b_S + tl.dot(tl.trans(b_kc), b_vn, input_precision=PREC)
        tl.store(out + s_off, b_S, mask=m_kv)

    @triton.jit
    def _conv_commit_kernel(
        x, state, out, widx, node, N, D,
        W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr,
    ):
        i_b = tl.program_id(0)
        i_d = tl.program_id(1)
        rd = i_d * BD + tl.arange(0, BD)
        rw = tl.arange(0, BW)
        md = rd < D
        mw = rw < W - 1
        a = tl.load(node + i_b)
        has = a >= 0
        a_c = tl.maximum(a, 0)
        idx = tl.load(widx + (i_b * N + a_c) * W + 1 + rw, mask=mw, other=0)  # (BW,) into [window | nodes]
        from_state = idx < W - 1
        m = md[:, None] & mw[None, :]
        s_val = tl.load(state + (i_b * D + rd[:, None]) * (W - 1) + idx[None, :], mask=m & from_state[None, :], other=0.0)
        x_row = tl.maximum(idx - (W - 1), 0)
        x_val = tl.load(x + (i_b * N + x_row[None, :]) * D + rd[:, None], mask=m & (~from_state[None, :]), other=0.0)
        val = tl.where(from_state[None, :], s_val.to(tl.float32), x_val.to(tl.float32))
        old = tl.load(state + (i_b * D + rd[:, None]) * (W - 1) + rw[None, :], mask=m, other=0.0).to(tl.float32)
        val = tl.where(has, val, old)
        tl.debug_barrier()  # every read of the old window happens before any write (in-place use)
        tl.store(out + (i_b * D + rd[:, None]) * (W - 1) + rw[None, :], val.to(out.dtype.element_ty), mask=m)


def _check_node(node: torch.Tensor, B: int) -> None:
    if not isinstance(node, torch.Tensor) or node.dtype != torch.long or tuple(node.shape) != (B,):
        raise ValueError(f"node must be a long tensor of shape ({B},), got {getattr(node, 'dtype', type(node))} "
                         f"{tuple(getattr(node, 'shape', ()))}")


def triton_tree_commit_state(
    *,
    state: torch.Tensor,
    cache: TritonTreeCache,
    node: torch.Tensor,
    out: torch.Tensor | None = None,
    precision: str | None = None,
    block_k: int | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """state (B, HV, K, V) float32 = S0; node (B,) long (node < 0: keep S0). Writes the state after `node` into
    `out` (default: `state` itself, IN PLACE) and returns it."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use gdnspec.ops.gated_delta_rule.tree.tree_commit_state")
    if not isinstance(cache, TritonTreeCache):
        raise TypeError(f"cache must be a TritonTreeCache (see TritonTreeCache.from_reference), got {type(cache).__name__}")
    B, N, H, K = cache.k.shape
    HV, V = cache.v_new.shape[2], cache.v_new.shape[3]
    if state.dtype != torch.float32 or tuple(state.shape) != (B, HV, K, V) or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 tensor (B, HV, K, V) = {(B, HV, K, V)}, "
                         f"got {state.dtype} {tuple(state.shape)}")
    _check_node(node, B)
    out = state if out is None else out
    if out.shape != state.shape or out.dtype != state.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor like state")
    BN = max(16, triton.next_power_of_2(N))
    BK = block_k or min(64, max(16, triton.next_power_of_2(K)))
    BV = block_v or min(64, max(16, triton.next_power_of_2(V)))
    grid = (triton.cdiv(K, BK) * triton.cdiv(V, BV), B * HV)
    _commit_kernel[grid](
        state, out, cache.k.contiguous(), cache.v_new.contiguous(), cache.gamma.contiguous(),
        cache.ancestor_mask.contiguous().view(torch.uint8), node.contiguous(), N,
        H=H, HV=HV, K=K, V=V, BN=BN, BK=BK, BV=BV, PREC=precision or default_precision(state), num_warps=4,
    )
    return out


def triton_tree_conv_commit_state(
    *,
    x: torch.Tensor,
    state: torch.Tensor,
    window_index: torch.Tensor,
    node: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (B, N, D) tree-node conv inputs; state (B, D, W-1) committed window; window_index (B, N, W) long from
    `tree_causal_conv1d`; node (B,) long (node < 0: keep the window). Writes into `out` (default: `state`, IN
    PLACE) and returns it."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use gdnspec.ops.conv1d.tree.tree_conv_commit_state")
    B, N, D = x.shape
    W = window_index.shape[-1]
    if tuple(state.shape) != (B, D, W - 1) or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous tensor (B, D, W-1) = {(B, D, W - 1)}, got {tuple(state.shape)}")
    if window_index.dtype != torch.long or tuple(window_index.shape) != (B, N, W):
        raise ValueError(f"window_index must be a long tensor (B, N, W) = {(B, N, W)}, got {window_index.dtype} "
                         f"{tuple(window_index.shape)}")
    _check_node(node, B)
    out = state if out is None else out
    BD = 256
    BW = max(2, triton.next_power_of_2(W - 1))
    _conv_commit_kernel[(B, triton.cdiv(D, BD))](
        x.contiguous(), state, out, window_index.contiguous(), node.contiguous(), N, D, W=W, BW=BW, BD=BD, num_warps=4,
    )
    return out
