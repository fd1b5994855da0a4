"""Triton fused single-token decode step of a Gated DeltaNet layer, from the projections to the gated RMSNorm.

Same result as `Qwen3GatedDeltaNet.forward_state(mode="fused_decode")` between `_project` and `out_proj`:

    launch 1  conv:  mixed_c = silu(conv1d_update(mixed, conv state))  (conv state rolled IN PLACE)
    launch 2  rec:   g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b), q/k L2 norm, q *= scale,
                     S = exp(g) S; S += k (beta (v - S^T k))^T; o = S^T q   (recurrent state updated IN PLACE)
                     + the gated RMSNorm when one program holds a whole value head (block_v == V)
    launch 3  norm:  gated RMSNorm  y = rmsnorm(o) * weight * silu(z)  (only when block_v < V)

Two launches when block_v == V (large batches), three when the value dim is split for parallelism (small batches).
The conv cannot share the recurrence launch: several programs read each key head's conv window, so rolling it in
place there would race.

References / CPU path: `gdnspec.ops.conv1d.causal_conv1d.causal_conv1d_update`,
`gdnspec.ops.gated_delta_rule.recurrent.gated_delta_rule_decode_step`, `gdnspec.layers.norm.GatedRMSNorm`.

    y = triton_gdn_decode_step(mixed, z, b, a, conv_weight=w, conv_state=cs, recurrent_state=S, A_log=A_log,
                               dt_bias=dt_bias, norm_weight=nw, num_k_heads=H, head_k_dim=K, norm_eps=1e-6)
    # y (B, HV, V) in mixed's dtype; cs and S advanced in place
"""
from __future__ import annotations

import torch

from gdnspec.ops.gated_delta_rule.common import state_dtype_for
from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON, available

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["available", "triton_gdn_decode_step", "triton_conv1d_update", "triton_gated_delta_rule_decode_step"]


if HAS_TRITON:

    @triton.jit
    def _conv_update_kernel(
        x, sx, wgt, state, y, D,
        W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, SILU: tl.constexpr,
    ):
        i_b = tl.program_id(0)
        i_d = tl.program_id(1)
        rd = i_d * BD + tl.arange(0, BD)
        rw = tl.arange(0, BW)
        md = rd < D
        ms = md[:, None] & (rw[None, :] < W - 1)
        st_off = (i_b * D + rd[:, None]) * (W - 1) + rw[None, :]
        b_st = tl.load(state + st_off, mask=ms, other=0.0)  # (BD, BW): the window, oldest first
        b_x = tl.load(x + i_b * sx + rd, mask=md, other=0.0)  # (BD,)
        full = tl.where(rw[None, :] == W - 1, b_x.to(tl.float32)[:, None], b_st.to(tl.float32))
        full = full.to(b_x.dtype).to(tl.float32)  # the window lives in x's dtype, like the reference
        b_w = tl.load(wgt + rd[:, None] * W + rw[None, :], mask=md[:, None] & (rw[None, :] < W), other=0.0)
        b_w = b_w.to(b_x.dtype).to(tl.float32)
        acc = tl.sum(full * b_w, 1)  # (BD,) float32 (the torch reference rounds each product to x's dtype)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(y + i_b * D + rd, acc.to(y.dtype.element_ty), mask=md)
        # roll the window left by one: new[w] = full[w + 1]
        nxt = tl.load(state + st_off + 1, mask=md[:, None] & (rw[None, :] < W - 2), other=0.0)
        nxt = tl.where(rw[None, :] == W - 2, b_x[:, None].to(nxt.dtype), nxt)
        tl.debug_barrier()  # every read of the old window happens before any write
        tl.store(state + st_off, nxt, mask=ms)

    @triton.jit
    def _rec_kernel(
        mc, b_in, a_in, z, A_log, dt_bias, nw, S, o, y,
        scale, eps, norm_eps,
        H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr, GATES: tl.constexpr, FUSE_NORM: tl.constexpr,
    ):
        i_v = tl.program_id(0)
        i_bh = tl.program_id(1)
        i_b = i_bh // HV
        i_hv = i_bh % HV
        i_h = i_hv // (HV // H)
        D: tl.constexpr = 2 * H * K + HV * V
        rk = tl.arange(0, BK)
        rv = i_v * BV + tl.arange(0, BV)
        mk = rk < K
        mv = rv < V
        b_q = tl.load(mc + i_b * D + i_h * K + rk, mask=mk, other=0.0).to(tl.float32)
        b_k = tl.load(mc + i_b * D + H * K + i_h * K + rk, mask=mk, other=0.0).to(tl.float32)
        b_v = tl.load(mc + i_b * D + 2 * H * K + i_hv * V + rv, mask=mv, other=0.0).to(tl.float32)
        b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 0) + eps) * scale
        b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 0) + eps)
        if GATES:  # b_in, a_in are the raw b, a projections
            b_b = tl.load(b_in + i_b * HV + i_hv).to(tl.float32)
            b_a = tl.load(a_in + i_b * HV + i_hv).to(tl.float32) + tl.load(dt_bias + i_hv).to(tl.float32)
            sp = tl.where(b_a > 20.0, b_a, tl.log(1.0 + tl.exp(tl.minimum(b_a, 20.0))))
            b_g = -tl.exp(tl.load(A_log + i_hv).to(tl.float32)) * sp
            b_beta = tl.sigmoid(b_b)
        else:  # b_in = beta, a_in = g (float32)
            b_beta = tl.load(b_in + i_b * HV + i_hv).to(tl.float32)
            b_g = tl.load(a_in + i_b * HV + i_hv).to(tl.float32)

        s_off = ((i_b * HV + i_hv) * K + rk[:, None]) * V + rv[None, :]
        m_kv = mk[:, None] & mv[None, :]
        b_S = tl.load(S + s_off, mask=m_kv, other=0.0) * tl.exp(b_g)  # (BK, BV)
        pred = tl.sum(b_S * b_k[:, None], 0)  # (BV,)
        u = (b_v - pred) * b_beta
        b_S = b_S + b_k[:, None] * u[None, :]
        tl.store(S + s_off, b_S, mask=m_kv)
        b_o = tl.sum(b_S * b_q[:, None], 0)  # (BV,)
        o_off = (i_b * HV + i_hv) * V + rv
        tl.store(o + o_off, b_o.to(o.dtype.element_ty), mask=mv)
        if FUSE_NORM:
            _gated_norm(b_o.to(o.dtype.element_ty), z, nw, y, o_off, rv, mv, norm_eps, V)

    @triton.jit
    def _gated_norm(b_o, z, nw, y, off, rv, mv, norm_eps, V: tl.constexpr):
        """GatedRMSNorm on one value head, rounding like the torch module (x dtype after the norm and the weight)."""
        dt = b_o.dtype
        xf = tl.where(mv, b_o.to(tl.float32), 0.0)
        rstd = tl.rsqrt(tl.sum(xf * xf, 0) / V + norm_eps)
        w = tl.load(nw + rv, mask=mv, other=0.0)
        # rounding points of the module; products in float32 (exact for bf16 x bf16, and the interpreter has no
        # bf16 arithmetic)
        yv = (xf * rstd).to(dt).to(tl.float32) * w.to(dt).to(tl.float32)
        gz = tl.load(z + off, mask=mv, other=0.0).to(tl.float32)
        yv = yv.to(dt).to(tl.float32) * (gz * tl.sigmoid(gz))
        tl.store(y + off, yv.to(y.dtype.element_ty), mask=mv)

    @triton.jit
    def _norm_kernel(o, z, nw, y, norm_eps, HV: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
        i_bh = tl.program_id(0)
        rv = tl.arange(0, BV)
        mv = rv < V
        off = i_bh * V + rv
        b_o = tl.load(o + off, mask=mv, other=0.0)
        _gated_norm(b_o, z, nw, y, off, rv, mv, norm_eps, V)


def triton_conv1d_update(x: torch.Tensor, *, weight: torch.Tensor, state: torch.Tensor, activation: str | None = "silu",
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Same as `causal_conv1d_update` (no bias): x (B, D) (last dim contiguous); weight (D, W); state (B, D, W-1)
    rolled IN PLACE. Returns y (B, D) in x's dtype."""
    B, D = x.shape
    W = weight.shape[1]
    if tuple(state.shape) != (B, D, W - 1) or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous tensor (B, D, W-1) = {(B, D, W - 1)}, got {tuple(state.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(B, D, dtype=x.dtype, device=x.device) if out is None else out
    BD = 256
    _conv_update_kernel[(B, triton.cdiv(D, BD))](
        x, x.stride(0), weight.contiguous(), state, y, D, W=W, BW=triton.next_power_of_2(W), BD=BD,
        SILU=activation == "silu", num_warps=4,
    )
    return y


def _pick_block_v(B: int, HV: int, V: int, device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    if B * HV >= 8 * sms:
        return triton.next_power_of_2(V)
    return min(triton.next_power_of_2(V), 32)


def triton_gdn_decode_step(
    mixed: torch.Tensor,
    z: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    *,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    recurrent_state: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    num_k_heads: int,
    head_k_dim: int,
    norm_eps: float = 1e-6,
    scale: float | None = None,
    block_v: int | None = None,
    return_o: bool = False,
):
    """One decode token from the projections: mixed (B, conv_dim) = concat(q, k, v) before the conv; z (B, HV, V);
    b, a (B, HV) raw; conv_weight (conv_dim, W); conv_state (B, conv_dim, W-1) and recurrent_state (B, HV, K, V)
    float32 are advanced IN PLACE. Returns y (B, HV, V) = GatedRMSNorm(o, z) in mixed's dtype (and o if return_o).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use Qwen3GatedDeltaNet.forward_state(mode='fused_decode')")
    B, D = mixed.shape
    _, HV, V = z.shape
    H, K = num_k_heads, head_k_dim
    if D != 2 * H * K + HV * V:
        raise ValueError(f"mixed has {D} channels, expected 2*H*K + HV*V = {2 * H * K + HV * V}")
    if tuple(recurrent_state.shape) != (B, HV, K, V) or recurrent_state.dtype != state_dtype_for(mixed.dtype) \
            or recurrent_state.dtype != torch.float32 or not recurrent_state.is_contiguous():
        raise ValueError(f"recurrent_state must be a contiguous float32 tensor (B, HV, K, V) = {(B, HV, K, V)}, "
                         f"got {recurrent_state.dtype} {tuple(recurrent_state.shape)}")
    for name, t in (("b", b), ("a", a)):
        if tuple(t.shape) != (B, HV):
            raise ValueError(f"{name} must have shape (B, HV) = {(B, HV)}, got {tuple(t.shape)}")
    mc = triton_conv1d_update(mixed, weight=conv_weight, state=conv_state)
    scale = K**-0.5 if scale is None else float(scale)
    BV = block_v or _pick_block_v(B, HV, V, mixed.device)
    fuse = BV >= V
    o = torch.empty(B, HV, V, dtype=mixed.dtype, device=mixed.device)
    y = torch.empty_like(o)
    zc = z.contiguous()
    _rec_kernel[(triton.cdiv(V, BV), B * HV)](
        mc, b.contiguous(), a.contiguous(), zc, A_log, dt_bias, norm_weight, recurrent_state, o, y,
        scale, 1e-6, norm_eps,
        H=H, HV=HV, K=K, V=V, BK=triton.next_power_of_2(K), BV=BV, GATES=True, FUSE_NORM=fuse,
        num_warps=4 if BV >= 64 else 1,
    )
    if not fuse:
        _norm_kernel[(B * HV,)](o, zc, norm_weight, y, norm_eps, HV=HV, V=V, BV=triton.next_power_of_2(V), num_warps=1)
    return (y, o) if return_o else y


def triton_gated_delta_rule_decode_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
    scale: float | None = None, block_v: int | None = None,
) -> torch.Tensor:
    """Recurrence only, like `gated_delta_rule_decode_step(..., use_qk_l2norm=True)`: q, k (B, H, K); v (B, HV, V);
    g, beta (B, HV) float32; state (B, HV, K, V) float32 IN PLACE. Returns o (B, HV, V) in v's dtype."""
    B, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    mc = torch.cat([q.reshape(B, -1), k.reshape(B, -1), v.reshape(B, -1).to(q.dtype)], dim=-1)
    BV = block_v or _pick_block_v(B, HV, V, v.device)
    o = torch.empty(B, HV, V, dtype=v.dtype, device=v.device)
    _rec_kernel[(triton.cdiv(V, BV), B * HV)](
        mc, beta.float().contiguous(), g.float().contiguous(), o, g, g, g, state, o, o,
        K**-0.5 if scale is None else float(scale), 1e-6, 1e-6,
        H=H, HV=HV, K=K, V=V, BK=triton.next_power_of_2(K), BV=BV, GATES=False, FUSE_NORM=False,
        num_warps=4 if BV >= 64 else 1,
    )
    return o
