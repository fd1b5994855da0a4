"""Tree-aware causal depthwise conv1d: node i convolves itself, its parent, grandparent, ..., falling back to the
committed conv window above the root (DESIGN.md section 3).

Positions are indexed in the concatenation [committed window (W-1 inputs, oldest first) | tree nodes (N)], where
every position has an "extended parent": a node's parent node, the newest window entry for the root, the previous
window entry for a window entry. `tree_conv_window_index` climbs that chain; the same index gives each node's
window, so committing node a's conv state is a gather (`tree_conv_commit_state`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gdnspec.ops.conv1d.common import check_conv_inputs


def tree_conv_window_index(parents: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """parents (B, N) long (root -1) -> index (B, N, W) into [window | nodes], oldest first, last = the node itself."""
    B, N = parents.shape
    W = kernel_size
    dev = parents.device
    window_pos = torch.arange(W - 1, device=dev)
    ext_parent_window = (window_pos - 1).expand(B, W - 1)  # window entry p -> p - 1 (never climbed past 0)
    ext_parent_nodes = torch.where(parents >= 0, parents + (W - 1), torch.full_like(parents, W - 2))
    ext_parent = torch.cat([ext_parent_window, ext_parent_nodes], dim=1).clamp(min=0)  # (B, W-1+N)
    cur = torch.arange(N, device=dev).expand(B, N) + (W - 1)
    idx = [cur]
    for _ in range(W - 1):
        cur = ext_parent.gather(1, cur)
        idx.append(cur)
    return torch.stack(idx[::-1], dim=-1)  # (B, N, W)


def tree_causal_conv1d(
    x: torch.Tensor,
    *,
    weight: torch.Tensor,
    parents: torch.Tensor,
    state: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    window_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, D) tree nodes; state (B, D, W-1) committed window (only read).

    Returns (y (B, N, D), window_index (B, N, W)) - pass the index on to `tree_conv_commit_state`.
    """
    B, D, W = check_conv_inputs(x, weight, bias, state, activation)
    if window_index is None:
        window_index = tree_conv_window_index(parents, W)
    seq = torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)  # (B, W-1+N, D)
    N = x.shape[1]
    windows = seq.gather(1, window_index.reshape(B, N * W, 1).expand(B, N * W, D)).view(B, N, W, D)
    y = torch.einsum("bnwd,dw->bnd", windows, weight.to(x.dtype))
    if bias is not None:
        y = y + bias.to(x.dtype)
    return (F.silu(y) if activation == "silu" else y), window_index


def tree_conv_commit_state(*, x: torch.Tensor, state: torch.Tensor, window_index: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
    """New conv state (B, D, W-1) after tree node `node` (B,): the newest W-1 inputs on its path. state is only read."""
    B, N, D = x.shape
    W = window_index.shape[-1]
    seq = torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)  # (B, W-1+N, D)
    idx = window_index[torch.arange(B, device=x.device), node, 1:]  # (B, W-1)
    return seq.gather(1, idx.unsqueeze(-1).expand(B, W - 1, D)).transpose(1, 2).to(state.dtype)
