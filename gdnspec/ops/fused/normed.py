"""The residual add + RMSNorm between two GEMVs, folded into them (issue 9): no add_rms_norm launch per norm.

    y = output_projection(x, W_out, b)           # in a block: a ResidualProjection (not computed yet), or a tensor
    xn, h = add_norm(y, resid, weight=w, eps=eps, offset=True)
                                                 # ResidualProjection + residual: ONE launch (gemv.linear_residual)
                                                 # writes h = resid + y and its sums of squares; xn is a NormedInput
    z = linear_in(xn, W_in, b_in)                # ONE launch (gemv.normed_linear): rmsnorm(h) * w @ W_in^T + b_in
    x = materialize(xn)                          # the plain normalised tensor, for code that needs one (MoE, CPU)

Before, the same three steps were output GEMV -> add_rms_norm -> input GEMV. The decode layer becomes in-proj
GEMV(normed) -> GDN kernel -> out-proj GEMV(+residual) -> gate_up GEMV(normed) -> silu_mul -> down GEMV(+residual);
only the first layer (its input is the embedding, no residual yet) keeps an add_rms_norm.

Every case the fused kernels do not take falls back to today's path (`gemv.linear_for_residual` + `add_rms_norm` +
`small_linear`), with the same numbers up to float rounding: a plain tensor y (embedding, MoE block, the module
path), no residual, rows > gemv.MAX_ROWS, float64, no Triton on this device, CUDA float32 shapes that small_linear
gives to cuBLAS (gemv.fp32_rows_ok), GDNSPEC_TRITON_GEMV=0, or GDNSPEC_NORM_GEMV unset / 0 (the DEFAULT, measured faster on the H200: see `enabled`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gdnspec.ops._env import flag
from gdnspec.ops.fused import elementwise as _ew
from gdnspec.ops.fused import gemv as _gemv

__all__ = ["NormedInput", "ResidualProjection", "add_norm", "enabled", "linear_in", "materialize",
           "output_projection"]


def enabled() -> bool:
    """GDNSPEC_NORM_GEMV=1 turns the folding on. OFF by default: measured on an H200 (1.7B config, bf16, same run) the
    folded decode step is SLOWER, 1.65-1.70 ms against 1.51 ms at B = 1 (159 kernels against 207) and 3.00 against
    2.51 ms at B = 32; verify N = 16 at B = 1 2.34 against 2.22 ms. The residual epilogue's last-arriver wait costs
    about what the add_rms_norm launch it removes cost, and the folded kernels lose GEMV efficiency (untuned configs).
    For the shipped float32 bundle it measured faster with stop 21's tf32x3 GEMVs (EAGLE spec step chain-4 0.697 ->
    0.626 ms) but SLOWER once those take the "fma" path (stop 22, same run: 0.602 against 0.497 ms; its residual
    kernel needs 16-column blocks, gemv.fma_tile). Kept, tested, as the starting point for tuning
    (docs/triton_kernels.md)."""
    return flag("GDNSPEC_NORM_GEMV", default=False)


def _kernel_rows_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The folded GEMV kernels run this product: the folding on, weight (N, K) for x (..., K), and what the GEMV
    kernels take (`gemv.kernel_applies`)."""
    return enabled() and weight.dim() == 2 and weight.shape[1] == x.shape[-1] and _gemv.kernel_applies(x, weight)


@dataclass(frozen=True)
class ResidualProjection:
    """An output projection x @ weight^T + bias whose result goes into the residual stream, not computed yet:
    `add_norm` runs it together with the residual add (gemv.linear_residual). x (..., K), weight (N, K)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.x.shape[:-1], self.weight.shape[0]))

    def compute(self) -> torch.Tensor:
        """The projection alone, as today: (..., N), or float32 split-K partial sums (S, ..., N) that add_rms_norm
        adds up (gemv.linear_for_residual)."""
        return _gemv.linear_for_residual(self.x, self.weight, self.bias)


@dataclass(frozen=True)
class NormedInput:
    """rmsnorm(h) * (1 + weight) (offset) or * weight, not materialised: h (..., D) the residual stream in the
    activation dtype, sumsq (M, ceil(D / 16)) float32 sums of squares of h over 16-column groups (M = rows of h).
    `linear_in` reads it with the norm folded into the GEMV; `materialize()` gives the plain tensor."""

    h: torch.Tensor
    sumsq: torch.Tensor
    weight: torch.Tensor
    eps: float
    offset: bool

    @property
    def shape(self) -> torch.Size:
        return self.h.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.h.dtype

    @property
    def device(self) -> torch.device:
        return self.h.device

    @property
    def is_cuda(self) -> bool:
        return self.h.is_cuda

    def dim(self) -> int:
        return self.h.dim()

    def materialize(self) -> torch.Tensor:
        """The normalised tensor (..., D) in h's dtype: add_rms_norm without a residual (one launch; the same numbers
        as the unfolded path, which normalised the same h)."""
        return _ew.add_rms_norm(self.h, residual=None, weight=self.weight, eps=self.eps, offset=self.offset)[0]


def materialize(x):
    """x itself for a tensor, the normalised tensor for a NormedInput."""
    return x.materialize() if isinstance(x, NormedInput) else x


def output_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """A block's output projection whose result goes to `add_norm`: a ResidualProjection where the folded kernel
    can run it (the residual add then happens in its epilogue), else computed now as before
    (gemv.linear_for_residual: a tensor or split-K partial sums, both accepted by add_norm)."""
    if _kernel_rows_ok(x, weight):
        return ResidualProjection(x, weight, bias)
    return _gemv.linear_for_residual(x, weight, bias)


def add_norm(y, resid: torch.Tensor | None, *, weight: torch.Tensor, eps: float, offset: bool):
    """(norm(resid + y), resid + y), the norm's multiplier (1 + weight) when offset else weight.

    y: a ResidualProjection (`output_projection`), a tensor (..., D), or split-K partial sums (S, ..., D); resid None
    means y is the stream. A ResidualProjection with a residual the kernel takes runs as ONE gemv.linear_residual
    launch and the first result is a NormedInput (for `linear_in`); everything else is today's add_rms_norm and a
    plain tensor."""
    if isinstance(y, ResidualProjection):
        if (resid is not None and _kernel_rows_ok(y.x, y.weight) and resid.dtype == y.x.dtype
                and tuple(resid.shape) == tuple(y.shape) and tuple(weight.shape) == (y.weight.shape[0],)
                and (y.bias is None or tuple(y.bias.shape) == (y.weight.shape[0],))):
            h, sumsq = _gemv.linear_residual(y.x, y.weight, y.bias, resid)
            return NormedInput(h, sumsq, weight, float(eps), bool(offset)), h
        y = y.compute()
    return _ew.add_rms_norm(y, residual=resid, weight=weight, eps=eps, offset=offset)


def linear_in(x, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A block's input projection (..., D) -> (..., N): gemv.normed_linear for a NormedInput (the norm folded into
    the GEMV, one launch), gemv.small_linear for a tensor (and for a NormedInput the kernel cannot take, after
    materialising it)."""
    if isinstance(x, NormedInput):
        if _kernel_rows_ok(x.h, weight) and (bias is None or tuple(bias.shape) == (weight.shape[0],)):
            return _gemv.normed_linear(x.h, x.sumsq, x.weight, x.eps, x.offset, weight, bias)
        x = x.materialize()
    return _gemv.small_linear(x, weight, bias)
