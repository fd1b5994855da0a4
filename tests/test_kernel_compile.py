"""The tree-verify, decode, float32 GEMV and log-softmax top-k Triton kernels COMPILE for an sm_90 GPU (benchmarks/compile_check.py, in a subprocess
without TRITON_INTERPRET): the interpreter tests run kernels as Python and accept code the compiler refuses (a
constexpr assigned twice in a static_range loop passed every interpreter test and failed on the H200 in stop 19).
Needs no GPU: Triton's front end and ptxas run on the CPU (~20 s).

Run: python -m pytest -q tests/test_kernel_compile.py
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

REPO = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compile_check.py")], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("ok  ") == 31, r.stdout


SPILL_PROBE = """
import sys
sys.path.insert(0, sys.argv[1] + "/benchmarks")
import compile_check as cc
from gdnspec.ops import tree_build as tb
st = {n: "*i64" for n in ("pool_tok", "pool_par", "tokens", "parents", "order")}
st.update({"pool_sc": "*fp32", "scores": "*fp32", "valid": "*i8"})
for warps in (4, tb._select_warps(128)):
    used = cc.compile_kernel(tb._select_kernel, st, dict(BP=128, BN=16), "select", num_warps=warps, usage=True)
    print("usage", warps, None if used is None else used[1])
"""


def test_spill_check_sees_the_select_kernels_spills():
    """compile_check's ptxas report: the tree builder's selection over a 128-slot pool spills at 4 warps (what it
    launched with before, ~20 us of an EAGLE tree step on an H200) and not at the warps it launches with now."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", SPILL_PROBE, str(REPO)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    usage = [line.split() for line in r.stdout.splitlines() if line.startswith("usage")]
    if usage[0][2] == "None":
        pytest.skip("no ptxas shipped with Triton reads its PTX here")
    assert int(usage[0][2]) > 0 and usage[0][1] == "4"
    assert int(usage[1][2]) == 0 and int(usage[1][1]) > 4
