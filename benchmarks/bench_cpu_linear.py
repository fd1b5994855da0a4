"""CPU linear products of the default bundle's shapes: F.linear (MKL) against oneDNN with a packed weight.

    python benchmarks/bench_cpu_linear.py [--threads 2] [--rows 1,2,5,16] [--out FILE.json]

For each (N, K) weight of the default target / draft model / EAGLE head and each row count, the median wall time of
F.linear(x, W) and of torch.ops.mkldnn._linear_pointwise(x, packed W) (the path of gdnspec/ops/cpu_linear.py), with
the weight hot (one copy, cache-resident) and cold (copies rotated past the L3 cache, as in a step whose weights do
not fit in cache). Prints a table (us, MKL / packed, and the choice of `cpu_linear.packed_pays`) and JSON. Time with
the machine idle: this is a CPU benchmark.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gdnspec.ops import cpu_linear  # noqa: E402

SHAPES = [(1032, 384), (384, 256), (2048, 384), (384, 1024), (512, 384), (384, 192), (8192, 384), (1024, 256),
          (256, 512), (8192, 256)]  # (N, K): target in/out/gate_up/down/qkv/o/lm_head, draft gate_up/down/lm_head


def median_us(fn, calls: int) -> float:
    for i in range(min(calls, 20)):
        fn(i)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        times.append((time.perf_counter() - t0) / calls)
    return sorted(times)[2] * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,5,16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    try:
        rows = [int(r) for r in args.rows.split(",")]
        if not rows or min(rows) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--rows takes a comma list of positive integers, got {args.rows!r}")
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if not cpu_linear.available():
        print("this torch build has no oneDNN packed linear (torch.ops.mkldnn)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    lp = torch.ops.mkldnn._linear_pointwise
    out = []
    print(f"us per product, MKL / packed oneDNN, {args.threads} threads; * = packed_pays picks oneDNN")
    with torch.inference_mode():
        for N, K in SHAPES:
            copies = max(2, (128 << 20) // (N * K * 4))
            ws = [torch.randn(N, K) for _ in range(copies)]
            ps = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]
            cells = []
            for M in rows:
                x = torch.randn(M, K)
                r = {"N": N, "K": K, "rows": M, "packed_pays": cpu_linear.packed_pays(M, N, K)}
                r["hot_mkl"] = median_us(lambda i: F.linear(x, ws[0]), 200)
                r["hot_packed"] = median_us(lambda i: lp(x, ps[0], None, "none", [], ""), 200)
                r["cold_mkl"] = median_us(lambda i: F.linear(x, ws[i % copies]), 2 * copies)
                r["cold_packed"] = median_us(lambda i: lp(x, ps[i % copies], None, "none", [], ""), 2 * copies)
                out.append(r)
                mark = "*" if r["packed_pays"] else " "
                cells.append(f"{M:2d}{mark} hot {r['hot_mkl']:6.1f}/{r['hot_packed']:6.1f} cold "
                             f"{r['cold_mkl']:6.1f}/{r['cold_packed']:6.1f}")
            print(f"{N:5d} x {K:4d}: " + " | ".join(cells), flush=True)
            del ws, ps
    if args.out:
        Path(args.out).write_text(json.dumps({"threads": args.threads, "rows": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
