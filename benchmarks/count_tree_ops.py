"""Count the device operations of a draft proposal with the fused tree builder (ops/tree_build.py) and with the torch
builder, on the CPU: how many kernel launches the builder's bookkeeping costs a CUDA-graph step.

    python benchmarks/count_tree_ops.py [--out benchmarks/results/tree_build_ops.json]

For the shipped default bundle's EAGLE head and draft model (float32, batch 1, sync-free as in the graph step), one
`propose` per tree shape (chain-4, tree-4x5) runs under a TorchDispatchMode that counts the aten operations that
compute or copy data (views and metadata ops excluded: on CUDA each counted op is one kernel launch, or a memset /
copy), plus the builder kernels' launches (one each; the interpreter's own copies of their arguments are not counted). The builder kernels run through the Triton interpreter here
(TRITON_INTERPRET=1, DISPATCH_ON_CPU), so the counts are those of the CUDA path; the drafters' own layers run their
CPU forms, which differ from their CUDA kernels, but they are the same in both columns, so the difference is the
builder's. The trees of the two columns are checked equal (else no count is printed). Prints a table and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from gdnspec.ops import tree_build  # noqa: E402
from gdnspec.spec.tree import TreeConfig  # noqa: E402

SHAPES = {"chain-4": TreeConfig(builder="chain", num_steps=4),
          "tree-4x5": TreeConfig(topk=4, num_steps=5, num_draft_tokens=16)}
# aten ops that launch nothing on CUDA (views, metadata, allocation without a fill)
FREE = {"view", "_unsafe_view", "reshape", "expand", "slice", "select", "unsqueeze", "squeeze", "as_strided", "t",
        "transpose", "permute", "detach", "alias", "empty", "empty_strided", "new_empty", "lift_fresh", "unbind",
        "split", "split_with_sizes", "chunk", "_reshape_alias", "view_as", "expand_as", "narrow", "contiguous"}


class OpCounter(TorchDispatchMode):
    paused = False  # inside a builder kernel's call: the interpreter's own copies of its arguments are not counted

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in FREE and not OpCounter.paused:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count(drafter, state, roots, cfg, *, fused: bool):
    tree_build.DISPATCH_ON_CPU = fused
    launches = []
    names = ("frontier_step", "select_best", "chain_tree")
    saved = {n: getattr(tree_build, n) for n in names}
    def counted(fn, name):
        def call(*a, **k):  # one launch; what the interpreter does to run it is not a CUDA op
            launches.append(name)
            OpCounter.paused = True
            try:
                return fn(*a, **k)
            finally:
                OpCounter.paused = False
        return call

    for n in names:
        setattr(tree_build, n, counted(saved[n], n))
    try:
        with OpCounter() as c:
            tree = drafter.propose(state.clone(), roots, cfg, sync_free=True)
    finally:
        for n in names:
            setattr(tree_build, n, saved[n])
        tree_build.DISPATCH_ON_CPU = False
    return tree, sum(c.ops.values()), len(launches), c.ops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON file for the counts")
    args = ap.parse_args()
    from gdnspec.bundle import load

    torch.set_num_threads(1)
    b = load(device="cpu")
    target = b.model
    prompt = torch.randint(0, target.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    out = target(prompt)
    rows = []
    for name in ("eagle", "model"):
        if name not in b.drafters:
            continue
        drafter = b.drafters[name]
        if name == "eagle":
            state = drafter.begin([prompt[0]], target_hidden=[out.hidden_states[0]])
        else:
            state = drafter.begin([prompt[0]])
        roots = prompt[:, -1]
        for shape, cfg in SHAPES.items():
            count(drafter, state, roots, cfg, fused=False)  # warm-up: one-time work (weight packing, caches)
            t_tree, t_ops, _, t_by = count(drafter, state, roots, cfg, fused=False)
            f_tree, f_ops, f_launch, f_by = count(drafter, state, roots, cfg, fused=True)
            same = all(torch.equal(getattr(t_tree, k), getattr(f_tree, k)) for k in ("tokens", "parents", "scores",
                                                                                     "valid"))
            rows.append({"drafter": name, "shape": shape, "identical_trees": same,
                         "torch_builder_ops": t_ops if same else None,
                         "fused_builder_ops": (f_ops + f_launch) if same else None,
                         "fused_builder_kernels": f_launch,
                         "ops_removed": (t_ops - f_ops - f_launch) if same else None,
                         "torch_by_op": t_by, "fused_by_op": f_by})
    print(f"{'drafter':8} {'shape':9} {'identical':9} {'torch builder':>14} {'fused builder':>14} {'removed':>8}")
    for r in rows:
        print(f"{r['drafter']:8} {r['shape']:9} {str(r['identical_trees']):9} {str(r['torch_builder_ops']):>14} "
              f"{str(r['fused_builder_ops']):>14} {str(r['ops_removed']):>8}")
    doc = {"what": "device ops of one propose (sync-free, batch 1), counted on the CPU (module docstring)",
           "torch": torch.__version__, "rows": rows}
    print(json.dumps([{k: v for k, v in r.items() if not k.endswith("by_op")} for r in rows]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.out}")
    return 0 if all(r["identical_trees"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
