"""Sweep the tile configurations of the step kernels on the 1.7B shapes (which tile pays where), CUDA-graph timed.

    python benchmarks/bench_tiles.py [--parts gemv,decode,tree,attn] [--size 1.5b] [--rows 1,16,32] [--out FILE.json]
                                     [--mamba-ssm-cache-dtype float32|bfloat16|float16]

gemv: records the (N, K, rows, K splits) of every Triton GEMV launch of one eager decode step of the bench_e2e
model (rows = batch), then times each shape with every candidate tile (BN, BK, warps, stages) of
`gdnspec.ops.fused.gemv`'s kernel launched directly (no autotuner), the dispatched one, and
cuBLAS (F.linear); "dispatch" is what small_linear runs (gemv_tile's table, or the autotuner with
GDNSPEC_GEMV_AUTOTUNE=1). decode: `gdn_decode_fused` at B = rows for each (block_v, num_warps). tree: the tree-WY kernel
(`triton_tree_gated_delta_rule`, N = 16 random trees) at B = rows for each (block_v, num_warps, precision). attn: the
tree attention kernels (`tree_attention`, N = 16 tree below 512 cached positions) for each (block_m, num_warps).
Every candidate runs 40 launches captured in ONE CUDA graph (no host launch cost in the figure), its weights /
states rotating over copies that together exceed the L2 cache, so each launch streams from HBM as in a step.
Prints one line per shape (us, % of the measured copy bandwidth for the bytes that must move) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import build_model, comma_list, copy_bandwidth_gbs  # noqa: E402

import gdnspec.ops.fused.gemv as G  # noqa: E402
from gdnspec.models.lm import GDNForCausalLM  # noqa: E402
from gdnspec.ops.fused._bench import replay_ms  # noqa: E402
from gdnspec.runtime import StaticDecoder  # noqa: E402

CANDIDATES = [(16, 256, 4, 4), (16, 128, 4, 6), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (16, 512, 4, 3),
              (64, 64, 4, 6), (64, 256, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3), (32, 512, 8, 2), (128, 64, 8, 5)]


def record_shapes(model, B: int) -> list[tuple[int, int, int, int]]:
    """(N, K, M, splits) of the GEMV launches of one eager decode step at batch B (deduplicated, in order)."""
    seen: list[tuple[int, int, int, int]] = []
    orig_small, orig_part = G.small_linear, G.small_linear_partials

    def small(x, w, b=None):
        if G.kernel_applies(x, w):
            seen.append((w.shape[0], w.shape[1], x.numel() // x.shape[-1], 1))
        return orig_small(x, w, b)

    def part(x, w, s):
        seen.append((w.shape[0], w.shape[1], x.numel() // x.shape[-1], s))
        return orig_part(x, w, s)

    G.small_linear, G.small_linear_partials = small, part
    try:
        dec = StaticDecoder(model, batch_size=B, max_len=1024, use_graph=False)
        dec.step(torch.zeros(B, dtype=torch.long, device="cuda"))
        torch.cuda.synchronize()
    finally:
        G.small_linear, G.small_linear_partials = orig_small, orig_part
    return list(dict.fromkeys(seen))


def time_launch(fn, ws, iters: int = 40, replays: int = 5) -> float:
    """Mean ms per launch: `iters` calls fn(ws[i % len(ws)]) captured in one CUDA graph (after warm-up, which also
    runs any autotuning), the median of `replays` replays divided by iters."""
    for i in range(3):
        fn(ws[i % len(ws)])
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(iters):
            fn(ws[i % len(ws)])
    g.replay()
    torch.cuda.synchronize()
    ms = replay_ms(g, replays) / iters
    del g
    return ms


def sweep_gemv(model, rows, bw) -> list[dict]:
    import triton

    rows_out = []
    for M in rows:
        for N, K, _, S in record_shapes(model, M):
            nbytes = N * K * 2
            ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, (200 << 20) // nbytes))]
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            BM = 16 if M <= 16 else 32
            k_split = triton.cdiv(triton.cdiv(K, S), 256) * 256 if S > 1 else K
            S2 = triton.cdiv(K, k_split)
            y = torch.empty(S2, M, N, device="cuda", dtype=torch.float32 if S2 > 1 else torch.bfloat16)
            res = {"N": N, "K": K, "M": M, "splits": S2, "MB": nbytes / 1e6}

            def launch(w, cfg):
                bn, bk, nw, ns = cfg
                G._gemv_kernel[(triton.cdiv(N, bn), S2)](x, K, w, w, y, N, M, N, K, k_split, HAS_BIAS=False,
                                                        F32=False, BM=BM, BN=bn, BK=bk, num_warps=nw, num_stages=ns,
                                                        **G._launch_args(x, N, k_split))
            ref = F.linear(x.float(), ws[0].float())
            for cfg in CANDIDATES:
                try:
                    launch(ws[0], cfg)
                    got = y.sum(0) if S2 > 1 else y.float()
                    if not torch.allclose(got.float(), ref, rtol=2e-2, atol=2e-1):
                        res[str(cfg)] = "WRONG"
                        continue
                    res[str(cfg)] = time_launch(lambda w: launch(w, cfg), ws)
                except Exception as e:  # noqa: BLE001 (a tile Triton cannot compile: report it)
                    res[str(cfg)] = f"error {type(e).__name__}"
            if S2 == 1:
                res["dispatch"] = time_launch(lambda w: G.small_linear(x, w), ws)
            else:
                res["dispatch"] = time_launch(lambda w: G.small_linear_partials(x, w, S), ws)
            res["cublas"] = time_launch(lambda w: F.linear(x, w), ws)
            timed = {k: v for k, v in res.items() if isinstance(v, float) and k not in ("MB",)}
            best = min(timed, key=timed.get)
            res["best"] = best
            res["best_frac_copy_bw"] = nbytes / (timed[best] * 1e-3) / (bw * 1e9)
            res["dispatch_frac_copy_bw"] = nbytes / (res["dispatch"] * 1e-3) / (bw * 1e9)
            rows_out.append(res)
            print(f"M={M:2d} N={N:6d} K={K:5d} S={S2}  {nbytes/1e6:6.1f} MB  dispatch {res['dispatch']*1e3:7.1f} us "
                  f"({res['dispatch_frac_copy_bw']:.0%})  best {best} {timed[best]*1e3:7.1f} us "
                  f"({res['best_frac_copy_bw']:.0%})  cublas {res['cublas']*1e3:7.1f} us", flush=True)
            del ws
    return rows_out


def _best_line(label: str, res: dict, nbytes: int, bw: float) -> None:
    timed = {k: v for k, v in res.items() if isinstance(v, float)}
    best = min(timed, key=timed.get)
    res["best"], res["floor_us"] = best, nbytes / (bw * 1e9) * 1e6
    cells = "  ".join(f"{k} {v * 1e3:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()
                      if k.startswith("("))
    print(f"{label}: floor {res['floor_us']:.1f} us; best {best} {timed[best] * 1e3:.1f} us "
          f"({res['floor_us'] / (timed[best] * 1e3):.0%})\n    {cells}", flush=True)


def sweep_decode(rows, bw, ssm_dtype=torch.float32) -> list[dict]:
    """gdn_decode_fused on the 1.7B GDN layer shapes (H 16, HV 32, K = V = 128, conv 4) for each (block_v, warps)."""
    from gdnspec.ops.fused.gdn_decode import ProjLayout, gdn_decode_fused, gdn_decode_reference

    L = ProjLayout.qwen3_next(16, 32, 128, 128)
    CD = 2 * L.H * L.K + L.HV * L.V
    out = []
    for B in rows:
        per = B * L.HV * L.K * L.V * torch.empty((), dtype=ssm_dtype).element_size()
        copies = max(2, (256 << 20) // per)
        states = [(torch.randn(B, L.HV, L.K, L.V, device="cuda") * 0.1).to(ssm_dtype) for _ in range(copies)]
        proj = torch.randn(B, L.width, device="cuda", dtype=torch.bfloat16)
        cw = torch.randn(CD, 4, device="cuda", dtype=torch.bfloat16) * 0.5
        cs = torch.randn(B, CD, 3, device="cuda", dtype=torch.bfloat16)
        kw = dict(layout=L, conv_weight=cw, A_log=torch.zeros(L.HV, device="cuda"),
                  dt_bias=torch.zeros(L.HV, device="cuda"), norm_weight=torch.ones(L.V, device="cuda"), norm_eps=1e-6)
        s_init, c_init = states[0].clone(), cs.clone()  # time_launch advances states[0] and cs in place
        ref_s = s_init.to(torch.float32, copy=True)  # advanced in place by the reference (float32 maths)
        ref = gdn_decode_reference(proj.float(), conv_state=c_init.float(), recurrent_state=ref_s,
                                   **{**kw, "conv_weight": cw.float()})
        res = {"B": B}
        for bv in (16, 32, 64, 128):
            for nw in (2, 4, 8):
                s0, c0 = s_init.clone(), c_init.clone()
                try:
                    y = gdn_decode_fused(proj, conv_state=c0, recurrent_state=s0, block_v=bv, num_warps=nw, **kw)
                    err = float((s0.float() - ref_s).abs().max()) + float((y.float() - ref.float()).abs().max()) / 10
                    if err > 0.5:
                        res[str((bv, nw))] = f"WRONG {err:.2e}"
                        continue
                    res[str((bv, nw))] = time_launch(lambda s: gdn_decode_fused(
                        proj, conv_state=cs, recurrent_state=s, block_v=bv, num_warps=nw, **kw), states)
                except Exception as e:  # noqa: BLE001 (a tile that cannot compile: report it)
                    res[str((bv, nw))] = f"error {type(e).__name__}"
        res["default"] = time_launch(lambda s: gdn_decode_fused(proj, conv_state=cs, recurrent_state=s, **kw), states)
        _best_line(f"gdn_decode B={B}", res, 2 * per, bw)
        out.append(res)
        del states
    return out


def sweep_tree(rows, bw, N: int = 16) -> list[dict]:
    """triton_tree_gated_delta_rule (tree-WY verify) on the 1.7B shapes, N-node random trees, per (block_v, warps,
    precision); the error column is against the float32 IEEE run."""
    from gdnspec.ops.gated_delta_rule.triton_tree import triton_tree_gated_delta_rule

    H, HV, K, V = 16, 32, 128, 128
    out = []
    for B in rows:
        per = B * HV * K * V * 4
        copies = max(2, (256 << 20) // per)
        states = [torch.randn(B, HV, K, V, device="cuda") * 0.1 for _ in range(copies)]
        q = torch.randn(B, N, H, K, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, N, H, K, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, N, HV, V, device="cuda", dtype=torch.bfloat16)
        g = -torch.rand(B, N, HV, device="cuda") * 0.1
        beta = torch.rand(B, N, HV, device="cuda")
        parents = torch.tensor([-1] + [max(0, i - 1 - (i % 3)) for i in range(1, N)])
        mask = torch.zeros(N, N, dtype=torch.bool)
        for i in range(N):
            j = i
            while j >= 0:
                mask[i, j] = True
                j = int(parents[j])
        mask = mask.cuda().expand(B, N, N).contiguous()
        kw = dict(g=g, beta=beta, ancestor_mask=mask, use_qk_l2norm=True)
        ref, _ = triton_tree_gated_delta_rule(q, k, v, initial_state=states[0], precision="ieee", **kw)
        res = {"B": B, "N": N}
        for prec in ("tf32x3", "mixed", "tf32"):
            for bv in (32, 64, 128):
                for nw in (4, 8):
                    key = str((bv, nw, prec))
                    try:
                        o, _ = triton_tree_gated_delta_rule(q, k, v, initial_state=states[0], precision=prec,
                                                            block_v=bv, num_warps=nw, **kw)
                        res[key + " err"] = f"{float((o.float() - ref.float()).norm() / ref.float().norm()):.1e}"
                        res[key] = time_launch(lambda s: triton_tree_gated_delta_rule(
                            q, k, v, initial_state=s, precision=prec, block_v=bv, num_warps=nw, **kw), states)
                    except Exception as e:  # noqa: BLE001
                        res[key] = f"error {type(e).__name__}"
        res["default"] = time_launch(lambda s: triton_tree_gated_delta_rule(q, k, v, initial_state=s, **kw), states)
        _best_line(f"tree-WY verify B={B} N={N}", res, per, bw)
        out.append(res)
        del states
    return out


ATTN_TILES = [(None, None), (64, 4), (64, 8), (32, 4), (32, 8), (16, 4), (16, 2)]  # (block_m, warps); None: default


def sweep_attn(rows, bw, N: int = 16, cached: int = 512, cap: int = 1024, device: str = "cuda") -> list[dict]:
    """tree_attention (split + combine kernels) on the 1.7B attention shapes (H 16, Hkv 2, D 256), an N-node tree
    below `cached` cached positions, per (block_m, num_warps); KV caches rotate over copies larger than the L2 cache.
    Each tile's output is checked against tree_attention_reference first (a wrong tile is reported, not timed)."""
    from gdnspec.layers.layout import TokenLayout
    from gdnspec.ops.fused.attention import tree_attention, tree_attention_reference

    H, Hkv, D = 16, 2, 256
    g = torch.Generator(device=device).manual_seed(0)
    parents = torch.tensor([[-1] + [max(0, i - 1 - (i % 3)) for i in range(1, N)]])
    anc1 = TokenLayout.from_parents(parents).ancestor_mask[0]  # (N, N) bool
    out = []
    for B in rows:
        per = 2 * B * Hkv * cap * D * 2
        copies = max(2, (256 << 20) // per) if device == "cuda" else 1
        caches = [tuple(torch.randn(B, Hkv, cap, D, device=device, generator=g, dtype=torch.bfloat16) for _ in range(2))
                  for _ in range(copies)]
        q = torch.randn(B, N, H, D, device=device, generator=g, dtype=torch.bfloat16)
        gate = torch.randn(B, N, 2 * H * D + 64, device=device, generator=g, dtype=torch.bfloat16)
        lengths = torch.full((B,), cached, device=device, dtype=torch.long)
        anc = anc1.to(device).expand(B, N, N).contiguous()
        gq = gate[..., : 2 * H * D].reshape(B, N, H, 2 * D)[..., D:].reshape(B, N, H * D)
        ck, cv = caches[0]
        ref = tree_attention_reference(q.float(), ck.float(), cv.float(), lengths, anc, gate=gq.float(), scale=D**-0.5)
        res = {"B": B, "N": N}
        for bm, nw in ATTN_TILES:
            def call(c, bm=bm, nw=nw):
                return tree_attention(q, c[0], c[1], lengths, anc, gate=gate, scale=D**-0.5, block_m=bm, num_warps=nw)
            err = float((call(caches[0]).float() - ref).norm() / ref.norm())
            key = str((bm or "default", nw or "default"))
            res[key] = f"WRONG {err:.1e}" if err > 2e-2 else (time_launch(call, caches) if device == "cuda" else err)
        if device == "cuda":  # bytes that must move: the cached and new keys and values of every row
            _best_line(f"tree attention B={B} N={N}", res, 2 * B * Hkv * (cached + N) * D * 2, bw)
        out.append(res)
        del caches
    return out


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1.5b")
    ap.add_argument("--parts", default="gemv,decode,tree,attn")
    ap.add_argument("--rows", default=[1, 16, 32], type=comma_list(int, low=1, high=32))
    ap.add_argument("--out", default="benchmarks/results/tiles.json")
    ap.add_argument("--mamba-ssm-cache-dtype", default="float32", choices=GDNForCausalLM.MAMBA_SSM_CACHE_DTYPES,
                    help="decode part: storage dtype of the recurrent states")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"gemv", "decode", "tree", "attn"}:
        ap.error(f"--parts takes a comma list of gemv, decode, tree, attn; got {args.parts!r}")
    if not torch.cuda.is_available():
        print("bench_tiles needs a CUDA GPU (it times GPU kernels in CUDA graphs)", file=sys.stderr)
        return 2
    bw = copy_bandwidth_gbs()
    out = {"gpu": torch.cuda.get_device_name(), "copy_bandwidth_gbs": bw, "size": args.size}
    if "gemv" in parts:
        out["gemv"] = sweep_gemv(build_model(args.size, "cuda"), args.rows, bw)
        torch.cuda.empty_cache()
    if "decode" in parts:
        out["decode"] = sweep_decode(args.rows, bw, getattr(torch, args.mamba_ssm_cache_dtype))
    if "tree" in parts:
        out["tree"] = sweep_tree(args.rows, bw)
    if "attn" in parts:
        out["attn"] = sweep_attn(args.rows, bw)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
