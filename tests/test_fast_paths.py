"""Low-overhead fast paths against the references kept beside them: fused RMS norms, the cached RoPE table,
prefix-trimmed attention vs the shape-static (whole capacity) path, log-depth TokenLayout.from_parents, the joint
q/k l2norm of the GDN layer, commit_tree(all_rows_accept=True) and state row selection.

Run: python -m pytest -q tests/test_fast_paths.py
"""
from __future__ import annotations

import pytest
import torch

from conftest import random_parents, randomize_, tol
from gdnspec import GatedAttention, Qwen3GatedDeltaNet, TokenLayout
from gdnspec.cache import GDNLayerState, KVCache
from gdnspec.layers.attention import RotaryEmbedding
from gdnspec.layers.norm import GatedRMSNorm, RMSNorm, _reference_rms_norm
from gdnspec.models import GDNConfig, GDNForCausalLM
from gdnspec.spec.accept import path_to_node

F64 = torch.float64
DTYPES = (torch.float32, F64, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [True, False])
def test_rms_norm_matches_reference_formula(dtype, offset):
    torch.manual_seed(0)
    norm = randomize_(RMSNorm(40, offset=offset, dtype=dtype))
    x = (torch.randn(3, 5, 40) * 4).to(dtype)
    y = norm(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, _reference_rms_norm(x, norm.weight, norm.eps, offset=offset), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_rms_norm_matches_reference_formula(dtype):
    torch.manual_seed(0)
    norm = randomize_(GatedRMSNorm(24, dtype=dtype))
    x, gate = torch.randn(2, 3, 4, 24).to(dtype), torch.randn(2, 3, 4, 24).to(dtype)
    ref = (norm.weight * _reference_rms_norm(x, None, norm.eps)).to(gate.dtype if dtype == F64 else torch.float32)
    ref = (ref * torch.nn.functional.silu(gate.to(ref.dtype))).to(dtype)
    y = norm(x, gate)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prf", [0.25, 0.5, 1.0])
def test_cached_rope_equals_reference_and_grows(dtype, prf):
    rope = RotaryEmbedding(16, partial_rotary_factor=prf, theta=1000.0)
    x = torch.randn(2, 3, 5, 16).to(dtype)
    for hi in (7, 300, 2000):  # the table starts at 256 positions and must grow
        pos = torch.randint(0, hi, (2, 5))
        torch.testing.assert_close(rope(x, pos), rope.reference(x, pos), atol=0, rtol=0)
        torch.testing.assert_close(rope(x, pos, max_position=hi), rope.reference(x, pos), atol=0, rtol=0)
    rope_f32 = RotaryEmbedding(16, partial_rotary_factor=prf).to(torch.float32)  # inv_freq cast by Module.to
    pos = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(rope_f32(x, pos), rope_f32.reference(x, pos), atol=0, rtol=0)


def test_attention_trimmed_prefix_equals_static_path():
    """Rows of different lengths, a tree and a chain: reading only max(lengths) positions (eager) gives the same
    output as attending the whole (masked) capacity (static=True); forward_layout never writes the cache."""
    torch.manual_seed(0)
    attn = randomize_(GatedAttention(24, 4, 2, 8, partial_rotary_factor=0.5, dtype=F64))
    cache = attn.new_state(3, capacity=40)
    for i, n in enumerate((3, 9, 0)):
        if n:
            c = attn.new_state(1)
            attn.forward_state(torch.randn(1, n, 24, dtype=F64), c, TokenLayout.chain(1, n))
            cache.assign_rows_(torch.tensor([i]), c)
    before = cache.clone()
    for layout in (TokenLayout.from_parents(random_parents(3, 7, seed=1)), TokenLayout.chain(3, 7), TokenLayout.chain(3, 1)):
        x = torch.randn(3, layout.depth.shape[1], 24, dtype=F64)
        out, (k, v) = attn.forward_layout(x, cache, layout)
        out_s, (k_s, v_s) = attn.forward_layout(x, cache, layout, static=True)
        torch.testing.assert_close(out, out_s, **tol(F64))
        torch.testing.assert_close((k, v), (k_s, v_s), atol=0, rtol=0)
        for a, b in ((cache.k, before.k), (cache.v, before.v), (cache.lengths, before.lengths)):
            assert torch.equal(a, b)
    # uniform lengths, one token: the unmasked decode path
    uni = attn.new_state(2, capacity=20)
    attn.forward_state(torch.randn(2, 5, 24, dtype=F64), uni, TokenLayout.chain(2, 5))
    x = torch.randn(2, 1, 24, dtype=F64)
    torch.testing.assert_close(attn.forward_layout(x, uni, TokenLayout.chain(2, 1))[0],
                               attn.forward_layout(x, uni, TokenLayout.chain(2, 1), static=True)[0], **tol(F64))


@pytest.mark.parametrize("N", [1, 2, 3, 5, 8, 9, 16, 17, 33, 64])
@pytest.mark.parametrize("kind", ["random", "chain", "star"])
def test_from_parents_doubling_equals_reference(N, kind):
    parents = random_parents(3, N, kind=kind, seed=N)
    if N > 2 and kind == "random":
        parents[1, N // 2] = -1  # a second root (allowed by TokenLayout)
    got, ref = TokenLayout.from_parents(parents), TokenLayout.from_parents_reference(parents)
    assert torch.equal(got.ancestor_mask, ref.ancestor_mask)
    assert torch.equal(got.depth, ref.depth) and got.depth.dtype == ref.depth.dtype
    got_nv = TokenLayout.from_parents(parents, validate=False)
    assert torch.equal(got_nv.ancestor_mask, ref.ancestor_mask) and torch.equal(got_nv.depth, ref.depth)


def test_from_parents_still_validates():
    with pytest.raises(ValueError, match="topological"):
        TokenLayout.from_parents(torch.tensor([[-1, 0, 2]]))
    with pytest.raises(ValueError, match="topological"):
        TokenLayout.from_parents(torch.tensor([[-1, -2]]))


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_gdn_joint_qk_l2norm_matches_per_tensor(dtype):
    torch.manual_seed(0)
    layer = randomize_(Qwen3GatedDeltaNet(24, 2, 4, 8, 12, dtype=dtype))
    mixed = torch.randn(2, 3, layer.conv_dim).to(dtype)
    q, k, v = layer._split_qkv_normed(mixed)
    q0, k0, v0 = layer._split_qkv(mixed)
    from gdnspec.ops.gated_delta_rule.common import l2norm, state_dtype_for

    cdt = state_dtype_for(dtype)
    torch.testing.assert_close(q, l2norm(q0.to(cdt)), atol=0, rtol=0)
    torch.testing.assert_close(k, l2norm(k0.to(cdt)), atol=0, rtol=0)
    torch.testing.assert_close(v, v0.to(cdt), atol=0, rtol=0)


def _tiny_model():
    cfg = GDNConfig(vocab_size=50, hidden_size=24, num_hidden_layers=3, layer_types=["linear_attention", "full_attention",
                    "linear_attention"], intermediate_size=32, linear_num_key_heads=2, linear_num_value_heads=2,
                    linear_key_head_dim=8, linear_value_head_dim=8, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=8)
    torch.manual_seed(0)
    return randomize_(GDNForCausalLM(cfg, dtype=F64))


def test_commit_tree_all_rows_accept_equals_default():
    model = _tiny_model()
    state = model(torch.randint(0, 50, (2, 6))).state
    parents = random_parents(2, 6, seed=3)
    layout = TokenLayout.from_parents(parents)
    ver = model.forward_tree(torch.randint(0, 50, (2, 6)), state=state, layout=layout)
    path, counts = path_to_node(layout, torch.tensor([5, 3]))  # counts >= 1, as the engines guarantee
    a, b = state.clone(), state.clone()
    model.commit_tree(a, ver, path=path, counts=counts)
    model.commit_tree(b, ver, path=path, counts=counts, all_rows_accept=True)
    for la, lb in zip(a.layers, b.layers):
        for x, y in ((la.recurrent, lb.recurrent), (la.conv, lb.conv)) if isinstance(la, GDNLayerState) else \
                ((la.k, lb.k), (la.v, lb.v), (la.lengths, lb.lengths)):
            assert torch.equal(x, y)


def test_state_select_copies_rows():
    st = GDNLayerState(torch.randn(3, 2, 4, 4), torch.randn(3, 5, 3))
    kv = KVCache(torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 4), torch.tensor([1, 2, 3]))
    rows = torch.tensor([2, 0, 2])
    for s, fields in ((st, ("recurrent", "conv")), (kv, ("k", "v", "lengths"))):
        before = s.clone()
        sel = s.select(rows)
        for f in fields:
            src, got = getattr(s, f), getattr(sel, f)
            assert torch.equal(got, src[rows])
            got.zero_()  # a copy: the source keeps its values
            assert torch.equal(src, getattr(before, f))


def test_rms_norm_scale_cache_follows_weight_updates():
    norm = RMSNorm(8, offset=True)
    x = torch.randn(2, 8)
    with torch.inference_mode():
        y0 = norm(x)
    with torch.no_grad():
        norm.weight.add_(0.5)  # in place: version bump
    with torch.inference_mode():
        torch.testing.assert_close(norm(x), _reference_rms_norm(x, norm.weight, norm.eps, offset=True), atol=0, rtol=0)
    norm.weight = torch.nn.Parameter(torch.full((8,), -0.25))  # a new parameter object
    with torch.inference_mode():
        torch.testing.assert_close(norm(x), _reference_rms_norm(x, norm.weight, norm.eps, offset=True), atol=0, rtol=0)
    assert not torch.equal(y0, norm(x).detach())
    norm(x).sum().backward()  # outside inference mode the weight still gets a gradient
    assert norm.weight.grad is not None


def test_vocab_projection_matches_linear():
    """The CPU inference path of the LM head computes the same product as F.linear (1 and several rows), and its
    cached transposed weight follows in-place weight updates."""
    from gdnspec.layers.linear import VocabProjection

    torch.manual_seed(0)
    head = VocabProjection(48, 300, bias=False)
    for rows in (1, 3, 16):
        x = torch.randn(2, rows, 48)
        with torch.inference_mode():
            got = head(x)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, head.weight), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 1, 48)
    with torch.no_grad():
        head(x)
        head.weight.mul_(2.0)  # in place: the cached W^T must be rebuilt
        torch.testing.assert_close(head(x), torch.nn.functional.linear(x, head.weight), rtol=1e-5, atol=1e-5)
    y = head(torch.randn(1, 4, 48, requires_grad=True))  # autograd path
    y.sum().backward()
    assert head.weight.grad is not None
