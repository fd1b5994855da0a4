"""Programmatic dependent launch (PDL) for the Triton kernels of the decode and verify steps (Hopper and newer).

A decode step is a chain of ~200 small kernels. Launched plainly (also inside a CUDA graph), each kernel starts only
after the one before it has finished and drained: the GPU idles ~0.6 us per boundary (H200, 1.7B bf16: 1.38 ms of
kernel time in a 1.51 ms graph replay), and a memory-bound kernel streams nothing during its own ramp-up. With PDL
(CUDA >= 12.3, sm_90+; Triton's `launch_pdl` launch option and `tl.extra.cuda.gdc_*` instructions) a kernel launched
with the programmatic-stream-serialization attribute may start while its predecessor still runs:

    griddepcontrol.launch_dependents   (gdc_launch_dependents) the next kernel may launch now
    griddepcontrol.wait                (gdc_wait)              block until the previous kernel has COMPLETED and its
                                                               memory operations are visible

Rules every PDL kernel of gdnspec follows (so that ordering stays transitive along the stream: a kernel completes only
after its wait returned, i.e. after its predecessor completed):

1. every program calls `enter(PDL)` unconditionally, before its first store and before any load of data a previous
   kernel may have written (activations, states, caches, counters) or may still read (buffers the allocator reuses);
2. only loads of weights (never written while steps run) may come before it, e.g. `prefetch_l2` of the GEMV slab:
   the weight stream of the next GEMV starts during the tail of the kernel before it.

Kernels that know nothing of PDL (torch ops, cuBLAS) launch without the attribute and serialise as usual. CUDA graph
capture records the programmatic edges. Off (plain launches, `PDL=False`: the same instructions minus gdc_*) on the
CPU / under TRITON_INTERPRET, before sm_90, with a Triton that lacks gdc_wait, and when GDNSPEC_PDL=0 (A/B switch).
GDNSPEC_PDL_PREFETCH=1 adds the GEMV weight prefetch of rule 2 (opt-in: measured slower, see below).

    @triton.jit
    def _kernel(..., PDL: tl.constexpr):
        pdl.enter(PDL)
        ...
    _kernel[grid](..., **pdl.launch_args(x))           # {"PDL": True, "launch_pdl": True} or {"PDL": False}

Measured (H200, 1.7B bf16, graph replay, one session; benchmarks/results/ab_pdl_H200.md): decode step at B = 1 /
8 / 32: 1.47 / 1.79 / 2.58 ms with plain launches, 1.39 / 1.81 / 2.56 ms with PDL, 1.45 / 1.85 / 2.83 ms with PDL and
the weight prefetch (the prefetched lines compete with the running kernel's stream and are partly evicted before use);
verify N = 16: 2.37 / 3.62 / 8.11 ms plain, 2.12 / 3.57 / 8.16 ms with PDL.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        HAS_GDC = True
    except ImportError:  # pragma: no cover - Triton < 3.4
        HAS_GDC = False
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = HAS_GDC = False

__all__ = ["HAS_GDC", "enabled", "launch_args", "prefetch_enabled"]


@functools.lru_cache(maxsize=None)
def _device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(tensor: torch.Tensor) -> bool:
    """Whether kernels launched for `tensor` use PDL: a CUDA tensor on sm_90+, Triton with gdc_wait, not under
    TRITON_INTERPRET, GDNSPEC_PDL not "0"."""
    if not (HAS_GDC and tensor.is_cuda) or os.environ.get("GDNSPEC_PDL", "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return _device_ok(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device())


def prefetch_enabled(tensor: torch.Tensor) -> bool:
    """Whether the GEMV kernels prefetch their first weight columns into L2 before `enter`: PDL on and
    GDNSPEC_PDL_PREFETCH=1 (off by default: measured slower, see the module docstring)."""
    return enabled(tensor) and os.environ.get("GDNSPEC_PDL_PREFETCH", "0") == "1"


def launch_args(tensor: torch.Tensor) -> dict:
    """Keyword arguments for a PDL-aware kernel launch on `tensor`'s device: the PDL constexpr and Triton's
    `launch_pdl` launch option when PDL is on, PDL=False otherwise."""
    if enabled(tensor):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


if HAS_TRITON:

    @triton.jit
    def enter(PDL: tl.constexpr):
        """Wait for the previous kernel of the stream to complete, then let the next one launch (rule 1 above).
        A no-op when PDL is False (plain launches, the interpreter)."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def prefetch_l2(ptrs):
        """Ask L2 for the 128-byte lines at `ptrs` (any shape; in-bounds addresses only): `prefetch.global.L2`, no
        registers written, nothing waited for. For weights only (rule 2): call it before `enter`."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)
