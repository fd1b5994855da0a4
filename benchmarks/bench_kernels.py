"""Microbenchmarks of the fused-step kernels on the decode shapes of bench_e2e's 1.7B model (H200 / any CUDA GPU).

    python benchmarks/bench_kernels.py [--out results.json]

- small_linear (Triton GEMV) vs F.linear (cuBLAS) for every projection shape at M = 1, 8, 32 rows, weights rotated
  over copies that exceed L2; GB/s = weight bytes / time against the measured copy bandwidth;
- gdn_decode_fused at B = 1, 8, 32 for num_warps 4 / 8 / 16 (state bytes read + written per launch).
Times are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth_gbs  # noqa: E402

from gdnspec.ops.fused.gdn_decode import ProjLayout, gdn_decode_fused  # noqa: E402
from gdnspec.ops.fused.gemv import small_linear  # noqa: E402

SHAPES = {"gdn_in_proj": (12352, 2048), "gdn_out_proj": (2048, 4096), "mlp_gate_up": (11264, 2048),
          "mlp_down": (2048, 5632), "attn_qkv": (9216, 2048), "attn_o_proj": (2048, 4096), "lm_head": (32000, 2048)}


def bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    bw = copy_bandwidth_gbs()
    rows = []
    print(f"copy bandwidth {bw:.0f} GB/s")
    print(f"{'shape':14s} {'M':>3s} {'cublas_us':>10s} {'triton_us':>10s} {'floor_us':>9s} {'cublas_%':>8s} {'triton_%':>8s}")
    for name, (N, K) in SHAPES.items():
        copies = max(2, int(200e6 // (N * K * 2)) + 1)
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for _ in range(copies)]
        for M in (1, 8, 32):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            err = float((small_linear(x, ws[0]).float() - F.linear(x, ws[0]).float()).norm() / F.linear(x, ws[0]).float().norm())
            i = [0]

            def cub():
                i[0] = (i[0] + 1) % copies
                return F.linear(x, ws[i[0]])

            def tri():
                i[0] = (i[0] + 1) % copies
                return small_linear(x, ws[i[0]])

            tri()
            tc, tt = bench(cub) * 1e3, bench(tri) * 1e3
            floor = N * K * 2 / (bw * 1e9) * 1e6
            rows.append({"kind": "linear", "shape": name, "N": N, "K": K, "M": M, "cublas_us": tc, "triton_us": tt,
                         "floor_us": floor, "rel_err": err})
            print(f"{name:14s} {M:3d} {tc:10.2f} {tt:10.2f} {floor:9.2f} {floor / tc:8.2f} {floor / tt:8.2f}  err {err:.1e}")
        del ws
    L = ProjLayout.qwen3_next(16, 32, 128, 128)
    CD = 2 * 16 * 128 + 32 * 128
    for B in (1, 8, 32):
        proj = torch.randn(B, L.width, device="cuda", dtype=torch.bfloat16)
        cw = torch.randn(CD, 4, device="cuda", dtype=torch.bfloat16)
        cs = torch.randn(B, CD, 3, device="cuda", dtype=torch.bfloat16)
        S = [torch.randn(B, 32, 128, 128, device="cuda") * 0.01 for _ in range(8)]
        A, dt, nw = torch.zeros(32, device="cuda"), torch.zeros(32, device="cuda"), torch.ones(128, device="cuda", dtype=torch.bfloat16)
        sb = 2 * B * 32 * 128 * 128 * 4
        for nwarp in (4, 8, 16):
            i = [0]

            def run():
                i[0] = (i[0] + 1) % len(S)
                return gdn_decode_fused(proj, layout=L, conv_weight=cw, conv_state=cs, recurrent_state=S[i[0]], A_log=A,
                                        dt_bias=dt, norm_weight=nw, norm_eps=1e-6, num_warps=nwarp)

            run()
            t = bench(run) * 1e3
            rows.append({"kind": "gdn_decode", "B": B, "num_warps": nwarp, "us": t, "floor_us": sb / (bw * 1e9) * 1e6})
            print(f"gdn_decode B={B:2d} warps={nwarp:2d}: {t:7.2f} us (state r+w floor {sb / (bw * 1e9) * 1e6:.2f} us)")
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "copy_bandwidth_gbs": bw, "rows": rows},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
