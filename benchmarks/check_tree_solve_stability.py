"""Which inverse of tree-WY's (I + L) is safe in float32: three ways to compute T = (I + L)^-1.

    python benchmarks/check_tree_solve_stability.py        # CPU, a few seconds; prints a table

L is the strictly lower N x N matrix of tree-WY (docs/DESIGN.md): L_ij = beta_i (k_i . k_j) exp(gamma_i - gamma_j)
for ancestors j of i, here a chain (every earlier node an ancestor: the worst case). Three float32 solves against
the float64 inverse:
  substitution  row by row, T_i = e_i - L_i T (`triton_tree._tree_solve` with GDNSPEC_TREE_BLOCKED_SOLVE=0: N - 1
                serial steps);
  blocked       the blocked triangular inverse (`triton_tree._solve_blocked`, the kernels' default): 2 x 2 diagonal
                blocks I - L, then log2(N) - 1 merges T <- T - T (L_off T) of pairs of diagonal blocks; as accurate
                as substitution in every case below;
  doubling      (I - L)(I + L^2)(I + L^4)... (log2 N matrix products, proposed in docs/triton_kernels.md as a
                faster solve): exact in exact arithmetic because L is nilpotent, but its partial products hold
                binomially large terms that cancel, so float32 rounding is amplified when keys are correlated.
Keys: "same" (one key repeated: a repeated token), "corr" (one direction + 30% noise), "rand" (independent).
"""
from __future__ import annotations

import torch


def chain_L(N: int, kind: str, beta: float, g: float, gen: torch.Generator) -> torch.Tensor:
    if kind == "same":
        k = torch.randn(1, 128, generator=gen).expand(N, 128)
    elif kind == "corr":
        k = torch.randn(1, 128, generator=gen) + 0.3 * torch.randn(N, 128, generator=gen)
    else:
        k = torch.randn(N, 128, generator=gen)
    k = k / k.norm(dim=1, keepdim=True)
    gam = torch.cumsum(torch.full((N,), g), 0)
    return torch.tril(beta * (k @ k.T) * torch.exp(gam[:, None] - gam[None, :]), -1).double()


def substitution(L: torch.Tensor) -> torch.Tensor:
    T = torch.eye(L.shape[0], dtype=L.dtype)
    for i in range(1, L.shape[0]):
        T[i] = T[i] - L[i] @ T
    return T


def doubling(L: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(L.shape[0], dtype=L.dtype)
    P, Lp, m = eye - L, L @ L, 2
    while m < L.shape[0]:
        P, Lp, m = P @ (eye + Lp), Lp @ Lp, 2 * m
    return P


def blocked(L: torch.Tensor) -> torch.Tensor:
    """The kernel's `_solve_blocked` in torch (N a power of two)."""
    N = L.shape[0]
    r = torch.arange(N)
    T = torch.eye(N, dtype=L.dtype) - L * (r[:, None] // 2 == r[None, :] // 2)
    w = 2
    while w < N:
        off = (r[:, None] // (2 * w) == r[None, :] // (2 * w)) & (r[:, None] // w != r[None, :] // w)
        T = T - T @ ((L * off) @ T)
        w *= 2
    return T


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    print("N   keys  beta  g      substitution  blocked   doubling   (max |T32 - T64| / max |T64|)")
    for N in (16, 32, 64):
        for kind in ("same", "corr", "rand"):
            for beta, g in ((0.99, 0.0), (0.5, 0.0), (0.99, -0.05)):
                L = chain_L(N, kind, beta, g, gen)
                T = torch.linalg.inv(torch.eye(N, dtype=torch.float64) + L)
                errs = [float((f(L.float()).double() - T).abs().max() / T.abs().max()) for f in (substitution, blocked, doubling)]
                print(f"{N:<3d} {kind:5s} {beta:<5} {g:<6} {errs[0]:12.1e}  {errs[1]:8.1e}  {errs[2]:9.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
