"""The GDN layer's verify step around the tree-WY kernel, fused: one prep kernel before it, one norm kernel after.

    q, k, v, g, beta, mixed = gdn_tree_prep(proj, layout=ProjLayout..., conv_weight=w, conv_state=cs,
                                            window_index=idx, A_log=A_log, dt_bias=dt_bias)
    o, cache = triton_tree_gated_delta_rule(q, k, v, g=g, beta=beta, ..., use_qk_l2norm=True)   (triton_tree.py)
    y = gated_rms_norm_rows(o, proj, layout=..., weight=nw, eps=1e-6)                          # (B, N, HV*V)

gdn_tree_prep: one program per (node, key head) reads the fused projection row of its node; the tree conv takes each
channel's W inputs along the node's ancestor path (`window_index` from `ops.conv1d.tree.tree_conv_window_index`,
computed once per verify for all layers) from the committed conv window or from the ancestors' projection rows;
outputs SiLU(conv) as q, k (B, N, H, K), v (B, N, HV, V) in the activation dtype, the gates g, beta (B, N, HV)
float32, and `mixed` (B, N, conv_dim), the conv inputs that `triton_tree_conv_commit_state` commits. No split, cat or
cast copies. gated_rms_norm_rows: rmsnorm(o) * w * silu(z) per value head, z read from the projection row.
References: `gdn_tree_prep_reference` (tree_causal_conv1d + the layer's gates), `gated_rms_norm_rows_reference`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gdnspec.ops.conv1d.tree import tree_causal_conv1d
from gdnspec.ops.fused._checks import check_layout, check_shape
from gdnspec.ops.fused.gdn_decode import ProjLayout, check_proj_conv_gates
from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON, available

if HAS_TRITON:
    import triton
    import triton.language as tl

    from gdnspec.ops.fused.gdn_decode import _gated_rms_norm

__all__ = ["gdn_tree_prep", "gdn_tree_prep_reference", "gated_rms_norm_rows", "gated_rms_norm_rows_reference"]


def _pieces(proj: torch.Tensor, L: ProjLayout) -> dict:
    return {p: proj[..., L.gather_index(p, proj.device)] for p in ("q", "k", "v", "z", "b", "a")}


def gdn_tree_prep_reference(proj: torch.Tensor, *, layout: ProjLayout, conv_weight: torch.Tensor,
                            conv_state: torch.Tensor, window_index: torch.Tensor, A_log: torch.Tensor,
                            dt_bias: torch.Tensor):
    """proj (B, N, P) -> (q, k (B, N, H, K), v (B, N, HV, V) in proj's dtype, g, beta (B, N, HV) float32,
    mixed (B, N, conv_dim)); the torch ops of Qwen3GatedDeltaNet.forward_tree."""
    L = layout
    B, N, _ = proj.shape
    pc = _pieces(proj, L)
    mixed = torch.cat([pc["q"], pc["k"], pc["v"]], dim=-1)
    y, _ = tree_causal_conv1d(mixed, weight=conv_weight, parents=None, state=conv_state, window_index=window_index)
    HK = L.H * L.K
    q = y[..., :HK].reshape(B, N, L.H, L.K)
    k = y[..., HK: 2 * HK].reshape(B, N, L.H, L.K)
    v = y[..., 2 * HK:].reshape(B, N, L.HV, L.V)
    beta = torch.sigmoid(pc["b"].float())
    g = F.softplus(pc["a"].float() + dt_bias.float()) * -A_log.float().exp()
    return q, k, v, g, beta, mixed


def gated_rms_norm_rows_reference(o: torch.Tensor, proj: torch.Tensor, *, layout: ProjLayout, weight: torch.Tensor,
                                  eps: float) -> torch.Tensor:
    """o (B, N, HV, V) -> GatedRMSNorm(o, z) (B, N, HV*V) with the module's rounding points."""
    L = layout
    B, N = o.shape[:2]
    z = _pieces(proj, L)["z"].reshape(B, N, L.HV, L.V)
    dt = o.dtype
    yn = F.rms_norm(o.float(), (L.V,), None, eps).to(dt) * weight.to(dt)
    return (yn.float() * F.silu(z.float())).to(dt).reshape(B, N, L.HV * L.V)


if HAS_TRITON:

    @triton.jit
    def _tree_conv_piece(proj, sp_row, node_row0, col, chan, m, wgt, cs, widx, W: tl.constexpr, BW: tl.constexpr):
        """SiLU(conv) of channels `chan` for one node: the W inputs at window_index (oldest first)."""
        rw = tl.arange(0, BW)
        mw = rw < W
        idx = tl.load(widx + rw, mask=mw, other=0)  # (BW,) positions in [window (W-1) | nodes (N)]
        from_state = idx < W - 1
        st = tl.load(cs + chan[:, None] * (W - 1) + idx[None, :], mask=m[:, None] & mw[None, :] & from_state[None, :],
                     other=0.0)
        node = tl.maximum(idx - (W - 1), 0)
        xv = tl.load(proj + (node_row0 + node[None, :]) * sp_row + col[:, None],
                     mask=m[:, None] & mw[None, :] & (~from_state)[None, :], other=0.0)
        full = tl.where(from_state[None, :], st.to(tl.float32), xv.to(tl.float32)).to(xv.dtype).to(tl.float32)
        wv = tl.load(wgt + chan[:, None] * W + rw[None, :], mask=m[:, None] & mw[None, :], other=0.0)
        acc = tl.sum(full * wv.to(xv.dtype).to(tl.float32), 1)
        acc = acc * tl.sigmoid(acc)
        return acc.to(xv.dtype)

    @triton.jit
    def _tree_prep_kernel(proj, sp, wgt, cstate, widx, A_log, dt_bias, q_out, k_out, v_out, g_out, b_out, mixed,
                          N, q_base, q_hs, k_base, k_hs, v_base, v_hs, b_base, b_hs, a_base, a_hs,
                          H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, BW: tl.constexpr):
        i_bn = tl.program_id(0)
        i_h = tl.program_id(1)
        i_b = i_bn // N
        R: tl.constexpr = HV // H
        CD: tl.constexpr = 2 * H * K + HV * V
        row0 = i_b * N  # first projection row of this batch row
        cs = cstate + i_b * CD * (W - 1)
        wi = widx + i_bn * W
        rk = tl.arange(0, BK)
        rv = tl.arange(0, BV)
        mk = rk < K
        mv = rv < V
        prow = proj + i_bn * sp
        qc = q_base + i_h * q_hs + rk
        kc = k_base + i_h * k_hs + rk
        tl.store(q_out + (i_bn * H + i_h) * K + rk,
                 _tree_conv_piece(proj, sp, row0, qc, i_h * K + rk, mk, wgt, cs, wi, W, BW), mask=mk)
        tl.store(k_out + (i_bn * H + i_h) * K + rk,
                 _tree_conv_piece(proj, sp, row0, kc, H * K + i_h * K + rk, mk, wgt, cs, wi, W, BW), mask=mk)
        tl.store(mixed + i_bn * CD + i_h * K + rk, tl.load(prow + qc, mask=mk, other=0.0), mask=mk)
        tl.store(mixed + i_bn * CD + H * K + i_h * K + rk, tl.load(prow + kc, mask=mk, other=0.0), mask=mk)
        for l in range(R):
            i_hv = i_h * R + l
            vc = v_base + i_h * v_hs + l * V + rv
            tl.store(v_out + (i_bn * HV + i_hv) * V + rv,
                     _tree_conv_piece(proj, sp, row0, vc, 2 * H * K + i_hv * V + rv, mv, wgt, cs, wi, W, BW), mask=mv)
            tl.store(mixed + i_bn * CD + 2 * H * K + i_hv * V + rv, tl.load(prow + vc, mask=mv, other=0.0), mask=mv)
            bb = tl.load(prow + b_base + i_h * b_hs + l).to(tl.float32)
            aa = tl.load(prow + a_base + i_h * a_hs + l).to(tl.float32) + tl.load(dt_bias + i_hv).to(tl.float32)
            sp_a = tl.where(aa > 20.0, aa, tl.log(1.0 + tl.exp(tl.minimum(aa, 20.0))))
            tl.store(g_out + i_bn * HV + i_hv, -tl.exp(tl.load(A_log + i_hv).to(tl.float32)) * sp_a)
            tl.store(b_out + i_bn * HV + i_hv, tl.sigmoid(bb))

    @triton.jit
    def _gated_norm_rows_kernel(o, proj, sp, nw, y, eps, z_base, z_hs, H: tl.constexpr, HV: tl.constexpr,
                                V: tl.constexpr, BV: tl.constexpr):
        i_bn = tl.program_id(0)
        i_h = tl.program_id(1)
        R: tl.constexpr = HV // H
        rv = tl.arange(0, BV)
        mv = rv < V
        wn = tl.load(nw + rv, mask=mv, other=0.0)
        for l in range(R):
            i_hv = i_h * R + l
            ov = tl.load(o + (i_bn * HV + i_hv) * V + rv, mask=mv, other=0.0)
            gz = tl.load(proj + i_bn * sp + z_base + i_h * z_hs + l * V + rv, mask=mv, other=0.0).to(tl.float32)
            yv = _gated_rms_norm(ov, mv, wn, gz, V, eps)
            tl.store(y + (i_bn * HV + i_hv) * V + rv, yv.to(y.dtype.element_ty), mask=mv)


def gdn_tree_prep(proj: torch.Tensor, *, layout: ProjLayout, conv_weight: torch.Tensor, conv_state: torch.Tensor,
                  window_index: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """See the module docstring; proj (B, N, P), conv_state (B, conv_dim, W-1) (only read), window_index (B, N, W)
    long. One kernel on CUDA / under TRITON_INTERPRET, `gdn_tree_prep_reference` elsewhere."""
    L = layout
    CD, W = check_proj_conv_gates(proj, layout=L, conv_weight=conv_weight, A_log=A_log, dt_bias=dt_bias,
                                  dims="(B, N, P)")
    B, N, P = proj.shape
    if tuple(window_index.shape) != (B, N, W):
        raise ValueError(f"window_index must have shape (B, N, W) = {(B, N, W)}, got {tuple(window_index.shape)}")
    if tuple(conv_state.shape) != (B, CD, W - 1):
        raise ValueError(f"conv_state must have shape (B, conv_dim, W-1) = {(B, CD, W - 1)}, got {tuple(conv_state.shape)}")
    kw = dict(layout=L, conv_weight=conv_weight, conv_state=conv_state, window_index=window_index, A_log=A_log,
              dt_bias=dt_bias)
    if not available(proj) or proj.dtype == torch.float64:
        return gdn_tree_prep_reference(proj, **kw)
    p2 = proj.reshape(B * N, P)
    if p2.stride(-1) != 1 or p2.stride(0) != P:
        p2 = p2.contiguous()
    dev, dt = proj.device, proj.dtype
    q = torch.empty(B, N, L.H, L.K, dtype=dt, device=dev)
    k = torch.empty(B, N, L.H, L.K, dtype=dt, device=dev)
    v = torch.empty(B, N, L.HV, L.V, dtype=dt, device=dev)
    g = torch.empty(B, N, L.HV, dtype=torch.float32, device=dev)
    beta = torch.empty(B, N, L.HV, dtype=torch.float32, device=dev)
    mixed = torch.empty(B, N, CD, dtype=dt, device=dev)
    if B * N:
        _tree_prep_kernel[(B * N, L.H)](
            p2, p2.stride(0), conv_weight.contiguous(), conv_state.contiguous(), window_index.contiguous(), A_log,
            dt_bias, q, k, v, g, beta, mixed, N, *L.q, *L.k, *L.v, *L.b, *L.a,
            H=L.H, HV=L.HV, K=L.K, V=L.V, W=W, BK=triton.next_power_of_2(L.K), BV=triton.next_power_of_2(L.V),
            BW=triton.next_power_of_2(W), num_warps=4)
    return q, k, v, g, beta, mixed


def gated_rms_norm_rows(o: torch.Tensor, proj: torch.Tensor, *, layout: ProjLayout, weight: torch.Tensor,
                        eps: float) -> torch.Tensor:
    """o (B, N, HV, V) contiguous, proj (B, N, P) -> (B, N, HV*V) in o's dtype (see the module docstring)."""
    L = layout
    check_layout(L)
    if o.dim() != 4 or proj.dim() != 3:
        raise ValueError(f"o must be (B, N, HV, V) and proj (B, N, P), got {tuple(o.shape)} and {tuple(proj.shape)}")
    B, N = o.shape[:2]
    check_shape("o", o, (B, N, L.HV, L.V), "(B, N, HV, V)")
    check_shape("proj", proj, (B, N, L.width), "(B, N, P)")
    check_shape("weight", weight, (L.V,))
    if not available(o) or o.dtype == torch.float64:
        return gated_rms_norm_rows_reference(o, proj, layout=L, weight=weight, eps=eps)
    p2 = proj.reshape(B * N, -1)
    if p2.stride(-1) != 1:
        p2 = p2.contiguous()
    oc = o.contiguous()
    y = torch.empty(B, N, L.HV * L.V, dtype=o.dtype, device=o.device)
    if B * N:
        _gated_norm_rows_kernel[(B * N, L.H)](oc, p2, p2.stride(0), weight, y, float(eps), *L.z, H=L.H, HV=L.HV,
                                             V=L.V, BV=triton.next_power_of_2(L.V), num_warps=2)
    return y
