"""Arrival counters for the "last program to arrive finishes the work" pattern of the fused kernels.

A kernel whose programs each produce part of a result (gdn_decode: value-column blocks of one key head; gemv's
split-K residual epilogue: K ranges of one column block) lets each program publish its part, then take a ticket:

    tl.debug_barrier()                                                   # the whole program's stores are issued
    ticket = tl.atomic_add(counter + i, 1, sem="acq_rel", scope="gpu")   # release its part, acquire the others'
    if ticket == parts - 1:                                              # the last one reads every part
        ...
        tl.store(counter + i, 0)                                         # leave the counter zeroed for the next launch

so no counter is ever zeroed by the host (no memset per step, and a CUDA graph replays the kernels as captured).
"""
from __future__ import annotations

import torch

__all__ = ["arrival_counters"]

_COUNTERS: dict = {}
_RETIRED: list = []  # superseded buffers stay alive: a captured CUDA graph may still hold their addresses


def arrival_counters(n: int, device) -> torch.Tensor:
    """At least n zeroed int32 arrival counters, cached per (device, stream): launches on one stream run one after
    another and every launch leaves its counters at zero, so all kernels of a stream share one buffer."""
    device = torch.device(device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf
