"""Token-by-token gated delta rule in torch: the "recurrent" layer mode and the single-token decode step.

Same contract as `naive.py`; this version preallocates its output, works in place on a private state copy and
uses fused matmuls, so it is the CPU path for short multi-token steps. `gated_delta_rule_decode_step` updates a
caller-owned state in place (static buffers, CUDA-graph friendly).
"""
from __future__ import annotations

import torch

from gdnspec.ops.gated_delta_rule.common import as_dtype, check_gdr_inputs, prepare_inputs, state_dtype_for


def _step_(S: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """One recurrence step on S (B, HV, K, V) in place. q, k (B, HV, K); v (B, HV, V); alpha, beta (B, HV). Returns o (B, HV, V)."""
    S.mul_(alpha[..., None, None])
    pred = torch.matmul(k.unsqueeze(-2), S).squeeze(-2)  # (B, HV, V) = S^T k
    u = (v - pred) * beta[..., None]  # (B, HV, V)
    S.addcmul_(k.unsqueeze(-1), u.unsqueeze(-2))  # S += k u^T
    return torch.matmul(q.unsqueeze(-2), S).squeeze(-2)  # (B, HV, V) = S^T q


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (o (B, T, HV, V) in v's dtype, final state (B, HV, K, V) or None). initial_state is not modified."""
    B, T, H, HV, K, V = check_gdr_inputs(q, k, v, g, beta, initial_state)
    out_dtype = v.dtype  # v is recast to the compute dtype below
    cdt = state_dtype_for(v.dtype)
    scale = K**-0.5 if scale is None else scale
    q, k, v, g, beta = prepare_inputs(q, k, v, g, beta, num_value_heads=HV, scale=scale, use_qk_l2norm=use_qk_l2norm,
                                      dtype=cdt)  # q, k (B, T, HV, K)
    alpha = g.exp()
    S = torch.zeros(B, HV, K, V, dtype=cdt, device=v.device) if initial_state is None else initial_state.to(cdt).clone()
    o = torch.empty(B, T, HV, V, dtype=cdt, device=v.device)
    for t in range(T):
        o[:, t] = _step_(S, q[:, t], k[:, t], v[:, t], alpha[:, t], beta[:, t])
    return o.to(out_dtype), (S if output_final_state else None)


def gated_delta_rule_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> torch.Tensor:
    """One token for each row: q, k (B, H, K); v (B, HV, V); g, beta (B, HV); state (B, HV, K, V) updated IN PLACE.

    Returns o (B, HV, V) in v's dtype.
    """
    B, _, H, HV, K, V = check_gdr_inputs(q, k, v, g, beta, state, time_dim=False)
    if state.dtype != state_dtype_for(v.dtype):
        raise ValueError(f"state must be {state_dtype_for(v.dtype)} for {v.dtype} activations, got {state.dtype}")
    cdt = state.dtype
    scale = K**-0.5 if scale is None else scale
    q, k, v_c, g, beta = prepare_inputs(q, k, v, g, beta, num_value_heads=HV, scale=scale, use_qk_l2norm=use_qk_l2norm,
                                        dtype=cdt)  # q, k (B, HV, K)
    o = _step_(state, q, k, v_c, g.exp(), beta)
    return as_dtype(o, v.dtype)
