"""Counter-based uniforms (sampling.counter_uniforms) as ONE Triton kernel.

    u = counter_uniforms_fused(seeds, counters, slot=0, n=1)     # (B, n) float64 in [0, 1), bit for bit the torch form

Why: every sampled static step (plain decoding, the speculative bonus token, each node's acceptance test, a stochastic
tree's draws) takes its uniforms from `sampling.counter_uniforms`, a pure function of (seed, counter, slot, index)
written as int64 torch ops: five lowbias32 hashes of ~20 elementwise ops each, ~150 kernel launches per call. In a
CUDA graph each is a ~1.5-2 us launch, so on an H200 a sampled plain decode step of the shipped bundle cost ~0.5 ms
against 0.2 ms greedy (`gdnspec eval --temperature 0.7`: plain 2017 tokens/s against 5024). Here one program per
(row, block of indices) runs the same integer ops (int64, no overflow: the same values as the torch form, so the same
bits; tests/test_uniforms.py compares them under TRITON_INTERPRET=1).

The torch form in sampling.py stays the reference and the path wherever this kernel does not run (the CPU,
GDNSPEC_FUSED_UNIFORMS=0 for A/B).
"""
from __future__ import annotations

import os

import torch

from gdnspec.ops._env import flag
from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON, available

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["counter_uniforms_fused", "enabled", "runs_on"]

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DISPATCH_ON_CPU = False  # CPU tensors take the kernel (through the interpreter) only when a test sets this
_BLOCK = 128


def enabled() -> bool:
    """GDNSPEC_FUSED_UNIFORMS: "1" (default) or "0"; anything else raises a ValueError naming the variable."""
    return flag("GDNSPEC_FUSED_UNIFORMS", default=True)


def runs_on(t: torch.Tensor) -> bool:
    """Whether counter_uniforms takes the kernel for seeds like `t`: Triton, a CUDA tensor (CPU tensors only in the
    kernel tests: DISPATCH_ON_CPU under TRITON_INTERPRET=1), GDNSPEC_FUSED_UNIFORMS not 0."""
    if not (HAS_TRITON and enabled()):
        return False
    return t.is_cuda or (DISPATCH_ON_CPU and _INTERPRETED and available(t))


if HAS_TRITON:
    @triton.jit
    def _mul32(x, m: tl.constexpr):
        """(x * m) mod 2**32 for int64 x in [0, 2**33) by 16-bit halves, as sampling._mul32 (no int64 overflow)."""
        lo = x & 0xFFFF
        hi = x >> 16
        return (lo * m + (((hi * m) & 0xFFFF) << 16)) & 0xFFFFFFFF

    @triton.jit
    def _hash32(x):
        """lowbias32 (Wellons) on int64 values, as sampling._hash32."""
        x = x ^ (x >> 16)
        x = _mul32(x, 0x7FEB352D)
        x = x ^ (x >> 15)
        x = _mul32(x, 0x846CA68B)
        return x ^ (x >> 16)

    @triton.jit
    def _uniforms_kernel(seeds_ptr, counters_ptr, out_ptr, n, base, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        blk = tl.program_id(1)
        s = tl.load(seeds_ptr + row).to(tl.int64)
        c = tl.load(counters_ptr + row).to(tl.int64)
        key = _hash32((s & 0xFFFFFFFF) ^ _hash32(((s >> 32) & 0xFFFFFFFF) ^ 0x2545F491))
        key = _hash32(key ^ (c & 0xFFFFFFFF))
        idx = blk * BLOCK + tl.arange(0, BLOCK)
        j = base + idx.to(tl.int64)  # (slot << 16) + index
        w1 = _hash32(key ^ _hash32(2 * j))
        w2 = _hash32(key ^ _hash32(2 * j + 1))
        u = ((w1 << 21) + (w2 >> 11)).to(tl.float64) * (1.0 / 9007199254740992.0)  # 53 bits / 2**53, exact
        tl.store(out_ptr + row * n + idx, u, mask=idx < n)


def counter_uniforms_fused(seeds: torch.Tensor, counters: torch.Tensor, *, slot: int, n: int) -> torch.Tensor:
    """sampling.counter_uniforms in one launch: seeds (B,) int64 >= 0, counters (B,) int64 on the same device, slot
    (0 <= slot < 2**15), n >= 0 -> (B, n) float64 on seeds' device. Raises ValueError for other shapes or ranges
    (the torch form broadcasts; this kernel would read past the buffers)."""
    if seeds.dim() != 1 or tuple(counters.shape) != tuple(seeds.shape) or counters.device != seeds.device:
        raise ValueError(f"seeds and counters must be (B,) on one device, got {tuple(seeds.shape)} on {seeds.device} "
                         f"and {tuple(counters.shape)} on {counters.device}")
    if not (isinstance(slot, int) and 0 <= slot < 2**15 and isinstance(n, int) and n >= 0):
        raise ValueError(f"slot must be an int in [0, 2**15) and n an int >= 0, got slot={slot!r}, n={n!r}")
    B = seeds.shape[0]
    out = torch.empty(B, n, dtype=torch.float64, device=seeds.device)
    if B == 0 or n == 0:
        return out
    s = seeds if seeds.dtype == torch.long and seeds.is_contiguous() else seeds.to(torch.long).contiguous()
    c = counters if counters.dtype == torch.long and counters.is_contiguous() else counters.to(torch.long).contiguous()
    _uniforms_kernel[(B, triton.cdiv(n, _BLOCK))](s, c, out, n, slot << 16, BLOCK=_BLOCK)
    return out
