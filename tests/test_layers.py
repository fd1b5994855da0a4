"""Layers: the seed's TestGDNLayer cases, GDN modes and the seed's auto rule, state carrying (recurrent + conv),
the two weight layouts, gated attention with a KV cache, and tree forwards/commits of both mixers.

Run: python -m pytest -q tests/test_layers.py
"""
from __future__ import annotations

import pytest
import torch

import gdnspec.layers.gated_deltanet as gdn_module
from conftest import path_to, random_parents, randomize_, tol
from gdnspec import GDNLayerState, GatedAttention, Qwen3GatedDeltaNet, TokenLayout
from gdnspec.layers import resolve_mode

F64 = torch.float64


def make_gdn(layout="qwen3_next", dtype=F64, H=2, HV=4, K=8, V=12, hidden=24, W=4, seed=0):
    torch.manual_seed(seed)
    return randomize_(Qwen3GatedDeltaNet(hidden, H, HV, K, V, conv_kernel_size=W, layout=layout, dtype=dtype), seed=seed)


def make_attn(dtype=F64, H=4, Hkv=2, D=8, hidden=24, prf=0.5, seed=0):
    torch.manual_seed(seed)
    return randomize_(GatedAttention(hidden, H, Hkv, D, partial_rotary_factor=prf, dtype=dtype), seed=seed)


# ---------------------------------------------------------------------------------------------------- the seed's tests
class TestGDNLayer:
    """The seed's two cases with its shapes: hidden 128, 2 k heads, 2 v heads, head dims 32 (default float32)."""

    def setup_method(self):
        torch.manual_seed(0)
        self.layer = Qwen3GatedDeltaNet(hidden_size=128, num_k_heads=2, num_v_heads=2, head_k_dim=32, head_v_dim=32)

    def test_gdn_layer_forward_chunk(self):
        x = torch.randn(2, 128, 128)
        out, final_state = self.layer(hidden_states=x, mode="chunk", output_final_state=True)
        assert out.shape == (2, 128, 128) and out.dtype == torch.float32
        assert final_state.shape == (2, 2, 32, 32) and final_state.dtype == torch.float32
        # same values as the token-by-token mode (float32: chunk reorders sums -> ~1e-6 relative; 1e-4 is safe)
        out_r, state_r = self.layer(hidden_states=x, mode="recurrent", output_final_state=True)
        torch.testing.assert_close(out, out_r, **tol(torch.float32))
        torch.testing.assert_close(final_state, state_r, **tol(torch.float32))
        assert out.abs().max() > 1e-3 and final_state.abs().max() > 1e-3

    def test_gdn_layer_forward_recurrent(self):
        x = torch.randn(2, 1, 128)
        past_state = torch.randn(2, 2, 32, 32)
        past_copy = past_state.clone()
        out, _ = self.layer(hidden_states=x, mode="recurrent", initial_state=past_state)
        assert out.shape == (2, 1, 128)
        assert torch.equal(past_state, past_copy), "the seed call must not modify past_state"
        for mode in ("fused_decode", "chunk", "auto"):
            other, _ = self.layer(hidden_states=x, mode=mode, initial_state=past_state)
            torch.testing.assert_close(out, other, **tol(torch.float32), msg=mode)
        # the past state is really used
        fresh, _ = self.layer(hidden_states=x, mode="recurrent")
        assert (fresh - out).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------- modes
@pytest.mark.parametrize("layout", ("qwen3_next", "qwen3_5"))
@pytest.mark.parametrize("T", (1, 5, 70))
def test_all_modes_same_output_and_state(layout, T):
    layer = make_gdn(layout)
    x = torch.randn(2, T, 24, dtype=F64)
    init = layer.new_state(2)
    init.recurrent.normal_()
    init.conv.normal_()
    modes = ("chunk", "recurrent", "auto") + (("fused_decode",) if T == 1 else ())
    res = {m: layer(x, mode=m, initial_state=init, output_final_state=True) for m in modes}
    for m, (out, st) in res.items():
        torch.testing.assert_close(out, res["recurrent"][0], **tol(F64), msg=m)
        torch.testing.assert_close(st.recurrent, res["recurrent"][1].recurrent, **tol(F64), msg=m)
        torch.testing.assert_close(st.conv, res["recurrent"][1].conv, rtol=0, atol=0, msg=m)


def test_resolve_mode_seed_rule():
    assert resolve_mode("auto", 1) == "fused_decode"
    assert resolve_mode("auto", 2) == "recurrent"
    assert resolve_mode("auto", 128) == "recurrent"
    assert resolve_mode("auto", 129) == "chunk"
    for m in ("chunk", "recurrent"):
        assert resolve_mode(m, 1) == m and resolve_mode(m, 300) == m
    assert resolve_mode("fused_decode", 1) == "fused_decode"


@pytest.mark.parametrize("T,expected", [(1, "decode"), (2, "recurrent"), (128, "recurrent"), (129, "chunk")])
def test_auto_mode_dispatches_by_seed_rule(monkeypatch, T, expected):
    """The layer really calls the op that resolve_mode picks (spy on the op functions the layer imports)."""
    calls = []
    for name, tag in (("chunk_gated_delta_rule", "chunk"), ("fused_recurrent_gated_delta_rule", "recurrent"),
                      ("gated_delta_rule_decode_step", "decode")):
        orig = getattr(gdn_module, name)
        monkeypatch.setattr(gdn_module, name, lambda *a, _o=orig, _t=tag, **k: (calls.append(_t), _o(*a, **k))[1])
    layer = Qwen3GatedDeltaNet(16, 1, 1, 4, 4)
    layer(torch.randn(1, T, 16), mode="auto")
    assert calls == [expected]


# ---------------------------------------------------------------------------------------------------- state carrying
@pytest.mark.parametrize("layout", ("qwen3_next", "qwen3_5"))
@pytest.mark.parametrize("W", (2, 4))
def test_prefill_then_decode_equals_one_forward(layout, W):
    """forward_state carries the conv window too: prefill(T) + k single-token steps == one forward over T + k."""
    layer = make_gdn(layout, W=W)
    T, k = 6, 5
    x = torch.randn(2, T + k, 24, dtype=F64)
    full, full_state = layer.forward_state(x, None, mode="chunk")
    state = layer.new_state(2)
    out0, st = layer.forward_state(x[:, :T], state, mode="recurrent")
    assert st is state, "forward_state advances the given state in place"
    rec_buf, conv_buf = state.recurrent, state.conv
    outs = [out0]
    for t in range(T, T + k):
        o, _ = layer.forward_state(x[:, t:t + 1], state)  # auto -> fused_decode
        outs.append(o)
    assert state.recurrent is rec_buf and state.conv is conv_buf, "buffers keep their identity (CUDA graphs)"
    torch.testing.assert_close(torch.cat(outs, 1), full, **tol(F64))
    torch.testing.assert_close(state.recurrent, full_state.recurrent, **tol(F64))
    torch.testing.assert_close(state.conv, full_state.conv, **tol(F64))
    # the seed contract with a bare tensor state loses the conv window, so it must differ here (shows the test bites)
    o_seed, _ = layer(x[:, T:T + 1], mode="recurrent", initial_state=layer.forward_state(x[:, :T], None)[1].recurrent)
    assert (o_seed - full[:, T:T + 1]).abs().max() > 1e-6


def test_layer_state_as_initial_state_is_returned_and_not_modified():
    layer = make_gdn()
    x = torch.randn(2, 7, 24, dtype=F64)
    _, st = layer(x[:, :4], mode="chunk", initial_state=layer.new_state(2), output_final_state=True)
    assert isinstance(st, GDNLayerState)
    before = st.clone()
    out, st2 = layer(x[:, 4:], mode="recurrent", initial_state=st, output_final_state=True)
    assert isinstance(st2, GDNLayerState) and st2 is not st
    assert torch.equal(st.recurrent, before.recurrent) and torch.equal(st.conv, before.conv)
    full, full_st = layer(x, mode="recurrent", initial_state=layer.new_state(2), output_final_state=True)
    torch.testing.assert_close(out, full[:, 4:], **tol(F64))
    torch.testing.assert_close(st2.recurrent, full_st.recurrent, **tol(F64))
    # tensor / None initial state -> tensor final state; output_final_state=False -> None
    _, s_t = layer(x, mode="chunk", output_final_state=True)
    assert isinstance(s_t, torch.Tensor)
    torch.testing.assert_close(s_t, full_st.recurrent, **tol(F64))
    assert layer(x, mode="chunk", initial_state=st)[1] is None


def test_layouts_compute_the_same_function():
    """Qwen3-Next interleaved in_proj_qkvz/in_proj_ba == Qwen3.5 separate projections, with weights re-ordered
    per key-head group (q_h, k_h, v of its r value heads, z of those heads; b_h, a_h)."""
    H, HV, K, V, hid = 2, 4, 8, 12, 24
    r = HV // H
    l5 = make_gdn("qwen3_5", seed=1)
    ln = Qwen3GatedDeltaNet(hid, H, HV, K, V, layout="qwen3_next", dtype=F64)
    with torch.no_grad():
        qkv = l5.in_proj_qkv.weight
        wq, wk, wv = qkv[:H * K].view(H, K, hid), qkv[H * K:2 * H * K].view(H, K, hid), qkv[2 * H * K:].view(H, r * V, hid)
        wz = l5.in_proj_z.weight.view(H, r * V, hid)
        ln.in_proj_qkvz.weight.copy_(torch.cat([wq, wk, wv, wz], 1).reshape(-1, hid))
        ln.in_proj_ba.weight.copy_(torch.cat([l5.in_proj_b.weight.view(H, r, hid), l5.in_proj_a.weight.view(H, r, hid)], 1).reshape(-1, hid))
        for name in ("conv1d.weight", "dt_bias", "A_log", "norm.weight", "out_proj.weight"):
            ln.get_parameter(name).copy_(l5.get_parameter(name))
    x = torch.randn(2, 9, hid, dtype=F64)
    o5, s5 = l5(x, mode="chunk", output_final_state=True)
    on, sn = ln(x, mode="chunk", output_final_state=True)
    torch.testing.assert_close(on, o5, **tol(F64))
    torch.testing.assert_close(sn, s5, **tol(F64))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_low_precision_layer_matches_float64(dtype):
    """Same weights in float32 / bf16 vs float64. Tolerance: float32 ~1e-6 relative per op -> 1e-4;
    bf16 weights and activations (8-bit mantissa) through ~6 matmuls and norms -> 5e-2 relative to the output scale."""
    layer = make_gdn()
    x = torch.randn(2, 10, 24, dtype=F64)
    ref, ref_s = layer(x, mode="chunk", output_final_state=True)
    low = make_gdn().to(dtype)
    for mode in ("chunk", "recurrent"):
        out, s = low(x.to(dtype), mode=mode, output_final_state=True)
        assert out.dtype == dtype and s.dtype == torch.float32
        t = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2 * ref.abs().max().item(), rtol=5e-2)
        torch.testing.assert_close(out.double(), ref, **t)


# ---------------------------------------------------------------------------------------------------- attention
def reference_attention(attn: GatedAttention, x: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Plain causal gated attention written from the maths (no KV cache), positions start..start+T-1."""
    B, T, _ = x.shape
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rd = attn.rotary.rotary_dim
    qg = attn.q_proj(x).view(B, T, H, 2 * D)
    q, gate = qg[..., :D], qg[..., D:]

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w)

    q = rms(q, attn.q_norm.weight)
    k = rms(attn.k_proj(x).view(B, T, Hkv, D), attn.k_norm.weight)
    v = attn.v_proj(x).view(B, T, Hkv, D)
    pos = torch.arange(start, start + T, dtype=F64)
    inv = 10000.0 ** (-torch.arange(0, rd, 2, dtype=F64) / rd)
    ang = pos[:, None] * inv  # (T, rd/2)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]

    def rope(t):
        a, b_, rest = t[..., :rd // 2], t[..., rd // 2:rd], t[..., rd:]
        return torch.cat([a * cos - b_ * sin, b_ * cos + a * sin, rest], -1)

    q, k = rope(q), rope(k)
    out = torch.empty(B, T, H, D, dtype=x.dtype)
    for h in range(H):
        kh = h // (H // Hkv)
        s = torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, kh]) / D**0.5
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        out[:, :, h] = torch.softmax(s, -1) @ v[:, :, kh]
    return attn.o_proj((out * torch.sigmoid(gate)).reshape(B, T, H * D))


@pytest.mark.parametrize("H,Hkv,prf", [(4, 2, 0.5), (4, 1, 0.25), (2, 2, 1.0)])
def test_attention_matches_reference_and_kv_cache_steps(H, Hkv, prf):
    attn = make_attn(H=H, Hkv=Hkv, prf=prf)
    T, k = 7, 4
    x = torch.randn(2, T + k, 24, dtype=F64)
    ref = reference_attention(attn, x)
    cache = attn.new_state(2)
    full = attn.forward_state(x, cache, TokenLayout.chain(2, T + k))
    torch.testing.assert_close(full, ref, **tol(F64))
    assert cache.lengths.tolist() == [T + k, T + k]
    cache = attn.new_state(2)
    outs = [attn.forward_state(x[:, :T], cache, TokenLayout.chain(2, T))]
    for t in range(T, T + k - 2):
        outs.append(attn.forward_state(x[:, t:t + 1], cache, TokenLayout.chain(2, 1)))
    outs.append(attn.forward_state(x[:, T + k - 2:], cache, TokenLayout.chain(2, 2)))  # a multi-token step
    torch.testing.assert_close(torch.cat(outs, 1), ref, **tol(F64))


def test_attention_rows_with_different_prefix_lengths():
    """Rows with different cache lengths (assembled with assign_rows_) step exactly as each row alone."""
    attn = make_attn()
    xa, xb = torch.randn(1, 3, 24, dtype=F64), torch.randn(1, 6, 24, dtype=F64)
    step = torch.randn(2, 2, 24, dtype=F64)
    cache = attn.new_state(2)
    for i, xi in enumerate((xa, xb)):
        c = attn.new_state(1)
        attn.forward_state(xi, c, TokenLayout.chain(1, xi.shape[1]))
        cache.assign_rows_(torch.tensor([i]), c)
    assert cache.lengths.tolist() == [3, 6]
    out = attn.forward_state(step, cache, TokenLayout.chain(2, 2))
    for i, xi in enumerate((xa, xb)):
        ref = reference_attention(attn, torch.cat([xi, step[i:i + 1]], 1))[:, -2:]
        torch.testing.assert_close(out[i:i + 1], ref, **tol(F64))


# ---------------------------------------------------------------------------------------------------- trees
def test_forward_tree_on_chain_equals_causal_forward():
    layer, attn = make_gdn(), make_attn()
    x0, x = torch.randn(2, 5, 24, dtype=F64), torch.randn(2, 6, 24, dtype=F64)
    st = layer.forward_state(x0, None)[1]
    cache = attn.new_state(2)
    attn.forward_state(x0, cache, TokenLayout.chain(2, 5))
    chain = TokenLayout.from_parents(random_parents(2, 6, "chain"))
    o_tree, tc = layer.forward_tree(x, st, chain)
    a_tree, _ = attn.forward_layout(x, cache, chain)
    st_c = st.clone()
    o_causal, _ = layer.forward_state(x, st_c, mode="recurrent")
    torch.testing.assert_close(o_tree, o_causal, **tol(F64))
    torch.testing.assert_close(a_tree, attn.forward_layout(x, cache, TokenLayout.chain(2, 6))[0], **tol(F64))
    torch.testing.assert_close(a_tree, reference_attention(attn, torch.cat([x0, x], 1))[:, 5:], **tol(F64))
    layer.commit_tree(st, tc, torch.tensor([5, 5]))
    torch.testing.assert_close(st.recurrent, st_c.recurrent, **tol(F64))
    torch.testing.assert_close(st.conv, st_c.conv, rtol=0, atol=0)


@pytest.mark.parametrize("kind,seed", [("random", 0), ("random", 1), ("star", 2)])
def test_forward_tree_random_tree_equals_per_path_causal(kind, seed):
    """Every node's output == running that node's root-to-node path causally after the committed state; then
    commit_tree(node) == the causal state after the path (GDN: recurrent + conv; attention: KV commit)."""
    B, N, P = 2, 9, 4
    layer, attn = make_gdn(seed=seed), make_attn(seed=seed)
    x0 = torch.randn(B, P, 24, dtype=F64)
    x = torch.randn(B, N, 24, dtype=F64)
    parents = random_parents(B, N, kind, seed=seed)
    lay = TokenLayout.from_parents(parents)
    st = layer.forward_state(x0, None)[1]
    cache = attn.new_state(B)
    attn.forward_state(x0, cache, TokenLayout.chain(B, P))
    st_before, cache_before = st.clone(), cache.clone()
    o_tree, tcache = layer.forward_tree(x, st, lay)
    a_tree, kv_new = attn.forward_layout(x, cache, lay)
    assert torch.equal(st.recurrent, st_before.recurrent) and torch.equal(cache.k, cache_before.k), "verify only reads"
    for b in range(B):
        for node in range(N):
            p = path_to(parents[b], node)
            sb = st_before.select(torch.tensor([b]))
            o_path, sb = layer.forward_state(x[b:b + 1, p], sb, mode="recurrent")
            torch.testing.assert_close(o_tree[b, node], o_path[0, -1], **tol(F64))
            a_ref = reference_attention(attn, torch.cat([x0[b:b + 1], x[b:b + 1, p]], 1))[0, -1]
            torch.testing.assert_close(a_tree[b, node], a_ref, **tol(F64))
            if node == N - 1 or node == seed:  # commit a couple of nodes per row
                s_c = st_before.select(torch.tensor([b]))
                sub_cache = GDNTreeCacheRow(tcache, b)
                layer.commit_tree(s_c, sub_cache, torch.tensor([node]))
                torch.testing.assert_close(s_c.recurrent, sb.recurrent, **tol(F64))
                # the conv window holds projections of the same inputs, computed in a batch of another size
                torch.testing.assert_close(s_c.conv, sb.conv, **tol(F64))
                c = cache_before.select(torch.tensor([b]))
                attn.commit(c, tuple(t[b:b + 1] for t in kv_new), torch.tensor([p]), torch.tensor([len(p)]))
                nxt = torch.randn(1, 1, 24, dtype=F64)
                got = attn.forward_state(nxt, c, TokenLayout.chain(1, 1))
                ref = reference_attention(attn, torch.cat([x0[b:b + 1], x[b:b + 1, p], nxt], 1))[:, -1:]
                torch.testing.assert_close(got, ref, **tol(F64))


def GDNTreeCacheRow(cache, b):
    """Row b of a GDNTreeCache (to commit one row at a time in the test)."""
    from gdnspec.layers import GDNTreeCache
    from gdnspec.ops.gated_delta_rule import TreeGDRCache
    g = cache.gdr
    return GDNTreeCache(gdr=TreeGDRCache(k=g.k[b:b + 1], v_new=g.v_new[b:b + 1], gamma=g.gamma[b:b + 1],
                                         ancestor_mask=g.ancestor_mask[b:b + 1]),
                        conv_input=cache.conv_input[b:b + 1], conv_window_index=cache.conv_window_index[b:b + 1])


# ---------------------------------------------------------------------------------------------------- bad inputs
def test_layer_bad_inputs_raise_clear_errors():
    layer = Qwen3GatedDeltaNet(16, 2, 4, 4, 4)
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="hidden"):
        layer(torch.randn(2, 3, 15))
    with pytest.raises(ValueError, match="hidden_states"):
        layer(torch.randn(3, 16))
    with pytest.raises(ValueError, match="mode"):
        layer(x, mode="parallel")
    with pytest.raises(ValueError, match="fused_decode"):
        layer(x, mode="fused_decode")
    with pytest.raises(ValueError, match="initial_state"):
        layer(x, initial_state=torch.zeros(2, 4, 4, 5))
    with pytest.raises(ValueError, match="initial_state"):
        layer(x, initial_state=torch.zeros(2, 4, 4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="initial_state"):
        layer(x, initial_state=[0.0])
    bad = layer.new_state(2)
    bad.conv = torch.zeros(2, bad.conv.shape[1], 2)
    with pytest.raises(ValueError, match="conv state"):
        layer(x, initial_state=bad)
    bad = layer.new_state(2)
    bad.conv = bad.conv.double()
    with pytest.raises(ValueError, match="conv state"):
        layer(x, initial_state=bad)
    bad = layer.new_state(2)
    bad.recurrent = bad.recurrent.double()
    with pytest.raises(ValueError, match="recurrent state"):
        layer.forward_state(x, bad)
    with pytest.raises(ValueError, match="recurrent state"):
        layer.forward_state(x, layer.new_state(3))
    with pytest.raises(ValueError, match="num_v_heads"):
        Qwen3GatedDeltaNet(16, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="layout"):
        Qwen3GatedDeltaNet(16, 2, 2, 4, 4, layout="qwen2")
    with pytest.raises(ValueError, match="head_k_dim"):
        Qwen3GatedDeltaNet(16, 2, 2, 0, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        GatedAttention(16, 3, 2, 4)


def test_chain_layouts_are_cached_only_for_short_chains():
    """TokenLayout.chain: chains up to CHAIN_CACHE_MAX tokens share cached tensors (the EAGLE catch-up's every step),
    longer ones (prefill chunks) are built per call; values equal the definition either way."""
    import gdnspec.layers.layout as L

    for T in (3, L.CHAIN_CACHE_MAX + 1):
        a, b = L.TokenLayout.chain(2, T), L.TokenLayout.chain(3, T)
        idx = torch.arange(T)
        assert torch.equal(a.parents[0], idx - 1) and torch.equal(b.depth[2], idx)
        assert torch.equal(a.ancestor_mask[1], torch.ones(T, T, dtype=torch.bool).tril())
        assert torch.equal(a.conv_window_index(4)[1], idx[:, None] + torch.arange(4))
        shared = a.ancestor_mask.data_ptr() == b.ancestor_mask.data_ptr()
        assert shared == (T <= L.CHAIN_CACHE_MAX)
    assert all(key[0] <= L.CHAIN_CACHE_MAX for key in L._CHAINS)
