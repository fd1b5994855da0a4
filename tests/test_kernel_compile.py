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
    assert r.stdout.count("ok  ") == 28, r.stdout
