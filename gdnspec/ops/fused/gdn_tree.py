"""The GDN layer's verify step between its in- and out-projection, fused into ONE kernel (`gdn_tree_verify`).

    y, gdr, conv_input, conv_layout = gdn_tree_verify(proj, layout=ProjLayout..., conv_weight=w, conv_state=cs,
        window_index=idx, A_log=A_log, dt_bias=dt_bias, ancestor_mask=mask, recurrent_state=S, norm_weight=nw,
        norm_eps=1e-6)                                                                         # y (B, N, HV*V)
    triton_tree_commit(state=S, conv_state=cs, cache=gdr, conv_input=conv_input, conv_layout=conv_layout,
                       window_index=idx, node=node)                 # (triton_commit.py) one launch, both states

gdn_tree_verify's kernel (GDNSPEC_TREE_FUSION=full; NOT the default, see `tree_fusion`): one program per (value tile, batch row, value head)
computes the tree conv + SiLU of its key head's q, k (N x K, recomputed by every program of the head) and of its own
value columns straight from the projection rows and the committed window, the gates, then tree-WY (triton_tree's
_tree_solve / _tree_apply), then the gated RMSNorm (in registers when its tile covers V, else by the last program of
the value head to arrive). No q/k/v/mixed/o tensors in memory; the conv commit reads the projection rows.

The default (GDNSPEC_TREE_FUSION=norm, measured fastest) keeps gdn_tree_prep separate and folds the gated norm into
the tree-WY kernel, with one commit launch; "off" is the three-kernel sequence, kept for A/B:
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
References: `gdn_tree_prep_reference` (tree_causal_conv1d + the layer's gates), `gated_rms_norm_rows_reference`,
`gdn_tree_verify_reference` (the two around tree_gated_delta_rule).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gdnspec.ops import pdl
from gdnspec.ops.conv1d.tree import tree_causal_conv1d
from gdnspec.ops.fused._checks import check_layout, check_shape
from gdnspec.ops.fused.gdn_decode import ProjLayout, check_proj_conv_gates
from gdnspec.ops.gated_delta_rule import triton_tree as _triton_tree
from gdnspec.ops.gated_delta_rule.common import SSM_STATE_DTYPES
from gdnspec.ops.gated_delta_rule.tree import _check_tree, tree_gated_delta_rule
from gdnspec.ops.gated_delta_rule.triton_tree import (
    HAS_TRITON,
    MAX_NODES,
    _pick_config,
    _pow2,
    available,
    default_precision,
    triton_tree_gated_delta_rule,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from gdnspec.ops.pdl import enter

    from gdnspec.ops.fused._sync import arrival_counters as _arrival_counters
    from gdnspec.ops.fused.gdn_decode import _gated_rms_norm
    from gdnspec.ops.gated_delta_rule.triton_tree import _tree_apply, _tree_solve

__all__ = ["FUSIONS", "gdn_tree_prep", "gdn_tree_prep_reference", "gated_rms_norm_rows", "gated_rms_norm_rows_reference",
           "gdn_tree_verify", "gdn_tree_verify_reference", "tree_fusion"]

FUSIONS = ("full", "norm", "off")


def tree_fusion(fusion: str | None = None) -> str:
    """The verify/commit kernel sequence: `fusion`, else the environment variable GDNSPEC_TREE_FUSION, else "norm".
    "norm" is the default because it is measured fastest on an H200 (1.7B config, bf16, verify N = 16 with the
    commit, one session each, benchmarks/results/stop17/e2e_fusion_*.json): B = 1 / 8 / 32 1.97 / 3.38 / 6.69 ms
    against 2.03 / 3.56 / 7.08 ms with "off". "full" was slower than "off" (an earlier session: B = 1 2.40 against
    2.22 ms, B = 32 12.2 against 8.1 ms: the q/k tree conv that every program of a key head recomputes and the larger
    register footprint cost more than the launches they save).
    "full": one verify kernel per GDN layer (tree conv + gates + tree-WY + gated RMSNorm) and one commit kernel;
    "norm": gdn_tree_prep, then tree-WY + gated RMSNorm in one kernel; one commit kernel;
    "off": the previous sequence (gdn_tree_prep, tree-WY, gated_rms_norm_rows; state commit + conv commit), for A/B."""
    import os

    f = fusion if fusion is not None else (os.environ.get("GDNSPEC_TREE_FUSION") or "norm")
    if f not in FUSIONS:
        raise ValueError(f"tree fusion must be one of {FUSIONS}, got {f!r} (argument or GDNSPEC_TREE_FUSION)")
    return f


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
                          BK: tl.constexpr, BV: tl.constexpr, BW: tl.constexpr, PDL: tl.constexpr = False):
        enter(PDL)  # ops/pdl.py: before any load or store
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
                                V: tl.constexpr, BV: tl.constexpr, PDL: tl.constexpr = False):
        enter(PDL)  # ops/pdl.py: before any load or store
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


    @triton.jit
    def _tree_conv_tile(proj, sp, row0, col, chan, mc, rn, mn, wgt, cs, wi, W: tl.constexpr):
        """SiLU(tree conv) of channels `chan` (BC,) (input columns `col` of the projection rows) for the nodes rn
        (BN,) of one batch row: (BN, BC) float32, rounded to the activation dtype at gdn_tree_prep's points. wi: the
        row's window index (N, W) into [committed window cs (W-1) | the row's nodes from row0]."""
        act = proj.dtype.element_ty
        m2 = mn[:, None] & mc[None, :]
        acc = tl.zeros((rn.shape[0], chan.shape[0]), dtype=tl.float32)
        for w in tl.static_range(W):
            idx = tl.load(wi + rn * W + w, mask=mn, other=0)  # (BN,) position of tap w in [window | nodes]
            from_state = idx < W - 1
            st = tl.load(cs + chan[None, :] * (W - 1) + idx[:, None], mask=m2 & from_state[:, None], other=0.0)
            node = tl.maximum(idx - (W - 1), 0)
            xv = tl.load(proj + (row0 + node[:, None]) * sp + col[None, :], mask=m2 & (~from_state)[:, None],
                         other=0.0)
            full = tl.where(from_state[:, None], st.to(tl.float32), xv.to(tl.float32)).to(act).to(tl.float32)
            wv = tl.load(wgt + chan * W + w, mask=mc, other=0.0).to(act).to(tl.float32)
            acc += full * wv[None, :]
        acc = acc * tl.sigmoid(acc)
        return acc.to(act).to(tl.float32)

    @triton.jit
    def _gdn_tree_verify_kernel(
        q, k, v, g, beta, proj, sp, amask, s0, nw, y, o_buf, counter, k_out, vnew_out, gamma_out,
        wgt, cstate, widx, A_log, dt_bias,
        N, scale, norm_eps, q_base, q_hs, k_base, k_hs, v_base, v_hs, z_base, z_hs, b_base, b_hs, a_base, a_hs,
        H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BVN: tl.constexpr, NV: tl.constexpr,
        PREP: tl.constexpr, PREC: tl.constexpr, PREC_S: tl.constexpr, BLOCKED: tl.constexpr = True,
        PDL: tl.constexpr = False,
    ):
        """[tree conv + gates from the projection rows (PREP)] + tree-WY of one (value tile, batch row, value head)
        + the gated RMSNorm epilogue (see gdn_tree_verify). Without PREP, q, k, v, g, beta come from gdn_tree_prep."""
        enter(PDL)  # ops/pdl.py: before any load or store
        i_v = tl.program_id(0)
        i_bh = tl.program_id(1)
        i_b = i_bh // HV
        i_hv = i_bh % HV
        R: tl.constexpr = HV // H
        i_h = i_hv // R
        l = i_hv % R
        rn = tl.arange(0, BN)
        rk = tl.arange(0, BK)
        rv = i_v * BV + tl.arange(0, BV)
        mn = rn < N
        mk = rk < K
        mv = rv < V
        m_nk = mn[:, None] & mk[None, :]
        m_nv = mn[:, None] & mv[None, :]
        act = y.dtype.element_ty
        CD: tl.constexpr = 2 * H * K + HV * V
        row0 = i_b * N  # the batch row's first projection row
        cs = cstate + i_b * CD * (W - 1)  # its committed conv window
        wi = widx + i_b * N * W  # its window index (N, W)

        qk_off = ((i_b * N + rn[:, None]) * H + i_h) * K + rk[None, :]  # (BN, BK) into (B, N, H, K)
        gb_off = (i_b * N + rn) * HV + i_hv  # (BN,) into (B, N, HV)
        v_off = ((i_b * N + rn[:, None]) * HV + i_hv) * V + rv[None, :]  # (BN, BV) into (B, N, HV, V)
        if PREP:  # every program of key head i_h recomputes its q, k (N x K each) from the projection rows
            b_q = _tree_conv_tile(proj, sp, row0, q_base + i_h * q_hs + rk, i_h * K + rk, mk, rn, mn, wgt, cs, wi, W)
            b_k = _tree_conv_tile(proj, sp, row0, k_base + i_h * k_hs + rk, H * K + i_h * K + rk, mk, rn, mn, wgt, cs,
                                  wi, W)
            prow = proj + (row0 + rn) * sp  # (BN,) projection rows of the nodes
            bb = tl.load(prow + b_base + i_h * b_hs + l, mask=mn, other=0.0).to(tl.float32)
            aa = tl.load(prow + a_base + i_h * a_hs + l, mask=mn, other=0.0).to(tl.float32) + \
                tl.load(dt_bias + i_hv).to(tl.float32)
            sp_a = tl.where(aa > 20.0, aa, tl.log(1.0 + tl.exp(tl.minimum(aa, 20.0))))
            b_g = -tl.exp(tl.load(A_log + i_hv).to(tl.float32)) * sp_a
            b_beta = tl.sigmoid(bb)
        else:
            b_q = tl.load(q + qk_off, mask=m_nk, other=0.0).to(tl.float32)
            b_k = tl.load(k + qk_off, mask=m_nk, other=0.0).to(tl.float32)
            b_g = tl.load(g + gb_off, mask=mn, other=0.0).to(tl.float32)
            b_beta = tl.load(beta + gb_off, mask=mn, other=0.0).to(tl.float32)
        b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 1) + 1e-6)[:, None] * scale
        b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 1) + 1e-6)[:, None]
        m_nn = mn[:, None] & mn[None, :]
        b_A = tl.load(amask + (i_b * N + rn[:, None]) * N + rn[None, :], mask=m_nn, other=0) != 0  # (BN, BN)
        # the state tile and the values do not depend on the solve: issued first, their latency hides behind it
        b_S = tl.load(s0 + ((i_b * HV + i_hv) * K + rk[:, None]) * V + rv[None, :], mask=mk[:, None] & mv[None, :],
                      other=0.0).to(tl.float32)  # a 16-bit state (mamba_ssm_cache_dtype): maths in float32
        if PREP:
            b_v = _tree_conv_tile(proj, sp, row0, v_base + i_h * v_hs + l * V + rv, 2 * H * K + i_hv * V + rv, mv, rn,
                                  mn, wgt, cs, wi, W)
        else:
            b_v = tl.load(v + v_off, mask=m_nv, other=0.0).to(tl.float32)
        b_T, b_Gam, b_gamma = _tree_solve(b_k, b_g, b_beta, b_A, rn, N, PREC, BLOCKED)
        b_o, b_vnew = _tree_apply(b_q, b_k, b_v, b_beta, b_S, b_T, b_Gam, b_gamma, PREC, PREC_S)
        tl.store(vnew_out + v_off, b_vnew, mask=m_nv)
        if i_v == 0:
            tl.store(gamma_out + gb_off, b_gamma, mask=mn)
            if l == 0:
                tl.store(k_out + qk_off, b_k, mask=m_nk)

        # epilogue: y = rmsnorm(o) * w * silu(z) per node over the whole value head, o rounded to the activation dtype
        z_row = proj + (i_b * N + rn) * sp + z_base + i_h * z_hs + l * V  # (BN,) pointers to z of (node, i_hv)
        if NV == 1:  # this program holds whole value heads
            gz = tl.load(z_row[:, None] + rv[None, :], mask=m_nv, other=0.0).to(tl.float32)
            wn = tl.load(nw + rv, mask=mv, other=0.0)
            yv = _gated_rms_norm(b_o.to(act), m_nv, wn, gz, V, norm_eps)
            tl.store(y + v_off, yv.to(act), mask=m_nv)
        else:
            # NV programs share a value head: each writes its o tile; the LAST to arrive (barrier, then a gpu-scope
            # acq_rel atomic, as in gdn_decode) normalises the whole head from o_buf and resets the counter
            tl.store(o_buf + v_off, b_o.to(act), mask=m_nv)
            tl.debug_barrier()
            arrived = tl.atomic_add(counter + i_bh, 1, sem="acq_rel", scope="gpu")
            if arrived == NV - 1:
                rf = tl.arange(0, BVN)
                mf = rf < V
                m_nf = mn[:, None] & mf[None, :]
                f_off = ((i_b * N + rn[:, None]) * HV + i_hv) * V + rf[None, :]
                ov = tl.load(o_buf + f_off, mask=m_nf, other=0.0)
                gz = tl.load(z_row[:, None] + rf[None, :], mask=m_nf, other=0.0).to(tl.float32)
                wn = tl.load(nw + rf, mask=mf, other=0.0)
                yv = _gated_rms_norm(ov, m_nf, wn, gz, V, norm_eps)
                tl.store(y + f_off, yv.to(act), mask=m_nf)
                tl.store(counter + i_bh, 0)


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
            BW=triton.next_power_of_2(W), num_warps=4, **pdl.launch_args(p2))
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
                                             V=L.V, BV=triton.next_power_of_2(L.V), num_warps=2, **pdl.launch_args(oc))
    return y



def gdn_tree_verify_reference(proj: torch.Tensor, *, layout: ProjLayout, conv_weight: torch.Tensor,
                              conv_state: torch.Tensor, window_index: torch.Tensor, A_log: torch.Tensor,
                              dt_bias: torch.Tensor, ancestor_mask: torch.Tensor, recurrent_state: torch.Tensor,
                              norm_weight: torch.Tensor, norm_eps: float):
    """The torch ops of the layer's verify step between the projections (float32 state math, float64 for float64):
    gdn_tree_prep_reference -> tree_gated_delta_rule (use_qk_l2norm) -> gated_rms_norm_rows_reference.
    Returns (y (B, N, HV*V) in proj's dtype, TreeGDRCache, mixed (B, N, conv_dim) the conv inputs)."""
    q, k, v, g, beta, mixed = gdn_tree_prep_reference(proj, layout=layout, conv_weight=conv_weight,
                                                      conv_state=conv_state, window_index=window_index, A_log=A_log,
                                                      dt_bias=dt_bias)
    o, gdr = tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=ancestor_mask, initial_state=recurrent_state,
                                   use_qk_l2norm=True)
    return gated_rms_norm_rows_reference(o, proj, layout=layout, weight=norm_weight, eps=norm_eps), gdr, mixed


def gdn_tree_verify(proj: torch.Tensor, *, layout: ProjLayout, conv_weight: torch.Tensor, conv_state: torch.Tensor,
                    window_index: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
                    ancestor_mask: torch.Tensor, recurrent_state: torch.Tensor, norm_weight: torch.Tensor,
                    norm_eps: float, fusion: str | None = None, block_v: int | None = None,
                    num_warps: int | None = None, precision: str | None = None, prep: tuple | None = None):
    """The GDN layer's verify step between its in- and out-projection, over N tree nodes.

    proj (B, N, P) the fused in-projection rows (any `layout`), conv_weight (conv_dim, W), conv_state (B, conv_dim,
    W-1) in proj's dtype and recurrent_state (B, HV, K, V) contiguous, float32 or a 16-bit storage dtype (both only
    read), window_index (B, N, W)
    long (`tree_conv_window_index`), ancestor_mask (B, N, N) bool, A_log, dt_bias (HV,), norm_weight (V,); 1 <= N <= 64.
    Returns (y, gdr, conv_input, conv_layout): y (B, N, HV*V) in proj's dtype = GatedRMSNorm(o, z), ready for the
    out-projection; gdr the TritonTreeCache for `triton_tree_commit` (the same terms as triton_tree_gated_delta_rule's);
    conv_input (B, N, conv_dim) the conv inputs, or proj itself when conv_layout is not None (the commit then reads the
    conv inputs from the projection rows through that layout).

    fusion (`tree_fusion`; default env GDNSPEC_TREE_FUSION, else "norm"):
      "full": ONE kernel: tree conv + SiLU + gates from the projection rows (as gdn_tree_prep computes them; q, k
              recomputed by each program of the key head), tree-WY, gated RMSNorm as below. conv_input is proj and
              conv_layout the layout: no conv-input copy is written.
      "norm": gdn_tree_prep, then ONE kernel: tree-WY + the gated RMSNorm epilogue (rmsnorm(o) * w * silu(z), z read
              from the projection row; `_gated_rms_norm`, the module's rounding points). A program whose value tile
              covers V normalises in registers; otherwise (block_v < V, e.g. the 4 tiles of 32 at B = 1) the last of
              the V / block_v programs of a value head to arrive normalises the head (atomic arrival counter).
      "off":  gdn_tree_prep, triton_tree_gated_delta_rule, gated_rms_norm_rows (three kernels; for A/B measurements).
    prep: (q, k, v, g, beta) already computed from proj (gdn_tree_proj.tree_in_projection, the in-projection with
    the tree prep in its epilogue); with "norm" the kernel then reads them and the conv commit reads the projection
    rows (conv_input = proj, conv_layout = layout), so no gdn_tree_prep launch and no conv-input copy.
    Reference: `gdn_tree_verify_reference` (and the torch path where Triton cannot run: CPU without TRITON_INTERPRET,
    float64, a state dtype outside SSM_STATE_DTYPES); its gdr is then a TreeGDRCache.
    """
    L = layout
    mode = tree_fusion(fusion)
    CD, W = check_proj_conv_gates(proj, layout=L, conv_weight=conv_weight, A_log=A_log, dt_bias=dt_bias,
                                  dims="(B, N, P)")
    B, N, P = proj.shape
    if not 1 <= N <= MAX_NODES:
        raise ValueError(f"gdn_tree_verify takes 1..{MAX_NODES} tree nodes, got N={N}")
    check_shape("window_index", window_index, (B, N, W), "(B, N, W)")
    check_shape("conv_state", conv_state, (B, CD, W - 1), "(B, conv_dim, W-1)")
    check_shape("recurrent_state", recurrent_state, (B, L.HV, L.K, L.V), "(B, HV, K, V)")
    check_shape("norm_weight", norm_weight, (L.V,))
    _check_tree(ancestor_mask, B, N)
    kw = dict(layout=L, conv_weight=conv_weight, conv_state=conv_state, window_index=window_index, A_log=A_log,
              dt_bias=dt_bias)
    if not available(proj) or proj.dtype == torch.float64 or recurrent_state.dtype not in SSM_STATE_DTYPES:
        y, gdr, mixed = gdn_tree_verify_reference(proj, ancestor_mask=ancestor_mask, recurrent_state=recurrent_state,
                                                  norm_weight=norm_weight, norm_eps=norm_eps, **kw)
        return y, gdr, mixed, None
    if not recurrent_state.is_contiguous():
        raise ValueError(f"recurrent_state must be contiguous, got strides {tuple(recurrent_state.stride())}")
    dev, dt = proj.device, proj.dtype
    BN, BK = _pow2(N), _pow2(L.K)
    bv, warps = _pick_config(BN, B * L.HV, dev)
    if mode == "full":
        # the tree conv of q, k, v in the kernel: 4 warps spill (ptxas for sm_90, benchmarks/compile_check.py
        # --ptxas: 1.7B shapes 1292 bytes at 4 warps, 68 at 8; the shipped bundle's K = V = 64, N = 16 228 at 4,
        # none at 8)
        warps = max(warps, 8)
    BV = block_v or min(_pow2(L.V), bv)
    if BV < 16 or BV & (BV - 1):
        raise ValueError(f"block_v must be a power of two >= 16 (tl.dot tiles), got {BV}")
    # "full", or "norm" with the prep given: the conv commit reads its inputs from the projection rows
    from_rows = mode == "full" or (mode == "norm" and prep is not None)
    if mode != "full":
        q, k, v, g, beta, mixed = (*prep, None) if from_rows else gdn_tree_prep(proj, **kw)
    if mode == "off":
        o, gdr = triton_tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=ancestor_mask,
                                              initial_state=recurrent_state, use_qk_l2norm=True, precision=precision,
                                              block_v=block_v, num_warps=num_warps)
        return gated_rms_norm_rows(o, proj, layout=L, weight=norm_weight, eps=norm_eps), gdr, mixed, None
    p2 = proj.reshape(B * N, P)
    if p2.stride(-1) != 1 or p2.stride(0) != P:
        p2 = p2.contiguous()
    if mode == "full":  # q, k, v, g, beta are not read (PREP)
        q = k = v = g = beta = p2
    mixed, conv_layout = (p2.view(B, N, P), L) if from_rows else (mixed, None)
    NV = triton.cdiv(L.V, BV)
    prec, prec_s = _triton_tree.dot_precisions(precision or default_precision(proj))
    y = torch.empty(B, N, L.HV * L.V, dtype=dt, device=dev)
    o_buf = torch.empty(B, N, L.HV, L.V, dtype=dt, device=dev) if NV > 1 else y
    counter = _arrival_counters(B * L.HV, dev)
    k_out = torch.empty(B, N, L.H, L.K, dtype=torch.float32, device=dev)
    vnew = torch.empty(B, N, L.HV, L.V, dtype=torch.float32, device=dev)
    gamma = torch.empty(B, N, L.HV, dtype=torch.float32, device=dev)
    _gdn_tree_verify_kernel[(NV, B * L.HV)](
        q, k, v, g, beta, p2, p2.stride(0), ancestor_mask.contiguous().view(torch.uint8), recurrent_state,
        norm_weight, y, o_buf, counter, k_out, vnew, gamma,
        conv_weight.contiguous(), conv_state.contiguous(), window_index.contiguous(), A_log, dt_bias,
        N, L.K**-0.5, float(norm_eps), *L.q, *L.k, *L.v, *L.z, *L.b, *L.a,
        H=L.H, HV=L.HV, K=L.K, V=L.V, W=W, BN=BN, BK=BK, BV=BV, BVN=_pow2(L.V), NV=NV, PREP=mode == "full",
        PREC=prec, PREC_S=prec_s, BLOCKED=_triton_tree.blocked_solve(), num_warps=num_warps or warps, **pdl.launch_args(q))
    # the class through its module: a test's reload of triton_tree must not leave gdn_tree making a stale class
    return y, _triton_tree.TritonTreeCache(k=k_out, v_new=vnew, gamma=gamma, ancestor_mask=ancestor_mask), mixed, conv_layout
