"""Causal depthwise conv1d with state in torch: prefill over T tokens and the one-token update.

Same contract as `naive.py`. The state keeps the activation dtype of x. `causal_conv1d_update` rolls a
caller-owned state in place (static buffers, CUDA-graph friendly).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gdnspec.ops.conv1d.common import check_conv_inputs


def causal_conv1d(
    x: torch.Tensor,
    *,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = "silu",
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (B, T, D) -> (y (B, T, D), final conv state (B, D, W-1) or None)."""
    B, D, W = check_conv_inputs(x, weight, bias, initial_state, activation)
    T = x.shape[1]
    xt = x.transpose(1, 2)  # (B, D, T)
    prev = xt.new_zeros(B, D, W - 1) if initial_state is None else initial_state.to(x.dtype)
    full = torch.cat([prev, xt], dim=-1)  # (B, D, W-1+T)
    w = weight.to(x.dtype)
    # a sum of W shifted slices: torch's grouped conv1d is pathologically slow on CPU for this shape
    y = full[:, :, 0:T] * w[:, 0:1]
    for i in range(1, W):
        y = y + full[:, :, i:i + T] * w[:, i:i + 1]  # (B, D, T)
    if bias is not None:
        y = y + bias.to(x.dtype)[:, None]
    if activation == "silu":
        y = F.silu(y)
    final = full[:, :, T:].contiguous() if output_final_state else None  # last W-1 inputs
    return y.transpose(1, 2), final


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def causal_conv1d_update(
    x: torch.Tensor,
    *,
    weight: torch.Tensor,
    state: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """One token: x (B, D) -> y (B, D); state (B, D, W-1) is shifted left by one and gets x, IN PLACE."""
    B, D, W = check_conv_inputs(x, weight, bias, state, activation, time_dim=False)
    full = torch.cat([state, _as(x, state.dtype).unsqueeze(-1)], dim=-1)  # (B, D, W)
    y = (_as(full, x.dtype) * _as(weight, x.dtype)).sum(-1)
    if bias is not None:
        y = y + _as(bias, x.dtype)
    state.copy_(full[:, :, 1:])
    return F.silu(y) if activation == "silu" else y
