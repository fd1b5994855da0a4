"""Gated attention of the decode and verify steps in two Triton kernels plus a split combine, no dense mask.

    q = attention_prep(qkv, q_cols=..., k_cols=..., v_cols=..., norm weights, rope table, cache, slots/positions)
        # q/k RMSNorm (1 + w) + partial RoPE (the cached cos/sin table) + K/V written into the cache slots, one kernel
    out = tree_attention(q, cache_k, cache_v, lengths, ancestor_mask, gate=..., scale=...)
        # split-K (flash-decoding) attention of T new tokens per row over the cached prefix [0, lengths[b]) and the
        # new tokens' own slots [lengths[b], lengths[b] + T) masked by the ancestor mask (None: causal chain), then the
        # splits are combined and multiplied by sigmoid(gate)

T = 1 is the decode step, T = N a tree verify (the ancestor mask is read inside the kernel, never expanded to the
prefix). The new tokens' keys/values are written at slots lengths[b] + t, past the valid prefix, so a verify does
not change what the cache holds (`GatedAttention.commit` later writes the accepted path compactly); a decode step
then advances lengths by one. Reference: `tree_attention_reference` (dense masked softmax in float32).

Shapes: qkv (B*T, P) rows of the fused q|k|v projection (q part per head [query D | gate D]); cache k, v
(B, Hkv, capacity, D); q (B, T, H, D); out (B, T, H*D), all in the activation dtype.
"""
from __future__ import annotations

import torch

from gdnspec.ops import pdl
from gdnspec.ops.fused._checks import check_shape
from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON, available

if HAS_TRITON:
    import triton
    import triton.language as tl

    from gdnspec.ops.pdl import enter

__all__ = ["attention_prep", "attention_prep_reference", "kv_commit_path", "kv_commit_path_reference", "tree_attention",
           "tree_attention_reference"]


def attention_prep_reference(qkv: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int,
                             q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, eps: float,
                             table: torch.Tensor, perm: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                             cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
    """qkv (B, T, P); positions, slots (B, T) long. Writes k, v at cache[:, :, slots]; returns q (B, T, H, D)."""
    B, T, _ = qkv.shape
    H, Hkv, D = num_heads, num_kv_heads, head_dim
    qg = qkv[..., : 2 * H * D].reshape(B, T, H, 2 * D)
    q = qg[..., :D]
    k = qkv[..., 2 * H * D: 2 * H * D + Hkv * D].reshape(B, T, Hkv, D)
    v = qkv[..., 2 * H * D + Hkv * D: 2 * H * D + 2 * Hkv * D].reshape(B, T, Hkv, D)

    def norm(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).to(x.dtype)

    cs = table[:, positions].float()  # (2, B, T, D)

    def rope(x):
        xf = x.float()
        return (xf * cs[0][:, :, None] + xf[..., perm] * cs[1][:, :, None]).to(x.dtype)

    q, k = rope(norm(q, q_norm_weight)), rope(norm(k, k_norm_weight))
    bidx = torch.arange(B, device=qkv.device)[:, None].expand(B, T)
    cache_k[bidx, :, slots] = k.to(cache_k.dtype)
    cache_v[bidx, :, slots] = v.to(cache_v.dtype)
    return q


def tree_attention_reference(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, lengths: torch.Tensor,
                             ancestor_mask: torch.Tensor | None, *, gate: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense float32 reference. q (B, T, H, D); the new tokens' K/V at slots lengths + t; gate (B, T, H*D)."""
    B, T, H, D = q.shape
    Hkv, cap = cache_k.shape[1], cache_k.shape[2]
    G = H // Hkv
    kf = cache_k.float().repeat_interleave(G, dim=1)  # (B, H, cap, D)
    vf = cache_v.float().repeat_interleave(G, dim=1)
    s = torch.einsum("bthd,bhpd->bhtp", q.float(), kf) * scale  # (B, H, T, cap)
    pos = torch.arange(cap, device=q.device)
    L = lengths[:, None, None]
    j = pos[None, None, :] - L  # (B, 1, cap): index of the new token in that slot
    if ancestor_mask is None:
        anc = torch.ones(T, T, dtype=torch.bool, device=q.device).tril().expand(B, T, T)
    else:
        anc = ancestor_mask
    jc = j.clamp(0, T - 1).expand(B, T, cap)
    new_ok = (j >= 0) & (j < T) & anc.gather(2, jc)
    ok = (pos[None, None, :] < L) | new_ok  # (B, T, cap)
    s = s.masked_fill(~ok[:, None], float("-inf"))
    o = torch.einsum("bhtp,bhpd->bthd", s.softmax(-1), vf).to(q.dtype).reshape(B, T, H * D)
    return (o * torch.sigmoid(gate)).to(q.dtype)


if HAS_TRITON:

    @triton.jit
    def _prep_kernel(qkv, sq, qn_w, kn_w, table, n_table, perm, lengths, depth, ck, cv, q_out, eps, cap,
                     T, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, HAS_DEPTH: tl.constexpr, PDL: tl.constexpr = False):
        enter(PDL)  # ops/pdl.py: before any load or store
        i_bt = tl.program_id(0)
        i_head = tl.program_id(1)  # 0..H-1: query heads, H..H+HKV-1: key/value heads
        i_b = i_bt // T
        i_t = i_bt % T
        cols = tl.arange(0, BD)
        m = cols < D
        pcols = tl.load(perm + cols, mask=m, other=0)
        row = qkv + i_bt * sq
        ln = tl.load(lengths + i_b)
        if HAS_DEPTH:  # position = prefix length + depth (clamped prefix: padding rows of a batch bucket)
            pos = tl.minimum(ln, cap) + tl.load(depth + i_bt)
        else:
            pos = tl.minimum(ln, cap) + i_t
        if i_head < H:
            base = i_head * 2 * D
            w = qn_w
        else:
            base = 2 * H * D + (i_head - H) * D
            w = kn_w
        x = tl.load(row + base + cols, mask=m, other=0.0)
        xp = tl.load(row + base + pcols, mask=m, other=0.0).to(tl.float32)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, 0) / D + eps)
        wv = tl.load(w + cols, mask=m, other=0.0).to(tl.float32) + 1.0
        wp = tl.load(w + pcols, mask=m, other=0.0).to(tl.float32) + 1.0
        xn = (xf * rstd * wv).to(x.dtype).to(tl.float32)
        xpn = (xp * rstd * wp).to(x.dtype).to(tl.float32)
        c = tl.load(table + pos * D + cols, mask=m, other=0.0).to(tl.float32)
        s = tl.load(table + n_table * D + pos * D + cols, mask=m, other=0.0).to(tl.float32)
        y = (xn * c + xpn * s).to(x.dtype)
        if i_head < H:
            tl.store(q_out + (i_bt * H + i_head) * D + cols, y, mask=m)
        else:
            h = i_head - H
            slot = tl.minimum(ln, cap - T) + i_t
            off = ((i_b.to(tl.int64) * HKV + h) * cap + slot) * D + cols  # int64: caches of >= 2^31 elements
            tl.store(ck + off, y.to(ck.dtype.element_ty), mask=m)
            vv = tl.load(row + 2 * H * D + HKV * D + h * D + cols, mask=m, other=0.0)
            tl.store(cv + off, vv.to(cv.dtype.element_ty), mask=m)

    @triton.jit
    def _attn_split_kernel(q, ck, cv, lengths, anc, o_part, ml_part, scale, cap, T, SPLIT_LEN,
                           NSPLIT: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                           BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_ANC: tl.constexpr,
                           F32: tl.constexpr, PDL: tl.constexpr = False):
        enter(PDL)  # ops/pdl.py: before any load or store
        i_b = tl.program_id(0)
        i_hm = tl.program_id(1)
        i_s = tl.program_id(2)
        G: tl.constexpr = H // HKV
        n_mb = tl.cdiv(T * G, BM)
        i_kv = i_hm // n_mb
        i_m = i_hm % n_mb
        rows = i_m * BM + tl.arange(0, BM)  # query rows (t, g) flattened: t = row // G
        rt = rows // G
        rg = rows % G
        mrow = rows < T * G
        cols = tl.arange(0, BD)
        md = cols < D
        head = i_kv * G + rg
        qv = tl.load(q + ((i_b * T + rt[:, None]) * H + head[:, None]) * D + cols[None, :],
                     mask=mrow[:, None] & md[None, :], other=0.0)
        if F32:
            qv = qv.to(tl.float32)
        L = tl.minimum(tl.load(lengths + i_b), cap - T)
        total = L + T
        start = i_s * SPLIT_LEN
        end = tl.minimum(start + SPLIT_LEN, total)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, BD], tl.float32)
        kv_base = (i_b.to(tl.int64) * HKV + i_kv) * cap * D  # int64: caches of >= 2^31 elements
        for n0 in range(start, end, BN):
            pcol = n0 + tl.arange(0, BN)
            mp = pcol < end
            kt = tl.load(ck + kv_base + pcol[None, :] * D + cols[:, None], mask=md[:, None] & mp[None, :], other=0.0)
            vt = tl.load(cv + kv_base + pcol[:, None] * D + cols[None, :], mask=mp[:, None] & md[None, :], other=0.0)
            if F32:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
                s = tl.dot(qv, kt, input_precision="ieee") * scale
            else:
                s = tl.dot(qv, kt) * scale
            j = pcol - L  # index of the new token in that slot (< 0: cached prefix)
            ok = (pcol[None, :] < L) & mp[None, :]
            if HAS_ANC:
                isnew = (j >= 0) & mp
                a = tl.load(anc + (i_b * T + rt[:, None]) * T + j[None, :], mask=mrow[:, None] & isnew[None, :], other=0)
                ok = ok | ((a != 0) & isnew[None, :])
            else:
                ok = ok | ((j[None, :] >= 0) & (j[None, :] <= rt[:, None]) & mp[None, :])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if F32:
                acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
        out_row = (i_b * T + rt) * H + head  # (BM,)
        tl.store(o_part + (out_row[:, None] * NSPLIT + i_s) * D + cols[None, :], acc, mask=mrow[:, None] & md[None, :])
        tl.store(ml_part + (out_row * NSPLIT + i_s) * 2, m_i, mask=mrow)
        tl.store(ml_part + (out_row * NSPLIT + i_s) * 2 + 1, l_i, mask=mrow)

    @triton.jit
    def _attn_combine_kernel(o_part, ml_part, gate, sg, out, lengths, T, H: tl.constexpr, D: tl.constexpr,
                             BD: tl.constexpr, NSPLIT: tl.constexpr, BS: tl.constexpr, INC_LEN: tl.constexpr, PDL: tl.constexpr = False):
        enter(PDL)  # ops/pdl.py: before any load or store
        i_bt = tl.program_id(0)
        i_h = tl.program_id(1)
        if INC_LEN:  # a causal step: the new tokens join the prefix (the split kernel, which reads lengths, is done)
            if (i_h == 0) & (i_bt % T == 0):
                tl.store(lengths + i_bt // T, tl.load(lengths + i_bt // T) + T)
        r = i_bt * H + i_h
        sp = tl.arange(0, BS)
        ms = sp < NSPLIT
        mi = tl.load(ml_part + (r * NSPLIT + sp) * 2, mask=ms, other=float("-inf"))
        li = tl.load(ml_part + (r * NSPLIT + sp) * 2 + 1, mask=ms, other=0.0)
        mx = tl.max(mi, 0)
        w = tl.where(mi == float("-inf"), 0.0, tl.exp(mi - mx))
        lsum = tl.sum(li * w, 0)
        cols = tl.arange(0, BD)
        md = cols < D
        op = tl.load(o_part + (r * NSPLIT + sp[:, None]) * D + cols[None, :], mask=ms[:, None] & md[None, :], other=0.0)
        o = tl.sum(op * w[:, None], 0) / lsum
        gv = tl.load(gate + i_bt * sg + i_h * 2 * D + D + cols, mask=md, other=0.0)
        dt = gv.dtype
        sig = tl.sigmoid(gv.to(tl.float32)).to(dt).to(tl.float32)
        y = o.to(dt).to(tl.float32) * sig
        tl.store(out + (i_bt * H + i_h) * D + cols, y.to(out.dtype.element_ty), mask=md)


def attention_prep(qkv: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int, q_norm_weight: torch.Tensor,
                   k_norm_weight: torch.Tensor, eps: float, table: torch.Tensor, perm: torch.Tensor,
                   lengths: torch.Tensor, depth: torch.Tensor | None, cache_k: torch.Tensor, cache_v: torch.Tensor
                   ) -> torch.Tensor:
    """See `attention_prep_reference`; one kernel on CUDA / under TRITON_INTERPRET. Positions are
    min(lengths, capacity) + depth (depth None: t, a causal chain), slots min(lengths, capacity - T) + t, both
    computed in the kernel. table (2, P, D) in qkv's dtype with P >= capacity + T."""
    if qkv.dim() != 3:
        raise ValueError(f"qkv must have shape (B, T, P), got {tuple(qkv.shape)}")
    B, T, P = qkv.shape
    H, Hkv, D = num_heads, num_kv_heads, head_dim
    if cache_k.dim() != 4:
        raise ValueError(f"cache_k must have shape (B, Hkv, capacity, D), got {tuple(cache_k.shape)}")
    cap = cache_k.shape[2]
    check_shape("cache_k", cache_k, (B, Hkv, cap, D), "(B, Hkv, capacity, D)")
    check_shape("cache_v", cache_v, (B, Hkv, cap, D), "(B, Hkv, capacity, D)")
    check_shape("lengths", lengths, (B,), "(B,)")
    if depth is not None:
        check_shape("depth", depth, (B, T), "(B, T)")
    check_shape("q_norm_weight", q_norm_weight, (D,))
    check_shape("k_norm_weight", k_norm_weight, (D,))
    check_shape("perm", perm, (D,))
    if table.dim() != 3 or table.shape[0] != 2:
        raise ValueError(f"table must have shape (2, positions, D), got {tuple(table.shape)}")
    if T > cap:
        raise ValueError(f"{T} new tokens do not fit a KV cache of capacity {cap}")
    if P < 2 * H * D + 2 * Hkv * D:
        raise ValueError(f"qkv has {P} columns, expected 2*H*D + 2*Hkv*D = {2 * H * D + 2 * Hkv * D}")
    if table.shape[1] < cap + T:
        raise ValueError(f"the RoPE table holds {table.shape[1]} positions, capacity + T = {cap + T} are needed")
    if not available(qkv) or qkv.dtype == torch.float64:
        d = torch.arange(T, device=qkv.device).expand(B, T) if depth is None else depth
        positions = lengths.clamp(max=cap)[:, None] + d
        slots = lengths.clamp(max=cap - T)[:, None] + torch.arange(T, device=qkv.device)
        return attention_prep_reference(qkv, num_heads=H, num_kv_heads=Hkv, head_dim=D, q_norm_weight=q_norm_weight,
                                        k_norm_weight=k_norm_weight, eps=eps, table=table, perm=perm,
                                        positions=positions, slots=slots, cache_k=cache_k, cache_v=cache_v)
    if not (cache_k.is_contiguous() and cache_v.is_contiguous() and table.is_contiguous()):
        raise ValueError("cache_k, cache_v and table must be contiguous")
    if table.shape[-1] != D or cache_k.shape[-1] != D:
        raise ValueError(f"table and cache must have head dim {D}, got {table.shape[-1]} and {cache_k.shape[-1]}")
    rows = qkv.reshape(B * T, P)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    q = torch.empty(B, T, H, D, dtype=qkv.dtype, device=qkv.device)
    if B * T:
        dep = depth.reshape(-1).contiguous() if depth is not None else lengths
        _prep_kernel[(B * T, H + Hkv)](rows, rows.stride(0), q_norm_weight, k_norm_weight, table, table.shape[1], perm,
                                       lengths, dep, cache_k, cache_v, q, float(eps), cap, T,
                                       H=H, HKV=Hkv, D=D, BD=triton.next_power_of_2(D), HAS_DEPTH=depth is not None,
                                       num_warps=2, **pdl.launch_args(rows))
    # the table spans positions < table.shape[1]; positions are clamped by the caller
    return q


def _num_splits(B: int, units: int, capacity: int, block: int, device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(1, (2 * sms) // max(B * units, 1))
    return max(1, min(want, triton.cdiv(capacity, block), 64))


def tree_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, lengths: torch.Tensor,
                   ancestor_mask: torch.Tensor | None, *, gate: torch.Tensor, scale: float,
                   num_splits: int | None = None, advance_lengths: bool = False, block_m: int | None = None,
                   num_warps: int | None = None) -> torch.Tensor:
    """See the module docstring. q (B, T, H, D); gate: the (B, T, P) projection rows whose q part is per head
    [query D | gate D] (the gate of head h at columns h*2D + D ..); lengths (B,) long (clamped to capacity - T);
    ancestor_mask (B, T, T) bool with the diagonal, or None for a causal chain. advance_lengths=True adds T to
    `lengths` in place afterwards (a causal step), inside the last kernel. Returns (B, T, H*D).
    block_m (query rows (token, head of a kv group) per program, a power of two >= 16) and num_warps of the split
    kernel: the defaults below unless given (tile sweeps)."""
    if q.dim() != 4 or cache_k.dim() != 4:
        raise ValueError(f"q must be (B, T, H, D) and cache_k (B, Hkv, capacity, D), got {tuple(q.shape)} and "
                         f"{tuple(cache_k.shape)}")
    B, T, H, D = q.shape
    Hkv, cap = cache_k.shape[1], cache_k.shape[2]
    if cache_k.shape[-1] != D:
        raise ValueError(f"cache_k has head dim {cache_k.shape[-1]}, q has head dim {D}")
    check_shape("cache_k", cache_k, (B, Hkv, cap, D), "(B, Hkv, capacity, D)")
    check_shape("cache_v", cache_v, (B, Hkv, cap, D), "(B, Hkv, capacity, D)")
    check_shape("lengths", lengths, (B,), "(B,)")
    if gate.dim() != 3 or tuple(gate.shape[:2]) != (B, T) or gate.shape[-1] < 2 * H * D:
        raise ValueError(f"gate must hold the (B, T, P) projection rows with P >= 2*H*D = {2 * H * D}, got "
                         f"{tuple(gate.shape)}")
    if H % Hkv:
        raise ValueError(f"num_heads ({H}) must be a multiple of the cache's kv heads ({Hkv})")
    if T > cap:
        raise ValueError(f"{T} new tokens do not fit a KV cache of capacity {cap}")
    if ancestor_mask is not None and (tuple(ancestor_mask.shape) != (B, T, T) or ancestor_mask.dtype != torch.bool):
        # bool: the kernel reads the mask's bytes (a view), so a wider dtype would be read at the wrong offsets
        raise ValueError(f"ancestor_mask must be a bool tensor of shape (B, T, T) = {(B, T, T)}, got "
                         f"{ancestor_mask.dtype} {tuple(ancestor_mask.shape)}")
    if not available(q) or q.dtype == torch.float64:
        gq = gate.reshape(B, T, -1)[..., : 2 * H * D].reshape(B, T, H, 2 * D)[..., D:].reshape(B, T, H * D)
        out = tree_attention_reference(q, cache_k, cache_v, lengths.clamp(max=cap - T), ancestor_mask, gate=gq,
                                       scale=scale)
        if advance_lengths:
            lengths += T
        return out
    if not (cache_k.is_contiguous() and cache_v.is_contiguous()):
        raise ValueError(f"cache_k and cache_v must be contiguous, got strides {cache_k.stride()} and {cache_v.stride()}")
    G = H // Hkv
    BD = max(16, triton.next_power_of_2(D))  # tl.dot needs K >= 16 for 16-bit inputs on NVIDIA GPUs; masks pad D
    BM = block_m
    if BM is None:  # at most 32 query rows per program (64 held a 64 x D float32 accumulator: 128 registers per thread
        # at D = 256), 16 where even then the grid would be small: H200, 1.7B shapes (H 16, Hkv 2, D 256), T = 16,
        # split + combine (results/stop19/attn_tiles_H200.json): B = 1 9.7 us (BM 16) against 13.7 (BM 64),
        # B = 8 26.8 (BM 32) against 37.4, B = 32 65.6 (BM 32) against 98.2
        BM = max(16, min(32, triton.next_power_of_2(T * G)))
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        if BM == 32 and 4 * B * Hkv * triton.cdiv(T * G, 32) < sms:
            BM = 16
    if not isinstance(BM, int) or BM < 16 or BM & (BM - 1):
        raise ValueError(f"block_m must be a power of two >= 16 (tl.dot tiles), got {BM}")
    if num_warps is not None and (not isinstance(num_warps, int) or num_warps < 1 or num_warps & (num_warps - 1)):
        raise ValueError(f"num_warps must be a power of two >= 1, got {num_warps!r}")
    BN = 32 if BD >= 256 else 64
    n_mb = triton.cdiv(T * G, BM)
    ns = num_splits or _num_splits(B, Hkv * n_mb, cap, BN, q.device)
    split_len = triton.cdiv(triton.cdiv(cap, ns), BN) * BN
    ns = triton.cdiv(cap, split_len)
    o_part = torch.empty(B * T * H, ns, D, dtype=torch.float32, device=q.device)
    ml_part = torch.empty(B * T * H, ns, 2, dtype=torch.float32, device=q.device)
    # the bool mask read as bytes (a view, no conversion kernel per layer: 6 x 2.1 us per verify on an H200)
    anc = ancestor_mask.contiguous().view(torch.uint8) if ancestor_mask is not None else q
    f32 = q.dtype == torch.float32 or not q.is_cuda
    out = torch.empty(B, T, H * D, dtype=q.dtype, device=q.device)
    g2 = gate.reshape(B * T, -1)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    if B * T:
        _attn_split_kernel[(B, Hkv * n_mb, ns)](
            q.contiguous(), cache_k, cache_v, lengths, anc, o_part, ml_part, float(scale), cap, T, split_len,
            NSPLIT=ns, H=H, HKV=Hkv, D=D, BD=BD, BM=BM, BN=BN, HAS_ANC=ancestor_mask is not None, F32=f32,
            num_warps=4 if num_warps is None else num_warps, **pdl.launch_args(o_part))
        _attn_combine_kernel[(B * T, H)](o_part, ml_part, g2, g2.stride(0), out, lengths, T, H=H, D=D, BD=BD,
                                         NSPLIT=ns, BS=max(2, triton.next_power_of_2(ns)), INC_LEN=advance_lengths,
                                         num_warps=4, **pdl.launch_args(o_part))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Commit of a verified path (issue 9, verify step): the verify wrote node i's key/value at slot base + i, with
# base = min(lengths, capacity - N); the accepted nodes path[b, :counts[b]] move to base + 0 .. counts[b] - 1, then
# lengths += counts. One program per row, no copies of the node keys/values, one launch for k, v and lengths.
def kv_commit_path_reference(cache_k: torch.Tensor, cache_v: torch.Tensor, lengths: torch.Tensor, *, path: torch.Tensor,
                             counts: torch.Tensor, num_nodes: int) -> None:
    """cache_k, cache_v (B, Hkv, capacity, D); lengths, counts (B,) long; path (B, L) long node indices (< num_nodes),
    root first. In place: cache[b, :, base + j] = cache[b, :, base + path[b, j]] for j < counts[b] (all sources read
    first), lengths += counts."""
    B, Hkv, cap, D = cache_k.shape
    L = path.shape[1]
    base = lengths.clamp(max=cap - num_nodes)
    src = (base[:, None] + path.clamp(min=0, max=num_nodes - 1))[:, None, :, None].expand(B, Hkv, L, D)
    dst = (base[:, None] + torch.arange(L, device=path.device))  # (B, L)
    keep = (torch.arange(L, device=path.device)[None, :] < counts[:, None])  # (B, L)
    dst = torch.where(keep, dst, base[:, None] + path.clamp(min=0, max=num_nodes - 1))  # others rewrite themselves
    dst = dst[:, None, :, None].expand(B, Hkv, L, D)
    for c in (cache_k, cache_v):
        c.scatter_(2, dst, c.gather(2, src))
    lengths += counts


if HAS_TRITON:

    @triton.jit
    def _kv_commit_kernel(ck, cv, lengths, path, counts, cap, N, L, Hkv: tl.constexpr, D: tl.constexpr,
                          BL: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr = False):
        enter(PDL)  # ops/pdl.py: before any load or store
        i_b = tl.program_id(0)
        rl = tl.arange(0, BL)
        rd = tl.arange(0, BD)
        cnt = tl.load(counts + i_b)
        n0 = tl.load(lengths + i_b)
        base = tl.minimum(n0, cap - N)
        ml = rl < tl.minimum(cnt, L)
        src = tl.load(path + i_b * L + rl, mask=ml, other=0)
        src = tl.minimum(tl.maximum(src, 0), N - 1)
        m = ml[:, None] & (rd[None, :] < D)
        for h in range(Hkv):
            row = (i_b * Hkv + h).to(tl.int64) * cap
            ks = tl.load(ck + (row + base + src[:, None]) * D + rd[None, :], mask=m, other=0.0)
            vs = tl.load(cv + (row + base + src[:, None]) * D + rd[None, :], mask=m, other=0.0)
            tl.debug_barrier()  # every source slot is read before any destination slot is written
            tl.store(ck + (row + base + rl[:, None]) * D + rd[None, :], ks, mask=m)
            tl.store(cv + (row + base + rl[:, None]) * D + rd[None, :], vs, mask=m)
        tl.store(lengths + i_b, n0 + cnt)


def kv_commit_path(cache_k: torch.Tensor, cache_v: torch.Tensor, lengths: torch.Tensor, *, path: torch.Tensor,
                   counts: torch.Tensor, num_nodes: int) -> None:
    """Fused `kv_commit_path_reference` (same arguments and effect): one launch, no host sync. Falls back to the
    reference where Triton cannot run."""
    B, Hkv, cap, D = cache_k.shape
    check_shape("cache_v", cache_v, tuple(cache_k.shape), "(B, Hkv, capacity, D)")
    check_shape("lengths", lengths, (B,), "(B,)")
    check_shape("counts", counts, (B,), "(B,)")
    if path.dim() != 2 or path.shape[0] != B:
        raise ValueError(f"path must have shape (B, L) with B={B}, got {tuple(path.shape)}")
    if not 1 <= num_nodes <= cap:
        raise ValueError(f"num_nodes must be in [1, capacity={cap}], got {num_nodes}")
    if not available(cache_k) or cache_k.dtype == torch.float64:
        return kv_commit_path_reference(cache_k, cache_v, lengths, path=path, counts=counts, num_nodes=num_nodes)
    if not (cache_k.is_contiguous() and cache_v.is_contiguous()):
        raise ValueError("cache_k and cache_v must be contiguous")
    L = path.shape[1]
    if B and L:
        _kv_commit_kernel[(B,)](cache_k, cache_v, lengths, path.contiguous(), counts.contiguous(), cap, num_nodes, L,
                                Hkv=Hkv, D=D, BL=max(triton.next_power_of_2(L), 2), BD=triton.next_power_of_2(D),
                                num_warps=4, **pdl.launch_args(cache_k))
    elif B:
        lengths += counts
