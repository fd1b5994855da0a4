"""Small-batch linear layers (GEMV / skinny GEMM) in Triton, for the decode and verify steps.

    y = small_linear(x, weight)          # x (..., K) with at most MAX_ROWS rows, weight (N, K) -> (..., N)

At batch 1-32 a decode step is a chain of matrix-vector products whose cost is the weight bytes. cuBLAS picks
split-K kernels plus a reduction kernel for the tall-K shapes of out_proj / o_proj / down_proj (K >= 2N) and reaches
about half the copy bandwidth there on an H200 (benchmarks/results: profile_decode_b1.txt). This kernel gives each
program BN output columns and streams its (BN, K) weight slab once, with the M rows of x padded to one 16-row
tensor-core tile, software-pipelined over K; the tile comes from `gemv_tile`'s table (measured on an H200 with
benchmarks/bench_tiles.py), or from Triton's autotuner with GDNSPEC_GEMV_AUTOTUNE=1. Reference: F.linear (used for larger M, float64, and where Triton
cannot run).

The residual add + RMSNorm between two GEMVs is folded into them (ops/fused/normed.py wires it up):

    h, sumsq = linear_residual(x, W_out, b, residual)   # h = round(round(x @ W_out^T + b) + residual), and the
                                                        # float32 sums of squares of h per 16 columns (M, ceil(N/16))
    y = normed_linear(h, sumsq, w, eps, offset, W_in)   # (rmsnorm(h) * (1 + w or w)) @ W_in^T, normalised on the fly

linear_residual splits K like small_linear_partials; the last split to arrive at a column block (an int32 arrival
counter, ops/fused/_sync.py) adds the float32 partials in the fixed order 0 .. S-1 and runs the epilogue, so the
result is deterministic and bit-identical to small_linear_partials + add_rms_norm (both launch gemv_tile's tile;
with GDNSPEC_GEMV_AUTOTUNE=1 each autotuner picks its own BK, so only close; on the CUDA float32 "fma" path the
residual kernel's 16-column blocks are wider than small_linear's 4, and tl.sum's k-reduction follows the tile, so
only close there too). References: linear_residual_reference, normed_linear_reference. A/B switches:
GDNSPEC_NORM_GEMV=1 turns the folded kernels on (OFF by default: slower for the bf16 1.7B config and for the float32
bundle on the "fma" path, see normed.enabled); unset or 0 runs output GEMV -> add_rms_norm -> input GEMV. GDNSPEC_TRITON_GEMV=0 uses
cuBLAS and add_rms_norm everywhere; GDNSPEC_GEMV_SPLITS=S forces S K splits (tests).

The SwiGLU MLP's SiLU-mul can run in the down projection's loads (silu_linear_for_residual: one launch instead of
elementwise.silu_mul + the GEMV, bit-identical; opt-in GDNSPEC_SILU_GEMV=1, measured slower: silu_enabled). CUDA
float32 takes the kernels for 1-16 rows, on the CUDA cores ("fma": fp32_path, fma_tile) or with 'tf32x3' products
(GDNSPEC_FP32_GEMV=tf32x3, and the wide lm_head at 4+ rows).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from gdnspec.ops import pdl
from gdnspec.ops._env import flag
from gdnspec.ops.fused._bench import graph_bench
from gdnspec.ops.fused._sync import arrival_counters
from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON, available

if not HAS_TRITON:
    class OutOfResources(Exception):  # noqa: N818 (Triton's name; never raised without Triton)
        pass

if HAS_TRITON:
    import triton
    import triton.language as tl

    from gdnspec.ops.pdl import enter, prefetch_l2

    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # older Triton layouts
        from triton.runtime.autotuner import OutOfResources

__all__ = ["FP32_CUDA_MAX_ROWS", "FP32_CUDA_MIN_ROWS", "MAX_ROWS", "enabled", "fp32_rows_ok", "kernel_applies", "linear_for_residual",
           "silu_enabled", "silu_fusable", "silu_linear_for_residual", "linear_residual", "linear_residual_reference", "normed_linear",
           "normed_linear_reference", "small_linear", "small_linear_partials", "split_count"]

MAX_ROWS = 64
# CUDA float32 (fp32_path): the "fma" path (the default, GDNSPEC_FP32_GEMV) runs 1 .. 16 rows, with 'tf32x3' dots
# from FP32_TF32_MIN_N output columns at 4+ rows and cuBLAS for those at one row; "tf32x3" (stop 21) runs 2 .. 16 rows
# (FP32_CUDA_MIN_ROWS .. FP32_CUDA_MAX_ROWS). Measured for the shipped bundle's shapes on an H200
# (benchmarks/bench_small_gemm.py, results/stop22/small_gemm_fma_H200.json, us per product in CUDA graphs):
#   one row: fma 1.3-2.3 us, cuBLAS gemvx 2.4-3.1 us (N <= 2048); lm_head 8192 x 384: fma 4.4, cuBLAS 4.1
#   five rows: fma 1.9-3.9 us, tf32x3 3.4-10 us, cuBLAS 3.8-17.6 us (split-K "largek" landmines); lm_head: fma 7.2,
#   tf32x3 6.2; sixteen rows: fma 2.8-5.5 us, tf32x3 3.4-9.3; lm_head fma 9.7, tf32x3 6.2.
# 17+ rows stay with cuBLAS (6-17 us there, the 32-row tensor-core tile 11-18 us).
FP32_CUDA_MIN_ROWS, FP32_CUDA_MAX_ROWS = 2, 16
FP32_TF32_MIN_N = 4096


def enabled() -> bool:
    """GDNSPEC_TRITON_GEMV=0 turns the kernel off (cuBLAS everywhere), for A/B measurements."""
    return os.environ.get("GDNSPEC_TRITON_GEMV", "1") != "0"


PREFETCH_BYTES = 8 << 20  # L2 prefetch budget of one GEMV launch under PDL (of 50 MB of L2 on an H100 / H200)


def _launch_args(x: torch.Tensor, N: int, k_range: int) -> dict:
    """PDL launch arguments (ops/pdl.py) plus the weight prefetch of a GEMV launch: PF_LINES 128-byte lines of each
    weight row (from the start of the program's K range) go to L2 before the kernel waits for its predecessor, as
    many as fit PREFETCH_BYTES over all N rows (a power of two, 0 = none). LINE = elements per 128-byte line."""
    kw = pdl.launch_args(x)
    line = 128 // x.element_size()
    lines = 0
    if kw["PDL"] and pdl.prefetch_enabled(x):
        lines = min(k_range, PREFETCH_BYTES // max(1, N * x.element_size())) // line
        lines = 1 << (lines.bit_length() - 1) if lines > 0 else 0
    return {**kw, "PF_LINES": lines, "LINE": line}


if HAS_TRITON:

    @triton.jit
    def _pdl_prologue(w, rn, N, K, k_lo, PDL: tl.constexpr, PF_LINES: tl.constexpr, LINE: tl.constexpr):
        """PDL entry of a GEMV program: prefetch the first PF_LINES lines of its weight rows rn (from column k_lo)
        into L2 (weights only: allowed before the wait, ops/pdl.py rule 2), then `enter` (wait for the previous
        kernel, let the next one launch). Nothing at all when PDL is False."""
        if PF_LINES > 0:
            rl = k_lo + tl.arange(0, PF_LINES) * LINE
            prefetch_l2(w + tl.minimum(rn, N - 1)[:, None] * K + tl.minimum(rl, K - 1)[None, :])
        enter(PDL)

    @triton.jit
    def _x_chunk(x, sx, rm, rk, mm, mk, K, SILU: tl.constexpr):
        """The (BM, BK) chunk x[rm, rk] of a GEMV's input rows in x's dtype; SILU: x holds [gate | up] (rows of 2K)
        and the chunk is silu(gate) * up, rounded where elementwise.silu_mul rounds (silu to x's dtype, then the
        product)."""
        xt = tl.load(x + rm[:, None] * sx + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        if SILU:
            up = tl.load(x + rm[:, None] * sx + K + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
            gf = xt.to(tl.float32)
            act = (gf * tl.sigmoid(gf)).to(xt.dtype).to(tl.float32)
            xt = (act * up.to(tl.float32)).to(xt.dtype)
        return xt

    @triton.jit
    def _dot_tile(x, sx, w, rm, rn, mm, mn, K, k_lo, k_hi, F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, PREC: tl.constexpr = "ieee", SILU: tl.constexpr = False):
        """x[rm, k_lo:k_hi] @ w[rn, k_lo:k_hi]^T in float32 (BM, BN): the K loop every GEMV kernel here shares, so
        that the plain, split-K and residual kernels compute bit-identical sums for the same (BK, K range).
        SILU: the product's input is _x_chunk's silu(gate) * up, so the sums equal silu_mul + this GEMV.
        PREC "fma": float32 products and sums on the CUDA cores (F32 only); else tl.dot with that input precision."""
        if PREC == "fma":
            # float32 FMAs, no tensor cores: each thread keeps running sums of its (row, column, k) products over
            # the K loop and the tile reduces over k ONCE at the end (fma_tile: narrow column blocks, so that many
            # programs stream the weight in parallel; the few rows of x stay in L1 / L2)
            acc3 = tl.zeros([BM, BN, BK], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BK):
                rk = k0 + tl.arange(0, BK)
                mk = rk < K
                xt = _x_chunk(x, sx, rm, rk, mm, mk, K, SILU).to(tl.float32)  # (BM, BK)
                wt = tl.load(w + rn[:, None] * K + rk[None, :], mask=mn[:, None] & mk[None, :],
                             other=0.0).to(tl.float32)  # (BN, BK), k contiguous
                acc3 += xt[:, None, :] * wt[None, :, :]
            acc = tl.sum(acc3, 2)
        else:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BK):
                rk = k0 + tl.arange(0, BK)
                mk = rk < K
                xt = _x_chunk(x, sx, rm, rk, mm, mk, K, SILU)
                wt = tl.load(w + rn[None, :] * K + rk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
                if F32:
                    acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision=PREC)
                else:
                    acc += tl.dot(xt, wt)
        return acc

    @triton.jit
    def _gemv_kernel(x, sx, w, b, y, sy, M, N, K, K_SPLIT, HAS_BIAS: tl.constexpr, F32: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr = False,
                     PF_LINES: tl.constexpr = 0, LINE: tl.constexpr = 64, PREC: tl.constexpr = "ieee",
                     SILU: tl.constexpr = False):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)  # K split: program s covers K_SPLIT columns and writes partial sums y[s] (float32)
        rm = tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        mm = rm < M
        mn = rn < N
        k_lo = pid_s * K_SPLIT
        _pdl_prologue(w, rn, N, K, k_lo, PDL, PF_LINES, LINE)
        y += pid_s * M * N
        acc = _dot_tile(x, sx, w, rm, rn, mm, mn, K, k_lo, tl.minimum(k_lo + K_SPLIT, K), F32, BM, BN, BK, PREC,
                        SILU)
        if HAS_BIAS:
            if pid_s == 0:
                acc += tl.load(b + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        tl.store(y + rm[:, None] * sy + rn[None, :], acc.to(y.dtype.element_ty), mask=mm[:, None] & mn[None, :])

    @triton.jit
    def _residual_epilogue(acc, b, r, sr, h, sh, ssq, G, rm, rn, mm, mn, pid_n, HAS_BIAS: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr):
        """h = round(round(acc + bias) + r) for this (BM, BN) tile, and the float32 sums of squares of the rounded h
        over each 16-column group (BN // 16 slots of ssq per row): the residual add of `add_rms_norm`, done where the
        projection's sums are."""
        if HAS_BIAS:
            acc += tl.load(b + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        mt = mm[:, None] & mn[None, :]
        yv = acc.to(h.dtype.element_ty)  # the projection's output, rounded as F.linear's
        s = yv.to(tl.float32) + tl.load(r + rm[:, None] * sr + rn[None, :], mask=mt, other=0.0).to(tl.float32)
        ha = s.to(h.dtype.element_ty)  # h = y + residual, rounded as the torch sum
        tl.store(h + rm[:, None] * sh + rn[None, :], ha, mask=mt)
        hf = tl.where(mt, ha.to(tl.float32), 0.0)
        sq = tl.sum(tl.reshape(hf * hf, (BM, BN // 16, 16)), 2)  # (BM, BN // 16)
        rg = pid_n * (BN // 16) + tl.arange(0, BN // 16)
        tl.store(ssq + rm[:, None] * G + rg[None, :], sq, mask=mm[:, None] & (rg < G)[None, :])

    @triton.jit
    def _gemv_res_kernel(x, sx, w, b, r, sr, h, sh, ssq, part, counter, M, N, K, K_SPLIT, G,
                         HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, F32: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr = False,
                         PF_LINES: tl.constexpr = 0, LINE: tl.constexpr = 64, PREC: tl.constexpr = "ieee"):
        """Output projection + residual add (see linear_residual). Grid (column blocks, K splits). SPLIT: each split
        stores its float32 partial sums to part[s], then takes an arrival ticket on its column block's counter; the
        last to arrive adds the S partials in the fixed order 0 .. S-1 (the order add_rms_norm adds them in), runs
        the epilogue and zeroes the counter (ops/fused/_sync.py)."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rm = tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        mm = rm < M
        mn = rn < N
        k_lo = pid_s * K_SPLIT
        _pdl_prologue(w, rn, N, K, k_lo, PDL, PF_LINES, LINE)
        acc = _dot_tile(x, sx, w, rm, rn, mm, mn, K, k_lo, tl.minimum(k_lo + K_SPLIT, K), F32, BM, BN, BK, PREC)
        if SPLIT:
            S = tl.num_programs(1)
            tile = rm[:, None] * N + rn[None, :]
            mt = mm[:, None] & mn[None, :]
            tl.store(part + pid_s * M * N + tile, acc, mask=mt)
            tl.debug_barrier()  # every thread's partial sums are stored before the release below
            ticket = tl.atomic_add(counter + pid_n, 1, sem="acq_rel", scope="gpu")
            if ticket == S - 1:
                # .cg: read the other programs' partials from L2, never from a stale L1 line
                tot = tl.load(part + tile, mask=mt, other=0.0, cache_modifier=".cg")
                for p in range(1, S):
                    tot += tl.load(part + p * M * N + tile, mask=mt, other=0.0, cache_modifier=".cg")
                _residual_epilogue(tot, b, r, sr, h, sh, ssq, G, rm, rn, mm, mn, pid_n, HAS_BIAS, BM, BN)
                tl.store(counter + pid_n, 0)
        else:
            _residual_epilogue(acc, b, r, sr, h, sh, ssq, G, rm, rn, mm, mn, pid_n, HAS_BIAS, BM, BN)

    @triton.jit
    def _gemv_norm_kernel(h, sh, ssq, nw, w, b, y, sy, M, N, K, G, eps, OFFSET: tl.constexpr,
                          HAS_BIAS: tl.constexpr, F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr, BG: tl.constexpr, PDL: tl.constexpr = False, PF_LINES: tl.constexpr = 0,
                          LINE: tl.constexpr = 64, PREC: tl.constexpr = "ieee"):
        """rmsnorm(h) * (1 + nw or nw) @ w^T (see normed_linear): rstd from the producer's group sums of squares, each
        (BM, BK) chunk of h normalised and rounded to the activation dtype on the fly, then the dot."""
        pid_n = tl.program_id(0)
        rm = tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        mm = rm < M
        mn = rn < N
        _pdl_prologue(w, rn, N, K, 0, PDL, PF_LINES, LINE)
        tot = tl.zeros([BM], dtype=tl.float32)
        for g0 in range(0, G, BG):  # fixed order: chunks of BG groups, each a fixed reduction tree
            rg = g0 + tl.arange(0, BG)
            tot += tl.sum(tl.load(ssq + rm[:, None] * G + rg[None, :], mask=mm[:, None] & (rg < G)[None, :],
                                  other=0.0), 1)
        rstd = tl.rsqrt(tot / K + eps)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        if PREC == "fma":
            acc3 = tl.zeros([BM, BN, BK], dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < K
            ht = tl.load(h + rm[:, None] * sh + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
            wn = tl.load(nw + rk, mask=mk, other=0.0).to(tl.float32)
            if OFFSET:
                wn = wn + 1.0
            xt = (ht.to(tl.float32) * rstd[:, None] * wn[None, :]).to(ht.dtype)  # F.rms_norm in fp32, rounded
            if PREC == "fma":  # as _dot_tile's: running (row, column, k) sums, reduced over k after the loop
                wt = tl.load(w + rn[:, None] * K + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
                acc3 += xt.to(tl.float32)[:, None, :] * wt.to(tl.float32)[None, :, :]
            else:
                wt = tl.load(w + rn[None, :] * K + rk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
                if F32:
                    acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision=PREC)
                else:
                    acc += tl.dot(xt, wt)
        if PREC == "fma":
            acc = tl.sum(acc3, 2)
        if HAS_BIAS:
            acc += tl.load(b + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        tl.store(y + rm[:, None] * sy + rn[None, :], acc.to(y.dtype.element_ty), mask=mm[:, None] & mn[None, :])

    _CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
                for bn, bk, w, s in ((16, 256, 4, 4), (16, 128, 4, 6), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4),
                                     (16, 512, 4, 3), (64, 64, 4, 6), (128, 64, 4, 4), (128, 128, 8, 3))]
    _SPLIT_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=4, num_stages=s)
                      for bn, bk, s in ((16, 128, 4), (16, 256, 3), (32, 128, 4), (16, 64, 6), (64, 128, 4), (64, 64, 6))]
    # Timed by graph_bench (CUDA graph, L2 flushed before each launch): Triton's default benchmark times launches one
    # by one, so at ~15 us per kernel the host's launch cost (~20-60 us here) was what it measured and the pick was
    # arbitrary (benchmarks/bench_tiles.py, H200: up to 1.6x between the pick and the best tile at 32 rows).
    _gemv_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K", "BM"], do_bench=graph_bench)(_gemv_kernel)
    _gemv_split_tuned = triton.autotune(configs=_SPLIT_CONFIGS, key=["N", "K", "BM", "K_SPLIT"],
                                        do_bench=graph_bench)(_gemv_kernel)
    _res_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K", "BM"], do_bench=graph_bench)(_gemv_res_kernel)
    _res_split_tuned = triton.autotune(configs=_SPLIT_CONFIGS, key=["N", "K", "BM", "K_SPLIT"],
                                       do_bench=graph_bench)(_gemv_res_kernel)
    _norm_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K", "BM"], do_bench=graph_bench)(_gemv_norm_kernel)


FP32_PRECISIONS = ("fma", "tf32x3")


def fp32_precision() -> str:
    """GDNSPEC_FP32_GEMV: how the GEMV kernels multiply float32 activations. "fma" (the default): float32 products
    and sums on the CUDA cores, each thread keeping running (row, column, k) sums that the tile reduces once after
    the K loop, with narrow column blocks (fma_tile) so that ~100+ programs stream the weight at once. "tf32x3": the
    tl.dot of three TF32 tensor-core products (about float32 accuracy; stop 21's path). Anything else raises a
    ValueError naming the variable."""
    v = os.environ.get("GDNSPEC_FP32_GEMV") or "fma"
    if v not in FP32_PRECISIONS:
        raise ValueError(f"GDNSPEC_FP32_GEMV must be one of {FP32_PRECISIONS} (unset = fma), got {v!r}")
    return v


def fp32_path(M: int, N: int) -> str | None:
    """How CUDA runs a float32 product of M rows and N output columns: "fma", "tf32x3" (the GEMV kernels with that
    PREC) or None (cuBLAS), by GDNSPEC_FP32_GEMV (fp32_precision) and the table above FP32_CUDA_MIN_ROWS."""
    if fp32_precision() == "tf32x3":
        return "tf32x3" if FP32_CUDA_MIN_ROWS <= M <= FP32_CUDA_MAX_ROWS else None
    if M == 1:
        return "fma" if N < FP32_TF32_MIN_N else None
    if 2 <= M <= FP32_CUDA_MAX_ROWS:
        return "fma" if (N < FP32_TF32_MIN_N or M < 4) else "tf32x3"
    return None


def f32_args(x: torch.Tensor, N: int) -> dict:
    """F32 / PREC of a GEMV launch on x (..., K) for N output columns. CUDA float32: fp32_path's ("fma" or "tf32x3").
    float32 under the interpreter: "fma" (so CI runs the CUDA default's code) or, with GDNSPEC_FP32_GEMV=tf32x3,
    an 'ieee' tl.dot (the interpreter has no TF32). Other dtypes: off CUDA (the interpreter runs them in float32) an
    'ieee' tl.dot, on CUDA bf16 / fp16 the native tensor-core dot."""
    if x.dtype == torch.float32:
        if x.is_cuda:
            K = x.shape[-1]
            return {"F32": True, "PREC": fp32_path(x.numel() // K if K else 0, N) or "tf32x3"}
        return {"F32": True, "PREC": "fma" if fp32_precision() == "fma" else "ieee"}
    return {"F32": not x.is_cuda, "PREC": "ieee"}


def row_block(M: int, prec: str) -> int:
    """BM, the M rows padded to one tile: the next power of two >= 2 for the "fma" path (its (BM, BN, BK) running
    sums are registers: no padding to a tensor-core tile), else 16 / 32 / 64 (tl.dot's tiles)."""
    if prec == "fma":
        return max(2, triton.next_power_of_2(M)) if HAS_TRITON else 2
    return 16 if M <= 16 else (32 if M <= 32 else 64)


def fma_tile(N: int, M: int, *, min_bn: int = 4) -> tuple[int, int, int, int]:
    """(BN, BK, num_warps, num_stages) of an "fma" launch of M rows and N output columns. Narrow column blocks, so
    that 100-500 programs stream the weight at once: BN 4 (8 above 4096 columns; at least min_bn, the residual
    kernel's 16-column sum-of-squares groups need 16). BK as wide as the (BM, BN, BK) running sums allow (<= 256):
    few K steps, each a full HBM round trip. Up to 1536 columns (<= 384 programs) 4 warps and 128 registers a thread
    for the sums; wider weights (more programs than fit at once with that) 2 warps and 64 registers.

    Measured on an H200 with the weight streamed from HBM (bench_small_gemm.py --fma-sweep-rows 1,5,16 --cold,
    results/stop22/small_gemm_fma_cold_H200.json; 19 tiles per shape): the best or within 2% of the best tile on every
    shape of the bundle at 1, 5 and 16 rows but the 8192-column lm_head at 5 and 16 rows (9.9 / 12.1 us, which
    fp32_path gives to tf32x3 at 4+ rows, ~6 us)."""
    BM = max(2, triton.next_power_of_2(M))
    bn = max(min_bn, 4 if N <= 4096 else 8)
    warps, regs = (4, 128) if N <= 1536 else (2, 64)
    bk = max(16, min(256, (regs * 32 * warps) // (BM * bn)))
    return bn, bk, warps, 2


def autotune_enabled() -> bool:
    """GDNSPEC_GEMV_AUTOTUNE=1: Triton's autotuner (timed by graph_bench) picks each GEMV's tile per shape instead of
    `gemv_tile`'s table. Off by default: even timed in CUDA graphs its picks varied from process to process and
    missed the best tile by up to 1.6x on an H200 (benchmarks/bench_tiles.py), and a step's speed then depended on
    the run. The float32 "fma" path always takes fma_tile (the autotuner's configs are tl.dot tiles). Any value but unset / "" / 0 / 1 raises ValueError (a typo such as "true" must not silently A/B the
    table against itself)."""
    return flag("GDNSPEC_GEMV_AUTOTUNE", default=False)


def gemv_tile(N: int, K: int, M: int, splits: int, *, f32: bool = False, fma: bool = False,
              min_bn: int = 4) -> tuple[int, int, int, int]:
    """(BN, BK, num_warps, num_stages) of a GEMV launch with N output columns, K inputs, M rows, `splits` K ranges
    (0: the normed kernel, which never splits). The best or within 3% of the best of 12 candidate tiles on every
    shape of the 1.7B decode step on an H200 (benchmarks/bench_tiles.py, CUDA graphs, weights streamed from HBM):

        split-K (out_proj, o_proj, down_proj)       BN 64, BK 128, 4 warps, 4 stages   (M = 1 and 32)
        N >= 16384 (lm_head)                        BN 128, BK 64, 4 warps, 4 stages   (M <= 16)
                                                    BN 128, BK 128, 8 warps, 3 stages  (M > 16)
        others (in_proj, qkv, gate_up)              BN 32, BK 128, 4 warps, 4 stages   (M <= 16: one 16-row tile)
                                                    BN 64, BK 128, 4 warps, 4 stages   (M > 16: x re-read per program
                                                                                        halves with BN 64)

    f32 (CUDA float32, 'tf32x3' products; the shipped bundle's 384-wide shapes, benchmarks/bench_small_gemm.py
    --sweep-rows 2,5,16, results/stop21): unsplit launches of up to 8 rows take BN 32, BK 64, 4 warps, 4 stages
    (1.0-3.5 us faster than BK 128 at 2 and 5 rows on every shape; at 16 rows BK 128 was as fast or faster)."""
    if fma:
        return fma_tile(N, M, min_bn=min_bn)
    if splits > 1:
        return 64, 128, 4, 4
    if f32 and M <= 8:
        return 32, 64, 4, 4
    if N >= 16384:
        return (128, 64, 4, 4) if M <= 16 else (128, 128, 8, 3)
    return (32, 128, 4, 4) if M <= 16 else (64, 128, 4, 4)


def fallback_tiles(tile: tuple[int, int, int, int]) -> list[tuple[int, int, int, int]]:
    """The tiles `_launch` tries, in order, when `tile` does not fit the GPU (Triton OutOfResources: the table was
    measured on an H200, 227 KB of shared memory per SM; consumer cards have ~100 KB): fewer pipeline stages, then
    narrower column blocks. BK never changes, so the split-K sums stay bit-identical between small_linear_partials
    and linear_residual whatever the GPU (tl.dot tiles; the float32 "fma" path does not split K, and its residual
    kernel's wider column blocks make its sums only close to small_linear's, see the module docstring)."""
    bn, bk, warps, stages = tile
    out = [tile] + [(bn, bk, warps, s) for s in (2, 1) if s < stages]
    while bn > 16:
        bn //= 2
        out.append((bn, bk, 4, 2))
    return out


_TILES: dict = {}  # (kernel, N, K, M, splits, device) -> the tile that launched (after any fallback)


def _launch(kernel, tuned, N: int, K: int, M: int, splits: int, args: tuple, kw: dict, *, min_bn: int = 4) -> None:
    """One CUDA launch of a GEMV kernel: the tile of `gemv_tile` (or the first of its `fallback_tiles` that fits the
    GPU, remembered per shape), or the autotuner's (GDNSPEC_GEMV_AUTOTUNE=1). min_bn: the narrowest column block the
    kernel takes (the "fma" tiles' BN; the residual kernel's sum-of-squares groups need GROUP)."""
    cols = max(1, splits)
    if autotune_enabled() and kw.get("PREC") != "fma":  # the autotuner's tiles are tl.dot tiles: fma takes fma_tile
        tuned[lambda meta: (triton.cdiv(N, meta["BN"]), cols) if splits else (triton.cdiv(N, meta["BN"]),)](*args, **kw)
        return
    x = args[0]  # the tile depends on the activation dtype (float32: f32_args) and the SiLU loads too
    dtype = getattr(x, "dtype", None)
    key = (kernel, N, K, M, splits, getattr(x, "device", None), dtype, kw.get("SILU", False), kw.get("PREC"))
    tiles = [_TILES[key]] if key in _TILES else fallback_tiles(gemv_tile(N, K, M, splits, f32=dtype == torch.float32,
                                                                        fma=kw.get("PREC") == "fma", min_bn=min_bn))
    for i, (bn, bk, warps, stages) in enumerate(tiles):
        grid = (triton.cdiv(N, bn), cols) if splits else (triton.cdiv(N, bn),)
        try:
            kernel[grid](*args, **kw, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
        except OutOfResources:
            if i == len(tiles) - 1:
                raise
            continue
        _TILES[key] = (bn, bk, warps, stages)
        return


def fp32_rows_ok(M: int, N: int) -> bool:
    """Whether a CUDA float32 product of M rows and N output columns runs the Triton kernels (fp32_path)."""
    return fp32_path(M, N) is not None


def _cuda_rows_ok(x: torch.Tensor, M: int, N: int) -> bool:
    """The device / dtype / shape rule of the kernels (kernel_applies and split_count share it): anything off CUDA
    (the interpreter), CUDA bf16 / fp16, and CUDA float32 where fp32_rows_ok."""
    return (not x.is_cuda or x.dtype in (torch.bfloat16, torch.float16)
            or (x.dtype == torch.float32 and fp32_rows_ok(M, N)))


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the GEMV kernels of this module take x (..., K) @ weight^T: Triton on x's device, the kernels on
    (GDNSPEC_TRITON_GEMV), 1 .. MAX_ROWS rows, a contiguous weight, x and weight alike in bf16 / fp16 / float32
    (CUDA float32 where fp32_path takes the shape, by rows and output columns: the others stay with cuBLAS). Shapes
    are checked by the callers."""
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    return (HAS_TRITON and enabled() and available(x) and 1 <= M <= MAX_ROWS and weight.is_contiguous()
            and _act_dtypes_ok(x, weight) and _cuda_rows_ok(x, M, weight.shape[0]))


def _rows_of(x: torch.Tensor, K: int, silu: bool) -> tuple[torch.Tensor, int]:
    """(x as (M, K) rows, or (M, 2K) [gate | up] rows with silu, last dim contiguous; M)."""
    width = 2 * K if silu else K
    M = x.numel() // width if width else 0
    x2 = x.reshape(M, width)
    return (x2 if x2.stride(-1) == 1 else x2.contiguous()), M


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 silu: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., K) with at most MAX_ROWS rows, by the Triton kernel on CUDA bf16/fp16
    (float32 where fp32_rows_ok; and under TRITON_INTERPRET for tests); F.linear otherwise. weight (N, K) contiguous.
    silu=True: x is (..., 2K) [gate | up] and the product is silu_mul(x) @ weight^T (see silu_fusable)."""
    if silu:
        if not silu_fusable(x, weight):
            raise ValueError(f"small_linear(silu=True) needs GDNSPEC_SILU_GEMV=1 and x (..., 2K) [gate | up] for a "
                             f"(N, K) weight that the kernel takes (silu_fusable), got x {tuple(x.shape)}, weight "
                             f"{tuple(weight.shape)}, GDNSPEC_SILU_GEMV {'on' if silu_enabled() else 'off'}")
        K = weight.shape[1]
    else:
        K = x.shape[-1]
        if not kernel_applies(x, weight):
            return F.linear(x, weight, bias)
    N = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must have shape (N, K) with K = {K} (x's last dim), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape (N,) = ({N},), got {tuple(bias.shape)}")
    x2, M = _rows_of(x, K, silu)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    f32 = f32_args(x2, N)
    args = (x2, x2.stride(0), weight, bias if bias is not None else weight, y, y.stride(0), M, N, K, K)
    kw = dict(HAS_BIAS=bias is not None, **f32, BM=row_block(M, f32["PREC"]), SILU=silu)
    if x.is_cuda:
        _launch(_gemv_kernel, _gemv_tuned, N, K, M, 1, args, {**kw, **_launch_args(x, N, K)})
    else:  # interpreter: one fixed configuration
        _gemv_kernel[(triton.cdiv(N, 16), 1)](*args, **kw, BN=16, BK=64)
    return y.view(*x.shape[:-1], N)


def silu_enabled() -> bool:
    """GDNSPEC_SILU_GEMV: "1" the SwiGLU SiLU-mul in the down projection's loads (silu_fusable), "0" / unset (the
    DEFAULT) the separate silu_mul launch. Off because it measured SLOWER on an H200 (1.7B config, bf16,
    bench_e2e, results/stop21): decode B = 1 2.08 ms against 1.36 ms, verify N = 16 at B = 1 2.64 against 1.77 ms
    (same run, --ab-env). The down projection's K loop then computes the SiLU of a padded 16-row tile in every column
    program and its weight stream stalls behind it; kept, tested, as the starting point for a version that
    computes the activation once. Anything else raises a ValueError naming the variable."""
    return flag("GDNSPEC_SILU_GEMV", default=False)


def silu_fusable(gate_up: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the GEMV kernels take silu_mul(gate_up) @ weight^T with the SiLU-mul in their loads (small_linear /
    small_linear_partials / silu_linear_for_residual with silu=True): the switch on (silu_enabled), gate_up (..., 2K)
    [gate | up] with a contiguous last dim, weight (N, K), and the kernels take the (..., K) product (kernel_applies)."""
    if not (isinstance(gate_up, torch.Tensor) and weight.dim() == 2 and gate_up.dim() >= 1 and silu_enabled()):
        return False
    K = weight.shape[1]
    return gate_up.shape[-1] == 2 * K and gate_up.stride(-1) == 1 and kernel_applies(gate_up[..., :K], weight)


def split_count(x: torch.Tensor, weight: torch.Tensor) -> int:
    """How many K splits `small_linear_partials` uses for this product (1: no split, take `small_linear`): tall-K
    weights with few output columns (out_proj, o_proj, down_proj: K >= 2N) split K so that ~4 programs run per SM."""
    N, K = weight.shape
    M = x.numel() // K if K else 0
    if not (x.is_cuda or available(x)) or not enabled() or not HAS_TRITON or M == 0 or M > 32:
        return 1
    forced = int(os.environ.get("GDNSPEC_GEMV_SPLITS", "0"))  # tests: force a split count on any shape
    if forced > 0:
        return forced
    if K < 2 * N:
        return 1
    if not _cuda_rows_ok(x, M, N) or (x.dtype == torch.float32 and f32_args(x, N)["PREC"] == "fma"):
        return 1  # the fma path's narrow column blocks already keep every SM busy (fma_tile)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8
    return int(max(1, min(8, (4 * sms) // max(1, triton.cdiv(N, 16)), K // 512)))


def small_linear_partials(x: torch.Tensor, weight: torch.Tensor, splits: int, *, silu: bool = False) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T as `splits` float32 partial sums (splits, ..., N) over K ranges; their sum is
    F.linear(x, weight) before rounding. The consumer (`add_rms_norm(..., partials=True)`) adds them up, so the
    split-K reduction costs no extra launch. silu=True: x is (..., 2K) [gate | up], the product silu_mul(x) @ W^T."""
    N = weight.shape[0]
    K = weight.shape[1] if (silu and weight.dim() == 2) else x.shape[-1]
    M = x.numel() // ((2 if silu else 1) * K) if K else 0
    if not 1 <= M <= 32:
        raise ValueError(f"small_linear_partials takes 1 to 32 rows (one tile), got {M} rows of x {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != K or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous (N, K) matrix with K = {K}, got {tuple(weight.shape)}")
    if silu and x.shape[-1] != 2 * K:
        raise ValueError(f"silu=True needs x (..., 2K) = (..., {2 * K}) [gate | up], got {tuple(x.shape)}")
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    x2, M = _rows_of(x, K, silu)
    k_split = triton.cdiv(triton.cdiv(K, splits), 256) * 256
    splits = triton.cdiv(K, k_split)
    y = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    f32 = f32_args(x2, N)
    args = (x2, x2.stride(0), weight, weight, y, N, M, N, K, k_split)
    kw = dict(HAS_BIAS=False, **f32, BM=row_block(M, f32["PREC"]), SILU=silu)
    if x.is_cuda:
        _launch(_gemv_kernel, _gemv_split_tuned, N, K, M, splits, args, {**kw, **_launch_args(x, N, k_split)})
    else:
        _gemv_kernel[(triton.cdiv(N, 16), splits)](*args, **kw, BN=16, BK=64)
    return y.view(splits, *x.shape[:-1], N)


def linear_for_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """The output projection of a block whose result goes straight into `add_rms_norm`: float32 split-K partials
    (splits, ..., N) where that pays (see `split_count`), else `small_linear`'s (..., N) tensor. add_rms_norm accepts
    both (partials=True when x.dim() is one more than the residual's)."""
    if bias is None:
        s = split_count(x, weight)
        if s > 1 and weight.is_contiguous() and x.dtype == weight.dtype:
            return small_linear_partials(x, weight, s)
    return small_linear(x, weight, bias)


def silu_linear_for_residual(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """`linear_for_residual(elementwise.silu_mul(gate_up), weight, bias)` in ONE launch: the SwiGLU MLP's SiLU-mul
    done in the down projection's loads (gate_up (..., 2K) [gate | up], weight (N, K); needs silu_fusable). The
    same tile, K ranges and rounding points as the two launches, so the same numbers bit for bit (tested)."""
    K = weight.shape[1]
    if bias is None:
        s = split_count(gate_up[..., :K], weight)
        if s > 1 and weight.is_contiguous():
            return small_linear_partials(gate_up, weight, s, silu=True)
    return small_linear(gate_up, weight, bias, silu=True)


# ------------------------------------------------------------------------------------------------------------------
# Residual add + RMSNorm folded into the GEMVs around it (GDNSPEC_NORM_GEMV; ops/fused/normed.py wires them up)

GROUP = 16  # columns per sum-of-squares slot: linear_residual's sumsq is (M, ceil(N / GROUP)), whatever BN runs


def _act_dtypes_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The dtypes the GEMV kernels run: x and weight alike, bf16 / fp16 / float32 (the dispatchers leave the CUDA
    float32 shapes that fp32_path gives to cuBLAS there)."""
    return x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def linear_residual_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch `linear_residual`: h = round(round(x @ W^T + b) + residual) in x's dtype, computed in float32
    (float64 for float64), and the sums of squares of h over 16-column groups (M, ceil(N / 16)) in that dtype."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.linear(x.to(cdt), weight.to(cdt), None if bias is None else bias.to(cdt)).to(x.dtype)
    h = (y.to(cdt) + residual.to(cdt)).to(x.dtype)
    N = h.shape[-1]
    G = triton.cdiv(N, GROUP) if HAS_TRITON else -(-N // GROUP)
    hf = F.pad(h.reshape(-1, N).to(cdt), (0, G * GROUP - N))
    return h, hf.square().reshape(-1, G, GROUP).sum(-1)


def normed_linear_reference(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, offset: bool,
                            weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch `normed_linear`: x = rmsnorm(h) * (1 + w or w) (F.rms_norm in float32, rounded to h's dtype, as
    RMSNorm does), then F.linear(x, weight, bias) in float32, rounded to h's dtype."""
    from gdnspec.ops.fused.elementwise import add_rms_norm_reference

    x = add_rms_norm_reference(h, residual=None, weight=norm_weight, eps=eps, offset=offset)[0]
    cdt = torch.float64 if h.dtype == torch.float64 else torch.float32
    return F.linear(x.to(cdt), weight.to(cdt), None if bias is None else bias.to(cdt)).to(h.dtype)


def _check_matrix(weight: torch.Tensor, K: int, bias: torch.Tensor | None, what: str) -> int:
    if weight.dim() != 2 or weight.shape[1] != K or not weight.is_contiguous():
        raise ValueError(f"{what}: weight must be a contiguous (N, K) matrix with K = {K}, got {tuple(weight.shape)}")
    N = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"{what}: bias must have shape (N,) = ({N},), got {tuple(bias.shape)}")
    return N


def linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, *,
                    splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An output projection with the residual add fused into its epilogue, ONE launch:

        h = round(round(x @ W^T + b) + residual)       x (..., K), weight (N, K), bias (N,) or None,
                                                        residual (..., N); h (..., N) in x's dtype
        sumsq[m, j] = sum of h[m, 16 j : 16 j + 16]^2   (M, ceil(N / 16)) float32, of the ROUNDED h

    Same rounding points as small_linear / small_linear_partials followed by add_rms_norm (the sum over K in
    float32, rounded to the activation dtype, the residual added in float32, rounded); sumsq lets the consumer
    (`normed_linear`) normalise h without a pass of its own. `splits` K ranges (None: `split_count`; forced by
    GDNSPEC_GEMV_SPLITS) run as separate programs whose float32 partial sums the last one to arrive adds in the fixed
    order 0 .. S-1 (deterministic, no float atomics; int32 arrival counters from ops/fused/_sync.py that every launch
    leaves zeroed, so the launch is CUDA-graph safe). M = x.numel() / K rows, 1 .. MAX_ROWS (1 .. 32 with splits);
    other shapes raise ValueError. Where Triton cannot run (CPU without TRITON_INTERPRET, float64):
    `linear_residual_reference`."""
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    N = _check_matrix(weight, K, bias, "linear_residual")
    if tuple(residual.shape) != (*x.shape[:-1], N) or residual.dtype != x.dtype:
        raise ValueError(f"linear_residual: residual must have shape {(*x.shape[:-1], N)} and dtype {x.dtype}, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    if not available(x) or x.dtype == torch.float64:
        return linear_residual_reference(x, weight, bias, residual)
    if not _act_dtypes_ok(x, weight):
        raise ValueError(f"linear_residual: x and weight must share a bf16 / fp16 / fp32 dtype, got {x.dtype} and "
                         f"{weight.dtype}")
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"linear_residual takes 1 to {MAX_ROWS} rows, got {M} rows of x {tuple(x.shape)}")
    S = split_count(x, weight) if splits is None else splits
    if S < 1:
        raise ValueError(f"splits must be >= 1, got {S}")
    k_split = triton.cdiv(triton.cdiv(K, S), 256) * 256 if S > 1 else K
    S = triton.cdiv(K, k_split) if K else 1
    if S > 1 and M > 32:
        raise ValueError(f"linear_residual splits K for 1 to 32 rows (one tile), got {M} rows of x {tuple(x.shape)}")
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = residual.reshape(M, N)
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    G = triton.cdiv(N, GROUP)
    h = torch.empty(M, N, dtype=x.dtype, device=x.device)
    ssq = torch.empty(M, G, dtype=torch.float32, device=x.device)
    if S > 1:  # scratch: torch.empty (no memset; inside a CUDA graph capture it comes from the graph's pool)
        part = torch.empty(S, M, N, dtype=torch.float32, device=x.device)
        counter = arrival_counters(G, x.device)  # one per column block; BN >= GROUP
    else:
        part, counter = h, h
    f32 = f32_args(x2, N)
    args = (x2, x2.stride(0), weight, bias if bias is not None else weight, r2, r2.stride(0), h, h.stride(0), ssq,
            part, counter, M, N, K, k_split, G)
    kw = dict(HAS_BIAS=bias is not None, SPLIT=S > 1, **f32, BM=row_block(M, f32["PREC"]))
    if x.is_cuda:
        _launch(_gemv_res_kernel, _res_split_tuned if S > 1 else _res_tuned, N, K, M, S, args,
                {**kw, **_launch_args(x, N, k_split)}, min_bn=GROUP)
    else:  # interpreter: the configuration small_linear / small_linear_partials use there (bit-identical sums)
        _gemv_res_kernel[(triton.cdiv(N, 16), S)](*args, **kw, BN=16, BK=64)
    return h.view(*x.shape[:-1], N), ssq


def normed_linear(h: torch.Tensor, sumsq: torch.Tensor, norm_weight: torch.Tensor, eps: float, offset: bool,
                  weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm folded into the GEMV that reads it, ONE launch:

        y = (rmsnorm(h) * (1 + norm_weight or norm_weight)) @ W^T + b
        h (..., D) the residual stream, sumsq (M, ceil(D / 16)) float32 from `linear_residual`, norm_weight (D,),
        weight (N, D), bias (N,) or None -> y (..., N) in h's dtype

    Each program computes rstd = rsqrt(sum(sumsq[m]) / D + eps) (fixed order) and normalises every (rows, BK) chunk
    of h on the fly, rounding the normalised value to the activation dtype where RMSNorm does (F.rms_norm in float32,
    then .to(dtype)) before the product: `add_rms_norm` + `small_linear` without the normalised tensor in memory.
    M rows 1 .. MAX_ROWS, other shapes raise ValueError. Reference (and where Triton cannot run):
    `normed_linear_reference`."""
    D = h.shape[-1]
    M = h.numel() // D if D else 0
    N = _check_matrix(weight, D, bias, "normed_linear")
    G = triton.cdiv(D, GROUP) if HAS_TRITON else -(-D // GROUP)
    if tuple(norm_weight.shape) != (D,):
        raise ValueError(f"normed_linear: norm_weight must have shape (D,) = ({D},), got {tuple(norm_weight.shape)}")
    if tuple(sumsq.shape) != (M, G) or sumsq.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"normed_linear: sumsq must be float32 (M, ceil(D / 16)) = {(M, G)}, got {sumsq.dtype} "
                         f"{tuple(sumsq.shape)}")
    if not available(h) or h.dtype == torch.float64:
        return normed_linear_reference(h, norm_weight, eps, offset, weight, bias)
    if not _act_dtypes_ok(h, weight) or sumsq.dtype != torch.float32:
        raise ValueError(f"normed_linear: h and weight must share a bf16 / fp16 / fp32 dtype and sumsq be float32, "
                         f"got {h.dtype}, {weight.dtype}, {sumsq.dtype}")
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"normed_linear takes 1 to {MAX_ROWS} rows, got {M} rows of h {tuple(h.shape)}")
    h2 = h.reshape(M, D)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    ssq = sumsq if sumsq.is_contiguous() else sumsq.contiguous()
    y = torch.empty(M, N, dtype=h.dtype, device=h.device)
    f32 = f32_args(h2, N)
    args = (h2, h2.stride(0), ssq, norm_weight, weight, bias if bias is not None else weight, y, y.stride(0), M, N, D,
            G, float(eps))
    kw = dict(OFFSET=bool(offset), HAS_BIAS=bias is not None, **f32, BM=row_block(M, f32["PREC"]),
              BG=min(64, triton.next_power_of_2(G)))
    if h.is_cuda:
        _launch(_gemv_norm_kernel, _norm_tuned, N, D, M, 0, args, {**kw, **_launch_args(h, N, D)})
    else:
        _gemv_norm_kernel[(triton.cdiv(N, 16),)](*args, **kw, BN=16, BK=64)
    return y.view(*h.shape[:-1], N)
