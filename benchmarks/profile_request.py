"""Where one speculative request's wall time goes, phase by phase, against plain decoding of the same prompts.

    python benchmarks/profile_request.py [--device cuda] [--dtype float32] [--drafters eagle,model,ngram]
                                         [--shape tree-4x5] [--prompts 3] [--tokens 128] [--adaptive]
                                         [--temperature 0.7 --seed 0] [--out F.json]

For each drafter: the wall time of `SpeculativeEngine.generate` over the held-out prompts one after another (best of
3, as `gdnspec eval` runs them), then one more run with a device sync around each phase: the target's prefill, the
drafter's begin, the runner lookup (its weights check), the runner's load, the speculative steps (`runner.step` to
the host's read of its tokens is not separable under the look-ahead, so steps are counted and their replays timed as
a group), and the rest of the static loop (host work between steps). The synced run is slower than the unsynced one:
compare its phases with each other, and the unsynced totals with plain decoding. --adaptive also prints the policy's
per-kind estimates (seconds per step, tokens per step, deferred seconds per plain step) and choice counts.
Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_request_args, best_wall, bundle_and_prompts, device_sync  # noqa: E402


def main(argv=None) -> int:
    from gdnspec import generate_autoregressive
    from gdnspec.evaluate import SHAPES
    from gdnspec.runtime import static as S
    from gdnspec.spec import SpeculativeEngine
    from gdnspec.spec import engine as E

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_args(ap, shape="tree-4x5")
    ap.add_argument("--drafters", default="eagle,model,ngram")
    ap.add_argument("--adaptive", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy; > 0: plain and "
                    "speculative runs sample with seed --seed, and no identity is checked)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not args.temperature >= 0:
        print(f"--temperature must be >= 0, got {args.temperature}", file=sys.stderr)
        return 2
    T = args.temperature
    torch.set_grad_enabled(False)
    b, prompts = bundle_and_prompts(args)
    names = [d for d in args.drafters.split(",") if d]
    missing = [d for d in names if d not in b.drafters]
    if missing:
        print(f"--drafters: the bundle has no {missing} (it has {sorted(b.drafters)})", file=sys.stderr)
        return 2
    model = b.model
    cuda = args.device.startswith("cuda")

    def sync():
        device_sync(args.device)

    def best(f):
        return best_wall(f, args.device)

    acc, cnt = collections.defaultdict(float), collections.Counter()
    patched = []

    def wrap(obj, name, label):
        f = getattr(obj, name)

        @functools.wraps(f)
        def g(*a, **k):
            sync()
            t = time.perf_counter()
            r = f(*a, **k)
            sync()
            acc[label] += time.perf_counter() - t
            cnt[label] += 1
            return r
        setattr(obj, name, g)
        patched.append((obj, name, f))

    def gen():
        return torch.Generator(device=args.device).manual_seed(args.seed) if T > 0 else None

    def plain():
        return [generate_autoregressive(model, p[None], args.tokens, temperature=T, generator=gen()) for p in prompts]

    plain()
    t_plain = best(plain)
    rows = []
    print(f"{args.device} {args.dtype} {args.shape} {'adaptive ' if args.adaptive else ''}| plain decoding "
          f"{t_plain * 1e3:.1f} ms for {len(prompts)} x {args.tokens} tokens")
    for name in names:
        drafter = b.drafters[name]
        eng = SpeculativeEngine(model, drafter, SHAPES[args.shape], adaptive=args.adaptive, temperature=T)

        def spec():
            out = []
            for p in prompts:
                eng.generator = gen()
                out.append(eng.generate(p[None], args.tokens))
            return out

        same = all(torch.equal(a, c) for a, c in zip(plain(), spec())) if T == 0 else None
        t_spec = best(spec)
        acc.clear()
        cnt.clear()
        wrap(E, "graph_prefill", "target prefill")
        wrap(type(drafter), "begin", "drafter begin")
        wrap(E.SpeculativeEngine, "runner", "runner lookup")
        wrap(S.StaticSpecRunner, "load", "runner load")
        wrap(S.StaticSpecRunner, "step", "spec steps (replays)")
        wrap(S.StaticSpecRunner, "plain_step", "plain steps (replays)")
        wrap(S.StaticSpecRunner, "catch_up", "drafter catch-up")
        wrap(E.SpecSession, "run_static", "static loop")
        try:
            sync()
            t0 = time.perf_counter()
            spec()
            sync()
            t_synced = time.perf_counter() - t0
        finally:
            for obj, attr, f in reversed(patched):
                setattr(obj, attr, f)
            patched.clear()
        phases = {k: {"ms": acc[k] * 1e3, "calls": cnt[k]} for k in acc}
        inner = sum(acc[k] for k in acc if k in ("runner lookup", "runner load", "spec steps (replays)",
                                                   "plain steps (replays)", "drafter catch-up"))
        phases["static loop, host rest"] = {"ms": (acc["static loop"] - inner) * 1e3, "calls": cnt["static loop"]}
        row = {"drafter": name, "shape": args.shape, "identical_to_plain": same, "plain_ms": t_plain * 1e3,
               "spec_ms": t_spec * 1e3,
               "speedup": t_plain / t_spec if same or T > 0 or args.dtype != "float32" else None,
               "synced_ms": t_synced * 1e3, "phases": phases}
        if args.adaptive:
            pol = eng.policy
            row["policy"] = {"summary": pol.summary(),
                             "sec_per_step_us": {f"{b_}/{'spec' if k else 'plain'}": v * 1e6
                                                 for (b_, k), v in pol.sec.items()},
                             "tokens_per_step": {f"{b_}/{'spec' if k else 'plain'}": v for (b_, k), v in pol.tok.items()},
                             "deferred_us_per_plain_step": {f"{b_}": v * 1e6 for (b_, k), v in pol.extra.items()}}
        rows.append(row)
        sp = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "MISMATCH"
        print(f"\n{name} {args.shape}: speculative {t_spec * 1e3:.1f} ms ({sp}), identical {same}; synced run "
              f"{t_synced * 1e3:.1f} ms")
        print(f"  {'phase':28s} | {'ms':>8s} | calls")
        for k, v in phases.items():
            print(f"  {k:28s} | {v['ms']:8.2f} | {v['calls']}")
        if args.adaptive:
            print("  policy:", json.dumps(row["policy"]))
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "dtype": args.dtype,
           "temperature": T,
           "prompts": len(prompts), "tokens": args.tokens, "adaptive": args.adaptive, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
