"""The benchmark function the fused kernels' Triton autotuners time their candidate configurations with.

    triton.autotune(configs=..., key=[...], do_bench=graph_bench)(kernel)

Triton's default benchmark launches the kernel call by call between CUDA events. The decode-step kernels run for
5-40 us, while one Python launch of a Triton kernel costs 20-60 us of host time, so the events measured the host and
the autotuner's pick was close to arbitrary (benchmarks/bench_tiles.py on an H200: the pick up to 1.5x slower than
the best candidate at 32 rows). graph_bench captures `iters` launches in one CUDA graph, each preceded by a memset
of twice the L2 cache so that every launch streams its operands from HBM as in a step, and subtracts a graph of the
memsets alone: device time per launch, no host time.
"""
from __future__ import annotations

import torch

__all__ = ["graph_bench", "replay_ms"]

_FLUSH: dict = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    buf = _FLUSH.get(str(device))
    if buf is None:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20) or (64 << 20)
        buf = _FLUSH[str(device)] = torch.empty(2 * l2, dtype=torch.uint8, device=device)
    return buf


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Median milliseconds of `replays` replays of a captured CUDA graph (CUDA events around each replay)."""
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def graph_bench(kernel_call, quantiles=None, *, iters: int = 10, replays: int = 5):
    """Milliseconds per call of `kernel_call` (a no-argument launch), measured in CUDA graphs with the L2 flushed
    before each call; the median of `replays` replays. Returns a float, or [t] * len(quantiles) when the autotuner
    asks for quantiles (the graph gives one figure). Needs CUDA; not callable during a CUDA graph capture."""
    if torch.cuda.is_current_stream_capturing():
        # the autotuner ran for a new shape inside the caller's capture: synchronize / a nested capture would fail
        # there with an opaque CUDA error (and invalidate the caller's capture)
        raise RuntimeError("graph_bench (GDNSPEC_GEMV_AUTOTUNE=1) cannot time a kernel during a CUDA graph capture: "
                           "run each GEMV shape once eagerly before capturing, or unset GDNSPEC_GEMV_AUTOTUNE")
    kernel_call()  # compiles (no module load inside the capture)
    torch.cuda.synchronize()
    flush = _flush_buffer(torch.device("cuda", torch.cuda.current_device()))
    both, alone = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(alone):
        for _ in range(iters):
            flush.zero_()
    with torch.cuda.graph(both):
        for _ in range(iters):
            flush.zero_()
            kernel_call()
    both.replay()
    torch.cuda.synchronize()
    t = max(0.0, (replay_ms(both, replays) - replay_ms(alone, replays)) / iters)
    del both, alone
    return [t] * len(quantiles) if quantiles else t
