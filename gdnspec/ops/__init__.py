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
    "check_env_switches",
    "causal_conv1d",
    "causal_conv1d_update",
    "naive_causal_conv1d",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "gated_delta_rule_decode_step",
    "naive_recurrent_gated_delta_rule",
]


def check_env_switches() -> None:
    """Validate the GDNSPEC_* switches that take a fixed set of values (GDNSPEC_CPU_COMPILE, GDNSPEC_CPU_ONEDNN,
    GDNSPEC_FP32_GEMV, GDNSPEC_FUSED_UNIFORMS, GDNSPEC_GEMV_AUTOTUNE, GDNSPEC_NORM_GEMV, GDNSPEC_SILU_GEMV, GDNSPEC_TREE_ACCEPT, GDNSPEC_TREE_BLOCKED_SOLVE, GDNSPEC_TREE_BUILD, GDNSPEC_TREE_FUSION,
    GDNSPEC_TREE_INDEX, GDNSPEC_TREE_PROJ, GDNSPEC_TREE_PROJ_MAX_ROWS, GDNSPEC_TRITON_PRECISION) at once, through the functions that read them:
    each is otherwise read lazily, on the first step that reaches its path. Raises the ValueError of the first bad
    one (it names the variable and the values it takes)."""
    import os

    from gdnspec.ops import _env, cpu_linear, tree_accept, tree_build, tree_index, uniforms
    from gdnspec.ops.fused import gdn_tree, gdn_tree_proj, gemv, normed
    from gdnspec.ops.gated_delta_rule.triton_tree import blocked_solve, dot_precisions

    _env.cpu_compile()
    cpu_linear.enabled()
    gemv.autotune_enabled()
    gemv.fp32_precision()
    gemv.silu_enabled()
    normed.enabled()
    gdn_tree.tree_fusion()
    tree_index.enabled()
    tree_build.enabled()
    uniforms.enabled()
    tree_accept.enabled()
    gdn_tree_proj.enabled()
    gdn_tree_proj.max_rows()
    blocked_solve()
    if os.environ.get("GDNSPEC_TRITON_PRECISION"):
        dot_precisions(os.environ["GDNSPEC_TRITON_PRECISION"])
