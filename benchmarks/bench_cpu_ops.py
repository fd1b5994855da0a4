"""Top-level torch ops per step on the CPU for the default bundle, module path (before) vs CPU fast path (after).

    python benchmarks/bench_cpu_ops.py [--threads 2] [--repeats 200] [--out FILE.json] [--no-time] [--compile]

Steps (batch 1, after a 128-token prompt): the target's decode step, tree verifies of N = 5 and 16 nodes (a random
tree; the verify only reads the state), one EAGLE expansion (`EagleHead.decode_step`, as `propose` runs per tree
level; and a whole `propose` of a 1-step chain, tree building included), one draft-model expansion (a decode step of the draft model), and the catch-ups after a verify that accepted
3 tokens (EAGLE head: `catch_up` over 3 pairs; draft model: `advance_rows`, a 3-token chain verify + commit), and the
target's commit of a 3-node path. "ops" counts the aten ops the profiler records at top level (events whose parent
is not an aten op): deterministic, the per-op dispatch cost that dominates small CPU steps. "ms" is the median wall
time of `--repeats` calls (meaningful on an idle machine only). The "module" column sets model.fused_steps = False
(the module-by-module reference), "fast" the default (gdnspec/models/cpu_fast.py); --compile adds a "compiled" column:
the fast path with GDNSPEC_CPU_COMPILE=1 (models/cpu_compiled.py: the draft model's steps, the EAGLE expansion and
catch-up; the warm-up calls compile, not timed). Prints a table and JSON.
"""
from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.profiler import ProfilerActivity, profile

from common import time_host  # benchmarks/common.py (the script's folder is on sys.path)


def count_ops(fn) -> tuple[int, dict]:
    """Top-level aten ops of one call of fn (after two warm-up calls)."""
    fn()
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    c = collections.Counter()
    for e in p.events():
        if not e.name.startswith("aten::"):
            continue
        par = e.cpu_parent
        if par is not None and par.name.startswith("aten::"):
            continue
        c[e.name] += 1
    return sum(c.values()), dict(c.most_common())


def build_steps(bundle, prompt_len: int = 128):
    """name -> zero-argument callable running one step on copies of prepared states."""
    from gdnspec.layers.layout import TokenLayout
    from gdnspec.spec.drafters.model import advance_rows

    model = bundle.model
    eagle = bundle.drafters["eagle"]
    draft = bundle.drafters["model"].model
    g = torch.Generator().manual_seed(0)
    V = model.vocab_size
    prompt = torch.randint(0, V, (1, prompt_len), generator=g)
    out = model(prompt)
    tstate = out.state
    dstate = draft(prompt).state
    head = eagle.head
    hstate = head.new_state(1)
    head(out.hidden_states[:, :-1], model.embed_tokens(prompt[:, 1:]), hstate)
    one = torch.randint(0, V, (1, 1), generator=g)
    feat = out.hidden_states[:, -1:]
    emb = model.embed_tokens(one)
    steps = {}

    def decode():
        s = tstate.clone()
        return lambda: model(one, s)

    steps["decode"] = decode
    for N in (5, 16):
        parents = torch.tensor([[-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, N)]])
        lay = TokenLayout.from_parents(parents)
        ids = torch.randint(0, V, (1, N), generator=g)
        steps[f"verify_N{N}"] = (lambda ids=ids, lay=lay: (lambda: model.forward_tree(ids, state=tstate, layout=lay)))

    def eagle_expand():
        s = hstate.clone()
        return lambda: head.decode_step(feat, emb, s, target=model)

    steps["eagle_expansion"] = eagle_expand
    from gdnspec.spec.drafters.eagle import EagleDraftState
    from gdnspec.spec.tree import TreeConfig

    dstate_e = EagleDraftState(hstate, feat[:, 0].clone())
    root = one[:, 0]
    chain1 = TreeConfig(builder="chain", num_steps=1)
    steps["eagle_propose_chain1"] = lambda: (lambda: eagle.propose(dstate_e, root, chain1))

    def draft_expand():
        s = dstate.clone()
        return lambda: draft(one, s, logits_to_keep=1)

    steps["draft_expansion"] = draft_expand
    L = 3
    toks = torch.randint(0, V, (1, L), generator=g)
    counts = torch.tensor([L])
    hid = out.hidden_states[:, -L:]

    def eagle_catch_up():
        s = hstate.clone()
        return lambda: head.catch_up(hid, model.embed_tokens(toks), s, counts=counts, target=model)

    steps["eagle_catch_up_3"] = eagle_catch_up

    def draft_catch_up():
        s = dstate.clone()
        return lambda: advance_rows(draft, s, toks, counts)

    steps["draft_catch_up_3"] = draft_catch_up
    lay3 = TokenLayout.chain(1, L)
    ver = model.forward_tree(toks, state=tstate, layout=lay3)
    path = torch.arange(L)[None]

    def commit():
        s = tstate.clone()
        return lambda: model.commit_tree(s, ver, path=path, counts=counts, all_rows_accept=True)

    steps["target_commit_3"] = commit
    return steps, [model, draft]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--no-time", action="store_true", help="op counts only")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    ap.add_argument("--compile", action="store_true", help="add the fast path with GDNSPEC_CPU_COMPILE=1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import gdnspec

    bundle = gdnspec.load()  # outside inference mode, as the CLI: weights with version counters (cached derived tensors)
    with torch.inference_mode():
        return _run(bundle, args)


def _run(bundle, args) -> int:
    import os

    steps, models = build_steps(bundle)
    results = {}
    for mode in ("module", "fast") + (("compiled",) if args.compile else ()):
        for m in models:
            m.fused_steps = mode != "module"
        os.environ["GDNSPEC_CPU_COMPILE"] = "1" if mode == "compiled" else "0"
        for name, make in steps.items():
            n, by_op = count_ops(make())
            row = results.setdefault(name, {})
            row[mode] = {"ops": n, "by_op": by_op}
            if not args.no_time:
                row[mode]["ms"] = time_host(make(), warmup=max(3, args.repeats // 10), iters=args.repeats)
    for m in models:
        m.fused_steps = True
    dec = results["decode"]
    comp = "compiled" in dec
    print(f"{'step':20s} {'ops module':>10s} {'ops fast':>9s} {'ms module':>10s} {'ms fast':>8s} {'fast / decode':>14s}"
          + (f" {'ops compiled':>12s} {'ms compiled':>11s} {'/ decode':>9s}" if comp else ""))
    for name, row in results.items():
        a, b = row["module"], row["fast"]
        rel = f"{b['ms'] / dec['fast']['ms']:.2f}x" if "ms" in b else f"{b['ops'] / dec['fast']['ops']:.2f}x ops"
        line = (f"{name:20s} {a['ops']:10d} {b['ops']:9d} {a.get('ms', float('nan')):10.3f} "
                f"{b.get('ms', float('nan')):8.3f} {rel:>14s}")
        if comp:  # against the eager decode step (the default target is not compiled)
            c = row["compiled"]
            line += f" {c['ops']:12d}" + (f" {c['ms']:11.3f} {c['ms'] / dec['fast']['ms']:8.2f}x" if "ms" in c else "")
        print(line)
    summary = {name: {mode: {k: v for k, v in row[mode].items() if k != "by_op"} for mode in row}
               for name, row in results.items()}
    print(json.dumps({"threads": args.threads, "steps": summary}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "steps": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
