"""Residual add + RMSNorm and the SwiGLU activation as single Triton kernels (decode / verify steps).

    y, h = add_rms_norm(x, residual=r, weight=w, eps=1e-6, offset=True)   # h = x + r (rounded to x's dtype),
                                                                          # y = rmsnorm(h) * (1 + w)
    a = silu_mul(gu)                                                      # gu (M, 2I) = [gate | up] -> silu(gate) * up
    x = eagle_input(ids, table, hidden, w_e=we, w_h=wh, eps=1e-6, offset=True)
                                           # [rmsnorm(table[ids]) * w_e | rmsnorm(hidden) * w_h] (M, 2H): an EAGLE
                                           # head's embedding lookup, both input norms and their concat, one launch

Rounding follows the torch modules exactly where it is observable: the residual sum is rounded to the activation
dtype before it is normalised (as `h = h + y` then `RMSNorm(h)` does), the norm is computed in float32 and rounded
once. References: `add_rms_norm_reference`, `silu_mul_reference` (plain torch, used on every non-Triton device).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gdnspec.ops import pdl
from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON, available

if HAS_TRITON:
    import triton
    import triton.language as tl

    from gdnspec.ops.pdl import enter

__all__ = ["add_rms_norm", "add_rms_norm_reference", "eagle_input", "eagle_input_reference", "silu_mul",
           "silu_mul_reference"]


def add_rms_norm_reference(x: torch.Tensor, *, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                           offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (..., D) -> (rmsnorm(x + residual) * (1 + w or w) in x's dtype, x + residual in x's dtype)."""
    h = x if residual is None else x + residual
    cdt = torch.float64 if h.dtype == torch.float64 else torch.float32
    w = weight.to(cdt)
    w = 1.0 + w if offset else w
    y = F.rms_norm(h.to(cdt), (h.shape[-1],), w, eps).to(h.dtype)
    return y, h


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2I) -> silu(gate) * up (..., I) in the input dtype (rounded after silu, like F.silu(g) * u)."""
    g, u = gate_up.chunk(2, dim=-1)
    return F.silu(g) * u


if HAS_TRITON:

    @triton.jit
    def _rms_normed(s, w, cols, m, D, eps, OFFSET: tl.constexpr):
        """rmsnorm(s) * (1 + w or w) in float32 for one row s (BD,) float32 of D valid columns (m): the arithmetic every
        norm kernel here shares, so that they give the same numbers."""
        s = tl.where(m, s, 0.0)
        rstd = tl.rsqrt(tl.sum(s * s, 0) / D + eps)
        wv = tl.load(w + cols, mask=m, other=0.0).to(tl.float32)
        if OFFSET:
            wv = wv + 1.0
        return s * rstd * wv

    @triton.jit
    def _add_rms_norm_kernel(x, sx, r, sr, w, y, sy, h, sh, D, eps, n_rows,
                             HAS_RES: tl.constexpr, OFFSET: tl.constexpr, BD: tl.constexpr, NPART: tl.constexpr,
                             PDL: tl.constexpr = False):
        enter(PDL)  # ops/pdl.py: before any load or store
        row = tl.program_id(0)
        cols = tl.arange(0, BD)
        m = cols < D
        if NPART > 0:  # x holds NPART float32 partial sums (split-K GEMV): add them, round to the activation dtype
            acc = tl.load(x + row * sx + cols, mask=m, other=0.0)
            for p in range(1, NPART):
                acc += tl.load(x + (p * n_rows + row) * sx + cols, mask=m, other=0.0)
            xv = acc.to(h.dtype.element_ty)
        else:
            xv = tl.load(x + row * sx + cols, mask=m, other=0.0)
        if HAS_RES:
            s = xv.to(tl.float32) + tl.load(r + row * sr + cols, mask=m, other=0.0).to(tl.float32)
            s_act = s.to(xv.dtype)
            tl.store(h + row * sh + cols, s_act, mask=m)
            s = s_act.to(tl.float32)
        else:
            s = xv.to(tl.float32)
        tl.store(y + row * sy + cols, _rms_normed(s, w, cols, m, D, eps, OFFSET).to(y.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_kernel(gu, sg, out, so, I, BI: tl.constexpr, PDL: tl.constexpr = False):
        enter(PDL)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BI + tl.arange(0, BI)
        m = cols < I
        g = tl.load(gu + row * sg + cols, mask=m, other=0.0)
        u = tl.load(gu + row * sg + I + cols, mask=m, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        act = (gf * tl.sigmoid(gf)).to(g.dtype).to(tl.float32)  # F.silu rounds to the input dtype
        tl.store(out + row * so + cols, (act * u).to(out.dtype.element_ty), mask=m)


if HAS_TRITON:

    @triton.jit
    def _eagle_input_kernel(ids, table, st, hid, sh, we, wh, out, so, H, eps, hrows, OFFSET: tl.constexpr,
                            BD: tl.constexpr, PDL: tl.constexpr = False, HAS_ROWS: tl.constexpr = False):
        """Program (row, half): half 0 normalises the embedding row table[ids[row]] with we into out[row, :H],
        half 1 the feature row hid[hrows[row]] (HAS_ROWS) or hid[row] with wh into out[row, H:]; add_rms_norm's
        arithmetic without a residual."""
        enter(PDL)
        row = tl.program_id(0)
        half = tl.program_id(1)
        cols = tl.arange(0, BD)
        m = cols < H
        if half == 0:
            tok = tl.load(ids + row).to(tl.int64)
            xv = tl.load(table + tok * st + cols, mask=m, other=0.0)
            w = we
        else:
            if HAS_ROWS:
                src = tl.load(hrows + row).to(tl.int64)
            else:
                src = row.to(tl.int64)
            xv = tl.load(hid + src * sh + cols, mask=m, other=0.0)
            w = wh
        y = _rms_normed(xv.to(tl.float32), w, cols, m, H, eps, OFFSET)
        tl.store(out + row * so + half * H + cols, y.to(out.dtype.element_ty), mask=m)


def eagle_input_reference(ids: torch.Tensor, table: torch.Tensor, hidden: torch.Tensor, *, w_e: torch.Tensor,
                          w_h: torch.Tensor, eps: float, offset: bool) -> torch.Tensor:
    """[rmsnorm(table[ids]) | rmsnorm(hidden)] (..., 2H) in hidden's dtype, each as add_rms_norm_reference."""
    e = add_rms_norm_reference(table[ids].to(hidden.dtype), residual=None, weight=w_e, eps=eps, offset=offset)[0]
    f = add_rms_norm_reference(hidden, residual=None, weight=w_h, eps=eps, offset=offset)[0]
    return torch.cat([e, f], dim=-1)


def check_hidden_rows(hidden_rows, n: int | None, device: torch.device) -> None:
    """ValueError naming hidden_rows unless it is an (n,) long tensor on `device` (one row of the parent features per
    draft token; n None: the token ids are not a (B, 1) tensor, so no count fits)."""
    if (not isinstance(hidden_rows, torch.Tensor) or hidden_rows.dtype != torch.long or n is None
            or tuple(hidden_rows.shape) != (n,) or hidden_rows.device != device):
        got = (f"{hidden_rows.dtype} {tuple(hidden_rows.shape)} on {hidden_rows.device}"
               if isinstance(hidden_rows, torch.Tensor) else type(hidden_rows).__name__)
        raise ValueError(f"hidden_rows must be a ({n if n is not None else 'B'},) long tensor on {device} (one row "
                         f"of hidden per draft token), got {got}")


def eagle_input(ids: torch.Tensor, table: torch.Tensor, hidden: torch.Tensor, *, w_e: torch.Tensor,
                w_h: torch.Tensor, eps: float, offset: bool, hidden_rows: torch.Tensor | None = None) -> torch.Tensor:
    """An EAGLE head's input in ONE launch: the embedding lookup of the draft tokens, norm_e and norm_h and their
    concat (models/eagle.py: fc's input), [rmsnorm(table[ids]) * w_e | rmsnorm(hidden) * w_h].

    ids (...,) integer token ids in [0, V) (not checked on the device: the caller's tokens), table (V, H) the
    embedding, hidden (..., H) the parent features, w_e / w_h (H,); table and hidden of one dtype. Returns (..., 2H)
    in hidden's dtype, the same numbers as `eagle_input_reference` (add_rms_norm's arithmetic). The reference where
    the Triton kernels cannot run (CPU without TRITON_INTERPRET, float64). ValueError for mismatched shapes / dtypes.

    hidden_rows (M,) long, M = ids.numel(): row m takes the feature hidden.reshape(-1, H)[hidden_rows[m]] (a tree
    expansion's parent features, gathered in the kernel instead of by a gather launch before it; entries in range
    are the caller's, not checked on the device); the result is then (*ids.shape, 2H)."""
    H = hidden.shape[-1]
    if hidden_rows is not None:
        check_hidden_rows(hidden_rows, ids.numel(), hidden.device)
        if ids.is_floating_point():
            raise ValueError(f"ids must be integer token ids, got {ids.dtype}")
        h2 = hidden.reshape(-1, H)
        if not available(h2) or h2.dtype == torch.float64:
            return eagle_input(ids, table, h2.index_select(0, hidden_rows).view(*ids.shape, H), w_e=w_e, w_h=w_h,
                               eps=eps, offset=offset)
    elif tuple(ids.shape) != tuple(hidden.shape[:-1]) or ids.is_floating_point():
        raise ValueError(f"ids must be integer token ids of shape {tuple(hidden.shape[:-1])} (hidden's leading dims), "
                         f"got {ids.dtype} {tuple(ids.shape)}")
    if table.dim() != 2 or table.shape[1] != H or table.dtype != hidden.dtype:
        raise ValueError(f"table must be a (V, {H}) {hidden.dtype} embedding, got {table.dtype} "
                         f"{tuple(table.shape)}")
    for name, w in (("w_e", w_e), ("w_h", w_h)):
        if tuple(w.shape) != (H,):
            raise ValueError(f"{name} must have shape ({H},), got {tuple(w.shape)}")
    if not available(hidden) or hidden.dtype == torch.float64:
        return eagle_input_reference(ids, table, hidden, w_e=w_e, w_h=w_h, eps=eps, offset=offset)
    BD = triton.next_power_of_2(H)
    if BD > 65536:
        raise ValueError(f"eagle_input supports rows of at most 65536 elements, got H={H}")
    h2 = _rows((hidden if hidden.stride(-1) == 1 else hidden.contiguous()).reshape(-1, H), "hidden")
    tab = table if table.stride(-1) == 1 else table.contiguous()
    M = ids.numel()
    out = torch.empty(M, 2 * H, dtype=hidden.dtype, device=hidden.device)
    if M:
        _eagle_input_kernel[(M, 2)](ids.reshape(-1).contiguous(), tab, tab.stride(0), h2, h2.stride(0), w_e, w_h, out,
                                    out.stride(0), H, float(eps), h2 if hidden_rows is None else hidden_rows.contiguous(),
                                    OFFSET=bool(offset), BD=BD, HAS_ROWS=hidden_rows is not None,
                                    num_warps=4 if BD <= 4096 else 8, **pdl.launch_args(h2))
    return out.view(*ids.shape, 2 * H)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")
    return t.reshape(-1, t.shape[-1])


def add_rms_norm(x: torch.Tensor, *, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `add_rms_norm_reference`: x, residual (..., D) same dtype; weight (D,). Returns (y, h) in x's dtype
    (h is x itself when residual is None). One kernel on CUDA / under TRITON_INTERPRET, the reference elsewhere.

    x may also be float32 split-K partial sums (S, ..., D) of an output projection (`gemv.linear_for_residual`,
    recognised by having one more dim than the residual): they are summed and rounded to the residual's dtype first,
    which is what the unsplit projection followed by `x + residual` computes."""
    if residual is not None and x.dim() == residual.dim() + 1:
        if not available(x):
            x = x.sum(0).to(residual.dtype)
        else:
            return _add_rms_norm_partials(x, residual=residual, weight=weight, eps=eps, offset=offset)
    if not available(x) or x.dtype == torch.float64:
        return add_rms_norm_reference(x, residual=residual, weight=weight, eps=eps, offset=offset)
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight must have shape ({D},), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} {residual.dtype}")
    BD = triton.next_power_of_2(D)
    if BD > 65536:
        raise ValueError(f"add_rms_norm supports rows of at most 65536 elements, got D={D}")
    x2 = _rows(x.contiguous() if x.stride(-1) != 1 else x, "x")
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if residual is not None else x2
    r2 = _rows(residual.contiguous(), "residual") if residual is not None else x2
    if x2.shape[0]:
        _add_rms_norm_kernel[(x2.shape[0],)](x2, x2.stride(0), r2, r2.stride(0), weight, y, y.stride(0), h, h.stride(0),
                                             D, float(eps), x2.shape[0], HAS_RES=residual is not None,
                                             OFFSET=bool(offset), BD=BD, NPART=0, num_warps=4 if BD <= 4096 else 8,
                                             **pdl.launch_args(x2))
    return y.view(x.shape), (h.view(x.shape) if residual is not None else x)


def _add_rms_norm_partials(parts: torch.Tensor, *, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    S = parts.shape[0]
    D = parts.shape[-1]
    if parts.shape[1:] != residual.shape or parts.dtype != torch.float32:
        raise ValueError(f"partials must be float32 (S, *residual.shape), got {parts.dtype} {tuple(parts.shape)}")
    if weight.shape != (D,):
        raise ValueError(f"weight must have shape ({D},), got {tuple(weight.shape)}")
    if triton.next_power_of_2(D) > 65536:
        raise ValueError(f"add_rms_norm supports rows of at most 65536 elements, got D={D}")
    p2 = parts.reshape(S, -1, D).contiguous()
    r2 = _rows(residual.contiguous(), "residual")
    n = r2.shape[0]
    y = torch.empty_like(r2)
    h = torch.empty_like(r2)
    BD = triton.next_power_of_2(D)
    if n:
        _add_rms_norm_kernel[(n,)](p2, p2.stride(1), r2, r2.stride(0), weight, y, y.stride(0), h, h.stride(0), D,
                                   float(eps), n, HAS_RES=True, OFFSET=bool(offset), BD=BD, NPART=S,
                                   num_warps=4 if BD <= 4096 else 8, **pdl.launch_args(p2))
    return y.view(residual.shape), h.view(residual.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Fused `silu_mul_reference`: gate_up (..., 2I) -> (..., I), one kernel on CUDA / under TRITON_INTERPRET."""
    if not available(gate_up) or gate_up.dtype == torch.float64:
        return silu_mul_reference(gate_up)
    two_i = gate_up.shape[-1]
    if two_i % 2:
        raise ValueError(f"gate_up must have an even last dim [gate | up], got {two_i}")
    I = two_i // 2
    gu = _rows(gate_up.contiguous() if gate_up.stride(-1) != 1 else gate_up, "gate_up")
    out = torch.empty(gu.shape[0], I, dtype=gate_up.dtype, device=gate_up.device)
    BI = min(triton.next_power_of_2(I), 1024)
    if gu.shape[0]:
        _silu_mul_kernel[(gu.shape[0], triton.cdiv(I, BI))](gu, gu.stride(0), out, out.stride(0), I, BI=BI, num_warps=4,
                                                             **pdl.launch_args(gu))
    return out.view(*gate_up.shape[:-1], I)
