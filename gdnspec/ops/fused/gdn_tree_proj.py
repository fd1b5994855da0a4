"""The GDN layer's verify-step in-projection with the tree prep in its epilogue: ONE launch instead of two.

    out = tree_in_projection(x, weight, layout=ProjLayout..., conv_weight=w, conv_state=cs, window_index=idx,
                             A_log=A_log, dt_bias=dt_bias)       # None where the kernel does not apply
    proj, (q, k, v, g, beta) = out                             # proj (B, N, P); the rest as gdn_tree_prep's
    y, gdr, conv_input, conv_layout = gdn_tree_verify(proj, ..., prep=(q, k, v, g, beta))

Why: at batch 1 the verify step's `gdn_tree_prep` is a separate ~5 us kernel per GDN layer (18 per step on the 1.7B
config of bench_e2e, H200, bf16, PDL off: 91 us of a 1.77 ms step), yet everything it needs is in the
in-projection's own output tile. The tree conv is depthwise: channel c of node i needs column c of the W-1 nodes on
i's ancestor path (or of the committed conv window above the root), all of which the GEMV program that computes
column c holds when one row tile covers every node (the kernel takes up to the GEMV's 64 rows; the layer uses it for
M = B * N <= 8 in bf16 and 16 in float32, where it measured faster: max_rows). So each program stores its projection tile, waits for its own
threads (a CTA barrier: the rows it re-reads are its own stores), and computes for its columns: SiLU(tree conv) into q / k / v (B, N, H, K) / (B, N, HV, V), and the gates
g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b) (B, N, HV) float32, with gdn_tree_prep's rounding points
(inputs rounded to the activation dtype, the conv summed in float32, rounded after SiLU). The conv commit then
reads its inputs from the projection rows (conv_layout), as with GDNSPEC_TREE_FUSION=full.

Applies on CUDA (and under TRITON_INTERPRET for the tests) where the GEMV kernel of gemv.py takes the product
(bf16 / fp16 on CUDA, float32 where gemv.fp32_rows_ok), M <= max_rows() (8 rows, 16 in float32) and x is a plain
tensor (not a NormedInput);
otherwise (and with GDNSPEC_TREE_PROJ=0) `tree_in_projection` returns None and the caller runs linear_in +
gdn_tree_prep. Reference:
`tree_in_projection_reference` (F.linear rounded to the activation dtype, then gdn_tree_prep_reference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gdnspec.ops._env import flag
from gdnspec.ops.fused import gemv as _gemv
from gdnspec.ops.fused.gemv import _launch, _launch_args
from gdnspec.ops.fused.gdn_decode import ProjLayout, check_proj_conv_gates
from gdnspec.ops.fused.gdn_tree import gdn_tree_prep_reference
from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from gdnspec.ops.fused._bench import graph_bench
    from gdnspec.ops.fused.gemv import _CONFIGS, _dot_tile, _pdl_prologue

__all__ = ["column_codes", "enabled", "max_rows", "tree_in_projection", "tree_in_projection_reference"]


def enabled() -> bool:
    """GDNSPEC_TREE_PROJ: "1" (default) or "0" (the in-projection and gdn_tree_prep as two launches, for A/B);
    anything else raises a ValueError naming the variable."""
    return flag("GDNSPEC_TREE_PROJ", default=True)

# kinds of a projection column (low 2 bits of its code; the rest is the conv channel or the value head)
_CONV, _NONE, _BETA, _GATE = 0, 1, 2, 3
# The most rows (B * N) the fused launch takes. Measured on an H200 (1.7B config, bf16, verify with accept + commit,
# bench_e2e --ab-env GDNSPEC_TREE_PROJ=0 --ab-reps 5, one process, medians; results/stop18/ab_tree_proj_*.json):
# B = 1, N = 4 (4 rows) 1.80 vs 1.83 ms and B = 2, N = 4 (8 rows) 1.78 vs 1.82 ms with the epilogue, but 16 rows
# 1.86 vs 1.81 ms, 32 rows (B = 2, N = 16) 2.35 vs 2.22 ms and 64 rows 4.45 vs 3.18 ms: the epilogue's gathered
# taps over many rows lengthen every program of a bandwidth-bound GEMV more than the separate launch costs.
MAX_ROWS = 8
# float32 (the CUDA "fma" GEMV path of the shipped bundle, latency-bound: 384-wide rows): 16 rows. Measured on an H200
# (bench_draft.py --bundle --skip-1.7b, one process each, results/stop25/run2): EAGLE tree-4x5 step (B = 1, N = 16)
# 0.576 ms with the epilogue against 0.607 ms with gdn_tree_prep launched (169 against 175 kernels), and
# `gdnspec eval` float32 EAGLE tree-4x5 1.23x against 1.17x, draft model tree-4x5 1.05x against 1.01x.
MAX_ROWS_FLOAT32 = 16
_CODES: dict = {}


def column_codes(layout: ProjLayout, device) -> torch.Tensor:
    """(P,) int32, one per projection column: (conv channel << 2) for the q / k / v columns (channels in the conv's
    q | k | v order), (value head << 2) | 2 for b, | 3 for a, 1 for z. Cached per (layout, device)."""
    key = (layout, str(device))
    if key not in _CODES:
        L = layout
        code = torch.full((L.width,), _NONE, dtype=torch.int32)
        code[L.conv_index()] = (torch.arange(2 * L.H * L.K + L.HV * L.V, dtype=torch.int32) << 2) | _CONV
        code[L.gather_index("b")] = (torch.arange(L.HV, dtype=torch.int32) << 2) | _BETA
        code[L.gather_index("a")] = (torch.arange(L.HV, dtype=torch.int32) << 2) | _GATE
        _CODES[key] = code.to(device)
    return _CODES[key]


def tree_in_projection_reference(x: torch.Tensor, weight: torch.Tensor, *, layout: ProjLayout,
                                 conv_weight: torch.Tensor, conv_state: torch.Tensor, window_index: torch.Tensor,
                                 A_log: torch.Tensor, dt_bias: torch.Tensor):
    """x (B, N, D) -> (proj (B, N, P) = x @ weight^T in float32 rounded to x's dtype, (q, k, v, g, beta) of
    gdn_tree_prep_reference)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    proj = F.linear(x.to(cdt), weight.to(cdt)).to(x.dtype)
    q, k, v, g, beta, _ = gdn_tree_prep_reference(proj, layout=layout, conv_weight=conv_weight, conv_state=conv_state,
                                                  window_index=window_index, A_log=A_log, dt_bias=dt_bias)
    return proj, (q, k, v, g, beta)


if HAS_TRITON:

    @triton.jit
    def _tree_proj_kernel(x, sx, w, y, code, cw, cs, widx, A_log, dt_bias, q, k, v, g, beta,
                          M, N, K, NODES, CD, HK, HV, F32: tl.constexpr, W: tl.constexpr, BM: tl.constexpr,
                          BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr = False, PF_LINES: tl.constexpr = 0,
                          LINE: tl.constexpr = 64, PREC: tl.constexpr = "ieee"):
        """y = x @ w^T for columns rn of all M rows (one row tile), then the tree prep of those columns (module
        docstring). N = P columns; NODES tree nodes per batch row; CD conv channels, HK = H * K, HV value heads."""
        pid_n = tl.program_id(0)
        rm = tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        mm = rm < M
        mn = rn < N
        _pdl_prologue(w, rn, N, K, 0, PDL, PF_LINES, LINE)
        acc = _dot_tile(x, sx, w, rm, rn, mm, mn, K, 0, K, F32, BM, BN, BK, PREC)
        act = y.dtype.element_ty
        yv = acc.to(act)
        tl.store(y + rm[:, None] * N + rn[None, :], yv, mask=mm[:, None] & mn[None, :])
        tl.debug_barrier()  # the conv below re-reads other rows of these columns: this program's own stores

        cd = tl.load(code + rn, mask=mn, other=1)
        kind = cd & 3
        idx = cd >> 2  # conv channel (kind 0) or value head (kinds 2, 3)
        yf = yv.to(tl.float32)
        m_b = mm[:, None] & (mn & (kind == 2))[None, :]
        tl.store(beta + rm[:, None] * HV + idx[None, :], tl.sigmoid(yf), mask=m_b)
        is_a = mn & (kind == 3)
        aa = yf + tl.load(dt_bias + idx, mask=is_a, other=0.0).to(tl.float32)[None, :]
        sp_a = tl.where(aa > 20.0, aa, tl.log(1.0 + tl.exp(tl.minimum(aa, 20.0))))
        gv = -tl.exp(tl.load(A_log + idx, mask=is_a, other=0.0).to(tl.float32))[None, :] * sp_a
        tl.store(g + rm[:, None] * HV + idx[None, :], gv, mask=mm[:, None] & is_a[None, :])

        is_c = mn & (kind == 0)
        m_c = mm[:, None] & is_c[None, :]
        row0 = (rm // NODES) * NODES  # first projection row of each row's batch row
        cs_row = cs + (rm // NODES) * (CD * (W - 1))  # (BM,) its committed conv window
        conv = tl.zeros([BM, BN], dtype=tl.float32)
        for t in tl.static_range(W):
            pos = tl.load(widx + rm * W + t, mask=mm, other=0)  # (BM,) tap t's position in [window | nodes]
            from_state = pos < W - 1
            node = tl.maximum(pos - (W - 1), 0)
            st = tl.load(cs_row[:, None] + idx[None, :] * (W - 1) + pos[:, None], mask=m_c & from_state[:, None],
                         other=0.0)
            xv = tl.load(y + (row0 + node)[:, None] * N + rn[None, :], mask=m_c & (~from_state)[:, None], other=0.0)
            full = tl.where(from_state[:, None], st.to(tl.float32), xv.to(tl.float32)).to(act).to(tl.float32)
            wv = tl.load(cw + idx * W + t, mask=is_c, other=0.0).to(act).to(tl.float32)
            conv += full * wv[None, :]
        cv = (conv * tl.sigmoid(conv)).to(act)
        tl.store(q + rm[:, None] * HK + idx[None, :], cv, mask=m_c & (idx < HK)[None, :])
        tl.store(k + rm[:, None] * HK + (idx - HK)[None, :], cv, mask=m_c & ((idx >= HK) & (idx < 2 * HK))[None, :])
        tl.store(v + rm[:, None] * (CD - 2 * HK) + (idx - 2 * HK)[None, :], cv, mask=m_c & (idx >= 2 * HK)[None, :])

    _prep_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K", "BM"], do_bench=graph_bench)(_tree_proj_kernel)


def max_rows(dtype: torch.dtype | None = None) -> int:
    """The most rows B * N the fused launch takes for activations of `dtype`: GDNSPEC_TREE_PROJ_MAX_ROWS (an int in
    1 .. 64, for A/B measurements at other model sizes), else MAX_ROWS_FLOAT32 for float32 and MAX_ROWS for the
    16-bit dtypes (and None). Anything else in the variable raises a ValueError naming it."""
    import os

    v = os.environ.get("GDNSPEC_TREE_PROJ_MAX_ROWS")
    if not v:
        return MAX_ROWS_FLOAT32 if dtype == torch.float32 else MAX_ROWS
    try:
        n = int(v)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise ValueError(f"GDNSPEC_TREE_PROJ_MAX_ROWS must be an int in 1..64 (unset = {MAX_ROWS}), got {v!r}")
    return n


def tree_in_projection(x, weight: torch.Tensor, *, layout: ProjLayout, conv_weight: torch.Tensor,
                       conv_state: torch.Tensor, window_index: torch.Tensor, A_log: torch.Tensor,
                       dt_bias: torch.Tensor, max_rows: int | None = None):
    """x (B, N, D) the normalised hidden states of the N tree nodes, weight (P, D) the fused in-projection,
    conv_weight (conv_dim, W), conv_state (B, conv_dim, W-1) in x's dtype (only read), window_index (B, N, W) long,
    A_log, dt_bias (HV,). Returns (proj (B, N, P), (q, k, v, g, beta)) - proj as `linear_in(x, weight)`, the rest as
    `gdn_tree_prep(proj, ...)` - in ONE launch, or None where the kernel does not apply (module docstring; more than
    max_rows <= 64 rows B * N; None: `max_rows()`): the caller then runs the two. Raises ValueError naming a tensor
    of the wrong shape."""
    limit = globals()["max_rows"](getattr(x, "dtype", None)) if max_rows is None else max_rows
    if not (isinstance(x, torch.Tensor) and HAS_TRITON and x.dim() == 3 and enabled()
            and x.shape[0] * x.shape[1] <= min(limit, 64) and _gemv.kernel_applies(x, weight)):
        return None
    L = layout
    B, N, D = x.shape
    if weight.dim() != 2 or tuple(weight.shape) != (L.width, D):
        raise ValueError(f"weight must have shape (P, D) = {(L.width, D)}, got {tuple(weight.shape)}")
    dev, dt = x.device, x.dtype
    proj = torch.empty(B, N, L.width, dtype=dt, device=dev)
    CD, W = check_proj_conv_gates(proj, layout=L, conv_weight=conv_weight, A_log=A_log, dt_bias=dt_bias,
                                  dims="(B, N, P)")
    if tuple(window_index.shape) != (B, N, W):
        raise ValueError(f"window_index must have shape (B, N, W) = {(B, N, W)}, got {tuple(window_index.shape)}")
    if tuple(conv_state.shape) != (B, CD, W - 1):
        raise ValueError(f"conv_state must have shape (B, conv_dim, W-1) = {(B, CD, W - 1)}, got {tuple(conv_state.shape)}")
    M = B * N
    x2 = x.reshape(M, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(B, N, L.H, L.K, dtype=dt, device=dev)
    k = torch.empty(B, N, L.H, L.K, dtype=dt, device=dev)
    v = torch.empty(B, N, L.HV, L.V, dtype=dt, device=dev)
    g = torch.empty(B, N, L.HV, dtype=torch.float32, device=dev)
    beta = torch.empty(B, N, L.HV, dtype=torch.float32, device=dev)
    args = (x2, x2.stride(0), weight, proj, column_codes(L, dev), conv_weight.contiguous(), conv_state.contiguous(),
            window_index.contiguous(), A_log, dt_bias, q, k, v, g, beta, M, L.width, D, N, CD, L.H * L.K, L.HV)
    f32 = _gemv.f32_args(x2, L.width)
    kw = dict(**f32, W=W, BM=_gemv.row_block(M, f32["PREC"]))
    if x.is_cuda:
        _launch(_tree_proj_kernel, _prep_tuned, L.width, D, M, 0, args, {**kw, **_launch_args(x, L.width, D)})
    else:  # interpreter: one fixed configuration
        _tree_proj_kernel[(triton.cdiv(L.width, 16),)](*args, **kw, BN=16, BK=64)
    return proj, (q, k, v, g, beta)
