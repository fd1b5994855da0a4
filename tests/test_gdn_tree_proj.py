"""The verify step's in-projection with the tree prep in its epilogue (gdnspec/ops/fused/gdn_tree_proj.py) against
its reference (F.linear, then gdn_tree_prep_reference) under the Triton interpreter: both layouts, HV = 2H, odd head
dims, B not a power of two, N = 1 .. 17 with B * N up to 64 rows, chains, stars, random trees; then the verify kernel
fed by it against the two-launch sequence (output and cache).

Run: python -m pytest -q tests/test_gdn_tree_proj.py   (skipped when triton is not installed)
"""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from conftest import interpreter_modules, random_parents, rel_err  # noqa: E402
from gdnspec.ops.conv1d.tree import tree_conv_window_index  # noqa: E402

interpreter_modules(["gdnspec.ops.gated_delta_rule.triton_tree", "gdnspec.ops.gated_delta_rule.triton_commit"])
gd, gm, gt, gp = interpreter_modules(["gdnspec.ops.fused.gdn_decode", "gdnspec.ops.fused.gemv",
                                      "gdnspec.ops.fused.gdn_tree", "gdnspec.ops.fused.gdn_tree_proj"])

pytestmark = pytest.mark.usefixtures("interpret_env")


def bound(dtype) -> float:
    return 2e-6 if dtype == torch.float32 else 2e-2


def _case(B, N, H, HV, K, V, W, layout, kind, dtype, D=40, seed=0):
    g = torch.Generator().manual_seed(seed + N + K)
    L = (gd.ProjLayout.qwen3_next if layout == "qwen3_next" else gd.ProjLayout.qwen3_5)(H, HV, K, V)
    CD = 2 * H * K + HV * V
    x = torch.randn(B, N, D, generator=g).to(dtype)
    weight = (torch.randn(L.width, D, generator=g) / D ** 0.5).to(dtype)
    kw = dict(layout=L, conv_weight=(torch.randn(CD, W, generator=g) * 0.5).to(dtype),
              conv_state=torch.randn(B, CD, W - 1, generator=g).to(dtype),
              window_index=tree_conv_window_index(random_parents(B, N, kind, seed=N), W),
              A_log=torch.rand(HV, generator=g).log(),
              dt_bias=torch.cat([torch.randn(HV - 1, generator=g) * 0.5, torch.tensor([22.0])]))  # softplus's linear branch
    return x, weight, kw


CASES = [
    (3, 5, 2, 4, 12, 20, 4, "qwen3_next", "random", torch.float32),
    (2, 17, 1, 2, 16, 8, 4, "qwen3_5", "chain", torch.float32),
    (1, 6, 2, 2, 8, 24, 3, "qwen3_5", "star", torch.bfloat16),
    (2, 1, 2, 4, 8, 8, 4, "qwen3_next", "chain", torch.bfloat16),
    (4, 16, 2, 4, 16, 16, 4, "qwen3_next", "random", torch.float32),  # 64 rows: one full row tile
    (3, 7, 1, 1, 24, 12, 2, "qwen3_5", "random", torch.bfloat16),
]


@pytest.mark.parametrize("B,N,H,HV,K,V,W,layout,kind,dtype", CASES)
def test_tree_in_projection_matches_reference(B, N, H, HV, K, V, W, layout, kind, dtype):
    x, weight, kw = _case(B, N, H, HV, K, V, W, layout, kind, dtype)
    got = gp.tree_in_projection(x, weight, max_rows=64, **kw)  # the kernel's whole range (the layer takes <= 8 rows)
    assert got is not None
    proj, prep = got
    want_proj, want = gp.tree_in_projection_reference(x, weight, **kw)
    assert proj.dtype == dtype and rel_err(proj, want_proj) < bound(dtype)
    # the prep from the kernel's own projection rows: the same terms as gdn_tree_prep computes from them
    from_proj = gt.gdn_tree_prep_reference(proj, **kw)[:5]
    for name, a, b, c in zip(("q", "k", "v", "g", "beta"), prep, from_proj, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, b) < bound(dtype), name
        assert rel_err(a, c) < (2e-6 if dtype == torch.float32 else 4e-2), name


@pytest.mark.parametrize("B,N,H,HV,K,V,W,layout,kind,dtype", CASES[:3])
def test_verify_with_the_epilogue_prep_equals_the_two_launches(B, N, H, HV, K, V, W, layout, kind, dtype):
    """gdn_tree_verify(prep=...) (conv commit reading the projection rows) against gdn_tree_verify computing its own
    prep: the same output and cache; the conv inputs it hands the commit are the projection rows."""
    x, weight, kw = _case(B, N, H, HV, K, V, W, layout, kind, dtype, seed=3)
    L = kw["layout"]
    parents = random_parents(B, N, kind, seed=N)
    from gdnspec.layers.layout import TokenLayout

    mask = TokenLayout.from_parents_reference(parents).ancestor_mask
    S = torch.randn(B, HV, K, V) * 0.3
    nw = 1 + 0.1 * torch.randn(V)
    proj, prep = gp.tree_in_projection(x, weight, max_rows=64, **kw)
    common = dict(ancestor_mask=mask, recurrent_state=S, norm_weight=nw.to(dtype), norm_eps=1e-6, fusion="norm", **kw)
    y1, c1, mixed1, lay1 = gt.gdn_tree_verify(proj, prep=prep, **common)
    y2, c2, mixed2, lay2 = gt.gdn_tree_verify(proj, **common)
    assert lay1 == L and lay2 is None and mixed1.data_ptr() == proj.data_ptr()
    assert rel_err(y1, y2) < bound(dtype)
    for a, b in ((c1.k, c2.k), (c1.v_new, c2.v_new), (c1.gamma, c2.gamma)):
        assert rel_err(a, b) < bound(dtype)
    assert torch.equal(mixed2, mixed1[..., L.conv_index()])


def test_tree_in_projection_declines_what_it_cannot_run_and_names_bad_shapes(monkeypatch):
    x, weight, kw = _case(5, 16, 2, 4, 8, 8, 4, "qwen3_next", "chain", torch.float32)  # 80 rows > one tile
    assert gp.tree_in_projection(x, weight, max_rows=100, **kw) is None
    x, weight, kw = _case(3, 3, 2, 4, 8, 8, 4, "qwen3_next", "chain", torch.bfloat16)
    assert gp.tree_in_projection(x, weight, **kw) is None  # 9 rows: more than the layer's MAX_ROWS (16-bit)
    x, weight, kw = _case(3, 3, 2, 4, 8, 8, 4, "qwen3_next", "chain", torch.float32)
    assert gp.tree_in_projection(x, weight, **kw) is not None  # float32 takes up to MAX_ROWS_FLOAT32 = 16 rows
    x, weight, kw = _case(3, 6, 2, 4, 8, 8, 4, "qwen3_next", "chain", torch.float32)
    assert gp.tree_in_projection(x, weight, **kw) is None  # 18 rows
    monkeypatch.setenv("GDNSPEC_TREE_PROJ_MAX_ROWS", "18")  # the A/B limit for other model sizes
    assert gp.max_rows() == 18 and gp.tree_in_projection(x, weight, **kw) is not None
    for bad in ("0", "65", "many"):
        monkeypatch.setenv("GDNSPEC_TREE_PROJ_MAX_ROWS", bad)
        with pytest.raises(ValueError, match="GDNSPEC_TREE_PROJ_MAX_ROWS"):
            gp.tree_in_projection(x, weight, **kw)
    monkeypatch.delenv("GDNSPEC_TREE_PROJ_MAX_ROWS")
    x, weight, kw = _case(2, 3, 2, 4, 8, 8, 4, "qwen3_next", "chain", torch.float32)
    assert gp.tree_in_projection(x, weight, **kw) is not None
    assert gp.tree_in_projection(x.double(), weight.double(), **kw) is None  # float64: the GEMV kernel declines
    with pytest.raises(ValueError, match="window_index"):
        gp.tree_in_projection(x, weight, **{**kw, "window_index": kw["window_index"][:, :2]})
    with pytest.raises(ValueError, match="conv_state"):
        gp.tree_in_projection(x, weight, **{**kw, "conv_state": kw["conv_state"][:1]})
    with pytest.raises(ValueError, match="weight"):
        gp.tree_in_projection(x, weight[:-1], **kw)
    monkeypatch.setenv("GDNSPEC_TREE_PROJ", "0")  # the A/B switch: the caller runs the two launches
    assert gp.tree_in_projection(x, weight, **kw) is None
    monkeypatch.setenv("GDNSPEC_TREE_PROJ", "yes")
    with pytest.raises(ValueError, match="GDNSPEC_TREE_PROJ"):
        gp.tree_in_projection(x, weight, **kw)
