"""Gated delta rule ops: chunk == fused recurrent == step-by-step decode == naive reference (output AND final state),
tree-WY == per-node reference == per-path recurrence, gradients of the chunk form.

Run: python -m pytest -q tests/test_ops_gated_delta_rule.py
"""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import gdr_inputs, path_to, random_parents, tol
from gdnspec.ops.gated_delta_rule import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    gated_delta_rule_decode_step,
    naive_recurrent_gated_delta_rule,
    naive_tree_gated_delta_rule,
    tree_commit_state,
    tree_gated_delta_rule,
)
from gdnspec.layers import TokenLayout

TS = (1, 7, 63, 64, 65, 200)
DIMS = ((16, 16), (32, 32), (48, 48), (16, 48), (48, 32))  # (K, V), K != V included


def run_decode_loop(q, k, v, g, beta, state, use_qk_l2norm):
    """Step-by-step decode: gated_delta_rule_decode_step once per token on a caller-owned state."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    sdt = torch.float64 if v.dtype == torch.float64 else torch.float32
    S = torch.zeros(B, HV, K, V, dtype=sdt) if state is None else state.clone()
    outs = [gated_delta_rule_decode_step(q[:, t], k[:, t], v[:, t], g=g[:, t], beta=beta[:, t], state=S,
                                         use_qk_l2norm=use_qk_l2norm) for t in range(T)]
    return torch.stack(outs, dim=1), S


def all_impls(q, k, v, g, beta, state, l2):
    kw = dict(g=g, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm=l2)
    return {
        "naive": naive_recurrent_gated_delta_rule(q, k, v, **kw),
        "fused_recurrent": fused_recurrent_gated_delta_rule(q, k, v, **kw),
        "chunk": chunk_gated_delta_rule(q, k, v, **kw),
        "decode": run_decode_loop(q, k, v, g, beta, state, l2),
    }


CASES = [
    (T, ratio, dtype, dims, flags)
    for i, (T, ratio, dtype, dims) in enumerate(itertools.product(TS, (1, 2), (torch.float32, torch.float64), DIMS))
    for flags in [((True, False), (False, True), (True, True), (False, False))[i % 4]]
]


@pytest.mark.parametrize("T,ratio,dtype,dims,flags", CASES, ids=lambda p: str(p).replace("torch.", ""))
def test_all_forms_agree(T, ratio, dtype, dims, flags):
    """Every (T, HV/H, dtype, head dims) combination; (with_state, use_qk_l2norm) cycles through all 4 pairs."""
    with_state, l2 = flags
    K, V = dims
    H = 2
    q, k, v, g, beta, s0 = gdr_inputs(2, T, H, H * ratio, K, V, dtype=dtype, with_state=with_state, l2norm_in_op=l2, seed=T)
    s0_copy = None if s0 is None else s0.clone()
    res = all_impls(q, k, v, g, beta, s0, l2)
    o_ref, s_ref = res["naive"]
    assert o_ref.shape == (2, T, H * ratio, V) and o_ref.dtype == dtype
    assert s_ref.shape == (2, H * ratio, K, V) and s_ref.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, (o, s) in res.items():
        torch.testing.assert_close(o, o_ref, **tol(dtype), msg=f"{name} output")
        torch.testing.assert_close(s, s_ref, **tol(dtype), msg=f"{name} final state")
    if s0 is not None:
        assert torch.equal(s0, s0_copy), "initial_state must not be modified"


@pytest.mark.parametrize("with_state,l2", list(itertools.product((False, True), (False, True))))
def test_full_flag_grid_and_reference_semantics(with_state, l2):
    """All flag pairs on one awkward shape, plus: the initial state matters, and the naive reference follows the
    written recurrence for T=1 (S = a*S0; u = b*(v - S^T k); S += k u^T; o = S^T q*scale) computed by hand."""
    q, k, v, g, beta, s0 = gdr_inputs(1, 65, 1, 2, 16, 32, dtype=torch.float64, with_state=with_state, l2norm_in_op=l2, seed=5)
    res = all_impls(q, k, v, g, beta, s0, l2)
    for name, (o, s) in res.items():
        torch.testing.assert_close(o, res["naive"][0], **tol(torch.float64), msg=name)
        torch.testing.assert_close(s, res["naive"][1], **tol(torch.float64), msg=name)
    if with_state:
        o0, _ = naive_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm=l2)
        assert (o0 - res["naive"][0]).abs().max() > 1e-3, "initial state had no effect"
    # hand-written single step
    qq, kk = (torch.nn.functional.normalize(x, dim=-1, eps=0) if l2 else x for x in (q[:, 0, 0], k[:, 0, 0]))
    S = torch.zeros(1, 2, 16, 32, dtype=torch.float64) if s0 is None else s0.clone()
    S = S * g[:, 0].exp()[..., None, None]
    u = beta[:, 0, :, None] * (v[:, 0] - torch.einsum("bhkv,bk->bhv", S, kk))
    S = S + kk[:, None, :, None] * u[:, :, None, :]
    o = torch.einsum("bhkv,bk->bhv", S, qq * 16**-0.5)
    o_n, S_n = naive_recurrent_gated_delta_rule(q[:, :1], k[:, :1], v[:, :1], g=g[:, :1], beta=beta[:, :1],
                                                initial_state=s0, output_final_state=True, use_qk_l2norm=l2)
    # l2norm uses x*rsqrt(|x|^2 + 1e-6): differs from exact normalisation by ~1e-6/|x|^2 relative
    torch.testing.assert_close(o_n[:, 0], o, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(S_n, S, atol=1e-6, rtol=1e-6)


def test_grouped_value_heads_use_key_head_j_div_r():
    """HV = 2H: value head j reads key head j // 2. Equivalent to H = HV with key heads repeated."""
    q, k, v, g, beta, s0 = gdr_inputs(2, 9, 2, 4, 8, 8, dtype=torch.float64, seed=3)
    o, s = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
    rep = lambda x: x.repeat_interleave(2, dim=2)  # noqa: E731
    o2, s2 = naive_recurrent_gated_delta_rule(rep(q), rep(k), v, g=g, beta=beta, initial_state=s0,
                                              output_final_state=True, use_qk_l2norm=True)
    torch.testing.assert_close(o, o2, **tol(torch.float64))
    torch.testing.assert_close(s, s2, **tol(torch.float64))


@pytest.mark.parametrize("T", (7, 65))
@pytest.mark.parametrize("impl", ("chunk", "fused_recurrent", "decode"))
def test_bf16_inputs_vs_fp32_reference(T, impl):
    """bf16 activations: the ops compute in float32 internally and return bf16 output with a float32 state.
    Reference = naive on the same (bf16-representable) values in float32. The state stays float32, so only the final
    cast of the output is lossy: bf16 has an 8-bit mantissa (rel. error <= 2^-8 ~ 4e-3); we allow 1e-2 rel + 1e-2 abs."""
    q, k, v, g, beta, s0 = gdr_inputs(2, T, 2, 4, 16, 32, dtype=torch.bfloat16, seed=11)
    res = all_impls(q, k, v, g, beta, s0, True)
    o, s = res[impl]
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q.float(), k.float(), v.float(), g=g, beta=beta, initial_state=s0,
                                                    output_final_state=True, use_qk_l2norm=True)
    torch.testing.assert_close(o.float(), o_ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)


def test_chunk_sizes_and_no_final_state():
    """Any chunk size gives the same result (the padding of the last chunk leaves the state unchanged)."""
    q, k, v, g, beta, s0 = gdr_inputs(1, 23, 1, 2, 8, 8, dtype=torch.float64, seed=2)
    ref = naive_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
    for C in (1, 4, 5, 23, 64):
        o, s = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=s0, output_final_state=True,
                                      use_qk_l2norm=True, chunk_size=C)
        torch.testing.assert_close(o, ref[0], **tol(torch.float64))
        torch.testing.assert_close(s, ref[1], **tol(torch.float64))
    o, s = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm=True)
    assert s is None


# ---------------------------------------------------------------------------------------------------- gradients
def test_chunk_gradcheck_tiny():
    """torch.autograd.gradcheck in float64: B=1, T=5, chunk_size=2 (3 chunks, last one padded), H=1, HV=2, K=V=3,
    wrt q, k, v, g, beta and the initial state, through both the output and the final state."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, HV, K, V = 1, 5, 1, 2, 3, 3
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64, requires_grad=True)
    k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    v = torch.randn(B, T, HV, V, generator=gen, dtype=torch.float64, requires_grad=True)
    g = (-torch.rand(B, T, HV, generator=gen, dtype=torch.float64)).requires_grad_()
    beta = torch.rand(B, T, HV, generator=gen, dtype=torch.float64).requires_grad_()
    s0 = torch.randn(B, HV, K, V, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, g, beta, s0):
        return chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=s0, output_final_state=True, chunk_size=2)

    assert torch.autograd.gradcheck(f, (q, k, v, g, beta, s0), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_chunk_grads_match_naive_grads():
    """Chunk (C=64, T=70 -> 2 chunks) vs the token-by-token reference, fp64, HV=2H, with q/k L2 norm in the op."""
    inputs = gdr_inputs(2, 70, 2, 4, 16, 8, dtype=torch.float64, seed=7)
    grads = []
    for fn in (chunk_gated_delta_rule, naive_recurrent_gated_delta_rule):
        leaves = [x.clone().requires_grad_() for x in inputs]
        q, k, v, g, beta, s0 = leaves
        o, s = fn(q, k, v, g=g, beta=beta, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
        w_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype)
        w_s = torch.randn(s.shape, generator=torch.Generator().manual_seed(2), dtype=s.dtype)
        ((o * w_o).sum() + (s * w_s).sum()).backward()
        grads.append([x.grad for x in leaves])
    for name, gc, gn in zip("q k v g beta s0".split(), *grads):
        assert gc is not None and gn.abs().max() > 0, name
        torch.testing.assert_close(gc, gn, atol=1e-9, rtol=1e-8, msg=f"grad {name}")


# ---------------------------------------------------------------------------------------------------- tree ops
@pytest.mark.parametrize("kind,N,dtype", [("random", 13, torch.float64), ("random", 9, torch.float32),
                                          ("chain", 11, torch.float64), ("star", 8, torch.float64), ("random", 1, torch.float64)])
def test_tree_gdr_matches_reference(kind, N, dtype):
    """tree-WY outputs == per-node-state reference; tree_commit_state(node) == the reference's state at node; and the
    reference itself == running the plain recurrence along each node's root-to-node path."""
    B, H, HV, K, V = 2, 1, 2, 16, 8
    q, k, v, g, beta, s0 = gdr_inputs(B, N, H, HV, K, V, dtype=dtype, seed=N)
    parents = random_parents(B, N, kind, seed=N)
    layout = TokenLayout.from_parents(parents)
    s0_copy = s0.clone()
    o, cache = tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=layout.ancestor_mask, initial_state=s0,
                                     use_qk_l2norm=True)
    o_ref, states = naive_tree_gated_delta_rule(q, k, v, g=g, beta=beta, parents=parents, initial_state=s0, use_qk_l2norm=True)
    torch.testing.assert_close(o, o_ref, **tol(dtype))
    for node in range(N):
        s = tree_commit_state(initial_state=s0, cache=cache, node=torch.full((B,), node, dtype=torch.long))
        torch.testing.assert_close(s, states[:, node], **tol(dtype))
    # different node per row
    nodes = torch.randint(0, N, (B,))
    s = tree_commit_state(initial_state=s0, cache=cache, node=nodes)
    torch.testing.assert_close(s, states[torch.arange(B), nodes], **tol(dtype))
    assert torch.equal(s0, s0_copy)
    for b in range(B):
        for node in range(N):
            p = path_to(parents[b], node)
            sl = lambda x: x[b:b + 1, p]  # noqa: E731
            op, sp = naive_recurrent_gated_delta_rule(sl(q), sl(k), sl(v), g=sl(g), beta=sl(beta), initial_state=s0[b:b + 1],
                                                      output_final_state=True, use_qk_l2norm=True)
            torch.testing.assert_close(o_ref[b, node], op[0, -1], **tol(dtype))
            torch.testing.assert_close(states[b, node], sp[0], **tol(dtype))


def test_tree_requires_topological_parents_and_state():
    q, k, v, g, beta, s0 = gdr_inputs(1, 3, 1, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="parents"):
        naive_tree_gated_delta_rule(q, k, v, g=g, beta=beta, parents=torch.tensor([[-1, 2, 0]]), initial_state=s0)
    with pytest.raises(ValueError, match="parents"):
        TokenLayout.from_parents(torch.tensor([[-1, 2, 0]]))
    with pytest.raises(ValueError, match="initial_state"):
        tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=torch.ones(1, 3, 3, dtype=torch.bool).tril(),
                              initial_state=None)
    with pytest.raises(ValueError, match="ancestor_mask"):
        tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=torch.ones(1, 3, 3).tril(), initial_state=s0)


# ---------------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_name_the_argument():
    q, k, v, g, beta, s0 = gdr_inputs(1, 4, 2, 4, 8, 8)
    kw = dict(g=g, beta=beta)
    for fn in (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, naive_recurrent_gated_delta_rule):
        with pytest.raises(ValueError, match="value heads"):
            fn(q, k, v[:, :, :3], g=g[..., :3], beta=beta[..., :3])
        with pytest.raises(ValueError, match="initial_state"):
            fn(q, k, v, **kw, initial_state=s0[:, :, :4])
        with pytest.raises(ValueError, match="initial_state"):
            fn(q, k, v, **kw, initial_state=s0.to(torch.int32))
        # a 16-bit storage dtype (mamba_ssm_cache_dtype) is taken and computed in float32: as its float32 upcast
        s16 = s0.to(torch.bfloat16)
        o16, f16 = fn(q, k, v, **kw, initial_state=s16, output_final_state=True)
        o32, f32 = fn(q, k, v, **kw, initial_state=s16.float(), output_final_state=True)
        assert f16.dtype == torch.float32 and torch.equal(o16, o32) and torch.equal(f16, f32)
        with pytest.raises(ValueError, match="g must"):
            fn(q, k, v, g=g[:, :3], beta=beta)
        with pytest.raises(ValueError, match="beta must"):
            fn(q, k, v, g=g, beta=beta[..., None])
        with pytest.raises(ValueError, match="q and k"):
            fn(q, k[..., :4], v, **kw)
        with pytest.raises(TypeError, match="q must"):
            fn(q.numpy(), k, v, **kw)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_delta_rule(q, k, v, **kw, chunk_size=0)
    with pytest.raises(ValueError, match="state must be"):
        gated_delta_rule_decode_step(q[:, 0], k[:, 0], v[:, 0], g=g[:, 0], beta=beta[:, 0], state=s0.double())
    with pytest.raises(TypeError):
        chunk_gated_delta_rule(q, k, v, g, beta)  # g/beta are keyword-only
