"""Numerical ops of gdnspec: the gated delta rule (recurrent, chunk, decode step, tree) and causal conv1d.

Each op folder holds a plain float32/float64 reference (`naive.py`) beside the faster versions that share its
keyword-only contract, so tests can compare output AND state against the reference.
"""
from gdnspec.ops.conv1d import causal_conv1d, causal_conv1d_update, naive_causal_conv1d
from gdnspec.ops.gated_delta_rule import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    gated_delta_rule_decode_step,
    naive_recurrent_gated_delta_rule,
)

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "naive_causal_conv1d",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "gated_delta_rule_decode_step",
    "naive_recurrent_gated_delta_rule",
]
