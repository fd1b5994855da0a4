"""RMS norms of the Qwen3-Next family, computed in float32 and cast back.

- RMSNorm(offset=True): x_hat * (1 + weight), weight initialised to 0 ("zero-centred", Qwen3-Next / Qwen3.5
  decoder norms, q/k norms). RMSNorm(offset=False): x_hat * weight, weight initialised to 1.
- GatedRMSNorm: the GDN output norm, x_hat * weight (init 1), then * silu(gate), per value head.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def check_eps(eps) -> float:
    """eps of an RMS norm (a layer's norm_eps / the config's rms_norm_eps): a finite number > 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"norm_eps (the RMS norm's eps) must be a finite number > 0, got {eps!r}")
    return float(eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, *, offset: bool = True, dtype=None, device=None):
        super().__init__()
        self.eps = check_eps(eps)
        self.offset = offset
        init = torch.zeros if offset else torch.ones
        self.weight = nn.Parameter(init(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cdt = _compute_dtype(x.dtype)
        w = self._scale(cdt)
        # one fused op: x_hat * w, in float32 (float64 stays float64); see _reference_rms_norm
        y = F.rms_norm(x if x.dtype == cdt else x.to(cdt), (x.shape[-1],), w, self.eps)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _scale(self, dtype: torch.dtype) -> torch.Tensor:
        """The multiplier in `dtype`: 1 + weight (offset) or weight."""
        w = self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        return 1.0 + w if self.offset else w


class GatedRMSNorm(nn.Module):
    """norm(x) * weight * silu(gate); x and gate (..., dim)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype=None, device=None):
        super().__init__()
        self.eps = check_eps(eps)
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        cdt = _compute_dtype(x.dtype)
        if x.dtype == cdt and gate.dtype == cdt and self.weight.dtype == cdt:  # float32 / float64: 3 ops
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps) * F.silu(gate)
        xf = x.to(cdt)
        y = F.rms_norm(xf, (x.shape[-1],), None, self.eps)
        y = self.weight * y.to(x.dtype)
        gf = gate.to(_compute_dtype(gate.dtype))
        return (y.to(gf.dtype) * F.silu(gf)).to(x.dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reference_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, offset: bool = False) -> torch.Tensor:
    """The unfused formula the modules above implement with F.rms_norm (tests compare both)."""
    xf = x.float() if x.dtype != torch.float64 else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        w = weight.to(y.dtype)
        y = y * (1.0 + w) if offset else y * w
    return y.to(x.dtype)
