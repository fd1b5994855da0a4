"""The fused GDN verify step (`gdn_tree_verify`: tree conv + gates + tree-WY + gated RMSNorm) and the one-launch
commit (`triton_tree_commit`: recurrent state + conv window) against their torch references, on the CPU through the
Triton interpreter (TRITON_INTERPRET=1), at awkward shapes: odd head dims (K, V = 40, 48), HV = 2H, B = 3, N = 1, 2,
16, 17, 64, chains, stars and random trees, bf16 and float32 activations, value tiles that cover V (in-register norm)
and that do not (last-arriver norm). Outputs AND the committed states are compared, for every kernel sequence of
GDNSPEC_TREE_FUSION ("full", "norm", "off"). Mutants (the kernel source deliberately broken) must fail the same checks.

Run: python -m pytest -q tests/test_gdn_tree_fusion.py   (skipped when triton is not installed)
"""
from __future__ import annotations

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch  # noqa: E402

from conftest import interpreter_modules, random_parents, rel_err  # noqa: E402
from gdnspec.layers.layout import TokenLayout  # noqa: E402
from gdnspec.ops.conv1d.tree import tree_conv_commit_state, tree_conv_window_index  # noqa: E402
from gdnspec.ops.gated_delta_rule.tree import tree_commit_state  # noqa: E402

tt, tc, gd, gt = interpreter_modules(["gdnspec.ops.gated_delta_rule.triton_tree",
                                      "gdnspec.ops.gated_delta_rule.triton_commit", "gdnspec.ops.fused.gdn_decode",
                                      "gdnspec.ops.fused.gdn_tree"])
pytestmark = pytest.mark.usefixtures("interpret_env")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """rel_err, with non-finite values in `a` as an infinite error: a failed check for `_check_verify_and_commit`'s
    list instead of an assertion (a broken arrival can normalise uninitialised memory, NaN or not by chance)."""
    return rel_err(a, b) if torch.isfinite(a).all() else float("inf")

CASES = [  # (B, N, H, HV, K, V, W, layout, tree kind, dtype, block_v); block_v None = the kernel's own pick
    (3, 5, 2, 4, 48, 48, 4, "qwen3_next", "random", torch.float32, 32),  # 2 value tiles of 32: last arriver
    (3, 17, 1, 2, 40, 40, 4, "qwen3_5", "chain", torch.bfloat16, 64),  # one tile covers V: in-register norm
    (1, 1, 2, 4, 48, 40, 3, "qwen3_next", "chain", torch.float32, 16),  # N = 1, 3 tiles (last one masked)
    (3, 2, 2, 2, 40, 48, 4, "qwen3_5", "star", torch.bfloat16, None),
    (1, 16, 2, 4, 48, 48, 4, "qwen3_5", "star", torch.float32, 16),
    (3, 16, 2, 4, 40, 48, 4, "qwen3_next", "random", torch.bfloat16, 64),
    (3, 64, 1, 2, 16, 24, 4, "qwen3_next", "random", torch.float32, None),  # N = 64, the kernel's limit
    (2, 64, 1, 2, 16, 16, 2, "qwen3_5", "chain", torch.bfloat16, 16),
]


def _inputs(B, N, H, HV, K, V, W, layout, kind, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 97 * N + K)
    L = (gd.ProjLayout.qwen3_next if layout == "qwen3_next" else gd.ProjLayout.qwen3_5)(H, HV, K, V)
    CD = 2 * H * K + HV * V
    parents = random_parents(B, N, kind, seed=N + seed)
    kw = dict(layout=L, conv_weight=(torch.randn(CD, W, generator=g) * 0.5).to(dtype),
              conv_state=torch.randn(B, CD, W - 1, generator=g).to(dtype),
              window_index=tree_conv_window_index(parents, W),
              A_log=torch.rand(HV, generator=g).log(), dt_bias=torch.randn(HV, generator=g) * 0.5,
              ancestor_mask=TokenLayout.from_parents(parents).ancestor_mask,
              recurrent_state=torch.randn(B, HV, K, V, generator=g) * 0.3,
              norm_weight=(1 + 0.2 * torch.randn(V, generator=g)).to(dtype), norm_eps=1e-6)
    proj = torch.randn(B, N, L.width, generator=g).to(dtype)
    node = torch.randint(0, N, (B,), generator=g)
    if B > 1:
        node[-1] = -1  # keeps its states
    return proj, kw, node


def _bound(dtype):
    return 1e-5 if dtype == torch.float32 else 2e-2


def _check_verify_and_commit(gt_mod, tc_mod, B, N, H, HV, K, V, W, layout, kind, dtype, block_v, fusion):
    """Verify + commit with `fusion` against the references; returns the list of failed checks (empty: all good)."""
    proj, kw, node = _inputs(B, N, H, HV, K, V, W, layout, kind, dtype)
    S0, cs0 = kw["recurrent_state"].clone(), kw["conv_state"].clone()
    y_ref, gdr_ref, mixed_ref = gt_mod.gdn_tree_verify_reference(proj, **kw)
    y, gdr, conv_input, conv_layout = gt_mod.gdn_tree_verify(proj, fusion=fusion, block_v=block_v, **kw)
    bad = []
    if not (torch.equal(kw["recurrent_state"], S0) and torch.equal(kw["conv_state"], cs0)):
        bad.append("verify wrote a committed state")
    if gd._arrival_counters(1, proj.device).any():  # every launch leaves the arrival counters at zero for the next one
        bad.append("arrival counters left non-zero")
    if y.shape != (B, N, HV * V) or y.dtype != dtype:
        bad.append(f"y {tuple(y.shape)} {y.dtype}")
    elif rel(y, y_ref) >= _bound(dtype):
        bad.append(f"y rel {rel(y, y_ref):.2e}")
    ref = gdr.to_reference()
    for name in ("k", "v_new", "gamma"):
        e = rel(getattr(ref, name), getattr(gdr_ref, name))
        if e >= _bound(dtype):
            bad.append(f"cache {name} rel {e:.2e}")
    # commit: different accepted nodes per row; node -1 keeps the row's states
    S, cs = S0.clone(), cs0.clone()
    tc_mod.triton_tree_commit(state=S, conv_state=cs, cache=gdr, conv_input=conv_input, conv_layout=conv_layout,
                              window_index=kw["window_index"], node=node,
                              fused=gt_mod.tree_fusion(fusion) != "off")
    if conv_layout is None:  # the one-launch commit reading the conv inputs from the projection rows: same states
        S2, cs2 = S0.clone(), cs0.clone()
        tc_mod.triton_tree_commit(state=S2, conv_state=cs2, cache=gdr, conv_input=proj, conv_layout=kw["layout"],
                                  window_index=kw["window_index"], node=node)
        if not (torch.equal(cs2, cs) and torch.equal(S2, S)):
            bad.append("commit from the projection rows")
    keep = node.clamp(min=0)
    S_want = tree_commit_state(initial_state=S0, cache=gdr_ref, node=keep)
    cs_want = tree_conv_commit_state(x=mixed_ref, state=cs0, window_index=kw["window_index"], node=keep)
    S_want[node < 0], cs_want[node < 0] = S0[node < 0], cs0[node < 0]
    if rel(S, S_want) >= _bound(dtype):
        bad.append(f"recurrent state rel {rel(S, S_want):.2e}")
    if not torch.equal(cs, cs_want):  # the window is a copy: exact
        bad.append("conv window")
    return bad


@pytest.mark.parametrize("fusion", ["full", "norm", "off"])
@pytest.mark.parametrize("B,N,H,HV,K,V,W,layout,kind,dtype,block_v", CASES)
def test_gdn_tree_verify_and_commit_match_reference(B, N, H, HV, K, V, W, layout, kind, dtype, block_v, fusion):
    bad = _check_verify_and_commit(gt, tc, B, N, H, HV, K, V, W, layout, kind, dtype, block_v, fusion)
    assert not bad, bad


def test_fusion_switch_and_shape_errors(monkeypatch):
    monkeypatch.delenv("GDNSPEC_TREE_FUSION", raising=False)  # the default, whatever the caller's shell sets
    assert gt.tree_fusion() == "norm"  # the default: measured fastest on the H200
    monkeypatch.setenv("GDNSPEC_TREE_FUSION", "full")
    assert gt.tree_fusion() == "full" and gt.tree_fusion("norm") == "norm"
    monkeypatch.setenv("GDNSPEC_TREE_FUSION", "fused")
    with pytest.raises(ValueError, match="GDNSPEC_TREE_FUSION"):
        gt.tree_fusion()
    monkeypatch.delenv("GDNSPEC_TREE_FUSION")
    proj, kw, _ = _inputs(2, 3, 2, 4, 8, 8, 4, "qwen3_5", "chain", torch.float32)
    for name, bad, pattern in [
        ("recurrent_state", torch.zeros(2, 4, 8, 9), "recurrent_state"),
        ("norm_weight", torch.ones(7), "norm_weight"),
        ("window_index", kw["window_index"][:, :2], "window_index"),
        ("conv_state", kw["conv_state"][..., :2], "conv_state"),
        ("ancestor_mask", kw["ancestor_mask"][:1], "ancestor_mask"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            gt.gdn_tree_verify(proj, **{**kw, name: bad})
    with pytest.raises(ValueError, match="block_v"):
        gt.gdn_tree_verify(proj, block_v=8, **kw)
    p65, kw65, _ = _inputs(1, 65, 1, 1, 8, 8, 4, "qwen3_5", "chain", torch.float32)
    with pytest.raises(ValueError, match="N=65"):
        gt.gdn_tree_verify(p65, **kw65)


# ------------------------------------------------------------------------------------------------------------ mutants
MUTANTS = [  # (module, snippet of the kernel source, deliberately broken replacement): each must fail the checks
    # arrival counted per batch row instead of per (row, value head): heads normalised before all their tiles arrived
    ("gdnspec.ops.fused.gdn_tree", "tl.atomic_add(counter + i_bh, 1,", "tl.atomic_add(counter + i_b, 1,"),
    ("gdnspec.ops.fused.gdn_tree", "tl.store(counter + i_bh, 0)", "pass"),  # counters not reset for the next launch
    ("gdnspec.ops.fused.gdn_tree", "wv = tl.load(wgt + chan * W + w,", "wv = tl.load(wgt + chan * W + (W - 1 - w),"),
    ("gdnspec.ops.fused.gdn_tree", "z_base + i_h * z_hs + l * V  #", "z_base + i_h * z_hs  #"),  # z of the wrong head
    ("gdnspec.ops.fused.gdn_tree", "b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 1) + 1e-6)[:, None]\n",
     "b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 1) + 1e-6)[:, None] * 1.001\n"),  # a small error in the keys only
    ("gdnspec.ops.gated_delta_rule.triton_commit", "v_base + (hv // R) * v_hs + (hv % R) * V + c_v % V",
     "v_base + (hv // R) * v_hs + c_v % V"),  # conv commit: v column of the first value head of the key head
    ("gdnspec.ops.gated_delta_rule.triton_commit", "pid % NKV, pid // NKV,", "pid // NKV, pid % NKV,"),
    # conv commit off by one: the window after the node keeps its oldest input instead of the node's own
    ("gdnspec.ops.gated_delta_rule.triton_commit", "(i_b * N + a_c) * W + 1 + rw,", "(i_b * N + a_c) * W + rw,"),
]


def _mutant_module(name: str, old: str, new: str, tmp_path, tag: int):
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    src = Path(importlib.import_module(name).__file__).read_text()
    assert src.count(old) == 1, f"mutant snippet not found once in {name}: {old!r}"
    path = tmp_path / f"gdnspec_mutant_{tag}.py"
    path.write_text(src.replace(old, new))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("i", range(len(MUTANTS)), ids=[f"{m[0].rsplit('.', 1)[1]}-{j}" for j, m in enumerate(MUTANTS)])
def test_deliberately_broken_kernels_fail_the_same_checks(i, tmp_path):
    import sys

    name, old, new = MUTANTS[i]
    mut = _mutant_module(name, old, new, tmp_path, i)
    gt_mod, tc_mod = (mut, tc) if name.endswith("gdn_tree") else (gt, mut)
    try:
        bad = _check_verify_and_commit(gt_mod, tc_mod, *CASES[0], "full")
    finally:
        gd._arrival_counters(1, torch.device("cpu")).zero_()  # a broken arrival leaves the shared counters dirty
        sys.modules.pop(mut.__name__, None)
    assert bad, f"mutant {i} ({new!r}) passed the checks"


@pytest.mark.parametrize("fusion", ["full", "norm", "off"])
def test_mixed_precision_reaches_every_kernel_as_valid_dot_precisions(fusion):
    """'mixed' (the CUDA default for bf16 / fp16 activations, never the interpreter's) must reach tl.dot as two valid
    precisions in every verify kernel sequence and in the one-launch commit: an unsplit 'mixed' string there fails
    only on the GPU otherwise. The interpreter computes every precision exactly: same results as the default."""
    B, N, H, HV, K, V, W, layout, kind, dtype, block_v = CASES[3]
    proj, kw, node = _inputs(B, N, H, HV, K, V, W, layout, kind, dtype)
    outs = []
    for precision in (None, "mixed"):
        y, gdr, conv_input, conv_layout = gt.gdn_tree_verify(proj, fusion=fusion, block_v=block_v,
                                                             precision=precision, **kw)
        S, cs = kw["recurrent_state"].clone(), kw["conv_state"].clone()
        tc.triton_tree_commit(state=S, conv_state=cs, cache=gdr, conv_input=conv_input, conv_layout=conv_layout,
                              window_index=kw["window_index"], node=node, fused=fusion != "off", precision=precision)
        outs.append((y, S, cs))
    for a, b in zip(*outs):
        assert rel(a, b) < 1e-6


def test_state_products_take_prec_s():
    """_tree_apply: the two products with the committed state S0 (k S0, q S0) run at PREC_S, the N x N ones at PREC;
    both verify kernels pass PREC_S through. (The interpreter cannot tell precisions apart, so this is checked on the
    source: a kernel that ignored PREC_S would pass every numeric test on the CPU.)"""
    import ast
    import inspect

    fns = {n.name: n for n in ast.walk(ast.parse(inspect.getsource(tt))) if isinstance(n, ast.FunctionDef)}
    fns.update({n.name: n for n in ast.walk(ast.parse(inspect.getsource(gt))) if isinstance(n, ast.FunctionDef)})
    precs = {}
    for node in ast.walk(fns["_tree_apply"]):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "tl.dot":
            prec = next(ast.unparse(k.value) for k in node.keywords if k.arg == "input_precision")
            precs[ast.unparse(node.args[1])] = precs.get(ast.unparse(node.args[1]), set()) | {prec}
    assert precs.pop("b_S") == {"PREC_S"} and precs and all(p == {"PREC"} for p in precs.values()), precs
    for kernel in ("_tree_verify_kernel", "_gdn_tree_verify_kernel"):
        calls = [ast.unparse(n) for n in ast.walk(fns[kernel]) if isinstance(n, ast.Call)
                 and ast.unparse(n.func) == "_tree_apply"]
        assert calls and all(c.endswith("PREC, PREC_S)") for c in calls), (kernel, calls)
