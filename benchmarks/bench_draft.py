"""What drafting costs on the GPU: one EAGLE expansion and whole speculative steps, against a target decode step.

    python benchmarks/bench_draft.py [--size 1.5b] [--out benchmarks/results/draft.json]     # needs CUDA

Target: the bench_e2e model (bf16, 512 cached positions). Head: an EagleHead with the target's hidden size and GDN
head shapes (eagle_config_for; random weights: costs do not depend on them). Every number is a CUDA-graph replay
(median of CUDA-event timings); kernels are counted with the torch profiler on the eager call. Each row is measured
twice: with the fused steps (`model.fused_steps = True`, the default) and module by module (False), in one run.

Rows:
- expansion F=1 / F=4: one drafting step for F frontier nodes (head step + lm_head + log_softmax + top-k), the unit
  a chain (F = 1) or a tree level (F = topk) pays per depth.
- spec step chain-4 / tree-4x5: the whole StaticSpecRunner step with the EAGLE drafter inside the graph (propose +
  verify + accept + commit + head catch-up).
- with --bundle, the same for the shipped default bundle (float32, EAGLE head and draft model), with the CUDA kernels
  of each stage of a speculative step (propose, verify, accept, commit, advance; eager calls, torch profiler).
Ratios are against the target's decode step (B = 1) measured in the same run. The issue-10 target for the 1.7B
config: one expansion <= 15% of a decode step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import build_model, count_kernels  # noqa: E402
from common import environment, print_table, time_cuda, write_json  # noqa: E402

from gdnspec.models.eagle import EagleHead, eagle_config_for  # noqa: E402
from gdnspec.runtime import StaticDecoder, StaticSpecRunner  # noqa: E402
from gdnspec.runtime.static import _capture  # noqa: E402
from gdnspec.spec import TreeConfig  # noqa: E402
from gdnspec.spec.drafters import EagleDrafter  # noqa: E402

SHAPES = {"chain-4": TreeConfig(builder="chain", num_steps=4),
          "tree-4x5": TreeConfig(topk=4, num_steps=5, num_draft_tokens=16)}


def stage_kernels(run, *, names: bool = False) -> dict:
    """CUDA kernels of each stage of one eager StaticSpecRunner step (propose, verify, accept, commit, advance), each
    stage called on its own (torch profiler): counts, or with names=True the kernel names in launch order."""
    from gdnspec.layers.layout import TokenLayout
    from gdnspec.spec.accept import accept_greedy

    tgt, dr, cfg = run.target, run.drafter, run.config
    tree = dr.propose(run.draft_state, run.verified, cfg, sync_free=True)
    layout = TokenLayout.from_parents(tree.parents, validate=False)
    ver = tgt.forward_tree(tree.tokens, state=run.target_state, layout=layout, validate=False)
    acc = accept_greedy(tree, ver.logits, layout, width=run.path_width)
    path_tokens = tree.tokens.gather(1, acc.path)
    H = ver.hidden_states.shape[-1]
    hidden = ver.hidden_states.gather(1, acc.path[..., None].expand(*acc.path.shape, H))
    hidden = hidden if getattr(dr, "needs_target_hidden", False) else None
    count = kernel_names if names else count_kernels
    return {
        "propose": count(lambda: dr.propose(run.draft_state, run.verified, cfg, sync_free=True)),
        "verify": count(lambda: tgt.forward_tree(tree.tokens, state=run.target_state, layout=layout,
                                                         validate=False)),
        "accept": count(lambda: accept_greedy(tree, ver.logits, layout, width=run.path_width)),
        "commit": count(lambda: tgt.commit_tree(run.target_state, ver, path=acc.path, counts=acc.counts,
                                                        reserve=False, all_rows_accept=True)),
        "advance": count(lambda: dr.advance(run.draft_state, tokens=path_tokens, counts=acc.counts,
                                                    target_hidden=hidden, sync_free=True)),
    }


def kernel_names(fn) -> list[str]:
    """Names of the CUDA kernels (and device memcpy/memset) one call of fn launches, in launch order."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda e: e.time_range.start)
    return [e.name for e in ev]


def graph_timeline(graph) -> list[tuple[str, float, float]]:
    """One profiled replay of a CUDA graph: (kernel name, duration us, idle gap before it us) in launch order; the
    gaps are the device's launch latency between dependent kernels, the part of a small step that is not work."""
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda e: e.time_range.start)
    out, end = [], None
    for e in ev:
        gap = 0.0 if end is None else e.time_range.start - end
        out.append((e.name, e.time_range.end - e.time_range.start, gap))
        end = e.time_range.end
    return out


def timeline_text(label: str, tl: list[tuple[str, float, float]]) -> str:
    busy, idle = sum(d for _, d, _ in tl), sum(g for _, _, g in tl)
    lines = [f"## {label}: {len(tl)} kernels, busy {busy:.1f} us, gaps {idle:.1f} us"]
    lines += [f"{d:7.2f} {g:6.2f}  {n[:110]}" for n, d, g in tl]
    return "\n".join(lines) + "\n"


def names_text(label: str, stages: dict) -> str:
    lines = [f"## {label}"]
    for st, names in stages.items():
        lines.append(f"### {st}: {len(names)}")
        lines += [f"  {n[:120]}" for n in names]
    return "\n".join(lines) + "\n"


def bundle_rows(device: str = "cuda", *, detail_dir: Path | None = None) -> list[dict]:
    """The shipped default bundle (float32) on CUDA: decode step, spec steps with the EAGLE head and the draft model,
    and the kernels of each stage."""
    from gdnspec.bundle import load

    b = load(device=device)
    target, rows = b.model, []
    dec = StaticDecoder(target, batch_size=1, max_len=1024)
    ids = torch.randint(0, target.vocab_size, (1,), device=device)
    fill_lengths(dec.state, 128)
    dec_ms = time_cuda(lambda: dec.step(ids), warmup=5, iters=50)
    rows.append({"variant": "bundle fp32", "what": "target decode step", "ms": dec_ms, "x_decode": 1.0,
                 "kernels": count_kernels(lambda: dec._run())})
    if detail_dir is not None and dec.graph is not None:
        (detail_dir / "kernels_bundle_decode.txt").write_text(timeline_text("decode: graph replay",
                                                                            graph_timeline(dec.graph)))
    for name in ("eagle", "model"):
        if name not in b.drafters:
            continue
        for shape, cfg in SHAPES.items():
            run = StaticSpecRunner(target, b.drafters[name], cfg, batch_size=1, max_len=1024)
            fill_lengths(run.target_state, 128)
            ms = time_cuda(lambda: run.step(), warmup=5, iters=30)
            stages = stage_kernels(run)
            if detail_dir is not None:  # kernel names per stage, and the graph replay's kernel timeline
                text = names_text(f"{name} {shape}: eager stages", stage_kernels(run, names=True))
                if run.graph is not None:
                    text += timeline_text(f"{name} {shape}: graph replay", graph_timeline(run.graph))
                (detail_dir / f"kernels_bundle_{name}_{shape}.txt").write_text(text)
            rows.append({"variant": "bundle fp32", "what": f"{name} spec step {shape}", "ms": ms, "x_decode": ms / dec_ms,
                         "kernels": count_kernels(lambda: run._run()),
                         "stages": " ".join(f"{k}={v}" for k, v in stages.items())})
            del run
    return rows


def fill_lengths(state, n: int) -> None:
    for layer in state.layers:
        if hasattr(layer, "lengths"):
            layer.lengths.fill_(n)


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1.5b")
    ap.add_argument("--out", default="benchmarks/results/draft.json")
    ap.add_argument("--bundle", action="store_true", help="also the shipped default bundle (float32): decode, EAGLE "
                    "and draft-model spec steps with the kernels of each stage")
    ap.add_argument("--skip-1.7b", dest="skip_big", action="store_true", help="only the --bundle rows")
    ap.add_argument("--kernel-names", metavar="DIR", default=None, help="with --bundle: write each spec step's kernel "
                    "names per stage and its graph replay's kernel timeline (duration, gap) to DIR/kernels_bundle_*.txt")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_draft needs CUDA", file=sys.stderr)
        return 2
    target = build_model(args.size, "cuda")
    torch.manual_seed(1)
    head = EagleHead(eagle_config_for(target.config), dtype=torch.bfloat16, device="cuda").eval()
    drafter = EagleDrafter(head, target)
    env = environment()
    print(f"# {env['gpu']} | torch {env['torch']} | triton {env['triton']} | target "
          f"{sum(p.numel() for p in target.parameters()) / 1e9:.2f}B | head {sum(p.numel() for p in head.parameters()) / 1e6:.0f}M "
          "(+ the target's embedding and lm_head)")
    rows = []
    for fused in (() if args.skip_big else (True, False)):
        target.fused_steps = fused
        variant = "fused" if fused else "unfused"
        dec = StaticDecoder(target, batch_size=1, max_len=1024)
        dec.state.reserve_kv(1024)
        fill_lengths(dec.state, 512)
        ids = torch.randint(0, target.vocab_size, (1,), device="cuda")
        dec_ms = time_cuda(lambda: dec.step(ids), warmup=5, iters=50)
        fill_lengths(dec.state, 512)
        rows.append({"variant": variant, "what": "target decode step", "ms": dec_ms, "x_decode": 1.0,
                     "kernels": count_kernels(lambda: dec._run())})
        del dec
        for F in (1, 4):
            state = head.new_state(F)
            feat = torch.randn(F, 1, head.hidden_size, dtype=head.dtype, device="cuda")
            tok = torch.randint(0, target.vocab_size, (F, 1), device="cuda")

            def expand():
                out, logits = head.decode_step(feat, target.embed_tokens(tok), state, target=target)
                return torch.log_softmax(logits.float(), dim=-1).topk(4, dim=-1)

            graph, _ = _capture(expand, True, [state])  # the runtime's capture: warm-up, restore, capture
            ms = time_cuda(graph.replay, warmup=5, iters=50)
            rows.append({"variant": variant, "what": f"EAGLE expansion F={F}", "ms": ms, "x_decode": ms / dec_ms,
                         "kernels": count_kernels(expand)})
        for name, cfg in SHAPES.items():
            run = StaticSpecRunner(target, drafter, cfg, batch_size=1, max_len=1024)
            fill_lengths(run.target_state, 512)
            ms = time_cuda(lambda: run.step(), warmup=5, iters=30)
            fill_lengths(run.target_state, 512)
            rows.append({"variant": variant, "what": f"EAGLE spec step {name}", "ms": ms, "x_decode": ms / dec_ms,
                         "kernels": count_kernels(lambda: run._run()),
                         "stages": " ".join(f"{k}={v}" for k, v in stage_kernels(run).items())})
            del run
        torch.cuda.empty_cache()
    target.fused_steps = True
    if args.bundle:
        detail = None if args.kernel_names is None else Path(args.kernel_names)
        if detail is not None:
            detail.mkdir(parents=True, exist_ok=True)
        rows += bundle_rows(detail_dir=detail)
    print_table(rows, ["variant", "what", "ms", "x_decode", "kernels", "stages"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"env": env, "size": args.size, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
