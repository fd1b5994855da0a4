"""cuBLAS against the Triton GEMV / skinny GEMM of ops/fused/gemv.py for the shipped bundle's shapes, by row count,
and torch's log_softmax + topk against ops/fused/topk.py: which runs where on the GPU.

    python benchmarks/bench_small_gemm.py [--dtype float32] [--rows 1,2,4,5,8,16,17,32,64] [--sweep-rows 5,16]
                                          [--fma-sweep-rows 1,2,5,16] [--cold] [--out FILE.json]             # CUDA

Shapes: every distinct (N, K) weight of the default bundle's target (fused projections, as the fused steps run them)
and EAGLE head, plus its lm_head. Each product is timed as 40 launches captured in one CUDA graph (no host launch
cost; one weight read by all 40, so L2-warm: see --cold), median of 5 replays, per launch:
  cublas  F.linear,
  fma / tf32x3 (float32) the GEMV kernel with that PREC and its tile (fma_tile / gemv_tile), launched directly,
  triton  (bf16) the GEMV kernel with gemv_tile's tile, and for out / down shapes (K >= 2N) the split-K partials,
  dispatch what gemv.small_linear / linear_for_residual run now (fp32_path picks among cuBLAS, fma and tf32x3).
sweep rows (--sweep-rows): the plain kernel launched directly with every tile of SWEEP at those row counts, the best
tile per shape, against the table's (gemv_tile): what the table should say for this dtype. --fma-sweep-rows: the
same for the float32 "fma" path's tiles (FMA_SWEEP) against gemv.fma_tile; the rows table times both float32 paths
in one process. --cold: the sweeps read another copy of the weight at each launch
(streamed from HBM, as in a step whose weights exceed L2; the rows table stays L2-warm).
topk rows: log_softmax + topk (torch) against ops/fused/topk.log_softmax_topk for F rows of the
vocabulary (F = 1, 4 frontier nodes; k = 1, 4, 8; V = 8192 the bundle, 151936 Qwen3). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import comma_list  # noqa: E402
from common import environment, print_table, write_json  # noqa: E402

import gdnspec.ops.fused.gemv as G  # noqa: E402
from gdnspec.ops.fused._bench import replay_ms  # noqa: E402
from gdnspec.ops.fused.topk import log_softmax_topk  # noqa: E402


def graph_us(fn, iters: int = 40, indexed: bool = False) -> float:
    """Microseconds per call of fn: `iters` calls captured in one CUDA graph, the median of 5 replays (indexed: fn
    takes the call's index, e.g. to read another weight copy each time)."""
    for i in range(3):
        fn(i) if indexed else fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(iters):
            fn(i) if indexed else fn()
    g.replay()
    torch.cuda.synchronize()
    us = replay_ms(g, 5) / iters * 1e3
    del g
    return us


SWEEP = [(16, 64, 4, 4), (16, 128, 4, 4), (16, 256, 4, 3), (32, 64, 4, 4), (32, 128, 4, 4), (64, 64, 4, 4),
         (16, 64, 2, 4), (32, 64, 2, 4), (16, 128, 2, 3), (64, 128, 4, 3), (16, 32, 2, 6), (32, 32, 4, 6)]


# float32 "fma" tiles: (BN, num_warps, num_stages, register budget); BK = the budget's share of (BM, BN, BK)
FMA_SWEEP = [(16, 4, 2, 64), (8, 4, 2, 64), (4, 4, 2, 64), (8, 4, 2, 128), (4, 8, 2, 64), (4, 4, 2, 128),
             (4, 8, 3, 64), (4, 2, 2, 64), (8, 8, 2, 64), (32, 4, 2, 64), (16, 2, 2, 64), (16, 8, 2, 64), (16, 4, 1, 64),
             (16, 4, 3, 64), (16, 4, 2, 128), (8, 2, 2, 64), (32, 8, 2, 64), (16, 8, 3, 128), (8, 4, 3, 128)]


def fma_tiles(M: int) -> list[tuple[int, int, int, int]]:
    """FMA_SWEEP as (BN, BK, num_warps, num_stages) tiles for M rows (BK a power of two in 16 .. 256)."""
    import triton

    BM = max(2, triton.next_power_of_2(M))
    out = []
    for bn, warps, stages, regs in FMA_SWEEP:
        bk = max(16, min(256, triton.next_power_of_2(regs * 32 * warps // (BM * bn) + 1) // 2))
        if (bn, bk, warps, stages) not in out:
            out.append((bn, bk, warps, stages))
    return out


def direct_us(x: torch.Tensor, w: torch.Tensor, prec: str) -> float:
    """us per launch of gemv's plain kernel on x @ w^T with PREC `prec` ("fma", "tf32x3" for float32; "ieee" = the
    dtype's native tl.dot for bf16) and the tile the dispatch would give that path (fma_tile / gemv_tile), launched
    directly: whether or not small_linear's dispatch takes the kernel for this shape."""
    import triton

    M, K = x.shape
    N = w.shape[0]
    fma = prec == "fma"
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    f32 = {"F32": x.dtype == torch.float32, "PREC": prec}
    BM = G.row_block(M, prec)
    bn, bk, warps, stages = G.gemv_tile(N, K, M, 1, f32=x.dtype == torch.float32, fma=fma)
    args = (x, x.stride(0), w, w, y, y.stride(0), M, N, K, K)
    kw = dict(HAS_BIAS=False, **f32, BM=BM, **G._launch_args(x, N, K))
    return graph_us(lambda: G._gemv_kernel[(triton.cdiv(N, bn), 1)](*args, **kw, BN=bn, BK=bk, num_warps=warps,
                                                                     num_stages=stages))


def sweep(x: torch.Tensor, w: torch.Tensor, fma: bool = False, cold: bool = False) -> dict:
    """us per launch of gemv's plain kernel on x @ w^T with each tile of SWEEP (fma: of fma_tiles, on the float32
    "fma" path; None where a tile does not fit). cold: each of the graph's 40 launches reads its own copy of w
    (together > the 50 MB L2), so the weight streams from HBM as in a model step whose weights exceed L2."""
    import triton

    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    f32 = {"F32": True, "PREC": "fma"} if fma else G.f32_args(x, N)
    BM = max(2, triton.next_power_of_2(M)) if fma else (16 if M <= 16 else (32 if M <= 32 else 64))
    args = (x, x.stride(0), w, w, y, y.stride(0), M, N, K, K)
    kw = dict(HAS_BIAS=False, **f32, BM=BM, **G._launch_args(x, N, K))
    out = {}
    ws = [w.clone() for _ in range(40)] if cold else [w]
    for bn, bk, warps, stages in (fma_tiles(M) if fma else SWEEP):
        def call(i):
            a = (*args[:2], ws[i % len(ws)], *args[3:])
            G._gemv_kernel[(triton.cdiv(N, bn), 1)](*a, **kw, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
        try:
            out[(bn, bk, warps, stages)] = graph_us(call, indexed=True)
        except Exception:  # noqa: BLE001 (a tile that does not fit this GPU)
            out[(bn, bk, warps, stages)] = None
    return out


def bundle_shapes(dtype) -> list[tuple[str, int, int]]:
    """(name, N, K) of the bundle's products as its fused steps run them (fused in-projection, gate_up, qkv),
    deduplicated by shape, in model order."""
    from gdnspec.bundle import load
    from gdnspec.layers.attention import GatedAttention as Attention
    from gdnspec.layers.gated_deltanet import Qwen3GatedDeltaNet as GatedDeltaNet
    from gdnspec.layers.mlp import SwiGLUMLP as MLP

    b = load(dtype=dtype)  # on the CPU: only the shapes are read
    mods = [b.model] + ([b.drafters["eagle"].head] if "eagle" in b.drafters else [])
    seen, out = set(), []

    def add(name, w):
        if tuple(w.shape) not in seen:
            seen.add(tuple(w.shape))
            out.append((name, *w.shape))

    for m in mods:
        for mod in m.modules():
            if isinstance(mod, GatedDeltaNet):
                add("gdn in_proj", mod.fused_in_proj())
                add("gdn out_proj", mod.out_proj.weight)
            elif isinstance(mod, Attention):
                add("attn qkv", mod.fused_qkv()[0])
                add("attn o_proj", mod.o_proj.weight)
            elif isinstance(mod, MLP):
                add("mlp gate_up", mod.fused_gate_up())
                add("mlp down", mod.down_proj.weight)
        if hasattr(m, "fc"):
            add("eagle fc", m.fc.weight)
    add("lm_head", b.model.lm_head.weight)
    return out


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rows", default=[1, 2, 4, 5, 8, 16, 17, 32, 64], type=comma_list(int, low=1, high=64))
    ap.add_argument("--sweep-rows", default=[], type=comma_list(int, low=1, high=64))
    ap.add_argument("--fma-sweep-rows", default=[], type=comma_list(int, low=1, high=16),
                    help="float32: time the fma path's candidate tiles (FMA_SWEEP) at these row counts")
    ap.add_argument("--cold", action="store_true", help="sweeps read a fresh weight copy per launch (from HBM)")
    ap.add_argument("--out", default="benchmarks/results/small_gemm.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_small_gemm needs CUDA", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    env = environment()
    rows = []
    for name, N, K in bundle_shapes(dtype):
        w = torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5
        for M in args.rows:
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            row = {"what": name, "N": N, "K": K, "M": M, "cublas_us": graph_us(lambda: F.linear(x, w))}
            if dtype == torch.float32:  # both float32 kernels, launched directly with their tiles, whatever the dispatch
                row["fma_us"] = direct_us(x, w, "fma")
                row["tf32x3_us"] = direct_us(x, w, "tf32x3")
            else:
                row["triton_us"] = direct_us(x, w, "ieee")
                S = G.split_count(x, w)
                row["splits"] = S
                row["triton_split_us"] = graph_us(lambda: G.small_linear_partials(x, w, S)) if S > 1 else None
            row["dispatch_us"] = graph_us(lambda: G.linear_for_residual(x, w) if K >= 2 * N else G.small_linear(x, w))
            ref = F.linear(x.double(), w.double())
            got = G.small_linear(x, w).double() if G.kernel_applies(x, w) else F.linear(x, w).double()
            row["rel_err"] = float((got - ref).norm() / ref.norm())
            rows.append(row)
    print_table(rows, ["what", "N", "K", "M", "cublas_us", "fma_us", "tf32x3_us", "triton_us", "splits",
                       "triton_split_us", "dispatch_us", "rel_err"])
    tiles = []
    for name, N, K in bundle_shapes(dtype) if args.sweep_rows else ():
        w = torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5
        for M in args.sweep_rows:
            t = sweep(torch.randn(M, K, device="cuda", dtype=dtype), w, cold=args.cold)
            ok = {k: v for k, v in t.items() if v is not None}
            best = min(ok, key=ok.get)
            table = G.gemv_tile(N, K, M, 1, f32=dtype == torch.float32)
            tiles.append({"what": name, "N": N, "K": K, "M": M, "best_tile": "x".join(map(str, best)),
                          "best_us": ok[best], "table_tile": "x".join(map(str, table)), "table_us": t.get(table),
                          "all": {"x".join(map(str, k)): v for k, v in t.items()}})
    for name, N, K in bundle_shapes(dtype) if args.fma_sweep_rows and dtype == torch.float32 else ():
        w = torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5
        for M in args.fma_sweep_rows:
            t = sweep(torch.randn(M, K, device="cuda", dtype=dtype), w, fma=True, cold=args.cold)
            ok = {k: v for k, v in t.items() if v is not None}
            best = min(ok, key=ok.get)
            table = G.fma_tile(N, M)
            tiles.append({"what": f"fma {name}", "N": N, "K": K, "M": M, "best_tile": "x".join(map(str, best)),
                          "best_us": ok[best], "table_tile": "x".join(map(str, table)), "table_us": t.get(table),
                          "all": {"x".join(map(str, k)): v for k, v in t.items()}})
    if tiles:
        print_table(tiles, ["what", "N", "K", "M", "best_tile", "best_us", "table_tile", "table_us"])
    top = []
    for V in (8192, 151936):
        for Fr in (1, 4):
            logits = torch.randn(Fr, V, device="cuda", dtype=dtype) * 3
            for k in (1, 4, 8):
                torch_us = graph_us(lambda: torch.log_softmax(logits.float(), -1).topk(k, dim=-1))
                fused_us = graph_us(lambda: log_softmax_topk(logits, k))
                a, b = log_softmax_topk(logits, k), torch.log_softmax(logits.float(), -1).topk(k, dim=-1)
                ok = bool(torch.equal(logits.gather(-1, a[1]), logits.gather(-1, b[1]))
                          and torch.allclose(a[0], b[0], atol=1e-4))
                top.append({"V": V, "rows": Fr, "k": k, "torch_us": torch_us, "fused_us": fused_us if ok else None,
                            "matches": ok})
    print_table(top, ["V", "rows", "k", "torch_us", "fused_us", "matches"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"env": env, "dtype": args.dtype, "cold": args.cold, "gemm": rows, "tiles": tiles,
                          "topk": top})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
