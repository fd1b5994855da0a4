"""How low a CPU verify step can go: the default target's matrix products alone at N rows, against its decode step.

    python benchmarks/cpu_verify_floor.py [--threads 2] [--nodes 1,5,16] [--repeats 50] [--out FILE.json]

Issue 10 asks for a verify of N = 16 nodes at <= 1.4x a decode step on the 2-core CPU. A verify multiplies every
weight matrix of the target (projections, MLP, lm_head) by N rows instead of one. This script times exactly those
products for the shipped default target, float32, each with the faster of F.linear (MKL) and the oneDNN packed form
the CPU fast path uses (`ops/cpu_linear.packed_linear`), each timed alone (its weight hot in the cache), and prints
their sum per N next to the measured decode step: a lower bound for the verify step (everything else it does only
adds). The "in_sequence_ms" column runs the same products one after the other, layer by layer as a step does (the
fast path's product per matrix), so that the 67 MB of weights stream through the 32 MB L3 as they do in a step.
Prints a table and JSON. Time it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_host  # noqa: E402

from gdnspec.ops import cpu_linear  # noqa: E402


def _weights(model) -> list[torch.Tensor]:
    """Every matrix a forward multiplies by (fused projections as the fast path runs them) and the lm_head."""
    mats = []
    for layer in model.layers:
        mix = layer.linear_attn if layer.layer_type == "linear_attention" else layer.self_attn
        if layer.layer_type == "linear_attention":
            mats += [mix.fused_in_proj(), mix.out_proj.weight]
        else:
            mats += [mix.fused_qkv()[0], mix.o_proj.weight]
        mlp = layer.mlp
        mats += [mlp.fused_gate_up(), mlp.down_proj.weight]
    mats.append(model.lm_head.weight)
    return [m.detach().contiguous() for m in mats]


class _Holder:
    """Where cpu_linear caches a packed weight (as a module would)."""


def product_ms(w: torch.Tensor, rows: int, repeats: int) -> float:
    x = torch.randn(rows, w.shape[1])
    best = time_host(lambda: F.linear(x, w), warmup=3, iters=repeats)
    h = _Holder()
    if cpu_linear.packed_linear(x, w, holder=h, name="w") is not None:  # where the fast path packs this shape
        best = min(best, time_host(lambda: cpu_linear.packed_linear(x, w, holder=h, name="w"), warmup=3,
                                   iters=repeats))
    return best


def in_sequence_ms(mats: list[torch.Tensor], rows: int, repeats: int) -> float:
    """All products back to back, as in a step (cpu_linear.linear: oneDNN where the fast path packs, else F.linear)."""
    xs = [torch.randn(1, rows, w.shape[1]) for w in mats]
    holders = [_Holder() for _ in mats]

    def run():
        for w, x, h in zip(mats, xs, holders):
            cpu_linear.linear(x, w, holder=h, name="w")

    return time_host(run, warmup=3, iters=repeats)


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nodes", default="1,5,16")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from gdnspec.bundle import load
    from gdnspec.runtime import StaticDecoder

    model = load(device="cpu").model
    model.fuse_projections_()
    mats = _weights(model)
    params = sum(m.numel() for m in mats)
    dec = StaticDecoder(model, batch_size=1, max_len=512)
    ids = torch.randint(0, model.vocab_size, (1,))
    decode_ms = time_host(lambda: dec.step(ids), warmup=5, iters=args.repeats)
    rows = []
    for n in (int(v) for v in args.nodes.split(",")):
        ms = sum(product_ms(w, n, args.repeats) for w in mats)
        seq = in_sequence_ms(mats, n, args.repeats)
        rows.append({"N": n, "products_ms": ms, "in_sequence_ms": seq, "x_decode_step": ms / decode_ms,
                     "in_sequence_x_decode_step": seq / decode_ms, "gflops": 2 * n * params / (ms * 1e-3) / 1e9})
    print(f"# default target, float32, {args.threads} threads: {params / 1e6:.1f}M multiplied parameters, decode step "
          f"{decode_ms:.2f} ms")
    print_table(rows, ["N", "products_ms", "in_sequence_ms", "x_decode_step", "in_sequence_x_decode_step", "gflops"])
    if args.out:
        Path(args.out).write_text(json.dumps({"threads": args.threads, "decode_ms": decode_ms, "params": params,
                                              "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
