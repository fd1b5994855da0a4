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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_request_args, best_wall, bundle_and_prompts, device_sync  # noqa: E402


def main(argv=None) -> int:
    from gdnspec import generate_autoregressive
    from gdnspec.evaluate import SHAPES
    from gdnspec.spec import SpeculativeEngine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_args(ap, shape="chain-4")
    ap.add_argument("--drafter", default="eagle")
    ap.add_argument("--top", type=int, default=28, help="rows of each cProfile table")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    b, prompts = bundle_and_prompts(args)
    if args.drafter not in b.drafters:
        print(f"the bundle has no drafter {args.drafter!r} (it has {sorted(b.drafters)})", file=sys.stderr)
        return 2
    model = b.model
    eng = SpeculativeEngine(model, b.drafters[args.drafter], SHAPES[args.shape])

    def sync():
        device_sync(args.device)

    def plain():
        return [generate_autoregressive(model, p[None], args.tokens)[0] for p in prompts]

    def spec():
        return [eng.generate(p[None], args.tokens)[0] for p in prompts]

    def best(f):
        return best_wall(f, args.device)

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
