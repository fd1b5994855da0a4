"""Shared argument checks and small helpers for the gated delta rule ops.

Conventions (the same in every implementation, after fla):
    q, k  : (B, T, H, K)     key heads
    v     : (B, T, HV, V)    value heads; HV is a multiple of H, value head j uses key head j // (HV // H)
    g     : (B, T, HV)       log decay (<= 0), alpha = exp(g)
    beta  : (B, T, HV)       write strength in (0, 1)
    state : (B, HV, K, V)    float32 (float64 when the inputs are float64), K-first
"""
from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last dim (the Qwen3-Next / fla convention)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, without dispatching a no-op cast (per-op overhead dominates small decode steps)."""
    return x if x.dtype == dtype else x.to(dtype)


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Recurrent state dtype for activations of `dtype`: float64 stays float64, everything else float32. It is also
    the dtype every op here computes the state in; a model may STORE it in a 16-bit SSM_STATE_DTYPES entry
    (GDNForCausalLM.mamba_ssm_cache_dtype), which the fused kernels load to float32 and round when they store."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# storage dtypes of the recurrent state the fused CUDA kernels take (vLLM's --mamba-ssm-cache-dtype choices)
SSM_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_gdr_inputs(q, k, v, g, beta, initial_state, *, time_dim: bool = True) -> tuple[int, int, int, int, int, int]:
    """Validate shapes of the gated delta rule inputs; returns (B, T, H, HV, K, V).

    With time_dim=False the tensors carry no T dimension (decode step) and T is reported as 1.
    """
    names = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
    for name, t in names.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    want = 4 if time_dim else 3
    for name in ("q", "k", "v"):
        if names[name].dim() != want:
            layout = "(B, T, heads, dim)" if time_dim else "(B, heads, dim)"
            raise ValueError(f"{name} must have shape {layout}, got {tuple(names[name].shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if time_dim:
        B, T, H, K = q.shape
        HV, V = v.shape[2], v.shape[3]
        lead_v = v.shape[:2]
    else:
        B, H, K = q.shape
        T = 1
        HV, V = v.shape[1], v.shape[2]
        lead_v = v.shape[:1]
    if tuple(lead_v) != tuple(q.shape[: len(lead_v)]):
        raise ValueError(f"v must share the leading dims of q, got v {tuple(v.shape)} and q {tuple(q.shape)}")
    if HV % H != 0:
        raise ValueError(f"the number of value heads ({HV}) must be a multiple of the number of key heads ({H})")
    gate_shape = (B, T, HV) if time_dim else (B, HV)
    for name in ("g", "beta"):
        if tuple(names[name].shape) != gate_shape:
            raise ValueError(f"{name} must have shape {gate_shape}, got {tuple(names[name].shape)}")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise TypeError(f"initial_state must be a torch.Tensor, got {type(initial_state).__name__}")
        if tuple(initial_state.shape) != (B, HV, K, V):
            raise ValueError(f"initial_state must have shape (B, HV, K, V) = {(B, HV, K, V)}, got {tuple(initial_state.shape)}")
        if initial_state.dtype not in (*SSM_STATE_DTYPES, torch.float64):
            raise ValueError(f"initial_state must be float32 / float64 (or a 16-bit storage dtype, computed in float32), "
                             f"got {initial_state.dtype}")
    return B, T, H, HV, K, V


def expand_key_heads(x: torch.Tensor, num_value_heads: int, head_dim: int = -2) -> torch.Tensor:
    """Repeat key heads so that value head j reads key head j // (HV // H)."""
    H = x.shape[head_dim]
    if H == num_value_heads:
        return x
    return x.repeat_interleave(num_value_heads // H, dim=head_dim)


def prepare_inputs(q, k, v, g, beta, *, num_value_heads: int, scale: float, use_qk_l2norm: bool, dtype: torch.dtype):
    """The shared preamble of the fast ops: cast to the compute dtype, L2-normalise q and k (optional), scale q,
    repeat key heads onto value heads. Returns (q, k, v, g, beta); q, k (..., HV, K). naive.py keeps its own copy on
    purpose: the reference reads top to bottom."""
    q, k = as_dtype(q, dtype), as_dtype(k, dtype)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = expand_key_heads(q * scale, num_value_heads)
    k = expand_key_heads(k, num_value_heads)
    return q, k, as_dtype(v, dtype), as_dtype(g, dtype), as_dtype(beta, dtype)
