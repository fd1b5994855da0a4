"""The draft-tree builder's bookkeeping (spec/tree.py) as three Triton kernels: the frontier step of an EAGLE-2 tree,
the final best-N selection, and the greedy chain's assembly.

    nxt = frontier_step(top_lp, top_tok, pool, base=b, width=W, frontier=(scores, pool_idx) or None, roots=r)
    tree = select_best(pool, num_draft_tokens=N)        # (tokens, parents, scores, valid (B, N), order (B, N - 1))
    tree = chain_tree(roots, lp, tok, num_draft_tokens=N)   # the same five tensors for a greedy chain

Why: between the drafter's expansions, `build_tree` ran ~10 torch kernels per step (the candidates' scores, a radix
top-k of the layer, gathers of tokens / slots / pool indices) and ~25 to pick and renumber the kept nodes; the chain
builder ~20 to assemble its tree. On an H200 each is a 1-2 us launch that the CUDA-graph step serialises: in the
shipped bundle's EAGLE tree-4x5 step the torch kernels took ~205 of its 800 us (benchmarks/results/stop22/
kernels_run3). Here each is one program per row (B programs), with every list of the row in registers.

frontier_step: candidates c = F * K children of the frontier (top_lp / top_tok (B, F, K), best first per node);
    cand score = frontier score + log-prob (the same float32 add as the torch builder; the root's frontier is score 0,
    pool index 0 when `frontier` is None, and the roots are written to pool column 0); writes the layer to the pool
    columns [base, base + F * K) (token, parent pool index, score) and, with width W >= 1, returns the W best
    candidates (score descending, NaN first as torch ranks it, ties to the lower candidate index; torch.topk leaves
    the order of exact ties unspecified, so there a tie may keep another equally scored node): next frontier
    tokens, parent slot (the candidate's node in this frontier), pool index (base + candidate), score (B, W) each,
    and rows (B * W,) = b * F + slot (the flat frontier row a drafter gathers its per-node state from).
select_best: keep the root and the n = min(N - 1, P - 1) best pool nodes (score descending, NaN first, ties to the
    lower pool index: torch's stable sort), in pool (topological) order, parents renumbered; nodes whose score is
    not finite are invalid (token 0, parent 0, score -inf); padded to N nodes. `spec.tree._select_best`'s result,
    bit for bit.
chain_tree: node s + 1 = tok[:, s] with score lp[:, 0] + ... + lp[:, s] (added in that order, as the chain builder
    does step by step); valid while the score is finite; padded to N nodes; order = 1 .. S. `spec.tree._build_chain`'s
    tail, bit for bit.

Limits: P (pool nodes) and F * K (candidates) <= MAX_POOL (one program holds a P x P comparison). The torch forms in
spec/tree.py stay the references and the path everywhere these kernels do not run (the CPU, GDNSPEC_TREE_BUILD=0
for A/B); tests compare them under TRITON_INTERPRET=1 (tests/test_tree_build.py).
"""
from __future__ import annotations

import os

import torch

from gdnspec.ops._env import flag
from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON, available

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["MAX_POOL", "chain_tree", "enabled", "frontier_step", "runs_on", "select_best"]

MAX_POOL = 256

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# CPU tensors take the kernels (through the interpreter) only when a test sets this (as ops/tree_index.py)
DISPATCH_ON_CPU = False


def enabled() -> bool:
    """GDNSPEC_TREE_BUILD: "1" (default) or "0"; anything else raises a ValueError naming the variable."""
    return flag("GDNSPEC_TREE_BUILD", default=True)


def runs_on(t: torch.Tensor) -> bool:
    """Whether the tree builder takes these kernels for tensors like `t`: Triton, a CUDA tensor (CPU tensors only in
    the kernel tests: DISPATCH_ON_CPU under TRITON_INTERPRET=1), GDNSPEC_TREE_BUILD not 0."""
    if not (HAS_TRITON and enabled()):
        return False
    return t.is_cuda or (DISPATCH_ON_CPU and _INTERPRETED and available(t))


if HAS_TRITON:

    @triton.jit
    def _beats(a, b, ia, ib):
        """Whether value a (index ia) ranks before value b (index ib), best first, in torch.sort / topk's order:
        larger first, NaN above everything, equal values (NaN with NaN) by the lower index. A strict total order, so
        the ranks of a row are a permutation whatever its values."""
        nan_a = a != a
        nan_b = b != b
        greater = (a > b) | (nan_a & ~nan_b)
        same = (a == b) | (nan_a & nan_b)
        return greater | (same & (ia < ib))

    @triton.jit
    def _finite(x):
        """torch.isfinite: not NaN, not +-inf (a node with such a score is invalid)."""
        return (x == x) & (x != float("inf")) & (x != float("-inf"))

    @triton.jit
    def _root_and_padding(tokens, parents, scores, valid, b, N, root, last, BN: tl.constexpr):
        """Row b of a tree's outputs (B, N): node 0 = the root (token `root`, parent -1, score 0, valid) and the
        padding nodes last + 1 .. N - 1 (token 0, parent 0, score -inf, invalid)."""
        n = tl.arange(0, BN)
        put = (n == 0) | ((n > last) & (n < N))
        tl.store(tokens + b * N + n, tl.where(n == 0, root, 0), mask=put)
        tl.store(parents + b * N + n, tl.where(n == 0, -1, 0).to(tl.int64), mask=put)
        tl.store(scores + b * N + n, tl.where(n == 0, 0.0, float("-inf")), mask=put)
        tl.store(valid + b * N + n, (n == 0).to(tl.int8), mask=put)

    @triton.jit
    def _frontier_kernel(lp, tok, fscore, fpool, roots, pool_tok, pool_par, pool_sc, out_tok, out_slot, out_pool,
                         out_sc, out_rows, P, base, F, C, W, K: tl.constexpr, BC: tl.constexpr, FIRST: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BC)
        mi = i < C
        f = i // K
        v = tl.load(lp + b * C + i, mask=mi, other=float("-inf"))
        t = tl.load(tok + b * C + i, mask=mi, other=0)
        if FIRST:  # the frontier is the root: score 0, pool index 0; the root itself goes to pool column 0
            cand = 0.0 + v
            par = tl.zeros((BC,), dtype=tl.int64)
            tl.store(pool_tok + b * P, tl.load(roots + b))
            tl.store(pool_par + b * P, -1)
            tl.store(pool_sc + b * P, 0.0)
        else:
            cand = tl.load(fscore + b * F + f, mask=mi, other=0.0) + v
            par = tl.load(fpool + b * F + f, mask=mi, other=0)
        tl.store(pool_tok + b * P + base + i, t, mask=mi)
        tl.store(pool_par + b * P + base + i, par, mask=mi)
        tl.store(pool_sc + b * P + base + i, cand, mask=mi)
        if W > 0:
            j = tl.arange(0, BC)
            cj = tl.where(j < C, cand, float("-inf"))  # the same values, indexed by j
            beats = _beats(cj[None, :], cand[:, None], j[None, :], i[:, None])
            rank = tl.sum((beats & (j < C)[None, :]).to(tl.int32), 1)  # (BC,) place of candidate i, best first
            sel = mi & (rank < W)
            o = b * W + rank
            tl.store(out_tok + o, t, mask=sel)
            tl.store(out_slot + o, f.to(tl.int64), mask=sel)
            tl.store(out_pool + o, (base + i).to(tl.int64), mask=sel)
            tl.store(out_sc + o, cand, mask=sel)
            tl.store(out_rows + o, b * F + f, mask=sel)

    @triton.jit
    def _select_kernel(pool_tok, pool_par, pool_sc, tokens, parents, scores, valid, order, P, N, n_keep,
                       BP: tl.constexpr, BN: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BP)  # candidate i = pool node i + 1 (the root is always kept)
        mi = i + 1 < P
        s = tl.load(pool_sc + b * P + 1 + i, mask=mi, other=float("-inf"))
        j = tl.arange(0, BP)
        mj = j + 1 < P
        sj = tl.where(mj, s, float("-inf"))
        beats = _beats(sj[None, :], s[:, None], j[None, :], i[:, None])
        rank = tl.sum((beats & mj[None, :]).to(tl.int32), 1)
        kept = mi & (rank < n_keep)
        keptj = tl.where(mj, kept, False)
        pos = tl.sum((keptj[None, :] & (j[None, :] < i[:, None])).to(tl.int32), 1)  # (BP,) topological place
        node = pos + 1
        nodej = tl.where(keptj, node, -1)
        pp = tl.load(pool_par + b * P + 1 + i, mask=mi, other=0)  # parent pool index
        # its node: 0 for the root, node_j when pool node j + 1 is the kept parent, -1 if it was dropped
        hit = ((j[None, :] + 1) == pp[:, None]) & keptj[None, :]
        found = tl.sum(hit.to(tl.int32), 1) > 0
        pnode = tl.where(pp == 0, 0, tl.where(found, tl.sum(tl.where(hit, nodej[None, :], 0), 1), -1))
        ok = _finite(s)
        tk = tl.load(pool_tok + b * P + 1 + i, mask=mi, other=0)
        dst = b * N + node
        tl.store(tokens + dst, tl.where(ok, tk, 0), mask=kept)
        tl.store(parents + dst, tl.where(ok, pnode, 0).to(tl.int64), mask=kept)
        tl.store(scores + dst, tl.where(ok, s, float("-inf")), mask=kept)
        tl.store(valid + dst, ok.to(tl.int8), mask=kept)
        tl.store(order + b * n_keep + pos, (i + 1).to(tl.int64), mask=kept)
        _root_and_padding(tokens, parents, scores, valid, b, N, tl.load(pool_tok + b * P), n_keep, BN)

    @triton.jit
    def _chain_kernel(roots, lp, tok, tokens, parents, scores, valid, order, S, N, BN: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        acc = tl.load(lp + b * S)  # scalar running score, added step by step as the builder does
        for s in range(0, S):
            x = tl.load(lp + b * S + s)
            acc = tl.where(s == 0, x, acc + x)
            ok = _finite(acc)
            o = b * N + s + 1
            tl.store(tokens + o, tl.where(ok, tl.load(tok + b * S + s), 0))
            tl.store(parents + o, tl.where(ok, s, 0).to(tl.int64))
            tl.store(scores + o, tl.where(ok, acc, float("-inf")))
            tl.store(valid + o, ok.to(tl.int8))
            tl.store(order + b * S + s, b * 0 + s + 1)  # int64 (b is)
        _root_and_padding(tokens, parents, scores, valid, b, N, tl.load(roots + b), S, BN)


def _pow2(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def _warps(block: int) -> int:
    return 8 if block >= 256 else 4


def _select_warps(block: int) -> int:
    """num_warps of the best-N selection over BP = `block` candidates: its rank / place / parent matrices are
    (BP, BP), so the warps grow with BP to keep them in registers. ptxas for sm_90 (benchmarks/compile_check.py
    --ptxas): BP = 128 with 4 warps used 255 registers and spilled (EAGLE tree-4x5's 69-node pool: the kernel took
    ~20 us of a 640 us step on an H200, results/stop24/run1_tree_build), 84 with 16 warps; BP = 64: 96 with 4, 32
    with 16; BP = 256 (MAX_POOL) spills least with 16 (900 bytes)."""
    return 4 if block <= 32 else (8 if block <= 64 else 16)


def _need(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(shape)}, got {got}")


def _check_pool(pool: tuple, B: int) -> tuple:
    """pool = (tokens long, parent pool indices long, scores float32), each (B, P); ValueError naming the bad one."""
    P = pool[0].shape[1]
    for name, t, dt in zip(("pool tokens", "pool parents", "pool scores"), pool, (torch.long, torch.long, torch.float32)):
        _need(name, t, (B, P), dt)
    return pool


def new_pool(batch_size: int, pool_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty pool columns (tokens long, parent pool indices long, scores float32), (B, P) each: no kernel launch; the
    frontier steps fill every column (column 0 by the first one)."""
    if not 1 <= pool_size <= MAX_POOL + 1:
        raise ValueError(f"pool_size must be in [1, {MAX_POOL + 1}], got {pool_size}")
    return (torch.empty(batch_size, pool_size, dtype=torch.long, device=device),
            torch.empty(batch_size, pool_size, dtype=torch.long, device=device),
            torch.empty(batch_size, pool_size, dtype=torch.float32, device=device))


def frontier_step(top_lp: torch.Tensor, top_tok: torch.Tensor, pool: tuple, *, base: int, width: int,
                  frontier: tuple[torch.Tensor, torch.Tensor] | None = None, roots: torch.Tensor | None = None):
    """One EAGLE-2 layer (module docstring). top_lp (B, F, K) float32 and top_tok (B, F, K) long: each frontier node's
    K best children; pool = new_pool(...) (written in place at columns [base, base + F * K), and column 0 when
    frontier is None); frontier = (scores (B, F) float32, pool indices (B, F) long) or None for the root (then roots
    (B,) long is required); width W >= 0 (0: the last layer, nothing returned). Returns (tokens, parent slot, pool
    index, score (B, W), rows (B * W,)) or None. Errors: ValueError naming the argument."""
    B, F, K = top_lp.shape
    C = F * K
    _need("top_lp", top_lp, (B, F, K), torch.float32)
    _need("top_tok", top_tok, (B, F, K), torch.long)
    pool_tok, pool_par, pool_sc = _check_pool(pool, B)
    P = pool_tok.shape[1]
    if not (isinstance(base, int) and 1 <= base and base + C <= P):
        raise ValueError(f"base must be an int with 1 <= base and base + F * K <= P = {P}, got {base!r} (F * K = {C})")
    if not (isinstance(width, int) and 0 <= width <= C):
        raise ValueError(f"width must be an int in [0, F * K = {C}], got {width!r}")
    if C > MAX_POOL:
        raise ValueError(f"frontier_step takes at most {MAX_POOL} candidates per row, got F * K = {C}")
    dev = top_lp.device
    if frontier is None:
        if F != 1:
            raise ValueError(f"the root layer has one frontier node (F = 1), got F = {F}")
        _need("roots", roots, (B,), torch.long)
        fs, fp, rt = top_lp, top_tok, roots.contiguous()
    else:
        fs, fp = frontier
        _need("frontier scores", fs, (B, F), torch.float32)
        _need("frontier pool indices", fp, (B, F), torch.long)
        fs, fp, rt = fs.contiguous(), fp.contiguous(), top_tok
    Wk = max(width, 1)
    out_tok = torch.empty(B, Wk, dtype=torch.long, device=dev)
    out_slot = torch.empty(B, Wk, dtype=torch.long, device=dev)
    out_pool = torch.empty(B, Wk, dtype=torch.long, device=dev)
    out_sc = torch.empty(B, Wk, dtype=torch.float32, device=dev)
    out_rows = torch.empty(B * Wk, dtype=torch.long, device=dev)
    if B > 0:
        BC = _pow2(C)
        _frontier_kernel[(B,)](top_lp.contiguous(), top_tok.contiguous(), fs, fp, rt, pool_tok, pool_par, pool_sc,
                               out_tok, out_slot, out_pool, out_sc, out_rows, P, base, F, C, width, K=K, BC=BC,
                               FIRST=frontier is None, num_warps=_warps(BC))
    if width == 0:
        return None
    return out_tok, out_slot, out_pool, out_sc, out_rows


def _outputs(B: int, N: int, n_order: int, dev):
    return (torch.empty(B, N, dtype=torch.long, device=dev), torch.empty(B, N, dtype=torch.long, device=dev),
            torch.empty(B, N, dtype=torch.float32, device=dev), torch.empty(B, N, dtype=torch.int8, device=dev),
            torch.empty(B, n_order, dtype=torch.long, device=dev))


def select_best(pool: tuple, *, num_draft_tokens: int):
    """The final EAGLE-2 pruning (module docstring): pool (tokens long, parents long, scores float32) (B, P), P <=
    MAX_POOL + 1 -> (tokens, parents (B, N) long, scores (B, N) float32, valid (B, N) bool, order (B, n) long with
    n = min(N - 1, P - 1): the kept pool indices in topological order). Errors: ValueError naming the argument."""
    pool_tok, pool_par, pool_sc = _check_pool(pool, pool[0].shape[0])
    B, P = pool_tok.shape
    N = num_draft_tokens
    if not (isinstance(N, int) and N >= 2):
        raise ValueError(f"num_draft_tokens must be an int >= 2, got {N!r}")
    if not 2 <= P <= MAX_POOL + 1:
        raise ValueError(f"select_best takes 2 <= P <= {MAX_POOL + 1} pool nodes, got P = {P}")
    n_keep = min(N - 1, P - 1)
    tokens, parents, scores, valid, order = _outputs(B, N, n_keep, pool_tok.device)
    if B > 0:
        BP = _pow2(P - 1)
        _select_kernel[(B,)](pool_tok.contiguous(), pool_par.contiguous(), pool_sc.contiguous(), tokens, parents,
                             scores, valid, order, P, N, n_keep, BP=BP, BN=_pow2(N), num_warps=_select_warps(BP))
    return tokens, parents, scores, valid.view(torch.bool), order


def chain_tree(roots: torch.Tensor, lp: torch.Tensor, tok: torch.Tensor, *, num_draft_tokens: int):
    """A greedy chain's tree (module docstring): roots (B,) long, lp (B, S) float32 the chosen tokens' log-probs, tok
    (B, S) long, S <= N - 1 -> (tokens, parents (B, N) long, scores (B, N) float32, valid (B, N) bool, order (B, S)
    long = 1 .. S). Errors: ValueError naming the argument."""
    B, S = lp.shape
    N = num_draft_tokens
    if not (isinstance(N, int) and N >= 2):
        raise ValueError(f"num_draft_tokens must be an int >= 2, got {N!r}")
    if not 1 <= S <= N - 1:
        raise ValueError(f"lp must have 1 <= S <= num_draft_tokens - 1 = {N - 1} columns, got S = {S}")
    _need("lp", lp, (B, S), torch.float32)
    _need("tok", tok, (B, S), torch.long)
    _need("roots", roots, (B,), torch.long)
    tokens, parents, scores, valid, order = _outputs(B, N, S, lp.device)
    if B > 0:
        _chain_kernel[(B,)](roots.contiguous(), lp.contiguous(), tok.contiguous(), tokens, parents, scores, valid,
                            order, S, N, BN=_pow2(N), num_warps=1)
    return tokens, parents, scores, valid.view(torch.bool), order
