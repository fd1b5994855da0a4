"""The float32 "fma" path of the GEMV kernels (ops/fused/gemv.py, GDNSPEC_FP32_GEMV): float32 products and sums on
the CUDA cores, running (row, column, k) sums reduced once after the K loop. Runs under TRITON_INTERPRET=1 (the
interpreter takes the same path for float32 inputs as CUDA does by default), against float64 F.linear, over awkward
shapes: rows 1 .. 33 (not powers of two), K not a multiple of the K block, N not a multiple of the column block,
bias, the SiLU-mul loads, split-K partials, the tree in-projection and the normed / residual kernels. Mutants of the
fma branch (the last K chunk dropped, the SiLU loads skipped) must fail.

    TRITON_INTERPRET=1 python -m pytest tests/test_gemv_fma.py
"""
from __future__ import annotations

import inspect
import os
import textwrap

import pytest

os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import interpreter_modules, load_source_module  # noqa: E402

ew, gm = interpreter_modules(["gdnspec.ops.fused.elementwise", "gdnspec.ops.fused.gemv"])

pytestmark = pytest.mark.usefixtures("interpret_env")


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _xw(M, K, N, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K**0.5, torch.randn(N, generator=g)


def test_float32_takes_the_fma_path_by_default(monkeypatch):
    monkeypatch.delenv("GDNSPEC_FP32_GEMV", raising=False)
    x = torch.zeros(3, 8)
    assert gm.fp32_precision() == "fma" and gm.f32_args(x, 40) == {"F32": True, "PREC": "fma"}
    assert gm.row_block(5, "fma") == 8 and gm.row_block(1, "fma") == 2 and gm.row_block(17, "fma") == 32
    assert gm.f32_args(x.bfloat16(), 40)["PREC"] == "ieee" and gm.row_block(5, "ieee") == 16
    monkeypatch.setenv("GDNSPEC_FP32_GEMV", "tf32x3")
    assert gm.f32_args(x, 40) == {"F32": True, "PREC": "ieee"}  # the interpreter has no TF32: 'ieee' stands in
    monkeypatch.setenv("GDNSPEC_FP32_GEMV", "FMA")
    with pytest.raises(ValueError, match="GDNSPEC_FP32_GEMV"):
        gm.f32_args(x, 40)
    from gdnspec.ops import check_env_switches  # the CLI's up-front check names it too

    with pytest.raises(ValueError, match="GDNSPEC_FP32_GEMV"):
        check_env_switches()


def test_cuda_float32_dispatch_table(monkeypatch):
    """fp32_path: the fma path for 1-16 rows, tf32x3 for the wide lm_head at 4+ rows, cuBLAS for it at one row and
    for 17+ rows; GDNSPEC_FP32_GEMV=tf32x3 restores stop 21's rule (tf32x3 at 2-16 rows, cuBLAS otherwise)."""
    monkeypatch.delenv("GDNSPEC_FP32_GEMV", raising=False)
    wide = gm.FP32_TF32_MIN_N
    assert [gm.fp32_path(M, 1032) for M in (1, 2, 5, 16, 17)] == ["fma"] * 4 + [None]
    assert [gm.fp32_path(M, wide) for M in (1, 2, 3, 4, 16, 17)] == [None, "fma", "fma", "tf32x3", "tf32x3", None]
    monkeypatch.setenv("GDNSPEC_FP32_GEMV", "tf32x3")
    assert [gm.fp32_path(M, 1032) for M in (1, 2, 16, 17)] == [None, "tf32x3", "tf32x3", None]
    assert gm.fp32_path(1, 384) is None and gm.fp32_rows_ok(2, wide)


def test_fma_tile_register_budget():
    """The (BM, BN, BK) running sums stay <= 128 float32 registers a thread, BN is at least min_bn (16 where the
    residual kernel asks for its 16-column groups), BK is a power of two that divides the split-K ranges (256)."""
    for N in (37, 384, 1032, 2048, 8192):
        for M in range(1, 17):
            for min_bn in (4, gm.GROUP):
                bn, bk, warps, stages = gm.fma_tile(N, M, min_bn=min_bn)
                BM = max(2, triton.next_power_of_2(M))
                assert BM * bn * bk <= 128 * 32 * warps, (N, M, bn, bk)
                assert bn >= min_bn and 256 % bk == 0 and bk >= 16
            assert gm.gemv_tile(N, 384, M, 1, f32=True, fma=True) == gm.fma_tile(N, M)
    assert gm.fma_tile(384, 5) == (4, 256, 4, 2) and gm.fma_tile(2048, 16) == (4, 64, 2, 2)
    assert gm.fma_tile(8192, 2)[0] == 8 and gm.fma_tile(384, 5, min_bn=16)[0] == 16


@pytest.mark.parametrize("M", [1, 2, 5, 8, 16, 17, 33])
@pytest.mark.parametrize("K,N", [(300, 37), (1000, 130)])
def test_small_linear_fma_matches_float64(M, K, N):
    x, w, b = _xw(M, K, N, seed=M * K)
    ref = F.linear(x.double(), w.double(), b.double())
    y = gm.small_linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert rel(y, ref) < 1e-6
    assert rel(gm.small_linear(x[None, :, None], w), F.linear(x.double(), w.double())[None, :, None]) < 1e-6


@pytest.mark.parametrize("M,S", [(3, 2), (5, 3), (16, 4)])
def test_fma_partials_and_silu(M, S):
    g = torch.Generator().manual_seed(M + S)
    gu = torch.randn(M, 2 * 700, generator=g)
    w = torch.randn(90, 700, generator=g) / 26
    act = ew.silu_mul_reference(gu)
    ref = F.linear(act.double(), w.double())
    parts = gm.small_linear_partials(act, w, S)
    assert parts.shape[1:] == (M, 90) and rel(parts.sum(0), ref) < 1e-6  # S rounded to 256-column ranges
    os.environ["GDNSPEC_SILU_GEMV"] = "1"
    try:
        fused = gm.small_linear(gu, w, silu=True)
        fused_parts = gm.small_linear_partials(gu, w, S, silu=True)
    finally:
        del os.environ["GDNSPEC_SILU_GEMV"]
    assert torch.equal(fused, gm.small_linear(ew.silu_mul(gu), w))  # the same chunks, the same sums
    assert torch.equal(fused_parts, gm.small_linear_partials(ew.silu_mul(gu), w, S))


@pytest.mark.parametrize("M,K,N", [(5, 384, 200), (1, 130, 77), (16, 520, 33)])
def test_fma_residual_and_normed_kernels(M, K, N):
    """linear_residual -> normed_linear on the fma path against their references, and linear_residual bit-equal to
    small_linear + the residual add here (the interpreter launches both with BN 16 / BK 64; on CUDA the residual
    kernel's wider column blocks make the two only close, gemv's module docstring)."""
    x, w, b = _xw(M, K, N, seed=M + N)
    r = torch.randn(M, N)
    h, ssq = gm.linear_residual(x, w, b, r)
    h_ref, ssq_ref = gm.linear_residual_reference(x.double(), w.double(), b.double(), r.double())
    assert rel(h, h_ref) < 1e-6 and rel(ssq, ssq_ref) < 1e-6
    assert torch.equal(h, gm.small_linear(x, w, b) + r)
    nw = torch.randn(N) * 0.2
    w2 = torch.randn(45, N) / N**0.5
    y = gm.normed_linear(h, ssq, nw, 1e-6, True, w2)
    assert rel(y, gm.normed_linear_reference(h, nw, 1e-6, True, w2)) < 1e-6


def _mutant_gemv(tmp_path, name: str, old: str, new: str):
    """_gemv_kernel calling a _dot_tile whose fma branch has `old` replaced by `new` (first occurrence, which is in
    the fma branch: it comes before the tl.dot loop), as an interpreted kernel."""
    dot = textwrap.dedent(inspect.getsource(gm._dot_tile.fn))
    mark = "else:\n        acc = tl.zeros([BM, BN], dtype=tl.float32)"  # the tl.dot branch starts here
    fma, rest = dot.split(mark, 1)
    assert old in fma, old
    dot = fma.replace(old, new, 1) + mark + rest
    kern = textwrap.dedent(inspect.getsource(gm._gemv_kernel.fn))
    return load_source_module(tmp_path, f"mutant_{name}", "import triton\nimport triton.language as tl\n"
                              "from gdnspec.ops.fused.gemv import _x_chunk, _pdl_prologue\n\n" + dot + "\n\n"
                              + kern)._gemv_kernel


@pytest.mark.parametrize("mutation", ["drop_last_chunk", "skip_silu"])
def test_fma_mutants_fail(mutation, tmp_path, monkeypatch):
    subs = {"drop_last_chunk": ("for k0 in range(k_lo, k_hi, BK):", "for k0 in range(k_lo, k_hi - BK, BK):"),
            "skip_silu": ("_x_chunk(x, sx, rm, rk, mm, mk, K, SILU)", "_x_chunk(x, sx, rm, rk, mm, mk, K, False)")}
    g = torch.Generator().manual_seed(7)
    gu = torch.randn(5, 2 * 300, generator=g)
    w = torch.randn(40, 300, generator=g) / 17
    monkeypatch.setenv("GDNSPEC_SILU_GEMV", "1")

    def ok() -> bool:
        act = ew.silu_mul(gu)
        plain = rel(gm.small_linear(act, w), F.linear(act.double(), w.double())) < 1e-6
        return plain and torch.equal(gm.small_linear(gu, w, silu=True), gm.small_linear(act, w))

    assert ok()
    monkeypatch.setattr(gm, "_gemv_kernel", _mutant_gemv(tmp_path, mutation, *subs[mutation]))
    assert not ok()
