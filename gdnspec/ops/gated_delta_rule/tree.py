"""Gated delta rule over a token TREE, exact, without per-node states (tree-WY, DESIGN.md section 3).

Node i must see the committed state S0 and its own ancestors only. With A_ij = 1 if j is an ancestor of i or i
itself, gamma_i = g_i + gamma_parent(i), Gamma_ij = exp(gamma_i - gamma_j) * A_ij:

    T     = (I + (diag(beta) K K^T) * Gamma * (A - I))^-1     unit lower triangular (nodes in topological order)
    U     = T (beta V);   W = T (beta K exp(gamma));   v_new = U - W S0
    O     = (Q exp(gamma)) S0 + (Q K^T * Gamma) v_new

and the state after node a (what commit needs; one read and one write of the state):

    S_a   = exp(gamma_a) S0 + sum_{j in path(a)} (k_j exp(gamma_a - gamma_j)) v_new_j^T

`naive_tree_gated_delta_rule` is the reference: it materialises one state per node (S_i = step(S_parent(i), i)),
which is also what the per-node-state engines do; tests compare both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gdnspec.ops.gated_delta_rule.common import as_dtype, check_gdr_inputs, prepare_inputs, state_dtype_for


@dataclass
class TreeGDRCache:
    """Per-node terms that `tree_commit_state` needs. Shapes: k (B, HV, N, K); v_new (B, HV, N, V); gamma (B, HV, N);
    ancestor_mask (B, N, N) bool (row i = the path of node i)."""

    k: torch.Tensor
    v_new: torch.Tensor
    gamma: torch.Tensor
    ancestor_mask: torch.Tensor


def _check_tree(ancestor_mask: torch.Tensor, B: int, N: int) -> None:
    if ancestor_mask.dtype != torch.bool or tuple(ancestor_mask.shape) != (B, N, N):
        raise ValueError(f"ancestor_mask must be a bool tensor of shape (B, N, N) = {(B, N, N)}, "
                         f"got {ancestor_mask.dtype} {tuple(ancestor_mask.shape)}")


def _prepare(q, k, v, g, beta, initial_state, scale, use_qk_l2norm):
    B, N, H, HV, K, V = check_gdr_inputs(q, k, v, g, beta, initial_state)
    if initial_state is None:
        raise ValueError("initial_state (the committed state S0, (B, HV, K, V)) is required for tree verification")
    cdt = state_dtype_for(v.dtype)
    scale = K**-0.5 if scale is None else scale
    q, k, v, g, beta = prepare_inputs(q, k, v, g, beta, num_value_heads=HV, scale=scale, use_qk_l2norm=use_qk_l2norm,
                                      dtype=cdt)
    return (B, N, HV, K, V, cdt), q, k, v, g, beta, as_dtype(initial_state, cdt)


def tree_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor,
    beta: torch.Tensor,
    ancestor_mask: torch.Tensor,
    initial_state: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, TreeGDRCache]:
    """q, k (B, N, H, K); v (B, N, HV, V); g, beta (B, N, HV); ancestor_mask (B, N, N) bool; initial_state (B, HV, K, V).

    Returns (o (B, N, HV, V) in v's dtype, TreeGDRCache). initial_state is only read.
    """
    out_dtype = v.dtype
    (B, N, HV, K, V, cdt), q, k, v, g, beta, S0 = _prepare(q, k, v, g, beta, initial_state, scale, use_qk_l2norm)
    _check_tree(ancestor_mask, B, N)
    A = ancestor_mask.to(cdt)[:, None]  # (B, 1, N, N)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, HV, N, dim)
    g, beta = g.transpose(1, 2), beta.transpose(1, 2)  # (B, HV, N)
    gamma = A @ g.unsqueeze(-1)  # (B, HV, N, 1): sum of g along the path
    diff = (gamma - gamma.transpose(-1, -2)).masked_fill(~ancestor_mask[:, None], float("-inf"))
    Gamma = diff.exp()  # (B, HV, N, N)
    # strictly lower part only: the unit diagonal is implied (unitriangular=True), upper entries are masked (-inf)
    M = ((beta[..., None] * k) @ k.transpose(-1, -2)) * Gamma
    e_gamma = gamma.exp()  # (B, HV, N, 1)
    bv_bk = beta[..., None] * torch.cat([v, k * e_gamma], dim=-1)  # (B, HV, N, V + K)
    UW = torch.linalg.solve_triangular(M, bv_bk, upper=False, unitriangular=True)
    v_new = UW[..., :V] - UW[..., V:] @ S0  # (B, HV, N, V)
    o = (q * e_gamma) @ S0 + ((q @ k.transpose(-1, -2)) * Gamma) @ v_new  # (B, HV, N, V)
    return as_dtype(o.transpose(1, 2), out_dtype), TreeGDRCache(k=k, v_new=v_new, gamma=gamma.squeeze(-1),
                                                                ancestor_mask=ancestor_mask)


def tree_commit_state(*, initial_state: torch.Tensor, cache: TreeGDRCache, node: torch.Tensor) -> torch.Tensor:
    """State after tree node `node` (B,) long for each row: S_a = exp(gamma_a) S0 + sum_path k_j exp(gamma_a - gamma_j) v_new_j^T.

    Returns a new (B, HV, K, V) tensor in the state dtype; initial_state is not modified.
    """
    B, HV, N, K = cache.k.shape
    if node.dtype != torch.long or tuple(node.shape) != (B,):
        raise ValueError(f"node must be a long tensor of shape ({B},), got {node.dtype} {tuple(node.shape)}")
    rows = torch.arange(B, device=node.device)
    path = cache.ancestor_mask[rows, node]  # (B, N)
    gamma_a = cache.gamma.gather(2, node.view(B, 1, 1).expand(B, HV, 1))  # (B, HV, 1)
    coeff = (gamma_a - cache.gamma).masked_fill(~path[:, None], float("-inf")).exp()  # (B, HV, N)
    S = gamma_a.exp()[..., None] * initial_state.to(cache.k.dtype)
    S = S + (cache.k * coeff[..., None]).transpose(-1, -2) @ cache.v_new
    return S


def naive_tree_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor,
    beta: torch.Tensor,
    parents: torch.Tensor,
    initial_state: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one recurrent step per node from its parent's state. parents (B, N) long, root -1, topological.

    Returns (o (B, N, HV, V) in v's dtype, per-node states (B, N, HV, K, V)).
    """
    out_dtype = v.dtype
    (B, N, HV, K, V, cdt), q, k, v, g, beta, S0 = _prepare(q, k, v, g, beta, initial_state, scale, use_qk_l2norm)
    rows = torch.arange(B, device=v.device)
    states = torch.empty(B, N, HV, K, V, dtype=cdt, device=v.device)
    outs = torch.empty(B, N, HV, V, dtype=cdt, device=v.device)
    for i in range(N):
        par = parents[:, i]
        if bool((par >= i).any()):
            raise ValueError(f"parents must list nodes in topological order (parent index < node index); node {i} has parent {par.tolist()}")
        S = torch.where((par >= 0)[:, None, None, None], states[rows, par.clamp(min=0)], S0)
        S = S * g[:, i].exp()[..., None, None]
        u = beta[:, i, :, None] * (v[:, i] - torch.einsum("bhkv,bhk->bhv", S, k[:, i]))
        S = S + k[:, i, :, :, None] * u[:, :, None, :]
        states[:, i] = S
        outs[:, i] = torch.einsum("bhkv,bhk->bhv", S, q[:, i])
    return outs.to(out_dtype), states
