"""Compile gdnspec's tree-verify and decode Triton kernels for an sm_90 GPU on a machine without one.

    python benchmarks/compile_check.py          # CPU is enough: Triton's front end + ptxas; prints a line per kernel

The CPU interpreter (TRITON_INTERPRET=1, what the kernel tests run) executes kernels as Python and accepts code that
the compiler refuses: a `tl.constexpr` assigned twice in a `static_range` loop ran in every interpreter test and
failed on the H200 (stop 19). This script compiles the kernels changed most often (tree-WY with either solve, the
fused GDN verify kernel in its "norm" and "full" forms, the fused GDN decode kernel, with and without PDL) at the
1.7B shapes through `triton.compile` for `GPUTarget("cuda", 90, 32)`, which needs no GPU. Exit code 1 on the first
failure, with the compiler's message. Run it without TRITON_INTERPRET (tests/test_kernel_compile.py runs it in a
subprocess with a clean environment).
"""
from __future__ import annotations

import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter decorates kernels as Python functions)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(kernel, types: dict, consts: dict, label: str, num_warps: int = 4) -> None:
    """triton.compile of `kernel` with argument `types` (Triton type strings; every non-constexpr argument not named
    is an int32 scalar) and `consts` (the constexpr arguments) for sm_90. Raises what the compiler raises."""
    sig, cons = {}, {}
    for i, p in enumerate(kernel.params):
        if p.name in consts:
            sig[p.name] = "constexpr"
            cons[(i,)] = consts[p.name]
        else:
            sig[p.name] = types.get(p.name, "i32")
    t = time.perf_counter()
    triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=cons), target=TARGET,
                   options={"num_warps": num_warps})
    print(f"ok  {label} ({time.perf_counter() - t:.1f} s)", flush=True)


def main() -> int:
    from gdnspec.ops.fused import gdn_decode, gdn_tree
    from gdnspec.ops.gated_delta_rule import triton_tree

    shapes = dict(H=16, HV=32, K=128, V=128)
    f32 = {n: "*fp32" for n in ("q", "k", "v", "g", "beta", "s0", "o", "k_out", "vnew_out", "gamma_out")}
    tree_types = {**f32, "amask": "*u8", "scale": "fp32", "eps": "fp32"}
    fused_types = {n: "*bf16" for n in ("q", "k", "v", "proj", "nw", "y", "o_buf", "wgt", "cstate")}
    fused_types.update({"amask": "*u8", "counter": "*i32", "widx": "*i64", "s0": "*fp32", "k_out": "*fp32",
                        "vnew_out": "*fp32", "gamma_out": "*fp32", "g": "*fp32", "beta": "*fp32", "A_log": "*fp32",
                        "dt_bias": "*fp32", "scale": "fp32", "norm_eps": "fp32"})
    decode_types = {n: "*bf16" for n in ("proj", "wgt", "cstate", "nw", "y")}
    decode_types.update({"S": "*fp32", "o_buf": "*fp32", "counter": "*i32", "A_log": "*fp32", "dt_bias": "*fp32",
                         "scale": "fp32", "norm_eps": "fp32"})
    jobs = []
    for blocked in (True, False):
        for BN in (16, 32):
            jobs.append((triton_tree._tree_verify_kernel, tree_types,
                         dict(**shapes, BN=BN, BK=128, BV=32, L2NORM=True, PREC="tf32x3", PREC_S="tf32",
                              BLOCKED=blocked, PDL=False), f"tree-WY verify BN={BN} blocked={blocked}"))
    for prep in (False, True):
        jobs.append((gdn_tree._gdn_tree_verify_kernel, fused_types,
                     dict(**shapes, W=4, BN=16, BK=128, BV=32, BVN=128, NV=4, PREP=prep, PREC="tf32x3", PREC_S="tf32",
                          BLOCKED=True, PDL=True), f"fused GDN verify {'full' if prep else 'norm'} (PDL)"))
    for bvb, pdl in ((64, False), (32, True)):
        jobs.append((gdn_decode._gdn_decode_kernel, decode_types,
                     dict(**shapes, W=4, BK=128, BVB=bvb, NV=128 // bvb, BV=128, BW=4, PDL=pdl),
                     f"fused GDN decode block_v={bvb} PDL={pdl}"))
    for kernel, types, consts, label in jobs:
        try:
            compile_kernel(kernel, types, consts, label)
        except Exception as e:  # noqa: BLE001 (report the compiler's message, then fail)
            print(f"FAIL {label}: {type(e).__name__}: {e}", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
