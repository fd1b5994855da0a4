"""The counter-based uniforms kernel (ops/uniforms.py) against sampling.counter_uniforms' torch form, bit for bit, on
the CPU through the Triton interpreter: seeds over the whole int64 range, counters past 2**32, the slots the samplers
use and the largest, n across block edges, one and several rows, no rows; sampling.counter_uniforms dispatches to it;
mutants of the kernel's hash must fail.

Run: python -m pytest -q tests/test_uniforms.py   (skipped when triton is not installed)
"""
from __future__ import annotations

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch  # noqa: E402

from conftest import interpreter_modules  # noqa: E402

(un,) = interpreter_modules(["gdnspec.ops.uniforms"])
import gdnspec.sampling as sampling  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpret_env")


def _torch_form(seeds, counters, slot, n):
    """sampling.counter_uniforms with the kernel switched off: the reference."""
    old = un.DISPATCH_ON_CPU
    un.DISPATCH_ON_CPU = False
    try:
        return sampling.counter_uniforms(seeds, counters, slot=slot, n=n)
    finally:
        un.DISPATCH_ON_CPU = old


SEEDS = torch.tensor([0, 1, 7, 2**31 - 1, 2**32, 2**32 + 5, 2**62 + 12345, 2**63 - 1])
COUNTERS = torch.tensor([0, 1, 3, 2**32 - 1, 2**32 + 2, 17, 2**40, 5])


@pytest.mark.parametrize("slot,n", [(0, 1), (1, 5), (2, 127), (3, 128), (7, 129), (2**15 - 1, 300), (4, 1000)])
def test_kernel_equals_the_torch_form_bit_for_bit(slot, n, monkeypatch):
    want = _torch_form(SEEDS, COUNTERS, slot, n)
    got = un.counter_uniforms_fused(SEEDS, COUNTERS, slot=slot, n=n)
    assert got.dtype == torch.float64 and got.shape == (8, n)
    assert torch.equal(got, want)
    assert (got >= 0).all() and (got < 1).all()
    monkeypatch.setattr(un, "DISPATCH_ON_CPU", True)  # the public function takes the kernel
    assert un.runs_on(SEEDS)
    calls = []
    real = un.counter_uniforms_fused
    monkeypatch.setattr(un, "counter_uniforms_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(sampling.counter_uniforms(SEEDS, COUNTERS, slot=slot, n=n), want) and calls
    monkeypatch.setattr(un, "counter_uniforms_fused", real)
    # one row, int32 / strided inputs, and no rows
    assert torch.equal(un.counter_uniforms_fused(SEEDS[3:4], COUNTERS[3:4], slot=slot, n=n), want[3:4])
    assert torch.equal(un.counter_uniforms_fused(SEEDS[::2], COUNTERS[::2], slot=slot, n=n), want[::2])
    small = torch.tensor([5, 9], dtype=torch.int32)
    assert torch.equal(un.counter_uniforms_fused(small, small, slot=slot, n=n),
                       _torch_form(small.long(), small.long(), slot, n))
    assert un.counter_uniforms_fused(SEEDS[:0], COUNTERS[:0], slot=slot, n=n).shape == (0, n)


def test_the_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setattr(un, "DISPATCH_ON_CPU", True)
    monkeypatch.setenv("GDNSPEC_FUSED_UNIFORMS", "0")
    assert not un.runs_on(SEEDS)
    monkeypatch.setenv("GDNSPEC_FUSED_UNIFORMS", "yes")
    with pytest.raises(ValueError, match="GDNSPEC_FUSED_UNIFORMS"):
        un.runs_on(SEEDS)


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


_mul32_ref = un._mul32  # the kernel's own multiply, for the hash mutants below


@triton.jit
def _mul32_low_half_only(x, m: tl.constexpr):  # mutant: the high 16 bits' product dropped
    return ((x & 0xFFFF) * m) & 0xFFFFFFFF


@triton.jit
def _hash32_other_multiplier(x):  # mutant: the second multiplier off by 2
    x = x ^ (x >> 16)
    x = _mul32_ref(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32_ref(x, 0x846CA68D)
    return x ^ (x >> 16)


@triton.jit
def _hash32_shift16(x):  # mutant: the middle shift 16 instead of 15
    x = x ^ (x >> 16)
    x = _mul32_ref(x, 0x7FEB352D)
    x = x ^ (x >> 16)
    x = _mul32_ref(x, 0x846CA68B)
    return x ^ (x >> 16)


@pytest.mark.parametrize("name,mutant", [("_hash32", _hash32_other_multiplier), ("_hash32", _hash32_shift16),
                                         ("_mul32", _mul32_low_half_only)])
def test_mutants_fail(name, mutant, monkeypatch):
    """A kernel whose hash differs from the reference in one constant or term must not pass the equality test (the
    kernel reads its jit helpers from the module's globals at launch in the interpreter)."""
    want = _torch_form(SEEDS, COUNTERS, 1, 40)
    assert torch.equal(un.counter_uniforms_fused(SEEDS, COUNTERS, slot=1, n=40), want)
    monkeypatch.setattr(un, name, mutant)
    assert not torch.equal(un.counter_uniforms_fused(SEEDS, COUNTERS, slot=1, n=40), want)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="seeds and counters"):
        un.counter_uniforms_fused(SEEDS, COUNTERS[:1], slot=0, n=4)
    with pytest.raises(ValueError, match="slot"):
        un.counter_uniforms_fused(SEEDS, COUNTERS, slot=2**15, n=4)
    with pytest.raises(ValueError, match="slot"):
        un.counter_uniforms_fused(SEEDS, COUNTERS, slot=0, n=-1)
