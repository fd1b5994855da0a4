"""RMS norms of the Qwen3-Next family, computed in float32 and cast back.

- RMSNorm(offset=True): x_hat * (1 + weight), weight initialised to 0 ("zero-centred", Qwen3-Next / Qwen3.5
  decoder norms, q/k norms). RMSNorm(offset=False): x_hat * weight, weight initialised to 1.
- GatedRMSNorm: the GDN output norm, x_hat * weight (init 1), then * silu(gate), per value head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, *, offset: bool = True, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.offset = offset
        init = torch.zeros if offset else torch.ones
        self.weight = nn.Parameter(init(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype != torch.float64 else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.to(y.dtype)
        y = y * (1.0 + w) if self.offset else y * w
        return y.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """norm(x) * weight * silu(gate); x and gate (..., dim)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype != torch.float64 else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * y.to(x.dtype)
        gf = gate.float() if gate.dtype != torch.float64 else gate
        return (y.to(gf.dtype) * F.silu(gf)).to(x.dtype)
