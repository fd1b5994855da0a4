"""Argument checks for the causal depthwise conv1d ops.

Conventions: x (B, T, D); weight (D, W) (an nn.Conv1d depthwise weight (D, 1, W) squeezed; weight[:, W-1] multiplies
the current token); conv state (B, D, W-1) = the last W-1 inputs, oldest first.
"""
from __future__ import annotations

import torch

ACTIVATIONS = (None, "silu")


def check_conv_inputs(x: torch.Tensor, weight: torch.Tensor, bias, state, activation, *, time_dim: bool = True) -> tuple[int, int, int]:
    """Returns (B, D, W)."""
    want = 3 if time_dim else 2
    if x.dim() != want:
        raise ValueError(f"x must have shape {'(B, T, D)' if time_dim else '(B, D)'}, got {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (D, W), got {tuple(weight.shape)}")
    B, D = x.shape[0], x.shape[-1]
    if weight.shape[0] != D:
        raise ValueError(f"weight has {weight.shape[0]} channels but x has {D}")
    W = weight.shape[1]
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must have shape ({D},), got {tuple(bias.shape)}")
    if state is not None and tuple(state.shape) != (B, D, W - 1):
        raise ValueError(f"conv state must have shape (B, D, W-1) = {(B, D, W - 1)}, got {tuple(state.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return B, D, W
