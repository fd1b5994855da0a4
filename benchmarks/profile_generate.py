"""Where a whole generation's host time goes: plain vs speculative decoding of the shipped bundle, under cProfile.

    python benchmarks/profile_generate.py [--device cuda] [--dtype float32] [--drafter eagle] [--shape chain-4]
                                          [--prompts 3] [--tokens 128] [--top 28]

Times (best of 3) greedy `generate_autoregressive` and `SpeculativeEngine(...).generate` of `--tokens` new tokens for
each of `--prompts` held-out prompts one after another (as `gdnspec eval` runs them), then prints cProfile's
cumulative and own-time tables of one more run of each. On CUDA the per-step wait for the graph shows as the `.cpu()`
(speculative) / `.tolist()` (plain) of the step's tokens; what else is large is host overhead (prefill, the drafter's
begin, checks). Exit code 2 when the bundle lacks the drafter.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import torch


def main(argv=None) -> int:
    from gdnspec import generate_autoregressive
    from gdnspec.bundle import load
    from gdnspec.evaluate import SHAPES, heldout_prompts
    from gdnspec.spec import SpeculativeEngine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--drafter", default="eagle")
    ap.add_argument("--shape", default="chain-4", choices=sorted(SHAPES))
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--top", type=int, default=28, help="rows of each cProfile table")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    b = load(dtype=getattr(torch, args.dtype), device=args.device)
    if args.drafter not in b.drafters:
        print(f"the bundle has no drafter {args.drafter!r} (it has {sorted(b.drafters)})", file=sys.stderr)
        return 2
    model = b.model
    prompts = [p.to(args.device) for p in heldout_prompts(b.tokenizer, num_prompts=args.prompts, prompt_tokens=128)]
    eng = SpeculativeEngine(model, b.drafters[args.drafter], SHAPES[args.shape])

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def plain():
        return [generate_autoregressive(model, p[None], args.tokens)[0] for p in prompts]

    def spec():
        return [eng.generate(p[None], args.tokens)[0] for p in prompts]

    def best(f, n=3):
        ts = []
        for _ in range(n):
            sync()
            t = time.perf_counter()
            f()
            sync()
            ts.append(time.perf_counter() - t)
        return min(ts)

    same = all(torch.equal(a, c) for a, c in zip(plain(), spec()))  # also the warm-up (graph capture)
    print(f"{args.device} {args.dtype} {args.drafter} {args.shape}: plain {best(plain) * 1e3:.1f} ms, speculative "
          f"{best(spec) * 1e3:.1f} ms for {len(prompts)} x {args.tokens} tokens; identical: {same}")
    for name, fn in (("plain", plain), ("speculative", spec)):
        pr = cProfile.Profile()
        sync()
        pr.enable()
        fn()
        sync()
        pr.disable()
        print(f"\n## {name}")
        st = pstats.Stats(pr, stream=sys.stdout)
        st.sort_stats("cumulative").print_stats(args.top)
        st.sort_stats("tottime").print_stats(args.top // 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
