"""`VocabProjection`: the LM head (hidden -> vocab), with a CPU inference fast path.

On the CPU, F.linear for a large, skinny shape like the LM head (vocab x hidden weight, 1 to 16 rows) can be several
times slower than other formulations of the same product; measured on the 2-core AMD EPYC machines of this project
(torch 2.13 CPU, MKL), for an 8192 x 384 weight: 1 row 2.5 ms with F.linear vs 0.64 ms as x @ W^T (contiguous copy
of W^T), 4 rows 3.4 ms vs 0.97 ms as (W @ x^T)^T. The head is the largest matmul of a small model's decode step and
of every drafting step, so this path picks the faster form. Same product, float rounding may differ in the last
bits. float32 heads whose shape pays take oneDNN with a packed weight first (ops/cpu_linear.py; 8192 x 384 against
F.linear, benchmarks/results/stop17/cpu_linear_threads2.json: 1 row 364 -> 173 us hot, 1057 -> 511 us cold; 5 rows
709 -> 299 us hot). Autograd, CUDA and biased layers use F.linear unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from gdnspec.ops import cpu_linear as _cpu_linear


class VocabProjection(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.device.type != "cpu" or self.bias is not None or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])  # (M, hidden)
        if flat.dtype != w.dtype:
            return super().forward(x)
        y = _cpu_linear.packed_linear(flat, w, holder=self, name="_packed_w")  # oneDNN where it pays, else None
        if y is None:
            y = flat @ self._transposed() if flat.shape[0] == 1 else (w @ flat.T).T  # (M, vocab)
        return y.reshape(*x.shape[:-1], w.shape[0])

    def _transposed(self) -> torch.Tensor:
        """W^T, contiguous, cached until the weight changes (new tensor, or an in-place update of a versioned tensor)."""
        w = self.weight
        version = 0 if w.is_inference() else w._version
        key = (w.data_ptr(), w.dtype, tuple(w.shape), version)
        cached = self.__dict__.get("_wt_cache")
        if cached is None or cached[0] != key:
            cached = (key, w.detach().t().contiguous())
            self.__dict__["_wt_cache"] = cached
        return cached[1]
