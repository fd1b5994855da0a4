"""The Triton kernels (tree verify, commit, conv commit, fused decode) against their torch references, on the CPU
through the Triton interpreter (TRITON_INTERPRET=1), at small awkward shapes. Outputs AND states are compared.

Run: python -m pytest -q tests/test_triton_kernels.py   (skipped when triton is not installed)

The interpreter is chosen when a kernel is decorated, so this module sets TRITON_INTERPRET=1 before importing the
gdnspec Triton modules and reloads them if another test module imported them first; the variable is restored when
the module's tests end.
"""
from __future__ import annotations

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch  # noqa: E402

from conftest import gdr_inputs, interpreter_modules, random_parents, rel_err  # noqa: E402
from gdnspec.layers.gated_deltanet import Qwen3GatedDeltaNet  # noqa: E402
from gdnspec.layers.layout import TokenLayout  # noqa: E402
from gdnspec.ops.conv1d.tree import tree_causal_conv1d, tree_conv_commit_state  # noqa: E402
from gdnspec.ops.gated_delta_rule.recurrent import gated_delta_rule_decode_step  # noqa: E402
from gdnspec.ops.gated_delta_rule.tree import (  # noqa: E402
    naive_tree_gated_delta_rule,
    tree_commit_state,
    tree_gated_delta_rule,
)

tt, tc, td = interpreter_modules(["gdnspec.ops.gated_delta_rule.triton_tree", "gdnspec.ops.gated_delta_rule.triton_commit",
                                  "gdnspec.ops.gated_delta_rule.triton_decode"])
pytestmark = pytest.mark.usefixtures("interpret_env")
rel = rel_err


# (B, N, H, HV, K, V, dtype, tree kind)
TREE_CASES = [
    (1, 1, 2, 2, 16, 32, torch.float32, "chain"),
    (3, 5, 2, 4, 16, 32, torch.float32, "random"),
    (1, 5, 1, 2, 32, 16, torch.bfloat16, "star"),
    (3, 16, 2, 2, 32, 16, torch.float32, "random"),
    (3, 16, 1, 2, 16, 32, torch.bfloat16, "random"),
    (1, 16, 2, 4, 16, 16, torch.float32, "chain"),
    (3, 1, 1, 1, 32, 32, torch.bfloat16, "chain"),
]


@pytest.mark.parametrize("B,N,H,HV,K,V,dtype,kind", TREE_CASES)
def test_tree_verify_and_commit_match_reference(B, N, H, HV, K, V, dtype, kind):
    q, k, v, g, beta, S0 = gdr_inputs(B, N, H, HV, K, V, dtype=dtype, seed=N + B)
    parents = random_parents(B, N, kind, seed=N)
    layout = TokenLayout.from_parents(parents)
    o_ref, c_ref = tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=layout.ancestor_mask,
                                         initial_state=S0, use_qk_l2norm=True)
    _, states = naive_tree_gated_delta_rule(q, k, v, g=g, beta=beta, parents=parents, initial_state=S0,
                                            use_qk_l2norm=True)
    S0_copy = S0.clone()
    o, cache = tt.triton_tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=layout.ancestor_mask,
                                               initial_state=S0, use_qk_l2norm=True)
    assert torch.equal(S0, S0_copy), "tree verify must not write the committed state"
    assert o.dtype == dtype and o.shape == o_ref.shape
    out_tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(o, o_ref) < out_tol
    ref = cache.to_reference()
    assert rel(ref.k, c_ref.k) < 1e-5 and rel(ref.v_new, c_ref.v_new) < 1e-5 and rel(ref.gamma, c_ref.gamma) < 1e-5

    # commit: different accepted nodes per row; node -1 keeps the row's state
    node = torch.randint(0, N, (B,))
    if B > 1:
        node[-1] = -1
    S = S0.clone()
    out = tc.triton_tree_commit_state(state=S, cache=cache, node=node)
    assert out.data_ptr() == S.data_ptr()
    for b in range(B):
        want = S0[b] if node[b] < 0 else states[b, int(node[b])]
        assert rel(S[b], want) < 1e-5, f"row {b} node {int(node[b])}"
    keep = node.clamp(min=0)
    want = tree_commit_state(initial_state=S0, cache=c_ref, node=keep)
    fresh = tc.triton_tree_commit_state(state=S0, cache=cache, node=keep, out=torch.empty_like(S0))
    assert rel(fresh, want) < 1e-5 and torch.equal(S0, S0_copy)


@pytest.mark.parametrize("blocked", ["1", "0"])
@pytest.mark.parametrize("N,kind", [(2, "chain"), (17, "chain"), (33, "random"), (64, "chain"), (64, "star")])
def test_tree_solve_modes_match_float64(monkeypatch, blocked, N, kind):
    """Both inverses of (I + L) (GDNSPEC_TREE_BLOCKED_SOLVE: the blocked triangular inverse, or forward substitution)
    against the float64 reference on deep chains with nearly repeated keys (a repeated token: the worst case of
    benchmarks/check_tree_solve_stability.py, where the doubling product lost 4 digits at N = 16 and all of them at
    N = 64) and beta near 1, BN = 16, 32, 64."""
    monkeypatch.setenv("GDNSPEC_TREE_BLOCKED_SOLVE", blocked)
    q, k, v, g, beta, S0 = gdr_inputs(2, N, 1, 2, 16, 16, seed=N)
    k = (k[:, :1] + 0.05 * k).contiguous()  # (B, N, H, K): one direction, 5% noise
    beta = 0.5 + 0.49 * beta
    parents = random_parents(2, N, kind, seed=N)
    mask = TokenLayout.from_parents(parents).ancestor_mask
    o_ref, c_ref = tree_gated_delta_rule(q.double(), k.double(), v.double(), g=g.double(), beta=beta.double(),
                                         ancestor_mask=mask, initial_state=S0.double(), use_qk_l2norm=True)
    o, cache = tt.triton_tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=mask, initial_state=S0,
                                               use_qk_l2norm=True, precision="ieee")
    assert rel(o, o_ref) < 1e-5 and rel(cache.to_reference().v_new, c_ref.v_new) < 1e-5


def test_tree_solve_switch_rejects_bad_value(monkeypatch):
    monkeypatch.setenv("GDNSPEC_TREE_BLOCKED_SOLVE", "yes")
    with pytest.raises(ValueError, match="GDNSPEC_TREE_BLOCKED_SOLVE"):
        tt.blocked_solve()


def test_blocked_solve_refuses_tiles_past_its_merge_levels(monkeypatch):
    """_solve_blocked's static merge loop stops at 64 rows (MAX_NODES): a raised node limit must fail at compile
    time, not return a partial inverse (BN = 128 without the assert: rel err 0.1 at N = 100)."""
    monkeypatch.setattr(tt, "MAX_NODES", 128)
    q, k, v, g, beta, S0 = gdr_inputs(1, 65, 1, 1, 16, 16, seed=1)
    mask = TokenLayout.from_parents(random_parents(1, 65, "chain")).ancestor_mask
    with pytest.raises(Exception, match="_solve_blocked merges up to 64"):
        tt.triton_tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=mask, initial_state=S0)


def test_commit_accepts_reference_cache_and_no_l2norm():
    B, N, H, HV, K, V = 2, 5, 1, 2, 16, 16
    q, k, v, g, beta, S0 = gdr_inputs(B, N, H, HV, K, V, l2norm_in_op=False, seed=3)
    layout = TokenLayout.from_parents(random_parents(B, N, "random", seed=3))
    o_ref, c_ref = tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=layout.ancestor_mask, initial_state=S0)
    o, _ = tt.triton_tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=layout.ancestor_mask, initial_state=S0)
    assert rel(o, o_ref) < 1e-5
    node = torch.tensor([4, 2])
    got = tc.triton_tree_commit_state(state=S0.clone(), cache=tt.TritonTreeCache.from_reference(c_ref, HV), node=node)
    assert rel(got, tree_commit_state(initial_state=S0, cache=c_ref, node=node)) < 1e-5


@pytest.mark.parametrize("W,dtype", [(4, torch.float32), (3, torch.bfloat16)])
def test_conv_commit_matches_reference(W, dtype):
    B, N, D = 3, 6, 40
    x = torch.randn(B, N, D).to(dtype)
    state = torch.randn(B, D, W - 1).to(dtype)
    parents = random_parents(B, N, "random", seed=W)
    _, widx = tree_causal_conv1d(x, weight=torch.randn(D, W).to(dtype), parents=parents, state=state)
    node = torch.tensor([5, 0, -1])
    want = tree_conv_commit_state(x=x, state=state, window_index=widx, node=node.clamp(min=0))
    want[2] = state[2]
    got = state.clone()
    tc.triton_tree_conv_commit_state(x=x, state=got, window_index=widx, node=node)
    assert torch.equal(got, want)


def _layer(H, HV, K, V, dtype, seed=0):
    torch.manual_seed(seed)
    layer = Qwen3GatedDeltaNet(48, H, HV, K, V, conv_kernel_size=4, dtype=dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.A_log.uniform_(-1, 1)
    return layer


@pytest.mark.parametrize("B,H,HV,K,V,dtype,block_v", [
    (1, 2, 2, 16, 32, torch.float32, None),
    (3, 1, 2, 32, 16, torch.float32, 16),
    (3, 2, 4, 16, 32, torch.bfloat16, 16),
    (1, 1, 2, 32, 32, torch.bfloat16, 32),
])
def test_fused_decode_step_matches_layer(B, H, HV, K, V, dtype, block_v):
    layer = _layer(H, HV, K, V, dtype)
    st_ref = layer.new_state(B)
    st_ref.recurrent.normal_()
    st_ref.conv.normal_()
    st = st_ref.clone()
    with torch.no_grad():
        for _ in range(2):  # two steps: the rolled conv window and the state are reused
            x = torch.randn(B, 1, 48, dtype=dtype)
            out_ref, _ = layer.forward_state(x, st_ref, mode="fused_decode")
            mixed, z, b, a = layer._project(x)
            y = td.triton_gdn_decode_step(mixed[:, 0], z[:, 0], b[:, 0], a[:, 0], conv_weight=layer.conv_weight,
                                          conv_state=st.conv, recurrent_state=st.recurrent, A_log=layer.A_log,
                                          dt_bias=layer.dt_bias, norm_weight=layer.norm.weight, num_k_heads=H,
                                          head_k_dim=K, norm_eps=layer.norm.eps, block_v=block_v)
            out = layer.out_proj(y.reshape(B, 1, -1))
    # bf16: the reference rounds each conv product to bf16, the kernel sums in float32 (~1 bf16 ulp on q, k, v)
    tol_ = 1e-5 if dtype == torch.float32 else 3e-2
    assert rel(out, out_ref) < tol_
    assert rel(st.recurrent, st_ref.recurrent) < tol_
    assert torch.equal(st.conv, st_ref.conv)


def test_recurrence_only_decode_step():
    B, H, HV, K, V = 3, 2, 4, 16, 32
    q, k, v, g, beta, S = gdr_inputs(B, 1, H, HV, K, V, seed=7)
    S2 = S.clone()
    o_ref = gated_delta_rule_decode_step(q[:, 0], k[:, 0], v[:, 0], g=g[:, 0], beta=beta[:, 0], state=S, use_qk_l2norm=True)
    o = td.triton_gated_delta_rule_decode_step(q[:, 0], k[:, 0], v[:, 0], g=g[:, 0], beta=beta[:, 0], state=S2, block_v=16)
    assert rel(o, o_ref) < 1e-5 and rel(S2, S) < 1e-5


def test_layer_backend_triton_matches_torch():
    B, N, H, HV, K, V = 2, 5, 1, 2, 16, 16
    layer = _layer(H, HV, K, V, torch.float32, seed=1)
    st = layer.new_state(B)
    st.recurrent.normal_()
    st.conv.normal_()
    layout = TokenLayout.from_parents(random_parents(B, N, "random", seed=5))
    x = torch.randn(B, N, 48)
    node = torch.tensor([3, 4])
    with torch.no_grad():
        out_t, cache_t = layer.forward_tree(x, st, layout)
        out_k, cache_k = layer.forward_tree(x, st, layout, backend="triton")
        assert isinstance(cache_k.gdr, tt.TritonTreeCache)
        assert rel(out_k, out_t) < 1e-5
        s_t, s_k = st.clone(), st.clone()
        layer.commit_tree(s_t, cache_t, node)
        layer.commit_tree(s_k, cache_k, node)  # a TritonTreeCache is committed by the kernels
        assert rel(s_k.recurrent, s_t.recurrent) < 1e-5 and torch.equal(s_k.conv, s_t.conv)
        xd = torch.randn(B, 1, 48)
        o_t, _ = layer.forward_state(xd, s_t, mode="fused_decode")
        o_k, _ = layer.forward_state(xd, s_k, mode="fused_decode", backend="auto")
        assert rel(o_k, o_t) < 1e-5 and rel(s_k.recurrent, s_t.recurrent) < 1e-5
    with pytest.raises(ValueError, match="backend"):
        layer.forward_tree(x, st, layout, backend="cuda")


def test_available_and_argument_errors():
    t = torch.zeros(1)
    assert tt.available(t) and tc.available(t) and td.available(t)  # interpreter on in this module
    q, k, v, g, beta, S0 = gdr_inputs(1, 65, 1, 1, 16, 16)
    mask = torch.ones(65, 65, dtype=torch.bool).tril()[None]
    with pytest.raises(ValueError, match="1..64"):
        tt.triton_tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=mask, initial_state=S0)
    with pytest.raises(ValueError, match="float32"):
        tt.triton_tree_gated_delta_rule(q[:, :4], k[:, :4], v[:, :4], g=g[:, :4], beta=beta[:, :4],
                                        ancestor_mask=mask[:, :4, :4], initial_state=S0.double())


def test_dot_precisions_and_mixed_precision_path():
    """'mixed' = tf32x3 for the N x N products, tf32 for the products with S0; bad names are refused by name. The
    interpreter computes every precision exactly, so the mixed kernel must match the reference (the plumbing of
    PREC_S through the verify kernel and the commit, which takes the N x N precision)."""
    assert tt.dot_precisions("mixed") == ("tf32x3", "tf32")
    for p in ("ieee", "tf32", "tf32x3"):
        assert tt.dot_precisions(p) == (p, p)
    with pytest.raises(ValueError, match="precision must be one of"):
        tt.dot_precisions("bf16")
    B, N, H, HV, K, V = 2, 6, 1, 2, 16, 16
    q, k, v, g, beta, S0 = gdr_inputs(B, N, H, HV, K, V, seed=11)
    layout = TokenLayout.from_parents(random_parents(B, N, "random", seed=11))
    o_ref, c_ref = tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=layout.ancestor_mask,
                                         initial_state=S0, use_qk_l2norm=True)
    o, cache = tt.triton_tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=layout.ancestor_mask,
                                               initial_state=S0, use_qk_l2norm=True, precision="mixed")
    assert rel(o, o_ref) < 1e-5
    node = torch.tensor([5, 1])
    got = tc.triton_tree_commit_state(state=S0.clone(), cache=cache, node=node, precision="mixed")
    assert rel(got, tree_commit_state(initial_state=S0, cache=c_ref, node=node)) < 1e-5
