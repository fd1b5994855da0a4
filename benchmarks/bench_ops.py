"""Ops benchmark of the GDN Triton kernels at Qwen3-Next layer shapes (issue 4, section 3, first bullet).

Shapes: H=16 key heads, HV=32 value heads, K=V=128, bf16 inputs, float32 state; B in {1, 8, 64}; N in {4..64}.
Columns (microseconds, median over CUDA-graph replays timed with CUDA events; the committed states are rotated
over enough buffers that they do not sit in L2, like 36+ layers of real decode):

    verify      our Triton tree verify (tree-WY), reads the state once, writes no state
    commit      our Triton commit (read + write the state once)
    fla_chain   fla fused_recurrent_gated_delta_rule over a chain of N tokens (outputs only)
    per_node    per-node-state baseline (what SGLang does): a Triton recurrence writing every node's state
    dec_ours    our fused decode step (conv + gates + l2norm + recurrence + gated RMSNorm), one token
    dec_rec     our recurrence-only decode step (same work as fla's T=1 call)
    dec_fla     fla fused_recurrent_gated_delta_rule with T=1 (recurrence + l2norm, writes the final state)
    floor_r     bandwidth floor of one state read (bytes / measured copy bandwidth); floor_rw = 2 x floor_r

Every kernel is checked against a torch reference at every shape first; a kernel that fails prints FAIL instead
of a time. Run on a GPU:

    python benchmarks/bench_ops.py --out benchmarks/results      # writes ops_<gpu>.json and ops_<gpu>.png
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from gdnspec.layers.gated_deltanet import Qwen3GatedDeltaNet  # noqa: E402
from gdnspec.layers.layout import TokenLayout  # noqa: E402
from gdnspec.ops.gated_delta_rule import triton_decode as td  # noqa: E402
from gdnspec.ops.gated_delta_rule.recurrent import fused_recurrent_gated_delta_rule as torch_recurrent  # noqa: E402
from gdnspec.ops.gated_delta_rule.tree import tree_commit_state, tree_gated_delta_rule  # noqa: E402
from gdnspec.ops.gated_delta_rule.triton_commit import triton_tree_commit_state  # noqa: E402
from gdnspec.ops.gated_delta_rule.triton_tree import triton_tree_gated_delta_rule  # noqa: E402
from gdnspec.ops.fused._bench import replay_ms  # noqa: E402

H, HV, K, V = 16, 32, 128, 128
L2_BYTES = 50 * 2**20


# ---------------------------------------------------------------- per-node-state baseline (SGLang-style)
@triton.jit
def _per_node_kernel(q, k, v, g, beta, parents, s0, states, o, N, scale,
                     H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    """One recurrent step per node from its parent's state; every node's state is written to `states`
    (B, N, HV, K, V). A chain keeps the parent in registers; other parents are reloaded from `states`."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HV
    i_hv = i_bh % HV
    i_h = i_hv // (HV // H)
    rk = tl.arange(0, K)
    rv = i_v * BV + tl.arange(0, BV)
    s_off = rk[:, None] * V + rv[None, :]
    S0 = tl.load(s0 + (i_b * HV + i_hv) * K * V + s_off)
    S = S0
    for i in range(N):
        p = tl.load(parents + i_b * N + i)
        if p != i - 1:
            tl.debug_barrier()
            Sp = tl.load(states + ((i_b * N + tl.maximum(p, 0)) * HV + i_hv) * K * V + s_off)
            S = tl.where(p >= 0, Sp, S0)
        b_q = tl.load(q + ((i_b * N + i) * H + i_h) * K + rk).to(tl.float32)
        b_k = tl.load(k + ((i_b * N + i) * H + i_h) * K + rk).to(tl.float32)
        b_v = tl.load(v + ((i_b * N + i) * HV + i_hv) * V + rv).to(tl.float32)
        b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 0) + 1e-6) * scale
        b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 0) + 1e-6)
        b_g = tl.load(g + (i_b * N + i) * HV + i_hv)
        b_beta = tl.load(beta + (i_b * N + i) * HV + i_hv)
        S = S * tl.exp(b_g)
        u = (b_v - tl.sum(S * b_k[:, None], 0)) * b_beta
        S = S + b_k[:, None] * u[None, :]
        tl.store(states + ((i_b * N + i) * HV + i_hv) * K * V + s_off, S)
        tl.store(o + ((i_b * N + i) * HV + i_hv) * V + rv, tl.sum(S * b_q[:, None], 0).to(o.dtype.element_ty))


def per_node_verify(q, k, v, g, beta, parents, s0, states, o):
    B, N = parents.shape
    BV = 32
    _per_node_kernel[(V // BV, B * HV)](q, k, v, g, beta, parents, s0, states, o, N, K**-0.5,
                                        H=H, HV=HV, K=K, V=V, BV=BV, num_warps=4)


# ---------------------------------------------------------------- timing
def time_graph(calls, min_calls=20, reps=15):
    """Median microseconds per call of `calls` (callables) captured into one CUDA graph and replayed."""
    calls = calls * max(1, math.ceil(min_calls / len(calls)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls[:3]:
            c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    us = replay_ms(graph, reps) * 1000.0 / len(calls)
    del graph
    return us


def copy_bandwidth():
    """Bytes read + written per second of a large device-to-device copy."""
    n = 2**28  # 1 GiB of float32
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    us = time_graph([lambda: y.copy_(x)], min_calls=10, reps=10)
    del x, y
    return 2 * n * 4 / (us * 1e-6)


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ---------------------------------------------------------------- one (B, N) point
def bench_point(B, N, fla, results, tol_bf16=2e-2, tol_state=1e-4):
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(1000 * B + N)
    q = torch.randn(B, N, H, K, device=dev, generator=gen).bfloat16()
    k = torch.randn(B, N, H, K, device=dev, generator=gen).bfloat16()
    v = torch.randn(B, N, HV, V, device=dev, generator=gen).bfloat16()
    g = F.logsigmoid(torch.randn(B, N, HV, device=dev, generator=gen) + 2.0)
    beta = torch.sigmoid(torch.randn(B, N, HV, device=dev, generator=gen))
    state_bytes = B * HV * K * V * 4
    nbuf = max(1, min(64, math.ceil(3 * L2_BYTES / state_bytes)))
    S0s = [torch.randn(B, HV, K, V, device=dev, generator=gen) * 0.1 for _ in range(nbuf)]
    chain = TokenLayout.chain(B, N, device=dev)
    parents = chain.parents.contiguous()
    mask = chain.ancestor_mask.contiguous()
    row = dict(B=B, N=N, nbuf=nbuf, state_MiB=state_bytes / 2**20)
    checks = {}

    # references (torch, float32)
    o_ref, c_ref = tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=mask, initial_state=S0s[0], use_qk_l2norm=True)
    node = torch.randint(0, N, (B,), device=dev, generator=gen)
    S_ref = tree_commit_state(initial_state=S0s[0], cache=c_ref, node=node)

    o, cache = triton_tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=mask, initial_state=S0s[0], use_qk_l2norm=True)
    checks["verify"] = rel(o, o_ref)
    S = triton_tree_commit_state(state=S0s[0], cache=cache, node=node, out=torch.empty_like(S0s[0]))
    checks["commit"] = rel(S, S_ref)
    o_tf, _ = triton_tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=mask, initial_state=S0s[0],
                                           use_qk_l2norm=True, precision="tf32")
    checks["verify_tf32"] = rel(o_tf, o_ref)

    states = torch.empty(B, N, HV, K, V, device=dev)
    o_pn = torch.empty_like(v)
    per_node_verify(q, k, v, g, beta, parents, S0s[0], states, o_pn)
    S_last = tree_commit_state(initial_state=S0s[0], cache=c_ref, node=torch.full((B,), N - 1, device=dev, dtype=torch.long))
    checks["per_node"] = max(rel(o_pn, o_ref), rel(states[:, -1], S_last))

    if fla is not None:
        o_fla, _ = fla(q, k, v, g=g, beta=beta, initial_state=S0s[0], output_final_state=False, use_qk_l2norm_in_kernel=True)
        checks["fla_chain"] = rel(o_fla, o_ref)

    limits = dict(verify=tol_bf16, commit=tol_state, verify_tf32=tol_bf16, per_node=tol_bf16, fla_chain=tol_bf16)
    ok = {name: err < limits[name] for name, err in checks.items()}
    row["errors"] = checks

    vec = {}
    if ok["verify"]:
        vec["verify"] = time_graph([lambda s=s: triton_tree_gated_delta_rule(
            q, k, v, g=g, beta=beta, ancestor_mask=mask, initial_state=s, use_qk_l2norm=True) for s in S0s])
    if ok["verify_tf32"]:
        vec["verify_tf32"] = time_graph([lambda s=s: triton_tree_gated_delta_rule(
            q, k, v, g=g, beta=beta, ancestor_mask=mask, initial_state=s, use_qk_l2norm=True, precision="tf32")
            for s in S0s])
    if ok["commit"]:
        vec["commit"] = time_graph([lambda s=s: triton_tree_commit_state(state=s, cache=cache, node=node) for s in S0s])
    if ok["per_node"]:
        vec["per_node"] = time_graph([lambda s=s: per_node_verify(q, k, v, g, beta, parents, s, states, o_pn) for s in S0s],
                                     min_calls=4, reps=7)
    if fla is not None and ok["fla_chain"]:
        vec["fla_chain"] = time_graph([lambda s=s: fla(q, k, v, g=g, beta=beta, initial_state=s, output_final_state=False,
                                                       use_qk_l2norm_in_kernel=True) for s in S0s])
    for name, good in ok.items():
        if not good:
            vec[name] = "FAIL"
    row["us"] = vec
    results.append(row)
    del states
    torch.cuda.empty_cache()
    return row


def bench_decode(B, fla, results):
    """One decode token: ours (full fused step from the projections), ours recurrence-only, fla T=1."""
    dev = "cuda"
    torch.manual_seed(B)
    layer = Qwen3GatedDeltaNet(2048, H, HV, K, V, dtype=torch.bfloat16, device=dev)
    state_bytes = B * HV * K * V * 4
    nbuf = max(1, min(64, math.ceil(3 * L2_BYTES / state_bytes)))
    states = []
    for _ in range(nbuf):
        st = layer.new_state(B)
        st.recurrent.normal_(0, 0.1)
        st.conv.normal_()
        states.append(st)
    x = torch.randn(B, 1, 2048, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        mixed, z, b, a = layer._project(x)
        g, beta = layer._gates(b, a)
        ref_state = states[0].clone()
        out_ref, _ = layer.forward_state(x, ref_state, mode="fused_decode")
        st = states[0].clone()
        y = td.triton_gdn_decode_step(mixed[:, 0], z[:, 0], b[:, 0], a[:, 0], conv_weight=layer.conv_weight, conv_state=st.conv,
                                      recurrent_state=st.recurrent, A_log=layer.A_log, dt_bias=layer.dt_bias,
                                      norm_weight=layer.norm.weight, num_k_heads=H, head_k_dim=K, norm_eps=layer.norm.eps)
        out = layer.out_proj(y.reshape(B, 1, -1))
    checks = {"dec_ours": max(rel(out, out_ref), rel(st.recurrent, ref_state.recurrent))}
    mc = torch.nn.functional.silu(torch.randn(B, 2 * H * K + HV * V, device=dev)).bfloat16()
    qd = mc[:, : H * K].view(B, 1, H, K)
    kd = mc[:, H * K: 2 * H * K].view(B, 1, H, K)
    vd = mc[:, 2 * H * K:].view(B, 1, HV, V)
    o_rec = torch.empty(B, HV, V, device=dev, dtype=torch.bfloat16)
    g1, b1 = g[:, 0].contiguous(), beta[:, 0].contiguous()

    def rec(s):
        BV = td._pick_block_v(B, HV, V, mc.device)
        td._rec_kernel[(triton.cdiv(V, BV), B * HV)](mc, b1, g1, o_rec, g1, g1, g1, s, o_rec, o_rec, K**-0.5, 1e-6, 1e-6,
                                                     H=H, HV=HV, K=K, V=V, BK=K, BV=BV, GATES=False, FUSE_NORM=False,
                                                     num_warps=4 if BV >= 64 else 1)
    S_chk = states[0].recurrent.clone()
    rec(S_chk)
    o_t, S_t = torch_recurrent(qd, kd, vd, g=g, beta=beta, initial_state=states[0].recurrent, output_final_state=True,
                               use_qk_l2norm=True)
    checks["dec_rec"] = max(rel(o_rec, o_t[:, 0]), rel(S_chk, S_t))
    if fla is not None:
        o_f, S_f = fla(qd, kd, vd, g=g, beta=beta, initial_state=states[0].recurrent, output_final_state=True,
                       use_qk_l2norm_in_kernel=True)
        checks["dec_fla"] = max(rel(o_f, o_t), rel(S_f, S_t))
    vec = {}
    for name, err in checks.items():
        if err > 2e-2:
            vec[name] = "FAIL"
    if "dec_ours" not in vec:
        vec["dec_ours"] = time_graph([lambda s=s: td.triton_gdn_decode_step(
            mixed[:, 0], z[:, 0], b[:, 0], a[:, 0], conv_weight=layer.conv_weight, conv_state=s.conv,
            recurrent_state=s.recurrent, A_log=layer.A_log, dt_bias=layer.dt_bias, norm_weight=layer.norm.weight,
            num_k_heads=H, head_k_dim=K, norm_eps=layer.norm.eps) for s in states])
    if "dec_rec" not in vec:
        vec["dec_rec"] = time_graph([lambda s=s: rec(s.recurrent) for s in states])
    if fla is not None and "dec_fla" not in vec:
        vec["dec_fla"] = time_graph([lambda s=s: fla(qd, kd, vd, g=g, beta=beta, initial_state=s.recurrent,
                                                     output_final_state=True, use_qk_l2norm_in_kernel=True) for s in states])
    results.append(dict(B=B, nbuf=nbuf, errors=checks, us=vec))


def sweep_verify(fla, batches=(1, 64), nodes=(16, 32, 64)):
    """Tile/warp/precision sweep of the tree verify kernel (prints one line per config; checks each config)."""
    out = []
    for B in batches:
        for N in nodes:
            gen = torch.Generator(device="cuda").manual_seed(N)
            q = torch.randn(B, N, H, K, device="cuda", generator=gen).bfloat16()
            k = torch.randn(B, N, H, K, device="cuda", generator=gen).bfloat16()
            v = torch.randn(B, N, HV, V, device="cuda", generator=gen).bfloat16()
            g = F.logsigmoid(torch.randn(B, N, HV, device="cuda", generator=gen) + 2.0)
            beta = torch.sigmoid(torch.randn(B, N, HV, device="cuda", generator=gen))
            nbuf = max(1, min(64, math.ceil(3 * L2_BYTES / (B * HV * K * V * 4))))
            S0s = [torch.randn(B, HV, K, V, device="cuda", generator=gen) * 0.1 for _ in range(nbuf)]
            mask = TokenLayout.chain(B, N, device="cuda").ancestor_mask.contiguous()
            o_ref, _ = tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=mask, initial_state=S0s[0], use_qk_l2norm=True)
            for prec in ("tf32x3", "tf32"):
                for bv in (32, 64, 128):
                    for w in (4, 8):
                        kw = dict(g=g, beta=beta, ancestor_mask=mask, use_qk_l2norm=True, precision=prec, block_v=bv, num_warps=w)
                        try:
                            o, _ = triton_tree_gated_delta_rule(q, k, v, initial_state=S0s[0], **kw)
                            err = rel(o, o_ref)
                            us = time_graph([lambda s=s: triton_tree_gated_delta_rule(q, k, v, initial_state=s, **kw)
                                             for s in S0s], min_calls=10, reps=7) if err < 2e-2 else "FAIL"
                        except Exception as exc:  # noqa: BLE001
                            err, us = float("nan"), f"ERR {type(exc).__name__}"
                        out.append(dict(B=B, N=N, precision=prec, block_v=bv, num_warps=w, err=err, us=us))
                        print(f"sweep B={B} N={N} {prec} BV={bv} warps={w}: err={err:.1e} us={us}", flush=True)
    return out


def fmt(x):
    return f"{x:9.1f}" if isinstance(x, float) else f"{str(x):>9}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--nodes", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--sweep", action="store_true", help="only sweep the tree verify kernel's tiles and precision")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench_ops.py needs a CUDA GPU"
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla
    except Exception as exc:  # noqa: BLE001
        print(f"fla not importable ({exc}); fla columns skipped")
        fla = None
    gpu = torch.cuda.get_device_name()
    t0 = time.time()
    try:  # tf32x3 (float32-accurate dots on tensor cores) is the CUDA default; fall back if this triton lacks it
        qq = torch.randn(1, 4, H, K, device="cuda")
        triton_tree_gated_delta_rule(qq, qq, torch.randn(1, 4, HV, V, device="cuda"), g=torch.zeros(1, 4, HV, device="cuda"),
                                     beta=torch.ones(1, 4, HV, device="cuda"), ancestor_mask=TokenLayout.chain(1, 4, "cuda").ancestor_mask,
                                     initial_state=torch.zeros(1, HV, K, V, device="cuda"))
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        print(f"tf32x3 failed ({type(exc).__name__}: {str(exc)[:200]}); using ieee")
        os.environ["GDNSPEC_TRITON_PRECISION"] = "ieee"
    if args.sweep:
        res = sweep_verify(fla)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ops_sweep_verify.json"), "w") as f:
            json.dump(dict(gpu=gpu, triton=triton.__version__, rows=res), f, indent=1)
        return
    bw = copy_bandwidth()
    print(f"{gpu}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    tree_rows, dec_rows = [], []
    for B in args.batches:
        bench_decode(B, fla, dec_rows)
        print("decode", dec_rows[-1], flush=True)
        for N in args.nodes:
            row = bench_point(B, N, fla, tree_rows)
            row["floor_r"] = B * HV * K * V * 4 / bw * 1e6
            print(row, flush=True)
    dec = {r["B"]: r for r in dec_rows}
    cols = ["verify", "verify_tf32", "commit", "fla_chain", "per_node"]
    head = f"{'B':>3} {'N':>3} " + " ".join(f"{c:>9}" for c in cols + ["dec_ours", "dec_rec", "dec_fla", "floor_r", "floor_rw"])
    lines = [f"GPU: {gpu}; torch {torch.__version__}; triton {triton.__version__}; times in us (median, CUDA graphs)",
             head]
    for r in tree_rows:
        d = dec[r["B"]]["us"]
        vals = [r["us"].get(c, "-") for c in cols] + [d.get("dec_ours", "-"), d.get("dec_rec", "-"), d.get("dec_fla", "-"),
                                                      r["floor_r"], 2 * r["floor_r"]]
        lines.append(f"{r['B']:>3} {r['N']:>3} " + " ".join(fmt(x) for x in vals))
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    tag = gpu.replace(" ", "_").replace("/", "_")
    fla_version = None
    try:
        import importlib.metadata as md
        fla_version = md.version("fla-core")
    except Exception:  # noqa: BLE001
        pass
    with open(os.path.join(args.out, f"ops_{tag}.json"), "w") as f:
        json.dump(dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, fla_core=fla_version,
                       shapes=dict(H=H, HV=HV, K=K, V=V, dtype="bfloat16", state="float32"), copy_bandwidth_Bps=bw,
                       method="median of CUDA-graph replays timed with CUDA events; states rotated beyond L2",
                       tree=tree_rows, decode=dec_rows, table=table, seconds=time.time() - t0), f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(args.batches), figsize=(5 * len(args.batches), 4))
        for ax, B in zip(list(axes) if len(args.batches) > 1 else [axes], args.batches):
            rows = [r for r in tree_rows if r["B"] == B]
            Ns = [r["N"] for r in rows]
            for c in cols:
                ys = [r["us"].get(c) for r in rows]
                if all(isinstance(y, float) for y in ys):
                    ax.plot(Ns, ys, marker="o", label=c)
            for c in ("dec_ours", "dec_fla"):
                y = dec[B]["us"].get(c)
                if isinstance(y, float):
                    ax.axhline(y, linestyle="--", linewidth=1, label=f"{c} (1 token)", color="gray" if c == "dec_fla" else "k")
            ax.plot(Ns, [r["floor_r"] for r in rows], linestyle=":", label="floor (1 state read)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tree nodes N")
            ax.set_ylabel("us")
            ax.set_title(f"B={B}")
            ax.legend(fontsize=7)
        fig.suptitle(f"GDN layer ops, Qwen3-Next shapes, {gpu}")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, f"ops_{tag}.png"), dpi=110)
    except Exception as exc:  # noqa: BLE001
        print(f"plot skipped: {exc}")


if __name__ == "__main__":
    main()
