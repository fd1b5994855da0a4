"""The draft expansion's `log_softmax(logits).topk(k)` in one launch (two for vocabularies over 8192 tokens).

    vals, ids = log_softmax_topk(logits, k)   # logits (..., V) fp32 / bf16 / fp16 -> (..., k) float32 log-probs,
                                              # (..., k) int64 token ids, best first

Why: every drafting step of a tree or chain ranks the children of each frontier node by log-probability. torch runs
that as a softmax kernel and a radix-select top-k (`sbtopk::gatherTopK`), and on an H200 the top-k alone took 11-28 us
per expansion for the shipped bundle's 8192-token vocabulary (benchmarks/bench_draft.py --kernel-names, stop 21):
more than the head's whole layer. Here one program per (row, block of BLOCK tokens) loads its logits once, computes
their max and sum of exp (for the log-sum-exp) and takes its k best by k rounds of ONE int64 max reduction (value and
id packed in one key, ties to the lower id); with more than one block per row a second launch merges the blocks'
log-sum-exps and candidates. log_softmax values are
x - (max + log(sum exp(x - max))) in float32, as torch computes them (equal up to the last bits, not bitwise).

Ties: equal values come lowest column first (torch.topk leaves their order unspecified; -0.0 ranks below +0.0).
k <= MAX_K, k <= V and V < 2^31.

Runs on CUDA and under TRITON_INTERPRET=1 (the tests); elsewhere (the CPU, float64, k > MAX_K) the reference
`log_softmax_topk_reference`. Errors: ValueError naming `k` or `logits` for a bad k or an empty / 0-d tensor.
"""
from __future__ import annotations

import torch

from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON, available

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["MAX_K", "MAX_BLOCK", "kernel_applies", "log_softmax_topk", "log_softmax_topk_reference"]

MAX_K = 16
MAX_BLOCK = 8192  # tokens per program: one launch up to this vocabulary size


def log_softmax_topk_reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch: log_softmax over the last dim in float32 (float64 logits too, as the drafters always ranked them), then
    topk(k): (values float32, int64 ids)."""
    return torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)


if HAS_TRITON:

    @triton.jit
    def _sort_keys(vals, ids, avail):
        """One int64 key per candidate, ordered as (value, then LOWER id) so that one max reduction picks the next
        best: the float32 bits made monotonic as a signed int32 in the high word, 0x7FFFFFFF - id in the low word
        (ids < 2^31); -2^63 where not avail."""
        bits = vals.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)
        return tl.where(avail, key, -9223372036854775807 - 1)

    @triton.jit
    def _take_best(key, K: tl.constexpr, KP: tl.constexpr):
        """The K largest keys (see _sort_keys), best first, decoded: ((KP,) float32 values, (KP,) int64 ids); slots
        >= K, and slots past the candidates, hold -inf / 2^62."""
        slot = tl.arange(0, KP)
        out_v = tl.full([KP], float("-inf"), tl.float32)
        out_i = tl.full([KP], 1 << 62, tl.int64)
        for j in tl.static_range(K):
            kmax = tl.max(key, 0)
            ordered = (kmax >> 32).to(tl.int32)
            v = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
            idx = 0x7FFFFFFF - (kmax & 0xFFFFFFFF)
            real = kmax != -9223372036854775807 - 1
            out_v = tl.where(slot == j, tl.where(real, v, float("-inf")), out_v)
            out_i = tl.where(slot == j, tl.where(real, idx, 1 << 62), out_i)
            key = tl.where(key == kmax, -9223372036854775807 - 1, key)
        return out_v, out_i

    @triton.jit
    def _block_kernel(x, sx, V, out_v, out_i, part_m, part_s, C, K: tl.constexpr, KP: tl.constexpr,
                      BLOCK: tl.constexpr, SINGLE: tl.constexpr):
        """Program (row r, block c): the max, the sum of exp(x - max) and the K best of x[r, c BLOCK : (c+1) BLOCK].
        SINGLE (one block per row): the final log-probs and ids; else the block's partials for _merge_kernel."""
        r = tl.program_id(0)
        c = tl.program_id(1)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        inb = offs < V
        xv = tl.load(x + r.to(tl.int64) * sx + offs, mask=inb, other=float("-inf")).to(tl.float32)
        m = tl.max(xv, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(tl.where(inb, tl.exp(xv - m_safe), 0.0), 0)
        best_v, best_i = _take_best(_sort_keys(xv, offs, inb), K, KP)
        slot = tl.arange(0, KP)
        if SINGLE:
            lse = m_safe + tl.log(s)
            tl.store(out_v + r * K + slot, best_v - lse, mask=slot < K)
            tl.store(out_i + r * K + slot, best_i, mask=slot < K)
        else:
            tl.store(part_m + r * C + c, m)
            tl.store(part_s + r * C + c, s)
            base = (r * C + c) * KP
            tl.store(out_v + base + slot, best_v)
            tl.store(out_i + base + slot, best_i)

    @triton.jit
    def _merge_kernel(cand_v, cand_i, part_m, part_s, out_v, out_i, C, K: tl.constexpr, KP: tl.constexpr,
                      CP: tl.constexpr):
        """Program r: log-sum-exp of the row from its C blocks' (max, sum) and the K best of their C * KP candidates."""
        r = tl.program_id(0)
        cb = tl.arange(0, CP)
        mc = tl.load(part_m + r * C + cb, mask=cb < C, other=float("-inf"))
        sc = tl.load(part_s + r * C + cb, mask=cb < C, other=0.0)
        m = tl.max(mc, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        lse = m_safe + tl.log(tl.sum(sc * tl.exp(mc - m_safe), 0))
        j = tl.arange(0, CP * KP)
        ok = (j // KP < C) & (j % KP < K)
        v = tl.load(cand_v + r * C * KP + j, mask=ok, other=float("-inf"))
        ids = tl.load(cand_i + r * C * KP + j, mask=ok, other=1 << 62)
        ok = ok & (ids < (1 << 62))
        best_v, best_i = _take_best(_sort_keys(v, tl.where(ok, ids, 0), ok), K, KP)
        slot = tl.arange(0, KP)
        tl.store(out_v + r * K + slot, best_v - lse, mask=slot < K)
        tl.store(out_i + r * K + slot, best_i, mask=slot < K)


def _check(logits, k) -> int:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be a tensor (..., V) with V >= 1, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    V = logits.shape[-1]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= V:
        raise ValueError(f"k must be an int in [1, V = {V}], got {k!r}")
    return V


def kernel_applies(logits: torch.Tensor, k: int) -> bool:
    """Whether log_softmax_topk runs the kernel for these logits (else the torch reference): Triton on their device
    (CUDA, or TRITON_INTERPRET=1), float32 / bf16 / fp16, k <= MAX_K."""
    return (HAS_TRITON and available(logits) and k <= MAX_K
            and logits.dtype in (torch.float32, torch.bfloat16, torch.float16))


def log_softmax_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (..., k) float32, ids (..., k) int64): the k largest log_softmax(logits) entries of each row, best
    first (module docstring: one launch for V <= MAX_BLOCK, two above). Where the kernel does not apply
    (kernel_applies: float64 logits, k > MAX_K, a device the Triton kernels cannot run on):
    `log_softmax_topk_reference`."""
    V = _check(logits, k)
    if not kernel_applies(logits, k):
        return log_softmax_topk_reference(logits, k)
    lead = logits.shape[:-1]
    x2 = logits.reshape(-1, V)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    R = x2.shape[0]
    dev = logits.device
    out_v = torch.empty(R, k, dtype=torch.float32, device=dev)
    out_i = torch.empty(R, k, dtype=torch.int64, device=dev)
    if R == 0:
        return out_v.view(*lead, k), out_i.view(*lead, k)
    BLOCK = min(triton.next_power_of_2(V), MAX_BLOCK)
    C = triton.cdiv(V, BLOCK)
    KP = triton.next_power_of_2(k)
    warps = 8 if BLOCK >= 4096 else 4
    if C == 1:
        _block_kernel[(R, 1)](x2, x2.stride(0), V, out_v, out_i, out_v, out_v, 1, K=k, KP=KP, BLOCK=BLOCK,
                              SINGLE=True, num_warps=warps)
    else:
        cand_v = torch.empty(R, C, KP, dtype=torch.float32, device=dev)
        cand_i = torch.empty(R, C, KP, dtype=torch.int64, device=dev)
        part_m = torch.empty(R, C, dtype=torch.float32, device=dev)
        part_s = torch.empty(R, C, dtype=torch.float32, device=dev)
        _block_kernel[(R, C)](x2, x2.stride(0), V, cand_v, cand_i, part_m, part_s, C, K=k, KP=KP, BLOCK=BLOCK,
                              SINGLE=False, num_warps=warps)
        CP = triton.next_power_of_2(C)
        _merge_kernel[(R,)](cand_v, cand_i, part_m, part_s, out_v, out_i, C, K=k, KP=KP, CP=CP,
                            num_warps=4 if CP * KP <= 1024 else 8)
    return out_v.view(*lead, k), out_i.view(*lead, k)
