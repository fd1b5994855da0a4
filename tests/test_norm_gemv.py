"""The residual add + RMSNorm folded into the GEMVs around it (gemv.linear_residual, gemv.normed_linear and their
dispatch in ops/fused/normed.py) against plain torch references and against today's unfolded kernels, on the CPU
through the Triton interpreter: awkward widths (D = 200, 384; N not a multiple of the 16-column block), M = 1, 3,
17, 32 (64 unsplit), one and several K splits (also forced through GDNSPEC_GEMV_SPLITS), offset / plain norm weight,
bias on / off, bf16 and float32. Mutants of the split-K summation (a split dropped, the fixed order reversed) must
fail the same checks. The SwiGLU SiLU-mul done in the down projection's loads (gemv.silu_linear_for_residual) is
bit-identical to silu_mul + the projection, split or not (opt-in GDNSPEC_SILU_GEMV=1); its mutants fail. Whole fused model steps are compared with
the module path in test_fused_steps.py.

Run: python -m pytest -q tests/test_norm_gemv.py   (skipped when triton is not installed)
"""
from __future__ import annotations

import inspect
import os
import textwrap

import pytest

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import interpreter_modules, load_source_module, randomize_, rel_err, tiny_config  # noqa: E402

interpreter_modules(["gdnspec.ops.gated_delta_rule.triton_tree", "gdnspec.ops.gated_delta_rule.triton_commit",
                     "gdnspec.ops.gated_delta_rule.triton_decode", "gdnspec.ops.fused.gdn_decode",
                     "gdnspec.ops.fused.attention", "gdnspec.ops.fused.gdn_tree"])
ew, gm = interpreter_modules(["gdnspec.ops.fused.elementwise", "gdnspec.ops.fused.gemv"])
from gdnspec.ops.fused import normed  # noqa: E402  (calls the kernels through their modules: reload-safe)

pytestmark = pytest.mark.usefixtures("interpret_env")
rel = rel_err


def _inputs(M, K, N, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, 1, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = (torch.randn(N, generator=g) * 0.5).to(dtype) if bias else None
    r = torch.randn(M, 1, N, generator=g).to(dtype)
    return x, w, b, r


def _unfolded(x, w, b, r, S):
    """Today's path: the projection (split-K partial sums when S > 1) then add_rms_norm's residual add -> h."""
    y = gm.small_linear_partials(x, w, S) if S > 1 else gm.small_linear(x, w, b)
    return ew.add_rms_norm(y, residual=r, weight=torch.zeros(r.shape[-1], dtype=r.dtype), eps=1e-6, offset=True)[1]


def _residual_checks(x, w, b, r, S) -> list[str]:
    """The failed checks of linear_residual on these inputs (empty: all pass)."""
    fails = []
    h, ssq = gm.linear_residual(x, w, b, r, splits=S)
    h_ref, _ = gm.linear_residual_reference(x, w, b, r)
    M, N = h.numel() // h.shape[-1], h.shape[-1]
    if h.shape != r.shape or h.dtype != r.dtype or ssq.shape != (M, -(-N // 16)) or ssq.dtype != torch.float32:
        return [f"shapes {tuple(h.shape)} {h.dtype} {tuple(ssq.shape)} {ssq.dtype}"]
    # bf16: the interpreter truncates float32 -> bf16 casts (the GPU rounds to nearest), so h is compared to rounding
    if rel(h, h_ref) > (2e-6 if x.dtype == torch.float32 else 1e-2):
        fails.append(f"h vs reference {rel(h, h_ref):.2e}")
    # same sums in the same fixed order as the unfolded kernels (which never split a biased projection)
    if (b is None or S == 1) and not torch.equal(h, _unfolded(x, w, b, r, S)):
        fails.append("h differs from the unfolded kernels (small_linear[_partials] + add_rms_norm)")
    # the slots hold the sums of squares of the ROUNDED h the kernel wrote, in 16-column groups
    hf = F.pad(h.reshape(M, N).double(), (0, ssq.shape[1] * 16 - N))
    if rel(ssq, hf.square().reshape(M, -1, 16).sum(-1)) > 1e-6:
        fails.append("sumsq")
    rstd = torch.rsqrt(ssq.double().sum(1) / N + 1e-6)  # the norm a consumer derives, vs the reference's rstd
    rstd_ref = torch.rsqrt(h_ref.reshape(M, N).double().square().mean(1) + 1e-6)
    if rel(rstd, rstd_ref) > (1e-6 if x.dtype == torch.float32 else 1e-2):
        fails.append(f"rstd {rel(rstd, rstd_ref):.2e}")
    if gm.arrival_counters(256, x.device)[: ssq.shape[1]].any():
        fails.append("arrival counters left non-zero")
    return fails


RES_CASES = [  # (M, K, N, S, bias, dtype)
    (1, 600, 200, 1, False, torch.float32),
    (3, 600, 200, 3, False, torch.float32),
    (17, 1100, 384, 5, False, torch.float32),
    (32, 520, 200, 2, True, torch.float32),
    (3, 600, 384, 3, True, torch.bfloat16),
    (1, 300, 200, 2, False, torch.bfloat16),
    (17, 200, 200, 1, True, torch.bfloat16),
    (64, 384, 200, 1, False, torch.float32),  # more rows than a split tile: one program per column block
]


@pytest.mark.parametrize("M,K,N,S,bias,dtype", RES_CASES)
def test_linear_residual_matches_reference_and_unfolded_kernels(M, K, N, S, bias, dtype):
    x, w, b, r = _inputs(M, K, N, dtype, bias, seed=M + K + S)
    assert gm.triton.cdiv(K, gm.triton.cdiv(gm.triton.cdiv(K, S), 256) * 256) == S  # the splits really run
    assert _residual_checks(x, w, b, r, S) == []


@pytest.mark.parametrize("forced", ["1", "3"])
def test_linear_residual_takes_the_forced_split_count(forced, monkeypatch):
    monkeypatch.setenv("GDNSPEC_GEMV_SPLITS", forced)
    x, w, b, r = _inputs(3, 600, 200, torch.float32, False, seed=4)
    assert gm.split_count(x, w) == int(forced)
    h, ssq = gm.linear_residual(x, w, None, r)  # splits=None: split_count's choice
    assert torch.equal(h, _unfolded(x, w, None, r, int(forced)))


def _mutant(tmp_path, name: str, subs: list[tuple[str, str]]):
    """_gemv_res_kernel with its source edited (each substitution must apply), as an interpreted kernel."""
    src = textwrap.dedent(inspect.getsource(gm._gemv_res_kernel.fn))
    for a, b in subs:
        assert a in src, a
        src = src.replace(a, b)
    return load_source_module(tmp_path, f"mutant_{name}", "import triton\nimport triton.language as tl\n"
                              "from gdnspec.ops.fused.gemv import _dot_tile, _pdl_prologue, _residual_epilogue\n\n"
                              + src)._gemv_res_kernel


@pytest.mark.parametrize("mutation", ["drop_last_split", "reverse_split_order"])
def test_split_summation_mutants_fail_the_checks(mutation, tmp_path, monkeypatch):
    """The checks above must catch a wrong split-K reduction: the last split dropped, or the partials added in the
    reverse order (same exact-arithmetic sum, other float rounding: only the bit-exact comparison with the fixed
    order 0 .. S-1 of the unfolded kernels sees it)."""
    subs = {"drop_last_split": [("for p in range(1, S):", "for p in range(1, S - 1):")],
            "reverse_split_order": [("tot = tl.load(part + tile,", "tot = tl.load(part + (S - 1) * M * N + tile,"),
                                    ("tl.load(part + p * M * N + tile,", "tl.load(part + (S - 1 - p) * M * N + tile,")]}
    x, w, b, r = _inputs(5, 1100, 200, torch.float32, False, seed=11)
    assert _residual_checks(x, w, b, r, 5) == []
    monkeypatch.setattr(gm, "_gemv_res_kernel", _mutant(tmp_path, mutation, subs[mutation]))
    fails = _residual_checks(x, w, b, r, 5)
    assert any("unfolded" in f for f in fails), fails
    if mutation == "drop_last_split":
        assert any("reference" in f for f in fails), fails


NORM_CASES = [  # (M, D, N, offset, bias, dtype)
    (1, 200, 77, True, False, torch.float32),
    (3, 384, 200, False, True, torch.float32),
    (17, 200, 45, True, True, torch.bfloat16),
    (32, 384, 64, False, False, torch.bfloat16),
    (64, 200, 33, True, False, torch.float32),
]


@pytest.mark.parametrize("M,D,N,offset,bias,dtype", NORM_CASES)
def test_normed_linear_matches_reference_and_unfolded_kernels(M, D, N, offset, bias, dtype):
    g = torch.Generator().manual_seed(M + D)
    h = (torch.randn(M, 1, D, generator=g) * 3).to(dtype)
    nw = (torch.randn(D, generator=g) * 0.3 + (0.0 if offset else 1.0)).to(dtype)
    w = (torch.randn(N, D, generator=g) / D**0.5).to(dtype)
    b = (torch.randn(N, generator=g) * 0.5).to(dtype) if bias else None
    hf = F.pad(h.reshape(M, D).float(), (0, -(-D // 16) * 16 - D))
    ssq = hf.square().reshape(M, -1, 16).sum(-1)
    y = gm.normed_linear(h, ssq, nw, 1e-6, offset, w, b)
    assert y.shape == (M, 1, N) and y.dtype == dtype
    y_ref = gm.normed_linear_reference(h, nw, 1e-6, offset, w, b)
    assert rel(y, y_ref) < (2e-6 if dtype == torch.float32 else 2e-2)
    x_old = ew.add_rms_norm(h, residual=None, weight=nw, eps=1e-6, offset=offset)[0]
    assert rel(y, gm.small_linear(x_old, w, b)) < (2e-6 if dtype == torch.float32 else 2e-2)
    y64 = gm.normed_linear_reference(h.double(), nw.double(), 1e-6, offset, w.double(),
                                     None if b is None else b.double())
    assert rel(y, y64) < (2e-6 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("S,dtype", [(1, torch.bfloat16), (3, torch.float32)])
def test_folded_chain_matches_the_unfolded_chain(S, dtype, monkeypatch):
    """output GEMV -> add_norm -> input GEMV through ops/fused/normed.py, folded and with GDNSPEC_NORM_GEMV=0."""
    monkeypatch.setenv("GDNSPEC_GEMV_SPLITS", str(S))
    x, w, _, r = _inputs(3, 600, 200, dtype, False, seed=5)
    nw = (torch.randn(200) * 0.2).to(dtype)
    w_in = (torch.randn(150, 200) / 14).to(dtype)
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("GDNSPEC_NORM_GEMV", flag)
        xn, h = normed.add_norm(normed.output_projection(x, w), r, weight=nw, eps=1e-6, offset=True)
        assert isinstance(xn, normed.NormedInput) == (flag == "1")
        outs.append((normed.linear_in(xn, w_in), h, normed.materialize(xn)))
    (y, h, xm), (y0, h0, x0) = outs
    assert torch.equal(h, h0) and torch.equal(xm, x0)
    assert rel(y, y0) < (2e-6 if dtype == torch.float32 else 1e-2)


def test_dispatch_falls_back_where_the_folded_kernels_do_not_run(monkeypatch):
    """With the folding on (GDNSPEC_NORM_GEMV=1; off by default): plain add_rms_norm / small_linear (tensors, no
    NormedInput) for: no residual, a computed tensor, more rows than gemv.MAX_ROWS, float64; a NormedInput the normed
    kernel cannot take is materialised first. Unset, nothing is folded."""
    x, r = torch.randn(3, 300), torch.randn(3, 40)
    monkeypatch.delenv("GDNSPEC_NORM_GEMV", raising=False)
    assert isinstance(normed.output_projection(x, torch.randn(40, 300)), torch.Tensor)  # the default: not folded
    monkeypatch.setenv("GDNSPEC_NORM_GEMV", "yes")
    with pytest.raises(ValueError, match="GDNSPEC_NORM_GEMV must be 0 or 1"):
        normed.enabled()
    monkeypatch.setenv("GDNSPEC_NORM_GEMV", "1")
    nw = torch.randn(40) * 0.2
    w = torch.randn(40, 300) / 17
    for M, dtype in ((gm.MAX_ROWS + 1, torch.float32), (3, torch.float64)):
        x, r = torch.randn(M, 300, dtype=dtype), torch.randn(M, 40, dtype=dtype)
        y = normed.output_projection(x, w.to(dtype))
        assert isinstance(y, torch.Tensor)
        xn, h = normed.add_norm(y, r, weight=nw.to(dtype), eps=1e-6, offset=True)
        assert isinstance(xn, torch.Tensor)
    x, r = torch.randn(3, 300), torch.randn(3, 40)
    y = normed.output_projection(x, w)
    assert isinstance(y, normed.ResidualProjection)
    xn, h = normed.add_norm(y, None, weight=nw, eps=1e-6, offset=True)  # no residual: y is the stream
    assert isinstance(xn, torch.Tensor) and rel(h, F.linear(x, w)) < 2e-6
    xn, h = normed.add_norm(y, r, weight=nw, eps=1e-6, offset=True)
    assert isinstance(xn, normed.NormedInput)
    w_in = torch.randn(40, 30).t()  # a weight the kernel does not take (not contiguous): materialised, then F.linear
    assert rel(normed.linear_in(xn, w_in), F.linear(normed.materialize(xn), w_in)) < 2e-6


def _bad_calls():
    x, w, r = torch.zeros(3, 300), torch.zeros(40, 300), torch.zeros(3, 40)
    h, ssq, nw = torch.zeros(3, 40), torch.zeros(3, 3), torch.zeros(40)
    return [
        ("residual rows", lambda: gm.linear_residual(torch.zeros(65, 300), w, None, torch.zeros(65, 40)), "65 rows"),
        ("split rows", lambda: gm.linear_residual(torch.zeros(33, 600), torch.zeros(40, 600), None,
                                                  torch.zeros(33, 40), splits=2), "33 rows"),
        ("residual shape", lambda: gm.linear_residual(x, w, None, torch.zeros(3, 41)), r"residual.*\(3, 41\)"),
        ("residual weight", lambda: gm.linear_residual(x, torch.zeros(40, 299), None, r), r"weight.*\(40, 299\)"),
        ("residual bias", lambda: gm.linear_residual(x, w, torch.zeros(39), r), r"bias.*\(39,\)"),
        ("normed rows", lambda: gm.normed_linear(torch.zeros(65, 40), torch.zeros(65, 3), nw, 1e-6, True,
                                                 torch.zeros(8, 40)), "65 rows"),
        ("normed sumsq", lambda: gm.normed_linear(h, torch.zeros(3, 2), nw, 1e-6, True, torch.zeros(8, 40)),
         r"sumsq.*\(3, 2\)"),
        ("normed norm_weight", lambda: gm.normed_linear(h, ssq, torch.zeros(39), 1e-6, True, torch.zeros(8, 40)),
         r"norm_weight.*\(39,\)"),
        ("normed weight", lambda: gm.normed_linear(h, ssq, nw, 1e-6, True, torch.zeros(8, 41)), r"\(8, 41\)"),
        ("normed bias", lambda: gm.normed_linear(h, ssq, nw, 1e-6, True, torch.zeros(8, 40), torch.zeros(9)),
         r"bias.*\(9,\)"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_folded_kernels_refuse_shapes_they_cannot_run(case):
    name, call, pattern = _bad_calls()[case]
    with pytest.raises(ValueError, match=pattern):
        call()


@pytest.mark.parametrize("norm_gemv,launches", [("1", 1), ("0", 9)])
@torch.inference_mode()
def test_fused_steps_run_add_rms_norm_for_the_first_layer_only(norm_gemv, launches, monkeypatch):
    """4 layers (GDN and attention, each with an MLP; intermediate 520 so that down_proj really splits K in two):
    folded, the only add_rms_norm left in a decode or verify step is the first layer's input norm (its input is the
    embedding); GDNSPEC_NORM_GEMV=0 gives back today's 2 per layer + the final norm. Both equal the module path."""
    from conftest import random_parents
    from gdnspec.layers.layout import TokenLayout
    from gdnspec.models.lm import GDNForCausalLM

    monkeypatch.setenv("GDNSPEC_NORM_GEMV", norm_gemv)
    monkeypatch.setenv("GDNSPEC_GEMV_SPLITS", "2")
    cfg = tiny_config(num_hidden_layers=4, full_attention_interval=2, intermediate_size=520)
    model = randomize_(GDNForCausalLM(cfg)).eval()
    model.gdn_backend = "triton"
    g = torch.Generator().manual_seed(2)
    model.fused_steps = False
    state = model(torch.randint(0, model.vocab_size, (2, 4), generator=g)).state
    calls = []
    real = ew.add_rms_norm
    monkeypatch.setattr(ew, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, model.vocab_size, (2, 1), generator=g)
    tree = torch.randint(0, model.vocab_size, (2, 5), generator=g)
    lay = TokenLayout.from_parents(random_parents(2, 5, "random", seed=3))
    outs = []
    for fused in (True, False):
        model.fused_steps = fused
        calls.clear()
        outs.append((model(ids, state.clone(), mode="fused_decode"), model.forward_tree(tree, state=state, layout=lay)))
        if fused:
            assert len(calls) == 2 * launches  # one decode step + one verify
    (dec, ver), (dec_ref, ver_ref) = outs
    assert rel(dec.logits, dec_ref.logits) < 1e-5 and rel(dec.hidden_states, dec_ref.hidden_states) < 1e-5
    assert rel(ver.logits, ver_ref.logits) < 1e-5 and rel(ver.hidden_states, ver_ref.hidden_states) < 1e-5


def test_gemv_tile_table_shapes():
    """gemv_tile's tiles must suit every kernel they launch: BN a multiple of the 16-column sum-of-squares group
    (linear_residual's epilogue), BK and BN powers of two >= 16 (tl.dot), and split-K tiles identical for
    small_linear_partials and linear_residual (bit-identical sums need the same BK over the same K ranges)."""
    from gdnspec.ops.fused import gemv

    for N, K, M, S in [(12352, 2048, 1, 1), (2048, 4096, 32, 4), (32000, 2048, 16, 1), (32000, 2048, 32, 1),
                       (9216, 2048, 17, 1), (64, 64, 1, 0), (2048, 5632, 1, 4)]:
        bn, bk, warps, stages = gemv.gemv_tile(N, K, M, S)
        for v in (bn, bk):
            assert v >= 16 and v & (v - 1) == 0, (N, K, M, S, bn, bk)
        assert bn % gemv.GROUP == 0 and warps in (2, 4, 8) and stages >= 1
    assert gemv.gemv_tile(2048, 4096, 1, 4) == gemv.gemv_tile(2048, 4096, 32, 4)


class _FakeLaunch:
    """Stands in for a Triton kernel / autotuned wrapper: records the grid (resolved with meta BN = 64 when it is a
    callable, as the autotuner resolves it) and the launch keywords."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.calls.append((grid({"BN": 64}) if callable(grid) else grid, kw))
        return run


@pytest.mark.parametrize("autotune", ["0", "1"])
def test_launch_grids_table_and_autotuner(autotune, monkeypatch):
    """_launch's grid: 2-D (column blocks, K splits) for the plain / split kernels, 1-D for the normed kernel
    (splits = 0), the same with the table's tile and with the autotuner's (its grid lambda); the table's tile reaches
    the kernel as BN / BK / num_warps / num_stages, the autotuner gets none of them."""
    monkeypatch.setenv("GDNSPEC_GEMV_AUTOTUNE", autotune)
    for N, K, M, S, want_cols in [(1000, 2048, 1, 1, (1,)), (2048, 4096, 32, 4, (4,)), (1000, 2048, 3, 0, ())]:
        kernel, tuned = _FakeLaunch(), _FakeLaunch()
        gm._launch(kernel, tuned, N, K, M, S, ("args",), {"BM": 16})
        (grid, kw), = (tuned if autotune == "1" else kernel).calls
        assert not (kernel.calls if autotune == "1" else tuned.calls)
        bn = 64 if autotune == "1" else gm.gemv_tile(N, K, M, S)[0]
        assert grid == (-(-N // bn), *want_cols), (N, K, M, S, grid)
        if autotune == "1":
            assert kw == {"BM": 16}
        else:
            assert (kw["BN"], kw["BK"], kw["num_warps"], kw["num_stages"]) == gm.gemv_tile(N, K, M, S)


def test_gemv_autotune_switch_is_validated(monkeypatch):
    monkeypatch.delenv("GDNSPEC_GEMV_AUTOTUNE", raising=False)
    assert not gm.autotune_enabled()
    for v, want in (("", False), ("0", False), ("1", True)):
        monkeypatch.setenv("GDNSPEC_GEMV_AUTOTUNE", v)
        assert gm.autotune_enabled() is want
    for v in ("true", "yes", " 1"):
        monkeypatch.setenv("GDNSPEC_GEMV_AUTOTUNE", v)
        with pytest.raises(ValueError, match="GDNSPEC_GEMV_AUTOTUNE"):
            gm.autotune_enabled()


def test_graph_bench_refuses_to_run_inside_a_capture(monkeypatch):
    """The autotuner meeting a new shape inside the caller's CUDA graph capture gets one clear error, before any
    launch or synchronize (which would invalidate the caller's capture)."""
    from gdnspec.ops.fused import _bench

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    calls = []
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        _bench.graph_bench(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8))
    assert calls == []


class _SmallGPU(_FakeLaunch):
    """A kernel on a GPU with less shared memory: launches with more than `max_stages` stages or BN above `max_bn`
    raise Triton's OutOfResources (as a compile that does not fit does)."""

    def __init__(self, max_stages, max_bn):
        super().__init__()
        self.max_stages, self.max_bn, self.tried = max_stages, max_bn, []

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.tried.append((kw["BN"], kw["BK"], kw["num_warps"], kw["num_stages"]))
            if kw["num_stages"] > self.max_stages or kw["BN"] > self.max_bn:
                raise gm.OutOfResources(200000, 101376, "shared memory")
            self.calls.append((grid, kw))
        return run


def test_launch_falls_back_to_a_tile_that_fits_and_keeps_bk(monkeypatch):
    """gemv_tile's table was measured on an H200; on a GPU where its tile does not fit, _launch takes the first of
    fallback_tiles that does (fewer stages, then narrower BN; BK never changes, so split-K sums stay bit-identical
    between small_linear_partials and linear_residual), remembers it for the shape, and re-raises when none fits."""
    monkeypatch.setenv("GDNSPEC_GEMV_AUTOTUNE", "0")
    monkeypatch.setattr(gm, "_TILES", {})
    N, K, M, S = 32000, 2048, 32, 1
    bn0, bk0, _, _ = gm.gemv_tile(N, K, M, S)
    k = _SmallGPU(max_stages=2, max_bn=64)
    gm._launch(k, None, N, K, M, S, ("args",), {"BM": 32})
    (grid, kw), = k.calls
    assert kw["BK"] == bk0 and kw["BN"] <= 64 and kw["num_stages"] <= 2 and grid == (-(-N // kw["BN"]), 1)
    assert all(t[1] == bk0 for t in k.tried) and len(k.tried) > 1
    k.tried.clear()
    gm._launch(k, None, N, K, M, S, ("args",), {"BM": 32})  # remembered: one launch, the working tile
    assert k.tried == [(kw["BN"], kw["BK"], kw["num_warps"], kw["num_stages"])]
    with pytest.raises(gm.OutOfResources):
        gm._launch(_SmallGPU(max_stages=0, max_bn=0), None, 1000, 2048, 1, 1, ("args",), {"BM": 16})
    for tile in [gm.gemv_tile(*c) for c in [(12352, 2048, 1, 1), (2048, 4096, 32, 4), (32000, 2048, 32, 1)]]:
        fb = gm.fallback_tiles(tile)
        assert fb[0] == tile and all(t[1] == tile[1] and t[0] >= 16 and t[0] % gm.GROUP == 0 for t in fb)


# ---------------------------------------------------------------------------------- SiLU-mul in the down projection
SILU_CASES = [  # (M, I, N, splits, bias, dtype): I not a multiple of the interpreter's BK = 64, splits forced
    (1, 200, 96, "1", False, torch.float32),
    (3, 600, 200, "3", False, torch.float32),
    (17, 330, 384, "2", False, torch.bfloat16),
    (5, 200, 130, "1", True, torch.bfloat16),
    (40, 256, 64, "1", False, torch.float32),  # more rows than a split tile: never split
]


def _silu_inputs(M, I, N, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    gu = (torch.randn(M, 1, 2 * I, generator=g) * 2).to(dtype)
    w = (torch.randn(N, I, generator=g) / I**0.5).to(dtype)
    b = (torch.randn(N, generator=g) * 0.5).to(dtype) if bias else None
    return gu, w, b


def _silu_checks(gu, w, b) -> list[str]:
    """The failed checks of silu_linear_for_residual (empty: all pass): bitwise equal to silu_mul + the projection
    (split-K partials or a tensor, whichever linear_for_residual gives), and close to float64."""
    fails = []
    got = gm.silu_linear_for_residual(gu, w, b)
    ref = gm.linear_for_residual(ew.silu_mul(gu), w, b)
    if got.shape != ref.shape or got.dtype != ref.dtype or not torch.equal(got, ref):
        fails.append("differs from silu_mul + linear_for_residual")
    total = got.sum(0) if got.dim() == gu.dim() + 1 else got  # partial sums (S, ..., N) add up to the product
    exact = F.linear(ew.silu_mul_reference(gu.double()), w.double(), None if b is None else b.double())
    if rel(total, exact) > (1e-5 if gu.dtype == torch.float32 else 2e-2):
        fails.append(f"vs float64 {rel(total, exact):.2e}")
    return fails


@pytest.mark.parametrize("M,I,N,splits,bias,dtype", SILU_CASES)
def test_silu_in_the_down_gemv_equals_silu_mul_then_gemv(M, I, N, splits, bias, dtype, monkeypatch):
    monkeypatch.setenv("GDNSPEC_SILU_GEMV", "1")  # opt-in (gemv.silu_enabled)
    monkeypatch.setenv("GDNSPEC_GEMV_SPLITS", splits)
    gu, w, b = _silu_inputs(M, I, N, dtype, bias, seed=M + I)
    assert gm.silu_fusable(gu, w)
    if int(splits) > 1 and not bias and M <= 32:
        assert gm.silu_linear_for_residual(gu, w, b).dim() == gu.dim() + 1  # the split-K form really runs
    assert _silu_checks(gu, w, b) == []


def test_silu_fusable_refuses_what_the_kernel_cannot_take(monkeypatch):
    monkeypatch.setenv("GDNSPEC_SILU_GEMV", "1")
    gu, w, _ = _silu_inputs(3, 64, 32, torch.float32, False, seed=1)
    assert gm.silu_fusable(gu, w)
    assert not gm.silu_fusable(gu[..., :-2], w)  # not [gate | up] of the weight's K
    assert not gm.silu_fusable(gu.double(), w.double())  # float64: no kernel
    assert not gm.silu_fusable(torch.randn(3, 1, 128)[..., ::2], w)  # (3, 1, 64) with a strided last dim
    with pytest.raises(ValueError, match=r"silu=True"):
        gm.small_linear(gu[..., :-2], w, silu=True)


def test_silu_switch(monkeypatch):
    gu, w, _ = _silu_inputs(3, 64, 32, torch.float32, False, seed=2)
    monkeypatch.delenv("GDNSPEC_SILU_GEMV", raising=False)
    assert not gm.silu_fusable(gu, w)  # off by default (measured slower)
    monkeypatch.setenv("GDNSPEC_SILU_GEMV", "1")
    assert gm.silu_fusable(gu, w)
    monkeypatch.setenv("GDNSPEC_SILU_GEMV", "0")
    assert not gm.silu_fusable(gu, w)
    monkeypatch.setenv("GDNSPEC_SILU_GEMV", "yes")
    with pytest.raises(ValueError, match="GDNSPEC_SILU_GEMV"):
        gm.silu_fusable(gu, w)


@pytest.mark.parametrize("mutation", ["gate twice", "unrounded silu"])
def test_silu_mutants_fail_the_checks(mutation, tmp_path, monkeypatch):
    monkeypatch.setenv("GDNSPEC_SILU_GEMV", "1")
    subs = {"gate twice": ("x + rm[:, None] * sx + K + rk[None, :]", "x + rm[:, None] * sx + rk[None, :]"),
            "unrounded silu": ("act = (gf * tl.sigmoid(gf)).to(xt.dtype).to(tl.float32)", "act = gf * tl.sigmoid(gf)")}
    src = inspect.getsource(gm)
    assert subs[mutation][0] in src
    mod = load_source_module(tmp_path, "gemv_mutant", src.replace(*subs[mutation]))
    monkeypatch.setattr(gm, "_gemv_kernel", mod._gemv_kernel)
    gu, w, b = _silu_inputs(3, 200, 96, torch.bfloat16, False, seed=7)
    assert _silu_checks(gu, w, b) != []
