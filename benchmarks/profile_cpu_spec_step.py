"""Where the time of a speculative step goes on the CPU: wall time per stage of `SpecSession.step`, against plain decoding.

    python benchmarks/profile_cpu_spec_step.py [--drafters eagle,model,ngram] [--shapes chain-4,tree-4x5]
        [--threads 2] [--num-prompts 3] [--max-new-tokens 128] [--out FILE.json]

Default bundle, held-out prompts (gdnspec.evaluate.heldout_prompts), greedy, batch 1, eager steps (the CPU engine).
Each stage of the step is timed by wrapping the function that runs it (no change to the library): propose (the
drafter's tree, `propose_tree`), tree checks + trim + layout, verify (`target.forward_tree`), accept, commit
(`target.commit_tree`), drafter catch-up (`drafter.advance`), emit (bookkeeping per sequence); "other" is the rest of
`step` (hidden-state gather, compaction, the loop); "prefill" is the rest of a run per prompt (prompt forward, drafter
setup). ms per token of whole runs (prefill included) for plain decoding (`generate_autoregressive`) and speculative
decoding, same prompts, same run; the speculative outputs must equal plain decoding's (greedy), else no figures.
Prints a table and JSON. Time with the machine idle.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

import gdnspec
from gdnspec import generate_autoregressive
from gdnspec.evaluate import SHAPES, heldout_prompts
from gdnspec.spec import SpeculativeEngine
from gdnspec.spec import engine as engine_mod
from gdnspec.spec.tree import DraftTree

STAGES = ["propose", "tree", "verify", "accept", "commit", "catch_up", "emit", "other"]


@contextmanager
def _wrapped(obj, name: str, stage: str, acc: dict):
    """Replace obj.name by a wrapper adding its wall time to acc[stage]; restored on exit."""
    orig = getattr(obj, name)
    own = name in vars(obj)  # else a method found through the class: remove the shadowing attribute afterwards

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            acc[stage] += time.perf_counter() - t0

    setattr(obj, name, timed)
    try:
        yield
    finally:
        if own:
            setattr(obj, name, orig)
        else:
            delattr(obj, name)


def profile_row(bundle, prompts, drafter_name: str, config, max_new_tokens: int, refs) -> dict:
    model = bundle.model
    drafter = bundle.drafters[drafter_name]
    eng = SpeculativeEngine(model, drafter, config, static=False)
    for p in prompts:  # warm-up over every prompt: with GDNSPEC_CPU_COMPILE=1 the shapes met compile here, untimed
        eng.generate(p[None], max_new_tokens)
    acc = defaultdict(float)
    steps = 0
    step_s = 0.0
    orig_step = engine_mod.SpecSession.step

    def counted_step(self, **k):
        nonlocal steps, step_s
        t0 = time.perf_counter()
        try:
            return orig_step(self, **k)
        finally:
            steps += 1
            step_s += time.perf_counter() - t0

    eng.stats = type(eng.stats)()
    with (_wrapped(engine_mod, "propose_tree", "propose", acc), _wrapped(DraftTree, "validate", "tree", acc),
          _wrapped(engine_mod, "trim_tree", "tree", acc), _wrapped(DraftTree, "layout", "tree", acc),
          _wrapped(model, "forward_tree", "verify", acc), _wrapped(eng, "accept", "accept", acc),
          _wrapped(model, "commit_tree", "commit", acc), _wrapped(drafter, "advance", "catch_up", acc),
          _wrapped(engine_mod.SpecSession, "_emit", "emit", acc)):
        engine_mod.SpecSession.step = counted_step
        try:
            t0 = time.perf_counter()
            outs = [eng.generate(p[None], max_new_tokens)[0] for p in prompts]
            total_s = time.perf_counter() - t0
        finally:
            engine_mod.SpecSession.step = orig_step
    identical = all(torch.equal(o, r) for o, r in zip(outs, refs))
    known = sum(acc.values())
    acc["other"] = step_s - known
    tokens = sum(o.numel() - p.numel() for o, p in zip(outs, prompts))
    return {"drafter": drafter_name, "identical_to_plain": identical, "steps": steps,
            "tokens_per_step": tokens / steps, "step_ms": 1e3 * step_s / steps,
            "stage_ms": {s: 1e3 * acc[s] / steps for s in STAGES},
            "prefill_ms_per_prompt": 1e3 * (total_s - step_s) / len(prompts),  # prefill + drafter setup
            "ms_per_token": 1e3 * total_s / tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafters", default="eagle,model,ngram")
    ap.add_argument("--shapes", default="chain-4,tree-4x5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for s in args.shapes.split(","):
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r}, expected some of {sorted(SHAPES)}")
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    bundle = gdnspec.load()
    for d in args.drafters.split(","):
        if d not in bundle.drafters:
            ap.error(f"--drafters: {d!r} is not in the bundle (it has {sorted(bundle.drafters)})")
    prompts = heldout_prompts(bundle.tokenizer, num_prompts=args.num_prompts)
    with torch.inference_mode():
        model = bundle.model
        refs = [generate_autoregressive(model, p[None], args.max_new_tokens)[0] for p in prompts]  # warm-up
        t0 = time.perf_counter()
        refs = [generate_autoregressive(model, p[None], args.max_new_tokens)[0] for p in prompts]
        plain_s = time.perf_counter() - t0
        n_new = sum(r.numel() - p.numel() for r, p in zip(refs, prompts))
        plain_ms = 1e3 * plain_s / n_new  # includes each prompt's prefill, like a speculative run
        rows = []
        for d in args.drafters.split(","):
            for s in args.shapes.split(","):
                r = profile_row(bundle, prompts, d, SHAPES[s], args.max_new_tokens, refs)
                r["shape"] = s
                rows.append(r)
    res = {"threads": args.threads, "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
           "plain_ms_per_token": plain_ms, "rows": rows}
    print(f"plain decoding: {plain_ms:.2f} ms per token ({args.threads} threads, prefill included)")
    print("ms/token and vs plain: whole runs, prefill included on both sides")
    print("drafter | shape    | tok/step | step ms | " + " | ".join(f"{s:>8}" for s in STAGES) + " | prefill | ms/token | vs plain")
    for r in rows:
        if not r["identical_to_plain"]:
            print(f"{r['drafter']:7} | {r['shape']:8} | OUTPUT DIFFERS FROM PLAIN DECODING: no figures")
            continue
        per_tok = r["ms_per_token"]
        print(f"{r['drafter']:7} | {r['shape']:8} | {r['tokens_per_step']:8.2f} | {r['step_ms']:7.2f} | "
              + " | ".join(f"{r['stage_ms'][s]:8.2f}" for s in STAGES)
              + f" | {r['prefill_ms_per_prompt']:7.1f} | {per_tok:8.2f} | {plain_ms / per_tok:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out}")
    return 0 if all(r["identical_to_plain"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
