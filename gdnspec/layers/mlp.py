"""SwiGLU MLP: down(silu(gate(x)) * up(x))."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_fused(self, x):
        """Same result in three kernels: one GEMM over [gate | up] (layers/fusion.py), `silu_mul`, down_proj; with
        GDNSPEC_SILU_GEMV=1 (off by default, measured slower: gemv.silu_enabled) two, the SiLU-mul in down_proj's
        loads (gemv.silu_linear_for_residual, bit-identical) where the GEMV kernels take the product and the residual
        add is not folded into down_proj (normed.enabled). x is a tensor or a NormedInput (ops/fused/normed.py: the
        preceding RMSNorm folded into the gate_up GEMV). The result goes to `add_norm`: down_proj as a
        ResidualProjection (run there with the residual add), or computed (a tensor, or float32 split-K partial
        sums (S, ..., hidden) that add_rms_norm adds up)."""
        from gdnspec.ops.fused import gemv
        from gdnspec.ops.fused import normed
        from gdnspec.ops.fused.elementwise import silu_mul

        gate_up = normed.linear_in(x, self.fused_gate_up())
        w, b = self.down_proj.weight, self.down_proj.bias
        if not normed.enabled() and gemv.silu_fusable(gate_up, w):
            return gemv.silu_linear_for_residual(gate_up, w, b)
        return normed.output_projection(silu_mul(gate_up), w, b)

    def fused_gate_up(self) -> torch.Tensor:
        """gate_proj | up_proj as one (2 * intermediate, hidden) weight (row blocks; layers/fusion.py)."""
        from gdnspec.layers.fusion import fused_linear

        return fused_linear(self, ["gate_proj", "up_proj"])[0]
