"""GPU check and cost of sampling inside the CUDA-graph steps (issue 10, item 2).

    python benchmarks/check_sampling_gpu.py [--out benchmarks/results/sampling_gpu.json]     # needs CUDA

On the bench_e2e 1.7B model (bf16) and an EAGLE head of its shapes (random weights):
- StaticDecoder(sampling=True) captured in a CUDA graph: the same seeds replayed from the same state give the same
  tokens; a temperature-0 row gives exactly the greedy argmax; step time against the greedy decoder (B = 1, 8), with
  and without top-k / top-p (filtered=True sorts the vocabulary per row).
- StaticSpecRunner(sampling=True) with the EAGLE drafter in the graph, deterministic and stochastic trees
  (TreeConfig.sample_drafts): repeatability and step time against the greedy runner.
- The sampling kernels (ops/uniforms.py, ops/tree_accept.py) against their torch forms on CUDA.
Prints one line per check (exit code 1 on a failure) and a table; writes JSON.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_draft import fill_lengths  # noqa: E402
from bench_e2e import build_model  # noqa: E402
from common import environment, print_table, time_cuda, write_json  # noqa: E402

from gdnspec.models.eagle import EagleHead, eagle_config_for  # noqa: E402
from gdnspec.runtime import StaticDecoder, StaticSpecRunner  # noqa: E402
from gdnspec.sampling import row_seeds  # noqa: E402
from gdnspec.spec import TreeConfig  # noqa: E402
from gdnspec.spec.drafters import EagleDrafter  # noqa: E402


def sampling_kernel_checks(dev: str) -> list:
    """The sampling kernels against their torch forms on `dev` (the switches at 0 give the torch forms): the
    counter-based uniforms bit for bit (ops/uniforms.py); tree rejection sampling of deterministic drafts and the
    inverse-CDF draw (ops/tree_accept.py) on 256 random trees of 16 nodes over 5000 tokens (equal unless a uniform
    falls within rounding of a boundary). Returns [(name, passed)]."""
    import os

    from gdnspec import sampling as S
    from gdnspec.ops import tree_accept, uniforms
    from gdnspec.spec import accept as A

    def both(fn):
        old = {k: os.environ.get(k) for k in ("GDNSPEC_FUSED_UNIFORMS", "GDNSPEC_TREE_ACCEPT")}
        try:
            out = []
            for v in ("0", "1"):
                os.environ["GDNSPEC_FUSED_UNIFORMS"] = os.environ["GDNSPEC_TREE_ACCEPT"] = v
                out.append(fn())
            return out
        finally:
            for k, v in old.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    g = torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**62, (64,), generator=g).to(dev)
    seeds[0] = 2**63 - 1
    counters = torch.randint(0, 2**40, (64,), generator=g).to(dev)
    same_u = all(torch.equal(*both(lambda: S.counter_uniforms(seeds, counters, slot=slot, n=n)))
                 for slot, n in [(0, 1), (1, 16), (2, 129), (2**15 - 1, 1000)])
    B, N, V = 256, 16, 5000
    parents = torch.full((B, N), -1, dtype=torch.long)
    for i in range(1, N):
        parents[:, i] = torch.randint(0, i, (B,), generator=g)
    valid = torch.rand(B, N, generator=g) < 0.9
    valid[:, 0] = True
    tokens = torch.randint(0, 8, (B, N), generator=g)
    probs = torch.softmax(3 * torch.randn(B, N, V, generator=g), -1)
    probs[:, :, :8] += 0.2  # the drafted tokens carry mass
    probs = probs / probs.sum(-1, keepdim=True)
    u = torch.rand(B, N, generator=g, dtype=torch.float64)
    t = [x.to(dev) for x in (tokens, parents, valid, probs, u)]
    kw = dict(tokens=t[0], parents=t[1], valid=t[2], probs=t[3], uniforms=t[4], max_depth=6, max_children=6)
    (ref, got) = both(lambda: A.tree_rejection_sample(**kw))
    (dref, dgot) = both(lambda: S.sample_from_probs(t[3][:, 0], t[4][:, 0]))
    return [("counter-based uniforms kernel == torch form (64 rows, 4 slot / n pairs)",
             uniforms.runs_on(seeds) and same_u),
            (f"tree rejection sampling kernel == torch form (256 trees, N=16, V=5000; {int((got[0] > 0).sum())} "
             "rows accepted drafts)", tree_accept.runs_on(t[3], N) and torch.equal(ref[0], got[0])
             and torch.equal(ref[1], got[1])),
            ("inverse-CDF draw kernel == sample_from_probs' torch form", torch.equal(dref, dgot))]


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/sampling_gpu.json")
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a smoke test of this script)")
    ap.add_argument("--size", default="1.5b", help="bench_e2e model size (tiny for the smoke test)")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("check_sampling_gpu needs CUDA (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    target = build_model(args.size, dev)
    head = EagleHead(eagle_config_for(target.config), dtype=torch.bfloat16, device=dev).eval()
    drafter = EagleDrafter(head, target)
    ok, rows = True, []

    def check(name, cond):
        nonlocal ok
        ok &= bool(cond)
        print(f"{name}: {'ok' if cond else 'FAILED'}")

    if dev == "cuda":
        for name, cond in sampling_kernel_checks(dev):
            check(name, cond)

    for B in (1, 8):
        ids = torch.randint(0, target.vocab_size, (B,), device=dev)
        greedy = StaticDecoder(target, batch_size=B, max_len=1024)
        fill_lengths(greedy.state, 512)
        g_ms = time_cuda(lambda: greedy.step(ids), warmup=5, iters=50)
        rows.append({"what": f"decode B={B}", "variant": "greedy", "ms": g_ms, "x_greedy": 1.0})
        for filtered in (False, True):
            dec = StaticDecoder(target, batch_size=B, max_len=1024, sampling=True, filtered=filtered)
            temps = [0.0] + [0.7] * (B - 1) if B > 1 else [0.7]
            kw = dict(top_k=[50] * B, top_p=[0.9] * B) if filtered else {}
            dec.set_sampling(temperature=temps, seeds=row_seeds(123, range(B)), **kw)
            snap = dec.state.clone()
            runs = []
            for _ in range(2):
                dec.state.copy_(snap)
                dec.set_sampling(temperature=temps, seeds=row_seeds(123, range(B)), counters=[0] * B, **kw)
                toks, t = [], ids.clone()
                for _ in range(8):
                    t = dec.sample_step(t).clone()
                    toks.append(t)
                runs.append(torch.stack(toks))
            check(f"decode B={B} filtered={filtered}: same seeds -> same tokens (graph replay)",
                  torch.equal(runs[0], runs[1]))
            if B > 1:
                logits, tok = dec._step(ids)
                check(f"decode B={B} filtered={filtered}: temperature-0 row == argmax",
                      int(tok[0]) == int(logits[0].float().argmax()))
            fill_lengths(dec.state, 512)
            ms = time_cuda(lambda: dec.sample_step(ids), warmup=5, iters=50)
            rows.append({"what": f"decode B={B}", "variant": "sampled" + (" top-k/top-p" if filtered else ""),
                         "ms": ms, "x_greedy": ms / g_ms})
            del dec
        del greedy
        torch.cuda.empty_cache()
    for name, cfg in (("chain-4", TreeConfig(builder="chain", num_steps=4)),
                      ("tree-4x5", TreeConfig(topk=4, num_steps=5, num_draft_tokens=16))):
        run = StaticSpecRunner(target, drafter, cfg, batch_size=1, max_len=1024)
        fill_lengths(run.target_state, 512)
        g_ms = time_cuda(lambda: run.step(), warmup=5, iters=30)
        rows.append({"what": f"EAGLE spec step {name}", "variant": "greedy", "ms": g_ms, "x_greedy": 1.0})
        del run
        for stochastic in (False, True):
            c = replace(cfg, sample_drafts=stochastic)
            run = StaticSpecRunner(target, drafter, c, batch_size=1, max_len=1024, sampling=True)
            run.set_sampling(temperature=[0.7], seeds=row_seeds(7, [0]))
            fill_lengths(run.target_state, 512)
            ms = time_cuda(lambda: run.step(), warmup=5, iters=30)
            rows.append({"what": f"EAGLE spec step {name}", "variant": "sampled" + (" stochastic tree" if stochastic else ""),
                         "ms": ms, "x_greedy": ms / g_ms})
            del run
        torch.cuda.empty_cache()
    print_table(rows, ["what", "variant", "ms", "x_greedy"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"env": environment(), "ok": ok, "rows": rows})
    print("all checks ok" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
