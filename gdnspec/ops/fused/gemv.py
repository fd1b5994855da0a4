"""Small-batch linear layers (GEMV / skinny GEMM) in Triton, for the decode and verify steps.

    y = small_linear(x, weight)          # x (..., K) with at most MAX_ROWS rows, weight (N, K) -> (..., N)

At batch 1-32 a decode step is a chain of matrix-vector products whose cost is the weight bytes. cuBLAS picks
split-K kernels plus a reduction kernel for the tall-K shapes of out_proj / o_proj / down_proj (K >= 2N) and reaches
about half the copy bandwidth there on an H200 (benchmarks/results: profile_decode_b1.txt). This kernel gives each
program BN output columns and streams its (BN, K) weight slab once, with the M rows of x padded to one 16-row
tensor-core tile, software-pipelined over K; the configuration is picked by Triton's autotuner per (N, K, M bucket)
on the first call (before CUDA-graph capture). Reference: F.linear (used for larger M, float64, and where Triton
cannot run).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON, available

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["MAX_ROWS", "enabled", "linear_for_residual", "small_linear", "small_linear_partials", "split_count"]

MAX_ROWS = 64


def enabled() -> bool:
    """GDNSPEC_TRITON_GEMV=0 turns the kernel off (cuBLAS everywhere), for A/B measurements."""
    return os.environ.get("GDNSPEC_TRITON_GEMV", "1") != "0"


if HAS_TRITON:

    @triton.jit
    def _gemv_kernel(x, sx, w, b, y, sy, M, N, K, K_SPLIT, HAS_BIAS: tl.constexpr, F32: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)  # K split: program s covers K_SPLIT columns and writes partial sums y[s] (float32)
        rm = tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        mm = rm < M
        mn = rn < N
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        k_lo = pid_s * K_SPLIT
        y += pid_s * M * N
        for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < K
            xt = tl.load(x + rm[:, None] * sx + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
            wt = tl.load(w + rn[None, :] * K + rk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
            if F32:
                acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(xt, wt)
        if HAS_BIAS:
            if pid_s == 0:
                acc += tl.load(b + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        tl.store(y + rm[:, None] * sy + rn[None, :], acc.to(y.dtype.element_ty), mask=mm[:, None] & mn[None, :])

    _CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=4, num_stages=s)
                for bn, bk, s in ((16, 256, 4), (16, 128, 6), (32, 128, 4), (32, 256, 3), (64, 128, 4), (16, 512, 3))]
    _gemv_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K", "BM"])(_gemv_kernel)
    _SPLIT_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=4, num_stages=s)
                      for bn, bk, s in ((16, 128, 4), (16, 256, 3), (32, 128, 4), (16, 64, 6))]
    _gemv_split_tuned = triton.autotune(configs=_SPLIT_CONFIGS, key=["N", "K", "BM", "K_SPLIT"])(_gemv_kernel)


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., K) with at most MAX_ROWS rows, by the Triton kernel on CUDA bf16/fp16
    (and under TRITON_INTERPRET for tests); F.linear otherwise. weight (N, K) contiguous."""
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    use = (HAS_TRITON and enabled() and available(x) and M <= MAX_ROWS and M > 0 and weight.is_contiguous()
           and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
           and (x.dtype != torch.float32 or not x.is_cuda))
    if not use:
        return F.linear(x, weight, bias)
    N = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must have shape (N, K) with K = {K} (x's last dim), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape (N,) = ({N},), got {tuple(bias.shape)}")
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    BM = 16 if M <= 16 else (32 if M <= 32 else 64)
    args = (x2, x2.stride(0), weight, bias if bias is not None else weight, y, y.stride(0), M, N, K, K)
    kw = dict(HAS_BIAS=bias is not None, F32=x.dtype == torch.float32 or not x.is_cuda, BM=BM)
    if x.is_cuda:
        _gemv_tuned[lambda meta: (triton.cdiv(N, meta["BN"]), 1)](*args, **kw)
    else:  # interpreter: one fixed configuration
        _gemv_kernel[(triton.cdiv(N, 16), 1)](*args, **kw, BN=16, BK=64)
    return y.view(*x.shape[:-1], N)


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
    if x.dtype not in (torch.bfloat16, torch.float16) and x.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8
    return int(max(1, min(8, (4 * sms) // max(1, triton.cdiv(N, 16)), K // 512)))


def small_linear_partials(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T as `splits` float32 partial sums (splits, ..., N) over K ranges; their sum is
    F.linear(x, weight) before rounding. The consumer (`add_rms_norm(..., partials=True)`) adds them up, so the
    split-K reduction costs no extra launch."""
    K = x.shape[-1]
    N = weight.shape[0]
    M = x.numel() // K if K else 0
    if not 1 <= M <= 32:
        raise ValueError(f"small_linear_partials takes 1 to 32 rows (one tile), got {M} rows of x {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != K or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous (N, K) matrix with K = {K}, got {tuple(weight.shape)}")
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    k_split = triton.cdiv(triton.cdiv(K, splits), 256) * 256
    splits = triton.cdiv(K, k_split)
    y = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    BM = 16 if M <= 16 else 32
    args = (x2, x2.stride(0), weight, weight, y, N, M, N, K, k_split)
    kw = dict(HAS_BIAS=False, F32=x.dtype == torch.float32 or not x.is_cuda, BM=BM)
    if x.is_cuda:
        _gemv_split_tuned[lambda meta: (triton.cdiv(N, meta["BN"]), splits)](*args, **kw)
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
