"""Reference gated delta rule: the token-by-token recurrence of DESIGN.md section 1, written for clarity.

Every faster implementation (chunk, decode step, tree, Triton) is tested against this function.
Computes in float64 when v is float64, otherwise in float32, whatever the input dtype.

    S     = exp(g_t) * S_{t-1}
    u_t   = beta_t * (v_t - S^T k_t)
    S_t   = S + k_t u_t^T
    o_t   = S_t^T (scale * q_t)
"""
from __future__ import annotations

import torch

from gdnspec.ops.gated_delta_rule.common import check_gdr_inputs, expand_key_heads, l2norm, state_dtype_for


def naive_recurrent_gated_delta_rule(
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
    """Returns (o (B, T, HV, V) in v's dtype, final state (B, HV, K, V) or None)."""
    B, T, H, HV, K, V = check_gdr_inputs(q, k, v, g, beta, initial_state)
    out_dtype = v.dtype  # v is recast to the compute dtype below
    cdt = state_dtype_for(v.dtype)
    scale = K**-0.5 if scale is None else scale
    q, k = q.to(cdt), k.to(cdt)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = expand_key_heads(q, HV) * scale  # (B, T, HV, K)
    k = expand_key_heads(k, HV)  # (B, T, HV, K)
    v, g, beta = v.to(cdt), g.to(cdt), beta.to(cdt)
    S = torch.zeros(B, HV, K, V, dtype=cdt, device=v.device) if initial_state is None else initial_state.to(cdt).clone()
    outs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        pred = torch.einsum("bhkv,bhk->bhv", S, k[:, t])  # (B, HV, V)
        u = beta[:, t, :, None] * (v[:, t] - pred)  # (B, HV, V)
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(outs, dim=1) if T > 0 else v.new_zeros(B, 0, HV, V)
    final = S.to(state_dtype_for(v.dtype)) if output_final_state else None
    return o.to(out_dtype), final
