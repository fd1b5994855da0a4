"""The GDN token mixer of one decode token in ONE Triton kernel, read straight from the fused projection row.

    y = gdn_decode_fused(proj, layout=ProjLayout.qwen3_next(H, HV, K, V), conv_weight=w, conv_state=cs,
                         recurrent_state=S, A_log=A_log, dt_bias=dt_bias, norm_weight=nw, norm_eps=1e-6)
    # proj (B, P): one row of the layer's fused in-projection (qkvz|ba or qkv|z|b|a), any dtype of the layer
    # y (B, HV*V) in proj's dtype = GatedRMSNorm(o, z), ready for out_proj; cs (B, conv_dim, W-1) and
    # S (B, HV, K, V) float32 are advanced IN PLACE
    y = gdn_decode_fused(proj, ..., conv_state=cs_new, recurrent_state=S_new,
                         source=StateSource(conv=cs, recurrent=S, rows=rows))
    # a tree expansion: row b starts from row rows[b] of (cs, S) and writes (cs_new, S_new) (torch.empty is enough)

Grid: (batch row, key head h) x (value head of h, block of `block_v` value columns): 128 programs per row at B = 1
for the Qwen3-Next shapes (H = 16, HV = 32, V = 128, block_v = 32; fewer, wider blocks as B grows, at most 64), so the state
traffic spreads over the GPU (one program per
key head, the first version, kept 16 SMs busy at B = 1 and took 12.7 us per layer on an H200). Each program computes
q_h and k_h (conv + L2 norm) from the shared windows, its own value columns' conv (it alone rolls those windows) and
its block of the recurrence, and writes o to a float32 buffer. The last program of key head h to arrive (an atomic
arrival counter) rolls the shared q/k windows, which every program of h has read by then, and applies the gated
RMSNorm over whole value heads. In the programs: causal conv1d update + SiLU for those channels
(rounded to the activation dtype like the torch path), q/k L2 norm, q * K^-0.5; then per value head:
g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b), S = e^g S, S += k (beta (v - S^T k))^T, o = S^T q, and the
gated RMSNorm rmsnorm(o) * w * silu(z).

`ProjLayout` says where q, k, v, z, b, a of key head h sit in the projection row (base + h * head_stride), which
covers both checkpoint layouts without split or cat copies. Reference: `gdn_decode_reference` (the torch ops of
`Qwen3GatedDeltaNet.forward_state(mode="fused_decode")`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gdnspec.ops import pdl
from gdnspec.ops.conv1d.causal_conv1d import causal_conv1d_update
from gdnspec.ops.fused._checks import check_layout, check_shape
from gdnspec.ops.fused._sync import arrival_counters as _arrival_counters
from gdnspec.ops.gated_delta_rule.common import SSM_STATE_DTYPES, l2norm, state_dtype_for
from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON, available

if HAS_TRITON:
    import triton
    import triton.language as tl

    from gdnspec.ops.pdl import enter

__all__ = ["ProjLayout", "StateSource", "check_source", "gdn_decode_fused", "gdn_decode_reference"]


@dataclass(frozen=True)
class ProjLayout:
    """Where each piece of key head h lies in the projection row: piece(h) starts at base + h * head_stride.
    v and z hold the r value heads of h one after the other (V each); b and a hold r scalars each."""

    H: int
    HV: int
    K: int
    V: int
    q: tuple[int, int]
    k: tuple[int, int]
    v: tuple[int, int]
    z: tuple[int, int]
    b: tuple[int, int]
    a: tuple[int, int]
    width: int  # P, the projection row length

    @staticmethod
    def qwen3_next(H: int, HV: int, K: int, V: int) -> "ProjLayout":
        """in_proj_qkvz rows then in_proj_ba rows, both interleaved per key head."""
        r = HV // H
        g = 2 * K + 2 * r * V
        base_ba = H * g
        return ProjLayout(H, HV, K, V, q=(0, g), k=(K, g), v=(2 * K, g), z=(2 * K + r * V, g),
                          b=(base_ba, 2 * r), a=(base_ba + r, 2 * r), width=base_ba + 2 * HV)

    @staticmethod
    def qwen3_5(H: int, HV: int, K: int, V: int) -> "ProjLayout":
        """in_proj_qkv (all q | all k | all v), then in_proj_z, in_proj_b, in_proj_a rows."""
        r = HV // H
        conv = 2 * H * K + HV * V
        return ProjLayout(H, HV, K, V, q=(0, K), k=(H * K, K), v=(2 * H * K, r * V), z=(conv, r * V),
                          b=(conv + HV * V, r), a=(conv + HV * V + HV, r), width=conv + HV * V + 2 * HV)

    def gather_index(self, piece: str, device=None) -> torch.Tensor:
        """Column indices of `piece` for all heads in the layer's natural order: q, k (H*K), v, z (HV*V), b, a (HV)."""
        base, hs = getattr(self, piece)
        r = self.HV // self.H
        n = {"q": self.K, "k": self.K, "v": r * self.V, "z": r * self.V, "b": r, "a": r}[piece]
        h = torch.arange(self.H, device=device)[:, None]
        return (base + h * hs + torch.arange(n, device=device)[None, :]).reshape(-1)

    def conv_index(self, device=None) -> torch.Tensor:
        """Column indices of the conv inputs concat(q, k, v) (conv_dim,) in the projection row."""
        return torch.cat([self.gather_index(p, device) for p in ("q", "k", "v")])


@dataclass(frozen=True)
class StateSource:
    """Where a decode step reads its GDN states from when they are not the ones it writes (a drafter's tree
    expansion: each new frontier node starts from its parent's state). Row b of the step reads row rows[b] of
    (conv (R, conv_dim, W-1), recurrent (R, HV, K, V)), or row b when rows is None; the step's own conv_state /
    recurrent_state (B rows) are then written, not read, so they may be uninitialised (torch.empty)."""

    conv: torch.Tensor
    recurrent: torch.Tensor
    rows: torch.Tensor | None = None  # (B,) long on the states' device, entries in [0, R) (not checked on the device)

    def take(self, t: torch.Tensor, B: int) -> torch.Tensor:
        """Rows of `t` (conv or recurrent) the step reads: t[rows] or t[:B]."""
        return t[:B] if self.rows is None else t.index_select(0, self.rows)


def check_source(source: StateSource, *, B: int, conv_state: torch.Tensor, recurrent_state: torch.Tensor) -> None:
    """ValueError naming the field when `source` cannot feed a step that writes (conv_state, recurrent_state)."""
    if not isinstance(source, StateSource):
        raise ValueError(f"source must be a StateSource, got {type(source).__name__}")
    for name, src, dst in (("conv", source.conv, conv_state), ("recurrent", source.recurrent, recurrent_state)):
        if not isinstance(src, torch.Tensor):
            raise ValueError(f"source.{name} must be a tensor, got {type(src).__name__}")
        if src.dim() != dst.dim() or tuple(src.shape[1:]) != tuple(dst.shape[1:]) or src.dtype != dst.dtype:
            raise ValueError(f"source.{name} must be (R, {', '.join(map(str, dst.shape[1:]))}) {dst.dtype} like the "
                             f"written state, got {src.dtype} {tuple(src.shape)}")
        if src.device != dst.device or not src.is_contiguous():
            raise ValueError(f"source.{name} must be contiguous on {dst.device}")
        if src.data_ptr() == dst.data_ptr() and source.rows is not None:
            raise ValueError(f"source.{name} is the written state itself: a gather in place is a race")
    if source.conv.shape[0] != source.recurrent.shape[0]:
        raise ValueError(f"source.conv and source.recurrent hold {source.conv.shape[0]} and "
                         f"{source.recurrent.shape[0]} rows")
    R = source.conv.shape[0]
    if source.rows is None:
        if R < B:
            raise ValueError(f"source holds {R} rows, the step needs {B} (rows=None reads rows 0 .. B-1)")
    elif (not isinstance(source.rows, torch.Tensor) or source.rows.dtype != torch.long
          or tuple(source.rows.shape) != (B,) or source.rows.device != conv_state.device):
        got = (f"{source.rows.dtype} {tuple(source.rows.shape)}" if isinstance(source.rows, torch.Tensor)
               else type(source.rows).__name__)
        raise ValueError(f"source.rows must be a ({B},) long tensor on {conv_state.device}, got {got}")


def check_proj_conv_gates(proj: torch.Tensor, *, layout: ProjLayout, conv_weight: torch.Tensor, A_log: torch.Tensor,
                          dt_bias: torch.Tensor, dims: str) -> tuple[int, int]:
    """The input checks the GDN kernels share: proj (..., P) with len(dims) dims and P = layout.width, conv_weight
    (conv_dim, W), A_log and dt_bias (HV,). Returns (conv_dim, W); raises ValueError naming the tensor."""
    L = layout
    check_layout(L)
    if proj.dim() != dims.count(",") + 1:
        raise ValueError(f"proj must have shape {dims}, got {tuple(proj.shape)}")
    CD = 2 * L.H * L.K + L.HV * L.V
    if conv_weight.dim() != 2 or conv_weight.shape[0] != CD or conv_weight.shape[1] < 1:
        raise ValueError(f"conv_weight must have shape (conv_dim, W) = ({CD}, W), got {tuple(conv_weight.shape)}")
    if proj.shape[-1] != L.width:
        raise ValueError(f"proj has {proj.shape[-1]} columns, the layout expects {L.width}")
    check_shape("A_log", A_log, (L.HV,))
    check_shape("dt_bias", dt_bias, (L.HV,))
    return CD, conv_weight.shape[-1]


def gdn_decode_reference(proj: torch.Tensor, *, layout: ProjLayout, conv_weight: torch.Tensor, conv_state: torch.Tensor,
                         recurrent_state: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
                         norm_weight: torch.Tensor, norm_eps: float, source: "StateSource | None" = None
                         ) -> torch.Tensor:
    """The torch ops of the layer's fused_decode mode on a projection row; states advanced IN PLACE. -> (B, HV*V).
    source: the states start from source's rows instead (copied in first; see gdn_decode_fused)."""
    L = layout
    B = proj.shape[0]
    if source is not None:
        conv_state.copy_(source.take(source.conv, B))
        recurrent_state.copy_(source.take(source.recurrent, B))
    pieces = {p: proj[:, L.gather_index(p, proj.device)] for p in ("q", "k", "v", "z", "b", "a")}
    mixed = torch.cat([pieces["q"], pieces["k"], pieces["v"]], dim=-1)
    mc = causal_conv1d_update(mixed, weight=conv_weight, state=conv_state)  # (B, conv_dim) in proj's dtype
    cdt = state_dtype_for(recurrent_state.dtype)  # a 16-bit state: the maths in float32
    HK = L.H * L.K
    qk = l2norm(mc[:, : 2 * HK].to(cdt).reshape(B, 2 * L.H, L.K))
    r = L.HV // L.H
    q = qk[:, : L.H].repeat_interleave(r, dim=1) * L.K**-0.5  # (B, HV, K)
    k = qk[:, L.H:].repeat_interleave(r, dim=1)
    v = mc[:, 2 * HK:].to(cdt).reshape(B, L.HV, L.V)
    beta = torch.sigmoid(pieces["b"].to(cdt))
    g = F.softplus(pieces["a"].to(cdt) + dt_bias.to(cdt)) * -A_log.to(cdt).exp()
    S = recurrent_state.to(cdt) * g.exp()[..., None, None]
    u = (v - torch.einsum("bhkv,bhk->bhv", S, k)) * beta[..., None]
    S = S + k[..., :, None] * u[..., None, :]
    recurrent_state.copy_(S)
    o = torch.einsum("bhkv,bhk->bhv", S, q).to(proj.dtype)  # (B, HV, V), rounded like the torch path
    of = o.to(torch.float32 if proj.dtype != torch.float64 else torch.float64)
    yn = F.rms_norm(of, (L.V,), None, norm_eps).to(proj.dtype) * norm_weight.to(proj.dtype)
    z = pieces["z"].reshape(B, L.HV, L.V)
    zf = z.to(of.dtype)
    return (yn.to(of.dtype) * F.silu(zf)).to(proj.dtype).reshape(B, L.HV * L.V)


if HAS_TRITON:

    @triton.jit
    def _gated_rms_norm(x, m, wn, gz, V, eps):
        """Gated RMSNorm over the LAST axis: x (BV,) one value head or (BN, BV) one head of BN nodes, o in the
        activation dtype, m its mask, wn (BV,) the norm weight, gz the gate z in float32 (x's shape) -> rmsnorm(x) * w
        * silu(z) in float32, rounded at the torch module's points (activation dtype after the norm and the weight).
        Shared by the decode kernel, gdn_tree's gated_rms_norm_rows and its fused verify kernel's epilogue."""
        xf = tl.where(m, x.to(tl.float32), 0.0)
        rstd = tl.rsqrt(tl.sum(xf * xf, -1, keep_dims=True) / V + eps)
        y = (xf * rstd).to(x.dtype).to(tl.float32) * wn.to(x.dtype).to(tl.float32)
        return y.to(x.dtype).to(tl.float32) * (gz * tl.sigmoid(gz))

    @triton.jit
    def _conv_piece(proj_row, col, chan, m, wgt, cstate, W: tl.constexpr, BW: tl.constexpr):
        """Conv update + SiLU of channels `chan` (input at proj_row + col); returns the output in float32 rounded to the
        activation dtype, and the rolled window (to store after a barrier)."""
        rw = tl.arange(0, BW)
        xv = tl.load(proj_row + col, mask=m, other=0.0)
        ms = m[:, None] & (rw[None, :] < W - 1)
        st_off = chan[:, None] * (W - 1) + rw[None, :]
        win = tl.load(cstate + st_off, mask=ms, other=0.0)
        full = tl.where(rw[None, :] == W - 1, xv.to(tl.float32)[:, None], win.to(tl.float32))
        full = full.to(xv.dtype).to(tl.float32)
        wv = tl.load(wgt + chan[:, None] * W + rw[None, :], mask=m[:, None] & (rw[None, :] < W), other=0.0)
        acc = tl.sum(full * wv.to(xv.dtype).to(tl.float32), 1)
        acc = acc * tl.sigmoid(acc)
        # rolled window: new[w] = full[w + 1], taken from the loaded window (no re-read after the store)
        nxt = tl.load(cstate + st_off + 1, mask=m[:, None] & (rw[None, :] < W - 2), other=0.0)
        nxt = tl.where(rw[None, :] == W - 2, xv[:, None].to(nxt.dtype), nxt)
        return acc.to(xv.dtype).to(tl.float32), nxt, st_off, ms

    @triton.jit
    def _gdn_decode_kernel(
        proj, sp, wgt, cstate, A_log, dt_bias, nw, S, y, sy, o_buf, counter,
        q_base, q_hs, k_base, k_hs, v_base, v_hs, z_base, z_hs, b_base, b_hs, a_base, a_hs,
        scale, norm_eps, cs_src, S_src, src_rows,
        H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
        BK: tl.constexpr, BVB: tl.constexpr, NV: tl.constexpr, BV: tl.constexpr, BW: tl.constexpr, PDL: tl.constexpr = False,
        HAS_ROWS: tl.constexpr = False,
    ):
        """cs_src / S_src: the states read (cstate / S themselves for the in-place step), row src_rows[b] of them
        when HAS_ROWS else row b; cstate / S: the states written (StateSource)."""
        enter(PDL)  # ops/pdl.py: before any load or store
        i_bh = tl.program_id(0)  # (batch row, key head)
        i_rv = tl.program_id(1)  # (value head of this key head, block of BVB value columns)
        i_b = i_bh // H
        i_h = i_bh % H
        R: tl.constexpr = HV // H
        CD: tl.constexpr = 2 * H * K + HV * V
        l = i_rv // NV
        i_v = i_rv % NV
        i_hv = i_h * R + l
        row = proj + i_b * sp
        cs = cstate + i_b * CD * (W - 1)  # written
        if HAS_ROWS:
            i_src = tl.load(src_rows + i_b)
        else:
            i_src = i_b
        csr = cs_src + i_src * CD * (W - 1)  # read
        rk = tl.arange(0, BK)
        mk = rk < K
        rvb = i_v * BVB + tl.arange(0, BVB)
        mvb = rvb < V
        # q, k of the key head: every program of the head computes them from the (not yet rolled) windows
        b_q, nq, offq, msq = _conv_piece(row, q_base + i_h * q_hs + rk, i_h * K + rk, mk, wgt, csr, W, BW)
        b_k, nk, offk, msk = _conv_piece(row, k_base + i_h * k_hs + rk, H * K + i_h * K + rk, mk, wgt, csr, W, BW)
        b_q = tl.where(mk, b_q, 0.0)
        b_k = tl.where(mk, b_k, 0.0)
        b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 0) + 1e-6) * scale
        b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 0) + 1e-6)
        # this program's value columns: their conv windows belong to it alone
        b_v, nv, offv, msv = _conv_piece(row, v_base + i_h * v_hs + l * V + rvb, 2 * H * K + i_hv * V + rvb, mvb,
                                         wgt, csr, W, BW)
        b_b = tl.load(row + b_base + i_h * b_hs + l).to(tl.float32)
        b_a = tl.load(row + a_base + i_h * a_hs + l).to(tl.float32) + tl.load(dt_bias + i_hv).to(tl.float32)
        sp_a = tl.where(b_a > 20.0, b_a, tl.log(1.0 + tl.exp(tl.minimum(b_a, 20.0))))
        b_g = -tl.exp(tl.load(A_log + i_hv).to(tl.float32)) * sp_a
        b_beta = tl.sigmoid(b_b)
        s_off = ((i_b * HV + i_hv) * K + rk[:, None]) * V + rvb[None, :]
        m_kv = mk[:, None] & mvb[None, :]
        s_src = ((i_src * HV + i_hv) * K + rk[:, None]) * V + rvb[None, :]
        b_S = tl.load(S_src + s_src, mask=m_kv, other=0.0).to(tl.float32) * tl.exp(b_g)  # a 16-bit state: upcast
        pred = tl.sum(b_S * b_k[:, None], 0)
        u = (b_v - pred) * b_beta
        b_S = b_S + b_k[:, None] * u[None, :]
        tl.store(S + s_off, b_S.to(S.dtype.element_ty), mask=m_kv)
        b_o = tl.sum(b_S * b_q[:, None], 0)  # (BVB,) float32
        tl.store(o_buf + (i_b * HV + i_hv) * V + rvb, b_o, mask=mvb)
        tl.debug_barrier()  # every read of the windows happens before they are rolled
        tl.store(cs + offv, nv, mask=msv)
        # the LAST program of the key head to arrive (one atomic per program; CUTLASS-semaphore pattern: barrier, then
        # a gpu-scope acq_rel atomic) rolls the shared q/k windows and applies the gated RMSNorm over whole value heads
        # from o_buf; then it resets the counter for the next launch
        arrived = tl.atomic_add(counter + i_bh, 1, sem="acq_rel", scope="gpu")
        if arrived == R * NV - 1:
            tl.store(cs + offq, nq, mask=msq)
            tl.store(cs + offk, nk, mask=msk)
            rv = tl.arange(0, BV)
            mv = rv < V
            wn = tl.load(nw + rv, mask=mv, other=0.0)
            for r in range(R):
                j_hv = i_h * R + r
                ov = tl.load(o_buf + (i_b * HV + j_hv) * V + rv, mask=mv, other=0.0).to(nv.dtype)  # o rounded
                gz = tl.load(row + z_base + i_h * z_hs + r * V + rv, mask=mv, other=0.0).to(tl.float32)
                yv = _gated_rms_norm(ov, mv, wn, gz, V, norm_eps)
                tl.store(y + i_b * sy + j_hv * V + rv, yv.to(y.dtype.element_ty), mask=mv)
            tl.store(counter + i_bh, 0)


def gdn_decode_fused(proj: torch.Tensor, *, layout: ProjLayout, conv_weight: torch.Tensor, conv_state: torch.Tensor,
                     recurrent_state: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
                     norm_weight: torch.Tensor, norm_eps: float, num_warps: int | None = None,
                     block_v: int | None = None, source: StateSource | None = None) -> torch.Tensor:
    """See the module docstring. proj (B, P) with a contiguous last dim; conv_weight (conv_dim, W); conv_state
    (B, conv_dim, W-1) contiguous in proj's dtype; recurrent_state (B, HV, K, V) contiguous, float32 or a 16-bit
    storage dtype (bf16 / fp16: loaded to float32, the maths in float32, stored rounded; GDNForCausalLM's
    mamba_ssm_cache_dtype). Falls back to `gdn_decode_reference` where Triton cannot run (CPU without
    TRITON_INTERPRET, float64).

    source (StateSource): the step starts from source's rows (source.rows[b], or b) and writes conv_state /
    recurrent_state, which it does not read: the state gather of a tree expansion inside the step's one kernel
    instead of two index_select copies before it. ValueError when source's shapes, dtypes or rows do not fit."""
    L = layout
    CD, W = check_proj_conv_gates(proj, layout=L, conv_weight=conv_weight, A_log=A_log, dt_bias=dt_bias,
                                  dims="(B, P)")
    B, P = proj.shape
    check_shape("norm_weight", norm_weight, (L.V,))
    if tuple(conv_state.shape) != (B, CD, W - 1):
        raise ValueError(f"conv_state must have shape (B, conv_dim, W-1) = {(B, CD, W - 1)}, got {tuple(conv_state.shape)}")
    if tuple(recurrent_state.shape) != (B, L.HV, L.K, L.V):
        raise ValueError(f"recurrent_state must have shape (B, HV, K, V) = {(B, L.HV, L.K, L.V)}, "
                         f"got {tuple(recurrent_state.shape)}")
    if source is not None:
        check_source(source, B=B, conv_state=conv_state, recurrent_state=recurrent_state)
    kw = dict(layout=L, conv_weight=conv_weight, conv_state=conv_state, recurrent_state=recurrent_state, A_log=A_log,
              dt_bias=dt_bias, norm_weight=norm_weight, norm_eps=norm_eps)
    if not available(proj) or recurrent_state.dtype not in SSM_STATE_DTYPES or proj.dtype == torch.float64:
        return gdn_decode_reference(proj, source=source, **kw)
    if conv_state.dtype != proj.dtype:
        raise ValueError(f"conv_state must be {proj.dtype} (the activation dtype, proj's), got {conv_state.dtype}")
    if not (conv_state.is_contiguous() and recurrent_state.is_contiguous()):
        raise ValueError(f"conv_state and recurrent_state must be contiguous, got strides {conv_state.stride()} and "
                         f"{recurrent_state.stride()}")
    BK, BV = triton.next_power_of_2(L.K), triton.next_power_of_2(L.V)
    if BK * BV > 256 * 256:
        raise ValueError(f"gdn_decode_fused supports K * V <= 65536 (head dims K={L.K}, V={L.V})")
    if block_v is None:
        # enough programs to cover the GPU twice, no more: every extra column block recomputes q/k of its head; but
        # at most 64 columns (2 warps), measured fastest from B = 8 on (H200, 1.7B shapes, V = 128, bench_tiles.py
        # --parts decode): bf16 states B = 8 / 32 9.5 / 30.1 us against 12.9 / 33.5 us with the former (64, 4) /
        # (128, 4) (results/stop19/tiles_decode_bfloat16_H200.txt); float32 states 13.9 / 46.2 against 14.7 / 46.4 us
        # (results/stop17/tiles_decode_tree_H200.txt). Not measured for V > 128 (more blocks recompute q/k there).
        # V = 128, HV = 32: 4 blocks of 32 columns at B = 1 (128 programs), 2 blocks of 64 from B = 8 on
        sms = torch.cuda.get_device_properties(proj.device).multi_processor_count if proj.is_cuda else 8
        blocks = max(1, min(triton.cdiv(L.V, 32), triton.cdiv(2 * sms, B * L.HV)))
        block_v = min(64, triton.next_power_of_2(triton.cdiv(L.V, blocks)))
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 1, got {block_v}")
    NV = triton.cdiv(L.V, block_v)
    if proj.stride(-1) != 1:
        proj = proj.contiguous()
    y = torch.empty(B, L.HV * L.V, dtype=proj.dtype, device=proj.device)
    if num_warps is None:
        num_warps = 2 if block_v == 64 else 4  # 128-column blocks with 2 warps ran 6-10x slower (spills)
    if B:
        o_buf = torch.empty(B, L.HV, L.V, dtype=torch.float32, device=proj.device)
        counter = _arrival_counters(B * L.H, proj.device)
        _gdn_decode_kernel[(B * L.H, (L.HV // L.H) * NV)](
            proj, proj.stride(0), conv_weight.contiguous(), conv_state, A_log, dt_bias, norm_weight, recurrent_state,
            y, y.stride(0), o_buf, counter, *L.q, *L.k, *L.v, *L.z, *L.b, *L.a, L.K**-0.5, float(norm_eps),
            conv_state if source is None else source.conv, recurrent_state if source is None else source.recurrent,
            counter if source is None or source.rows is None else source.rows.contiguous(),
            HAS_ROWS=source is not None and source.rows is not None, H=L.H, HV=L.HV, K=L.K, V=L.V, W=W, BK=BK, BVB=block_v, NV=NV, BV=BV, BW=triton.next_power_of_2(W),
            num_warps=num_warps, **pdl.launch_args(proj),
        )
    return y
