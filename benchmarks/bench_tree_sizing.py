"""A/B of per-step tree sizing (spec/sizing.TreeSizer) on the shipped bundle: the eval's speedup over plain decoding
with fixed shapes ("fixed"), with per-step sizing ("sized"), with the adaptive plain/speculative fall-back alone
("fallback") and with both ("both", what `SpeculativeEngine(adaptive=True)` and `gdnspec eval --adaptive` run).

    python benchmarks/bench_tree_sizing.py [--device cpu] [--threads 2] [--drafters eagle,model,ngram]
                                           [--shapes chain-4,tree-4x5] [--prompts 3] [--tokens 128] [--rounds 3]
                                           [--temperature 0] [--variants fixed,sized,fallback,both] [--eager]
                                           [--dtype float32] [--out F.json]

Each round runs `gdnspec.evaluate.evaluate` once per variant (one timing: plain and speculative decoding of every
prompt, alternating prompt by prompt), the variants one after another, so that a slow phase of the machine is shared;
a row reports the median over rounds of each variant's speedup (plain seconds / speculative seconds of the same
call), its tokens per forward and, for the sized variant, the mean nodes verified and depth drafted and the
histograms. Greedy rows whose output differs from plain decoding report no speedup (evaluate's check). Sizing runs
on eager steps: on CUDA the engines are static (CUDA graphs) and sizing does nothing unless --eager (eager steps on
CUDA: a check that sizing does not cost where the verify's cost hardly depends on its nodes).
Time it on an idle machine. Prints a table and JSON.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_json  # noqa: E402  (benchmarks/common.py)

VARIANTS = {"fixed": dict(adaptive=False, size_trees=False), "sized": dict(adaptive=False, size_trees=True),
            "fallback": dict(adaptive=True, size_trees=False), "both": dict(adaptive=True, size_trees=True)}


def main(argv=None) -> int:
    from gdnspec.bundle import load
    from gdnspec.evaluate import SHAPES, evaluate, heldout_prompts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--drafters", default="eagle,model,ngram")
    ap.add_argument("--shapes", default="chain-4,tree-4x5")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--eager", action="store_true", help="eager engine steps on CUDA too (static=False)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    shapes = args.shapes.split(",")
    bad = [s for s in shapes if s not in SHAPES]
    variants = args.variants.split(",")
    if bad or args.rounds < 1 or args.threads < 1 or not set(variants) <= set(VARIANTS):
        ap.error(f"--shapes must name shapes of {sorted(SHAPES)}, --variants of {list(VARIANTS)}, --rounds and "
                 f"--threads must be >= 1")
    torch.set_num_threads(args.threads)
    bundle = load(device=args.device, dtype=getattr(torch, args.dtype))
    prompts = heldout_prompts(bundle.tokenizer, num_prompts=args.prompts, prompt_tokens=128)
    runs: dict = {}
    for r in range(args.rounds):
        for drafter in args.drafters.split(","):
            for shape in shapes:
                for variant in variants:
                    kw = VARIANTS[variant]
                    res = evaluate(bundle, prompts, drafters=[drafter], shapes={shape: SHAPES[shape]},
                                   max_new_tokens=args.tokens, temperature=args.temperature, repeats=1,
                                   progress=lambda *a: None, static=False if args.eager else None, **kw)
                    runs.setdefault((drafter, shape, variant), []).append(res["rows"][0])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    rows = []
    for (drafter, shape, variant), got in runs.items():
        sp = [g["speedup"] for g in got]
        row = {"drafter": drafter, "shape": shape, "variant": variant,
               "speedup": None if None in sp else statistics.median(sp), "speedups": sp,
               "tokens_per_forward": statistics.median(g["tokens_per_forward"] for g in got),
               "identical_to_plain": [g["identical_to_plain"] for g in got],
               "plain_step_share": [g.get("plain_step_share") for g in got],
               "tree_sizing": [g.get("tree_sizing") for g in got]}
        rows.append(row)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    out = {"device": dev, "eager": args.eager, "dtype": args.dtype, "threads": args.threads, "torch": torch.__version__,
           "temperature": args.temperature,
           "prompts": args.prompts, "tokens": args.tokens, "rounds": args.rounds, "rows": rows}
    print(f"{'drafter':7s} {'shape':9s} {'variant':9s} {'speedup':>8s} {'range':>11s} {'tok/fwd':>7s} "
          f"{'plain%':>6s} {'nodes':>5s} {'depth':>5s}")
    for row in rows:
        sp = row["speedups"]
        sizing = [s for s in row["tree_sizing"] if s]
        share = [s for s in row["plain_step_share"] if s is not None]
        text = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "MISMATCH"
        rng = f"{min(sp):.2f}-{max(sp):.2f}" if row["speedup"] is not None else "-"
        plain = f"{100 * statistics.median(share):.0f}%" if share else "-"
        nodes = f"{statistics.median(s['mean_nodes'] for s in sizing):.1f}" if sizing else "-"
        depth = f"{statistics.median(s['mean_depth'] for s in sizing):.1f}" if sizing else "-"
        print(f"{row['drafter']:7s} {row['shape']:9s} {row['variant']:9s} {text:>8s} {rng:>11s} "
              f"{row['tokens_per_forward']:7.2f} {plain:>6s} {nodes:>5s} {depth:>5s}")
    emit_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
