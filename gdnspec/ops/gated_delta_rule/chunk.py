"""Chunked gated delta rule (WY / UT transform): the prefill and training path, differentiable with torch autograd.

Within a chunk of C tokens (DESIGN.md section 1), with gamma = cumsum(g) and Gamma_ij = exp(gamma_i - gamma_j), j <= i:
    T      = (I + StrictTril(diag(beta) K K^T * Gamma))^-1
    U      = T (beta V),   W = T (beta K exp(gamma))
    v_new  = U - W S
    O      = (Q exp(gamma)) S + (Q K^T * Gamma) v_new
    S     <- exp(gamma_C) S + (K exp(gamma_C - gamma))^T v_new
T need not be a multiple of C: the tail is padded with k = v = beta = g = 0, which leaves the state unchanged.
On CUDA, without autograd, with fla-core importable, the call dispatches to fla's chunk_gated_delta_rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gdnspec.ops.gated_delta_rule.common import check_gdr_inputs, expand_key_heads, prepare_inputs, state_dtype_for

try:  # optional GPU fast path
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk_gated_delta_rule
except Exception:  # noqa: BLE001 - fla is optional, and fails to import in several ways on CPU-only machines
    _fla_chunk_gated_delta_rule = None


def _use_fla(q: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    if _fla_chunk_gated_delta_rule is None or not q.is_cuda or q.dtype == torch.float64:
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, *tensors)))


def chunk_gated_delta_rule(
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
    chunk_size: int = 64,
    allow_fla: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (o (B, T, HV, V) in v's dtype, final state (B, HV, K, V) or None). Same contract as the naive reference."""
    B, T, H, HV, K, V = check_gdr_inputs(q, k, v, g, beta, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scale = K**-0.5 if scale is None else scale
    if allow_fla and _use_fla(q, k, v, g, beta, initial_state):
        o, final = _fla_chunk_gated_delta_rule(
            expand_key_heads(q, HV), expand_key_heads(k, HV), v, g=g.float(), beta=beta.to(q.dtype), scale=scale,
            initial_state=None if initial_state is None else initial_state.float(),
            output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm,
        )
        return o, final
    out_dtype = v.dtype  # v is recast to the compute dtype below
    cdt = state_dtype_for(v.dtype)
    q, k, v, g, beta = prepare_inputs(q, k, v, g, beta, num_value_heads=HV, scale=scale, use_qk_l2norm=use_qk_l2norm,
                                      dtype=cdt)  # q, k (B, T, HV, K)

    C = chunk_size
    pad = (-T) % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    NC = (T + pad) // C
    # (B, HV, NC, C, dim) and (B, HV, NC, C)
    q, k, v = (x.view(B, NC, C, HV, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v))
    g, beta = (x.view(B, NC, C, HV).permute(0, 3, 1, 2) for x in (g, beta))

    gamma = g.cumsum(-1)  # (B, HV, NC, C)
    causal = torch.ones(C, C, dtype=torch.bool, device=v.device).tril()
    Gamma = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, HV, NC, C, C)
    eye = torch.eye(C, dtype=cdt, device=v.device)
    A = ((beta[..., None] * k) @ k.transpose(-1, -2)) * Gamma * (1 - eye)  # strict lower
    I_plus_A = A + eye
    rhs = torch.cat([beta[..., None] * v, beta[..., None] * k * gamma.exp()[..., None]], dim=-1)
    UW = torch.linalg.solve_triangular(I_plus_A, rhs, upper=False, unitriangular=True)
    U, W = UW[..., :V], UW[..., V:]  # (B, HV, NC, C, V), (B, HV, NC, C, K)
    q_decay = q * gamma.exp()[..., None]  # (B, HV, NC, C, K)
    intra = (q @ k.transpose(-1, -2)) * Gamma  # (B, HV, NC, C, C)
    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]  # (B, HV, NC, C, K)
    chunk_decay = gamma[..., -1].exp()  # (B, HV, NC)

    S = torch.zeros(B, HV, K, V, dtype=cdt, device=v.device) if initial_state is None else initial_state.to(cdt)
    outs = []
    for c in range(NC):
        v_new = U[:, :, c] - W[:, :, c] @ S  # (B, HV, C, V)
        outs.append(q_decay[:, :, c] @ S + intra[:, :, c] @ v_new)
        S = chunk_decay[:, :, c, None, None] * S + k_to_end[:, :, c].transpose(-1, -2) @ v_new
    o = torch.stack(outs, dim=2).permute(0, 2, 3, 1, 4).reshape(B, NC * C, HV, V)[:, :T]
    return o.to(out_dtype), (S if output_final_state else None)
