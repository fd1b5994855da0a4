"""Compile gdnspec's tree-verify and decode Triton kernels for an sm_90 GPU on a machine without one.

    python benchmarks/compile_check.py          # CPU is enough: Triton's front end + ptxas; prints a line per kernel

The CPU interpreter (TRITON_INTERPRET=1, what the kernel tests run) executes kernels as Python and accepts code that
the compiler refuses: a `tl.constexpr` assigned twice in a `static_range` loop ran in every interpreter test and
failed on the H200 (stop 19). This script compiles the kernels changed most often (tree-WY with either solve, the
fused GDN verify kernel in its "norm" and "full" forms, the fused GDN decode kernel, with and without PDL) at the
1.7B shapes, the float32 GEMV and tree in-projection, the GEMV with the SiLU-mul, the EAGLE input and the
log-softmax top-k, the tree builder's kernels, the counter-based uniforms and the tree rejection sampling, through `triton.compile` for `GPUTarget("cuda", 90, 32)`, which needs no GPU. Exit code 1 on the first
failure, with the compiler's message. Run it without TRITON_INTERPRET (tests/test_kernel_compile.py runs it in a
subprocess with a clean environment).

    python benchmarks/compile_check.py --ptxas  # also the registers and spill bytes of each kernel (ptxas -v)

Registers and spills come from the ptxas that ships with Triton (`ptxas_usage`; the one that reads Triton's PTX
version). Kernels launched at the shipped bundle's shapes with a num_warps chosen to keep their tiles in registers
are marked `no_spill`: a spill there fails the check (the tree builder's selection spilled at 4 warps and took ~20 us
of an EAGLE tree step on an H200). Without a usable ptxas the spill check is skipped with a note.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter decorates kernels as Python functions)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _ptxas() -> str | None:
    """The path of a ptxas shipped with Triton that accepts its PTX (the newest first), or None."""
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(base, name)
        if os.access(path, os.X_OK):
            return path
    return None


def ptxas_usage(compiled) -> tuple[int, int] | None:
    """(registers per thread, spill store bytes) of a compiled kernel's PTX by `ptxas -v` for sm_90a, or None when
    no shipped ptxas reads it (the PTX version is newer than the ptxas)."""
    ptxas = _ptxas()
    if ptxas is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                           capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    if r.returncode != 0 or regs is None or spill is None:
        return None
    return int(regs.group(1)), int(spill.group(1))


def compile_kernel(kernel, types: dict, consts: dict, label: str, num_warps: int = 4, *, usage: bool = False):
    """triton.compile of `kernel` with argument `types` (Triton type strings; every non-constexpr argument not named
    is an int32 scalar) and `consts` (the constexpr arguments; those left out take their defaults) for sm_90. Raises
    what the compiler raises. usage: also return ptxas_usage's (registers, spill bytes) (None without a ptxas)."""
    sig, cons = {}, {}
    for i, p in enumerate(kernel.params):
        if p.name in consts or (p.is_constexpr and p.default is not inspect.Parameter.empty):
            sig[p.name] = "constexpr"  # a constexpr left out takes its default, as at a launch
            cons[(i,)] = consts.get(p.name, p.default)
        else:
            sig[p.name] = types.get(p.name, "i32")
    t = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=cons), target=TARGET,
                              options={"num_warps": num_warps})
    used = ptxas_usage(compiled) if usage else None
    extra = f", {used[0]} registers, {used[1]} spill bytes" if used else ""
    print(f"ok  {label} ({time.perf_counter() - t:.1f} s{extra})", flush=True)
    return used


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a not in ("--ptxas",) for a in argv):
        print(f"usage: compile_check.py [--ptxas]; got {' '.join(argv)}", file=sys.stderr)
        return 2
    report = "--ptxas" in argv
    from gdnspec.ops.fused import elementwise, gdn_decode, gdn_tree, gdn_tree_proj, gemv, topk
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
                         "scale": "fp32", "norm_eps": "fp32", "cs_src": "*bf16", "S_src": "*fp32", "src_rows": "*i64"})
    jobs = []
    for blocked in (True, False):
        for BN in (16, 32):
            jobs.append((triton_tree._tree_verify_kernel, tree_types,
                         dict(**shapes, BN=BN, BK=128, BV=32, L2NORM=True, PREC="tf32x3", PREC_S="tf32",
                              BLOCKED=blocked, PDL=False), f"tree-WY verify BN={BN} blocked={blocked}"))
    for prep in (False, True):  # "full" launches with 8 warps (gdn_tree_verify)
        jobs.append((gdn_tree._gdn_tree_verify_kernel, fused_types,
                     dict(**shapes, W=4, BN=16, BK=128, BV=32, BVN=128, NV=4, PREP=prep, PREC="tf32x3", PREC_S="tf32",
                          BLOCKED=True, PDL=True), f"fused GDN verify {'full' if prep else 'norm'} (PDL)", 8 if prep else 4))
    for bvb, pdl, rows in ((64, False, False), (32, True, False), (32, True, True)):
        jobs.append((gdn_decode._gdn_decode_kernel, decode_types,
                     dict(**shapes, W=4, BK=128, BVB=bvb, NV=128 // bvb, BV=128, BW=4, PDL=pdl, HAS_ROWS=rows),
                     f"fused GDN decode block_v={bvb} PDL={pdl}" + (" reading source rows" if rows else "")))
    # float32 on CUDA (the bundle's verify step and tree expansions, gemv.fp32_rows_ok): the GEMV and the
    # verify in-projection with the tree prep, with and without PDL
    g32 = {n: "*fp32" for n in ("x", "w", "b", "y")}
    for pdl in (False, True):
        jobs.append((gemv._gemv_kernel, g32, dict(HAS_BIAS=False, F32=True, BM=16, BN=32, BK=128, PDL=pdl,
                                                  PF_LINES=4 if pdl else 0, LINE=32, PREC="tf32x3"),
                     f"float32 GEMV (PDL={pdl})"))
    # the float32 "fma" path (gemv.fp32_precision's default): plain with the SiLU loads, residual, normed, tree proj
    jobs.append((gemv._gemv_kernel, g32, dict(HAS_BIAS=True, F32=True, BM=8, BN=16, BK=64, PDL=True, PF_LINES=4,
                                              LINE=32, PREC="fma", SILU=True), "float32 fma GEMV with the SiLU-mul (PDL)"))
    r32 = {n: "*fp32" for n in ("x", "w", "b", "r", "h", "ssq", "part")}
    r32.update({"counter": "*i32"})
    jobs.append((gemv._gemv_res_kernel, r32, dict(HAS_BIAS=False, SPLIT=True, F32=True, BM=16, BN=16, BK=64,
                                                  PDL=True, PF_LINES=4, LINE=32, PREC="fma"),
                 "float32 fma split-K GEMV + residual (PDL)"))
    n32 = {n: "*fp32" for n in ("h", "ssq", "nw", "w", "b", "y")}
    n32["eps"] = "fp32"
    jobs.append((gemv._gemv_norm_kernel, n32, dict(OFFSET=True, HAS_BIAS=False, F32=True, BM=2, BN=16, BK=256,
                                                   BG=32, PDL=True, PF_LINES=4, LINE=32, PREC="fma"),
                 "float32 fma normed GEMV (PDL)"))
    b16 = {n: "*bf16" for n in ("x", "w", "b")}
    b16["y"] = "*fp32"
    jobs.append((gemv._gemv_kernel, b16, dict(HAS_BIAS=False, F32=False, BM=16, BN=64, BK=128, PDL=True, PF_LINES=4,
                                              LINE=64, SILU=True), "split-K GEMV with the SiLU-mul in its loads (PDL)"))
    p32 = {n: "*fp32" for n in ("x", "w", "y", "cw", "cs", "A_log", "dt_bias", "q", "k", "v", "g", "beta")}
    p32.update({"code": "*i32", "widx": "*i64"})
    jobs.append((gdn_tree_proj._tree_proj_kernel, p32, dict(F32=True, W=4, BM=16, BN=32, BK=128, PDL=True,
                                                             PF_LINES=4, LINE=32, PREC="tf32x3"),
                 "float32 tree in-projection (PDL)"))
    jobs.append((gdn_tree_proj._tree_proj_kernel, p32, dict(F32=True, W=4, BM=8, BN=16, BK=128, PDL=True,
                                                             PF_LINES=4, LINE=32, PREC="fma"),
                 "float32 fma tree in-projection (PDL)"))
    ei = {n: "*bf16" for n in ("table", "hid", "we", "wh", "out")}
    ei.update({"ids": "*i64", "eps": "fp32", "hrows": "*i64"})
    for rows in (False, True):
        jobs.append((elementwise._eagle_input_kernel, ei, dict(OFFSET=True, BD=2048, PDL=True, HAS_ROWS=rows),
                     "EAGLE input (PDL)" + (" gathering its feature rows" if rows else "")))
    tk = {"x": "*bf16", "out_v": "*fp32", "out_i": "*i64", "part_m": "*fp32", "part_s": "*fp32"}
    for single in (True, False):
        jobs.append((topk._block_kernel, tk, dict(K=4, KP=4, BLOCK=8192, SINGLE=single),
                     f"log-softmax top-k block (single={single})"))
    jobs.append((topk._merge_kernel, {"cand_v": "*fp32", "cand_i": "*i64", "part_m": "*fp32", "part_s": "*fp32",
                                      "out_v": "*fp32", "out_i": "*i64"}, dict(K=8, KP=8, CP=32),
                 "log-softmax top-k merge"))
    from gdnspec.ops import tree_build as tb
    ft = {n: "*i64" for n in ("tok", "fpool", "roots", "pool_tok", "pool_par", "out_tok", "out_slot", "out_pool",
                              "out_rows")}
    ft.update({n: "*fp32" for n in ("lp", "fscore", "pool_sc", "out_sc")})
    for first in (True, False):
        jobs.append((tb._frontier_kernel, ft, dict(K=4, BC=16, FIRST=first), f"tree builder frontier (first={first})"))
    st = {n: "*i64" for n in ("pool_tok", "pool_par", "tokens", "parents", "order")}
    st.update({"pool_sc": "*fp32", "scores": "*fp32", "valid": "*i8"})
    jobs.append((tb._select_kernel, st, dict(BP=64, BN=16), "tree builder best-N selection"))
    # the shipped bundle's EAGLE tree-4x5 pool (69 nodes: BP = 128) at the launch's warps: must not spill
    no_spill = [(tb._select_kernel, st, dict(BP=128, BN=16), "tree builder best-N selection, BP=128 (no spill)",
                 tb._select_warps(128), True)]
    ct = {n: "*i64" for n in ("roots", "tok", "tokens", "parents", "order")}
    ct.update({"lp": "*fp32", "scores": "*fp32", "valid": "*i8"})
    jobs.append((tb._chain_kernel, ct, dict(BN=16), "tree builder chain"))
    from gdnspec.ops import uniforms
    jobs.append((uniforms._uniforms_kernel, {"seeds_ptr": "*i64", "counters_ptr": "*i64", "out_ptr": "*fp64"},
                 dict(BLOCK=128), "counter-based uniforms"))
    from gdnspec.ops import tree_accept
    for pdt in ("*fp32", "*fp64"):
        jobs.append((tree_accept._tree_accept_kernel,
                     {"tokens_ptr": "*i64", "parents_ptr": "*i64", "valid_ptr": "*i8", "probs_ptr": pdt,
                      "u_ptr": "*fp64", "node_ptr": "*i64", "bonus_ptr": "*i64"},
                     dict(DEPTH=5, KIDS=4, BN=16, KP=4, BV=2048), f"tree rejection sampling ({pdt[1:]})"))
    jobs.append((tree_accept._draw_kernel, {"probs_ptr": "*fp32", "u_ptr": "*fp64", "out_ptr": "*i64"},
                 dict(BV=2048), "inverse-CDF draw"))
    if _ptxas() is None:
        print("note: no ptxas shipped with Triton: registers and spills not checked", flush=True)
    for kernel, types, consts, label, *launch in jobs + no_spill:  # launch: [num_warps[, must not spill]]
        must = len(launch) > 1 and launch[1]
        nw = launch[0] if launch else (8 if consts.get("BLOCK", 0) >= 4096 else 4)
        try:
            used = compile_kernel(kernel, types, consts, label, num_warps=nw, usage=report or must)
        except Exception as e:  # noqa: BLE001 (report the compiler's message, then fail)
            print(f"FAIL {label}: {type(e).__name__}: {e}", flush=True)
            return 1
        if must and used is not None and used[1] > 0:
            print(f"FAIL {label}: {used[1]} bytes of register spills at {nw} warps ({used[0]} registers)", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
