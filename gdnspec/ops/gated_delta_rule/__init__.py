"""The gated delta rule: naive reference, token-by-token torch, chunked (WY) torch, decode step, tree (tree-WY)."""
from gdnspec.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
from gdnspec.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from gdnspec.ops.gated_delta_rule.tree import (
    TreeGDRCache,
    naive_tree_gated_delta_rule,
    tree_commit_state,
    tree_gated_delta_rule,
)
from gdnspec.ops.gated_delta_rule.recurrent import fused_recurrent_gated_delta_rule, gated_delta_rule_decode_step

__all__ = [
    "TreeGDRCache",
    "naive_tree_gated_delta_rule",
    "tree_commit_state",
    "tree_gated_delta_rule",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "gated_delta_rule_decode_step",
    "naive_recurrent_gated_delta_rule",
]
