"""How well a drafter's path probabilities predict acceptance, depth by depth (the calibration spec/sizing.py needs).

    python benchmarks/draft_calibration.py [--drafters model,eagle] [--shape tree-4x5] [--prompts 3] [--tokens 128]
                                           [--threads 2] [--out F.json]

Greedy speculative decoding of the shipped bundle on the CPU with the full configured tree every step. Per depth d,
per step: predicted = the sum of exp(score) (the drafter's path probability) over the verified nodes at depth d, the
expected number of accepted nodes at that depth if the drafter's probabilities were the target's; accepted = the
steps whose accepted path reached depth d. kappa_d = accepted / predicted: 1 for a calibrated drafter, above 1 where
it is under-confident. TreeSizer uses one kappa for all depths, measured on the trees it cut (mostly shallow nodes):
where kappa_d grows with d, it undervalues deep nodes. Prints a table and JSON.
"""
from __future__ import annotations

import argparse
import collections
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_json  # noqa: E402  (benchmarks/common.py)


def main(argv=None) -> int:
    from gdnspec.bundle import load
    from gdnspec.evaluate import SHAPES, heldout_prompts
    from gdnspec.spec import SpeculativeEngine
    from gdnspec.spec.sizing import TreeSizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafters", default="model,eagle")
    ap.add_argument("--shape", default="tree-4x5", choices=sorted(SHAPES))
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load()
    prompts = heldout_prompts(bundle.tokenizer, num_prompts=args.prompts, prompt_tokens=128)
    out = {"shape": args.shape, "prompts": args.prompts, "tokens": args.tokens, "drafters": {}}

    class Observer(TreeSizer):
        """Keeps the configured shape every step and records the verified trees."""

        def __init__(self):
            super().__init__()
            self.pred, self.acc, self.n = collections.Counter(), collections.Counter(), 0

        def step_config(self, config, *, batch_size):
            return config

        def choose_nodes(self, scores, valid, *, draft_seconds):
            return len(scores[0])

        def record(self, *, tree, accepted, **kw):
            depth = tree.layout().depth.tolist()
            for row, sc, ok, a in zip(depth, tree.scores.tolist(), tree.valid.tolist(), accepted):
                for d, s, v in zip(row[1:], sc[1:], ok[1:]):
                    if v:
                        self.pred[d] += math.exp(s)
                for d in range(1, a + 1):
                    self.acc[d] += 1
                self.n += 1

    print(f"{'drafter':7s} {'depth':>5s} {'predicted':>9s} {'accepted':>8s} {'kappa_d':>7s}")
    for name in args.drafters.split(","):
        eng = SpeculativeEngine(bundle.model, bundle.drafters[name], SHAPES[args.shape], static=False,
                                size_trees=True)
        obs = eng.sizer = Observer()
        with torch.inference_mode():
            for p in prompts:
                eng.generate(p[None], args.tokens)
        rows = {}
        for d in sorted(obs.pred):
            pred, acc = obs.pred[d] / obs.n, obs.acc[d] / obs.n
            rows[d] = {"predicted": pred, "accepted": acc, "kappa": acc / pred if pred > 0 else None}
            print(f"{name:7s} {d:5d} {pred:9.3f} {acc:8.3f} {rows[d]['kappa']:7.2f}")
        total_p, total_a = sum(obs.pred.values()), sum(obs.acc.values())
        out["drafters"][name] = {"steps": obs.n, "by_depth": rows, "kappa_all": total_a / max(total_p, 1e-12)}
    emit_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
