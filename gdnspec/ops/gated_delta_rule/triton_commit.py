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

from gdnspec.ops import pdl
from gdnspec.ops.gated_delta_rule import triton_tree as _triton_tree
from gdnspec.ops.gated_delta_rule.common import SSM_STATE_DTYPES
from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON, TritonTreeCache, available, default_precision, dot_precisions

if HAS_TRITON:
    import triton
    import triton.language as tl

    from gdnspec.ops.pdl import enter

__all__ = ["available", "triton_tree_commit", "triton_tree_commit_state", "triton_tree_conv_commit_state"]


if HAS_TRITON:

    @triton.jit
    def _commit_state_tile(
        s0, out, k, vnew, gamma, amask, node, N, i_kv, i_bh,
        H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    ):
        """State tile i_kv (K-tile x V-tile) of (batch row, value head) i_bh after the row's accepted node."""
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
        b_S = tl.load(s0 + s_off, mask=m_kv, other=0.0).to(tl.float32)  # a 16-bit state: maths in float32
        b_kc = b_k * coeff[:, None]  # (BN, BK)
        b_S = tl.exp(gam_a) * b_S + tl.dot(tl.trans(b_kc), b_vn, input_precision=PREC)
        tl.store(out + s_off, b_S.to(out.dtype.element_ty), mask=m_kv)

    @triton.jit
    def _conv_commit_tile(
        x, sx, state, out, widx, node, N, D, i_b, i_d,
        q_base, q_hs, k_base, k_hs, v_base, v_hs,
        W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr,
        PROJ: tl.constexpr, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    ):
        """Conv window channels [i_d * BD, +BD) of batch row i_b after the row's accepted node. The conv input of
        channel c at node n is x[(i_b * N + n) * sx + c], or, with PROJ, the projection row's column of c (layout
        q/k/v base + head * head_stride: q, k of H key heads (K each), then v of HV value heads (V each))."""
        rd = i_d * BD + tl.arange(0, BD)
        rw = tl.arange(0, BW)
        md = rd < D
        mw = rw < W - 1
        if PROJ:
            R: tl.constexpr = HV // H
            HK: tl.constexpr = H * K
            c_k = rd - HK
            c_v = tl.maximum(rd - 2 * HK, 0)
            hv = c_v // V
            col = tl.where(rd < HK, q_base + (rd // K) * q_hs + rd % K,
                           tl.where(rd < 2 * HK, k_base + (c_k // K) * k_hs + c_k % K,
                                    v_base + (hv // R) * v_hs + (hv % R) * V + c_v % V))
        else:
            col = rd
        a = tl.load(node + i_b)
        has = a >= 0
        a_c = tl.maximum(a, 0)
        idx = tl.load(widx + (i_b * N + a_c) * W + 1 + rw, mask=mw, other=0)  # (BW,) into [window | nodes]
        from_state = idx < W - 1
        m = md[:, None] & mw[None, :]
        s_val = tl.load(state + (i_b * D + rd[:, None]) * (W - 1) + idx[None, :], mask=m & from_state[None, :], other=0.0)
        x_row = tl.maximum(idx - (W - 1), 0)
        x_val = tl.load(x + (i_b * N + x_row[None, :]) * sx + col[:, None], mask=m & (~from_state[None, :]), other=0.0)
        val = tl.where(from_state[None, :], s_val.to(tl.float32), x_val.to(tl.float32))
        old = tl.load(state + (i_b * D + rd[:, None]) * (W - 1) + rw[None, :], mask=m, other=0.0).to(tl.float32)
        val = tl.where(has, val, old)
        tl.debug_barrier()  # every read of the old window happens before any write (in-place use)
        tl.store(out + (i_b * D + rd[:, None]) * (W - 1) + rw[None, :], val.to(out.dtype.element_ty), mask=m)

    @triton.jit
    def _commit_kernel(
        s0, out, k, vnew, gamma, amask, node, N,
        H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr = False,
    ):
        enter(PDL)  # ops/pdl.py: before any load or store
        _commit_state_tile(s0, out, k, vnew, gamma, amask, node, N, tl.program_id(0), tl.program_id(1),
                           H, HV, K, V, BN, BK, BV, PREC)

    @triton.jit
    def _conv_commit_kernel(
        x, state, out, widx, node, N, D,
        W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr = False,
    ):
        enter(PDL)  # ops/pdl.py: before any load or store
        _conv_commit_tile(x, D, state, out, widx, node, N, D, tl.program_id(0), tl.program_id(1), 0, 0, 0, 0, 0, 0,
                          W, BW, BD, False, 1, 1, 1, 1)

    @triton.jit
    def _commit_all_kernel(
        s0, s_out, k, vnew, gamma, amask, node, x, sx, c_state, c_out, widx, N, D, n_state,
        q_base, q_hs, k_base, k_hs, v_base, v_hs,
        H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
        W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, PROJ: tl.constexpr, PDL: tl.constexpr = False,
    ):
        """One launch: programs [0, n_state) commit recurrent-state tiles, the rest conv-window channel blocks."""
        enter(PDL)  # ops/pdl.py: before any load or store
        pid = tl.program_id(0)
        NKV: tl.constexpr = ((K + BK - 1) // BK) * ((V + BV - 1) // BV)
        ND = (D + BD - 1) // BD
        if pid < n_state:
            _commit_state_tile(s0, s_out, k, vnew, gamma, amask, node, N, pid % NKV, pid // NKV,
                               H, HV, K, V, BN, BK, BV, PREC)
        else:
            j = pid - n_state
            _conv_commit_tile(x, sx, c_state, c_out, widx, node, N, D, j // ND, j % ND,
                              q_base, q_hs, k_base, k_hs, v_base, v_hs, W, BW, BD, PROJ, H, HV, K, V)


def _check_node(node: torch.Tensor, B: int) -> None:
    if not isinstance(node, torch.Tensor) or node.dtype != torch.long or tuple(node.shape) != (B,):
        raise ValueError(f"node must be a long tensor of shape ({B},), got {getattr(node, 'dtype', type(node))} "
                         f"{tuple(getattr(node, 'shape', ()))}")


def _state_tiles(N: int, K: int, V: int, block_k: int | None, block_v: int | None) -> tuple[int, int, int]:
    BN = max(16, triton.next_power_of_2(N))
    BK = block_k or min(64, max(16, triton.next_power_of_2(K)))
    BV = block_v or min(64, max(16, triton.next_power_of_2(V)))
    return BN, BK, BV


def _check_state_commit(state: torch.Tensor, cache, node: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(B, N, H, K, HV, V) of a recurrent-state commit after checking cache, state and node."""
    if not isinstance(cache, _triton_tree.TritonTreeCache):  # the class through its module (test reloads)
        raise TypeError(f"cache must be a TritonTreeCache (see TritonTreeCache.from_reference), got {type(cache).__name__}")
    B, N, H, K = cache.k.shape
    HV, V = cache.v_new.shape[2], cache.v_new.shape[3]
    if state.dtype not in SSM_STATE_DTYPES or tuple(state.shape) != (B, HV, K, V) or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 (or 16-bit storage) tensor (B, HV, K, V) = "
                         f"{(B, HV, K, V)}, got {state.dtype} {tuple(state.shape)}")
    _check_node(node, B)
    return B, N, H, K, HV, V


def _check_conv_window(conv_state: torch.Tensor, window_index: torch.Tensor, B: int, N: int, D: int, *,
                       name: str) -> None:
    """A conv-window commit's committed window `name` (B, D, W-1) and window_index (B, N, W) long."""
    W = window_index.shape[-1]
    if tuple(conv_state.shape) != (B, D, W - 1) or not conv_state.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor (B, conv_dim, W-1) = {(B, D, W - 1)}, "
                         f"got {tuple(conv_state.shape)}")
    if window_index.dtype != torch.long or tuple(window_index.shape) != (B, N, W):
        raise ValueError(f"window_index must be a long tensor (B, N, W) = {(B, N, W)}, got {window_index.dtype} "
                         f"{tuple(window_index.shape)}")


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
    B, N, H, K, HV, V = _check_state_commit(state, cache, node)
    out = state if out is None else out
    if out.shape != state.shape or out.dtype != state.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor like state")
    BN, BK, BV = _state_tiles(N, K, V, block_k, block_v)
    grid = (triton.cdiv(K, BK) * triton.cdiv(V, BV), B * HV)
    _commit_kernel[grid](
        state, out, cache.k.contiguous(), cache.v_new.contiguous(), cache.gamma.contiguous(),
        cache.ancestor_mask.contiguous().view(torch.uint8), node.contiguous(), N,
        H=H, HV=HV, K=K, V=V, BN=BN, BK=BK, BV=BV, PREC=dot_precisions(precision or default_precision(state))[0], num_warps=4, **pdl.launch_args(state),
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
    _check_conv_window(state, window_index, B, N, D, name="state")
    _check_node(node, B)
    out = state if out is None else out
    BD = 256
    BW = max(2, triton.next_power_of_2(W - 1))
    _conv_commit_kernel[(B, triton.cdiv(D, BD))](
        x.contiguous(), state, out, window_index.contiguous(), node.contiguous(), N, D, W=W, BW=BW, BD=BD, num_warps=4, **pdl.launch_args(state),
    )
    return out


def triton_tree_commit(
    *,
    state: torch.Tensor,
    conv_state: torch.Tensor,
    cache: TritonTreeCache,
    conv_input: torch.Tensor,
    window_index: torch.Tensor,
    node: torch.Tensor,
    conv_layout=None,
    fused: bool = True,
    precision: str | None = None,
    block_k: int | None = None,
    block_v: int | None = None,
) -> None:
    """Commit a GDN layer's recurrent state AND conv window to tree node `node` (B,) long (node < 0: keep both), IN
    PLACE, in ONE launch: programs [0, n_state) do what `triton_tree_commit_state` does (K-tile x V-tile, batch row,
    value head), the rest what `triton_tree_conv_commit_state` does (batch row, 256 channels); the two never touch
    the same memory. state (B, HV, K, V) float32 contiguous; conv_state (B, conv_dim, W-1) contiguous; cache the
    verify's TritonTreeCache; window_index (B, N, W) long; conv_input (B, N, conv_dim) the conv inputs, or with
    conv_layout (an ops.fused.gdn_decode.ProjLayout) the projection rows (B, N, P) they sit in (gdn_tree_verify's
    "full" fusion writes no separate conv-input copy). fused=False: the two kernels one after the other (A/B).
    References: tree.tree_commit_state and conv1d.tree.tree_conv_commit_state."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use tree.tree_commit_state and conv1d.tree.tree_conv_commit_state")
    B, N, H, K, HV, V = _check_state_commit(state, cache, node)
    W = window_index.shape[-1]
    D = 2 * H * K + HV * V
    _check_conv_window(conv_state, window_index, B, N, D, name="conv_state")
    L = conv_layout
    if L is not None and (L.H, L.HV, L.K, L.V) != (H, HV, K, V):
        raise ValueError(f"conv_layout has heads (H, HV, K, V) = {(L.H, L.HV, L.K, L.V)}, the cache {(H, HV, K, V)}")
    width = D if L is None else L.width
    if conv_input.dim() != 3 or tuple(conv_input.shape) != (B, N, width):
        what = "(B, N, conv_dim)" if L is None else "(B, N, P) projection rows"
        raise ValueError(f"conv_input must have shape {what} = {(B, N, width)}, got {tuple(conv_input.shape)}")
    if not fused:
        x = conv_input if L is None else conv_input[..., L.conv_index(conv_input.device)]
        triton_tree_conv_commit_state(x=x, state=conv_state, window_index=window_index, node=node)
        triton_tree_commit_state(state=state, cache=cache, node=node, precision=precision, block_k=block_k,
                                 block_v=block_v)
        return
    x = conv_input.reshape(B * N, width)
    if x.stride(-1) != 1:
        x = x.contiguous()
    BN, BK, BV = _state_tiles(N, K, V, block_k, block_v)
    n_state = triton.cdiv(K, BK) * triton.cdiv(V, BV) * B * HV
    BD = 256
    cols = (0, 0, 0, 0, 0, 0) if L is None else (*L.q, *L.k, *L.v)
    _commit_all_kernel[(n_state + B * triton.cdiv(D, BD),)](
        state, state, cache.k.contiguous(), cache.v_new.contiguous(), cache.gamma.contiguous(),
        cache.ancestor_mask.contiguous().view(torch.uint8), node.contiguous(), x, x.stride(0), conv_state, conv_state,
        window_index.contiguous(), N, D, n_state, *cols,
        H=H, HV=HV, K=K, V=V, BN=BN, BK=BK, BV=BV, PREC=dot_precisions(precision or default_precision(state))[0],
        W=W, BW=max(2, triton.next_power_of_2(W - 1)), BD=BD, PROJ=L is not None, num_warps=4, **pdl.launch_args(state),
    )
