"""Causal depthwise conv1d with state: naive reference, torch prefill, one-token update, tree-aware version."""
from gdnspec.ops.conv1d.causal_conv1d import causal_conv1d, causal_conv1d_update
from gdnspec.ops.conv1d.naive import naive_causal_conv1d
from gdnspec.ops.conv1d.tree import tree_causal_conv1d, tree_conv_commit_state, tree_conv_window_index

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "naive_causal_conv1d",
    "tree_causal_conv1d",
    "tree_conv_commit_state",
    "tree_conv_window_index",
]
