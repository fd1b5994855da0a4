"""Reference causal depthwise conv1d with state, token by token:

    window_t = [inputs t-W+1 .. t]   (inputs before the first token come from the conv state, zeros if none)
    y_t      = act(sum_w weight[:, w] * window_t[w] + bias)
Computes in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gdnspec.ops.conv1d.common import check_conv_inputs


def naive_causal_conv1d(
    x: torch.Tensor,
    *,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = "silu",
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (B, T, D) -> (y (B, T, D) in x's dtype, final conv state (B, D, W-1) or None)."""
    B, D, W = check_conv_inputs(x, weight, bias, initial_state, activation)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    window = torch.zeros(B, D, W - 1, dtype=cdt, device=x.device) if initial_state is None else initial_state.to(cdt)
    ys = []
    for t in range(x.shape[1]):
        full = torch.cat([window, x[:, t, :, None].to(cdt)], dim=-1)  # (B, D, W)
        y = (full * weight.to(cdt)).sum(-1)
        if bias is not None:
            y = y + bias.to(cdt)
        ys.append(F.silu(y) if activation == "silu" else y)
        window = full[:, :, 1:]
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(B, 0, D, dtype=cdt)
    return y.to(x.dtype), (window.to(x.dtype) if output_final_state else None)
