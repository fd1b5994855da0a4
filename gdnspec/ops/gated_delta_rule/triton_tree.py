"""Triton tree verification for the gated delta rule (tree-WY, DESIGN.md section 3), one read of the committed state.

One program per (V-tile, batch row, value head): it loads the N x K keys/queries of its key head, builds the
N x N ancestor-masked matrices in registers, inverts the unit-lower-triangular (I + L) (the blocked triangular inverse;
forward substitution with GDNSPEC_TREE_BLOCKED_SOLVE=0), then touches the committed state tile S0 (K x BV) exactly once:

    R     = beta * (V - exp(gamma) * (K S0))          (N, BV)
    v_new = (I + L)^-1 R                              (N, BV)   (= U - W S0 of the reference)
    O     = exp(gamma) * (Q S0) + ((Q K^T) * Gamma) v_new

No per-node state is written. The terms the commit needs are written in a compact layout (`TritonTreeCache`):
k (B, N, H, K) float32 (per KEY head, normalised), v_new (B, N, HV, V) float32, gamma (B, N, HV) float32;
`TritonTreeCache.to_reference()` turns it into the torch `TreeGDRCache`.

Reference / CPU path: `gdnspec.ops.gated_delta_rule.tree.tree_gated_delta_rule`. Tests run this kernel on the CPU
with TRITON_INTERPRET=1 (tests/test_triton_kernels.py).

    o, cache = triton_tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=mask, initial_state=S0,
                                            use_qk_l2norm=True)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gdnspec.ops import pdl
from gdnspec.ops._env import flag
from gdnspec.ops.gated_delta_rule.common import SSM_STATE_DTYPES, check_gdr_inputs
from gdnspec.ops.gated_delta_rule.tree import TreeGDRCache, _check_tree

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

MAX_NODES = 64


def available(tensor: torch.Tensor) -> bool:
    """True when the Triton kernels can run on `tensor`: triton importable and (CUDA tensor or TRITON_INTERPRET=1)."""
    if not HAS_TRITON:
        return False
    return bool(tensor.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1")


PRECISIONS = ("ieee", "tf32x3", "tf32", "mixed")


def default_precision(tensor: torch.Tensor) -> str:
    """tl.dot precision of the tree-WY kernels for the activations `tensor` (q / k / v or the projection rows; the
    committed state for the commit): 'ieee' off CUDA (the interpreter); on CUDA 'tf32x3' (about float32 accuracy)
    for float32 activations and 'mixed' (see dot_precisions) for bf16 / fp16 ones. The environment variable
    GDNSPEC_TRITON_PRECISION overrides it (one of PRECISIONS).

    Why 'mixed' for 16-bit models (benchmarks/bench_tiles.py, H200, 1.7B shapes, N = 16): the tree-WY kernel takes
    140 us at B = 32 with tf32x3, 72 us with mixed, 56 us with tf32; its output's error against the IEEE float32
    kernel is 4e-5, 1.4e-3 and 2.7e-3 (relative norm), against ~2e-3 for rounding that output to bf16 at all. fla's
    chunked kernels, which the bf16 prefill of gdnspec and of vLLM / SGLang runs, cast the state to bf16 for the
    same products (~4e-3). float32 models keep tf32x3: their greedy outputs are tested token-identical."""
    env = os.environ.get("GDNSPEC_TRITON_PRECISION")
    if env:
        return env
    if not tensor.is_cuda:
        return "ieee"
    return "mixed" if tensor.dtype in (torch.bfloat16, torch.float16) else "tf32x3"


def dot_precisions(precision: str) -> tuple[str, str]:
    """(PREC, PREC_S): the tl.dot input precisions of the tree-WY kernels for the N x N products and for the products
    with the committed state S0 (k S0, q S0: K x V per node, most of the kernel's MMA work). 'mixed' = tf32x3 for
    the N x N products, tf32 (one MMA instead of three) for the state products; the others use one precision for
    both. Raises ValueError for anything but PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (argument or GDNSPEC_TRITON_PRECISION), "
                         f"got {precision!r}")
    return ("tf32x3", "tf32") if precision == "mixed" else (precision, precision)


def blocked_solve() -> bool:
    """GDNSPEC_TREE_BLOCKED_SOLVE: "1" (default) inverts tree-WY's (I + L) by the blocked triangular inverse
    (`_solve_blocked`: ceil(log2 N) - 1 levels of two dots), "0" by forward substitution (N - 1 serial steps), for A/B;
    anything else raises a ValueError naming the variable. Both are float32-exact algorithms of equal stability
    (benchmarks/check_tree_solve_stability.py)."""
    return flag("GDNSPEC_TREE_BLOCKED_SOLVE", default=True)


@dataclass
class TritonTreeCache:
    """What `triton_tree_commit_state` needs. k (B, N, H, K) float32 normalised keys per key head; v_new
    (B, N, HV, V) float32; gamma (B, N, HV) float32; ancestor_mask (B, N, N) bool."""

    k: torch.Tensor
    v_new: torch.Tensor
    gamma: torch.Tensor
    ancestor_mask: torch.Tensor

    def to_reference(self) -> TreeGDRCache:
        """The torch TreeGDRCache layout: k (B, HV, N, K), v_new (B, HV, N, V), gamma (B, HV, N)."""
        HV, H = self.v_new.shape[2], self.k.shape[2]
        k = self.k.repeat_interleave(HV // H, dim=2) if HV != H else self.k
        return TreeGDRCache(k=k.transpose(1, 2), v_new=self.v_new.transpose(1, 2), gamma=self.gamma.transpose(1, 2),
                            ancestor_mask=self.ancestor_mask)

    @staticmethod
    def from_reference(cache: TreeGDRCache, num_key_heads: int) -> "TritonTreeCache":
        """Inverse of to_reference (keeps one key row per key head)."""
        B, HV, N, K = cache.k.shape
        r = HV // num_key_heads
        k = cache.k[:, ::r].transpose(1, 2).contiguous().float()  # (B, N, H, K)
        return TritonTreeCache(k=k, v_new=cache.v_new.transpose(1, 2).contiguous().float(),
                               gamma=cache.gamma.transpose(1, 2).contiguous().float(), ancestor_mask=cache.ancestor_mask)


if HAS_TRITON:
    from gdnspec.ops.pdl import enter

    @triton.jit
    def _tree_solve(b_k, b_g, b_beta, b_A, rn, N, PREC: tl.constexpr, BLOCKED: tl.constexpr = True):
        """The N x N part of tree-WY for one value head: b_k (BN, BK) normalised keys, b_g, b_beta (BN,) gates, b_A
        (BN, BN) ancestor mask (row i = path of node i) -> T = (I + L)^-1 (BN, BN), Gamma (BN, BN), gamma (BN,), all
        float32. Shared by `_tree_verify_kernel` and gdn_tree's fused verify kernel.
        BLOCKED (default; `blocked_solve`): the blocked triangular inverse, ceil(log2 N) - 1 levels (at most
        log2(BN) - 1) of two IEEE float32 dots each; else forward substitution, N - 1 serial steps of two cross-warp
        reductions (see _solve_blocked)."""
        b_gamma = tl.sum(tl.where(b_A, b_g[None, :], 0.0), 1)  # (BN,) cumulative g along the path
        b_Gam = tl.where(b_A, tl.exp(b_gamma[:, None] - b_gamma[None, :]), 0.0)  # (BN, BN)
        b_kk = tl.dot(b_k, tl.trans(b_k), input_precision=PREC)  # (BN, BN)
        b_L = tl.where(rn[:, None] > rn[None, :], b_beta[:, None] * b_kk * b_Gam, 0.0)  # strictly lower, ancestors only
        if BLOCKED:
            b_T = _solve_blocked(b_L, rn, N)
        else:
            # T = (I + L)^-1 by forward substitution over rows: T_i = e_i - sum_{j<i} L_ij T_j
            b_T = tl.where(rn[:, None] == rn[None, :], 1.0, 0.0)
            for i in range(1, N):
                l_i = tl.sum(tl.where(rn[:, None] == i, b_L, 0.0), 0)  # (BN,) row i of L (over j)
                t_i = tl.sum(l_i[:, None] * b_T, 0)  # (BN,)
                b_T = tl.where(rn[:, None] == i, b_T - t_i[None, :], b_T)
        return b_T, b_Gam, b_gamma

    @triton.jit
    def _solve_blocked(b_L, rn, N):
        """T = (I + L)^-1 for a strictly lower triangular (BN, BN) float32 L, BN a power of two >= 16, as the blocked
        triangular inverse: the 2 x 2 diagonal blocks are I - L (exact), then each level merges pairs of diagonal
        blocks of width w into one of width 2w,

            [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]   i.e.   T <- T - T (L_off T)

        where L_off keeps the C blocks of this level: 2 IEEE float32 dots per level, ceil(log2(N)) - 1 levels (3 at
        N = 16, 1 at N = 4: rows past N are identity rows) instead of N - 1 serial substitution steps. Numerically it is substitution's equal: no term is
        formed that the inverse itself does not hold (unlike the doubling product (I - L)(I + L^2)...,
        benchmarks/check_tree_solve_stability.py)."""
        BN: tl.constexpr = b_L.shape[0]
        tl.static_assert(BN <= 64, "_solve_blocked merges up to 64 rows (MAX_NODES): extend its static_range")
        ri = rn[:, None]
        rj = rn[None, :]
        b_T = tl.where(ri == rj, 1.0, 0.0) - tl.where(ri // 2 == rj // 2, b_L, 0.0)
        for lvl in tl.static_range(1, 6):  # merges widths 2 -> 4 -> ... -> BN (BN <= 64)
            if (2 << lvl) <= BN:
                if (1 << lvl) < N:  # rows >= N are identity rows: no merge past the first block that holds all N
                    off = (ri // (2 << lvl) == rj // (2 << lvl)) & (ri // (1 << lvl) != rj // (1 << lvl))
                    b_X = tl.dot(tl.where(off, b_L, 0.0), b_T, input_precision="ieee")  # (BN, BN) L_off T
                    b_T = b_T - tl.dot(b_T, b_X, input_precision="ieee")
        return b_T

    @triton.jit
    def _tree_apply(b_q, b_k, b_v, b_beta, b_S, b_T, b_Gam, b_gamma, PREC: tl.constexpr, PREC_S: tl.constexpr):
        """The value-tile part of tree-WY: b_q (BN, BK) normalised and scaled, b_v (BN, BV), b_S (BK, BV) the committed
        state tile, all float32 -> (o (BN, BV), v_new (BN, BV)) float32:
        v_new = T (beta (V - e^gamma K S0)),  O = e^gamma Q S0 + ((Q K^T) * Gamma) v_new.
        PREC_S: the precision of the two products with S0; PREC: the others (see dot_precisions)."""
        b_eg = tl.exp(b_gamma)
        b_kS = tl.dot(b_k, b_S, input_precision=PREC_S)  # (BN, BV)
        b_R = b_beta[:, None] * (b_v - b_eg[:, None] * b_kS)
        b_vnew = tl.dot(b_T, b_R, input_precision=PREC)  # (BN, BV)
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * b_Gam  # (BN, BN)
        b_o = b_eg[:, None] * tl.dot(b_q, b_S, input_precision=PREC_S) + tl.dot(b_qk, b_vnew, input_precision=PREC)
        return b_o, b_vnew

    @triton.jit
    def _tree_verify_kernel(
        q, k, v, g, beta, amask, s0, o, k_out, vnew_out, gamma_out,
        N, scale, eps,
        H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        L2NORM: tl.constexpr, PREC: tl.constexpr, PREC_S: tl.constexpr, BLOCKED: tl.constexpr = True,
        PDL: tl.constexpr = False,
    ):
        enter(PDL)  # ops/pdl.py: before any load or store
        i_v = tl.program_id(0)
        i_bh = tl.program_id(1)
        i_b = i_bh // HV
        i_hv = i_bh % HV
        i_h = i_hv // (HV // H)
        rn = tl.arange(0, BN)
        rk = tl.arange(0, BK)
        rv = i_v * BV + tl.arange(0, BV)
        mn = rn < N
        mk = rk < K
        mv = rv < V

        qk_off = ((i_b * N + rn[:, None]) * H + i_h) * K + rk[None, :]  # (BN, BK) into (B, N, H, K)
        m_nk = mn[:, None] & mk[None, :]
        b_q = tl.load(q + qk_off, mask=m_nk, other=0.0).to(tl.float32)
        b_k = tl.load(k + qk_off, mask=m_nk, other=0.0).to(tl.float32)
        if L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 1) + eps)[:, None]
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 1) + eps)[:, None]
        b_q = b_q * scale

        gb_off = (i_b * N + rn) * HV + i_hv  # (BN,) into (B, N, HV)
        b_g = tl.load(g + gb_off, mask=mn, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + gb_off, mask=mn, other=0.0).to(tl.float32)
        m_nn = mn[:, None] & mn[None, :]
        b_A = tl.load(amask + (i_b * N + rn[:, None]) * N + rn[None, :], mask=m_nn, other=0) != 0  # (BN, BN)
        # the state tile and the values do not depend on the solve: issued first, their latency hides behind it
        s_off = ((i_b * HV + i_hv) * K + rk[:, None]) * V + rv[None, :]  # (BK, BV) into (B, HV, K, V)
        b_S = tl.load(s0 + s_off, mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
        v_off = ((i_b * N + rn[:, None]) * HV + i_hv) * V + rv[None, :]  # (BN, BV) into (B, N, HV, V)
        m_nv = mn[:, None] & mv[None, :]
        b_v = tl.load(v + v_off, mask=m_nv, other=0.0).to(tl.float32)
        b_T, b_Gam, b_gamma = _tree_solve(b_k, b_g, b_beta, b_A, rn, N, PREC, BLOCKED)
        b_o, b_vnew = _tree_apply(b_q, b_k, b_v, b_beta, b_S, b_T, b_Gam, b_gamma, PREC, PREC_S)

        tl.store(o + v_off, b_o.to(o.dtype.element_ty), mask=m_nv)
        tl.store(vnew_out + v_off, b_vnew, mask=m_nv)
        if i_v == 0:
            tl.store(gamma_out + gb_off, b_gamma, mask=mn)
            if i_hv % (HV // H) == 0:
                tl.store(k_out + qk_off, b_k, mask=m_nk)


def _pick_config(BN: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(block_v, num_warps) from the H100 sweep in benchmarks/results/ops_sweep_verify.json (tf32x3)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    many = programs >= 4 * sms
    if BN <= 16:
        return (128, 4) if many else (32, 4)
    if BN <= 32:
        return 64, 8
    return (64, 4) if many else (32, 8)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def triton_tree_gated_delta_rule(
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
    eps: float = 1e-6,
    precision: str | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, TritonTreeCache]:
    """Same contract as `tree_gated_delta_rule` (q, k (B, N, H, K); v (B, N, HV, V); g, beta (B, N, HV);
    ancestor_mask (B, N, N) bool; initial_state (B, HV, K, V) float32, only read). N <= 64.

    Returns (o (B, N, HV, V) in v's dtype, TritonTreeCache). precision: tl.dot input_precision for the float32
    products ('tf32x3' on CUDA by default, 'ieee' in the interpreter; 'tf32' is faster and less exact).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use gdnspec.ops.gated_delta_rule.tree.tree_gated_delta_rule")
    B, N, H, HV, K, V = check_gdr_inputs(q, k, v, g, beta, initial_state)
    if initial_state is None:
        raise ValueError("initial_state (the committed state S0, (B, HV, K, V)) is required for tree verification")
    if initial_state.dtype not in SSM_STATE_DTYPES:
        raise ValueError(f"initial_state must be float32 (or a 16-bit storage dtype) for the Triton kernel, got "
                         f"{initial_state.dtype}")
    if not 1 <= N <= MAX_NODES:
        raise ValueError(f"the Triton tree kernel takes 1..{MAX_NODES} nodes, got N={N}")
    _check_tree(ancestor_mask, B, N)
    scale = K**-0.5 if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g, beta = g.float().contiguous(), beta.float().contiguous()
    s0 = initial_state.contiguous()
    amask = ancestor_mask.contiguous().view(torch.uint8)
    dev = v.device
    o = torch.empty(B, N, HV, V, dtype=v.dtype, device=dev)
    k_out = torch.empty(B, N, H, K, dtype=torch.float32, device=dev)
    vnew = torch.empty(B, N, HV, V, dtype=torch.float32, device=dev)
    gamma = torch.empty(B, N, HV, dtype=torch.float32, device=dev)
    BN, BK = _pow2(N), _pow2(K)
    bv, warps = _pick_config(BN, B * HV, dev)
    BV = block_v or min(_pow2(V), bv)
    warps = num_warps or warps
    grid = (triton.cdiv(V, BV), B * HV)
    prec, prec_s = dot_precisions(precision or default_precision(v))
    _tree_verify_kernel[grid](
        q, k, v, g, beta, amask, s0, o, k_out, vnew, gamma,
        N, scale, eps,
        H=H, HV=HV, K=K, V=V, BN=BN, BK=BK, BV=BV,
        L2NORM=bool(use_qk_l2norm), PREC=prec, PREC_S=prec_s, BLOCKED=blocked_solve(),
        num_warps=warps, **pdl.launch_args(q),
    )
    return o, TritonTreeCache(k=k_out, v_new=vnew, gamma=gamma, ancestor_mask=ancestor_mask)
