"""Profile one decode step, one verify step and one prefill of the bench_e2e model: kernels by name, count and time.

    python benchmarks/profile_step.py [--size 1.5b] [--out DIR] [--batches 1,32] [--nodes 16] [--rows 25] [--graph]
                                      [--mamba-ssm-cache-dtype float32|bfloat16|float16]
                                      # needs CUDA; prints tables, writes them to DIR/profile_<part>_b<B>[_n<N>].txt

The torch profiler (CPU + CUDA) around an eager call, after warm-up; the tables are what the speed work reads to see
where a step's kernels and host time go.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import FixedTreeDrafter, _cfg_for, build_model, comma_list  # noqa: E402

from gdnspec.models.lm import GDNForCausalLM  # noqa: E402
from gdnspec.runtime import StaticDecoder, StaticSpecRunner  # noqa: E402
from gdnspec.spec.tree import DraftTree  # noqa: E402


def prof(fn, label: str, out: Path, rows: int = 25) -> None:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    ka = p.key_averages()
    n = sum(1 for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    table = ka.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    cpu = ka.table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60)
    text = f"## {label}: {n} CUDA events\n{table}\n### by host time\n{cpu}\n"
    print(text)
    (out / f"profile_{label}.txt").write_text(text)


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1.5b")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--parts", default="decode,verify,prefill")
    ap.add_argument("--batches", default=[1], type=comma_list(int, low=1, high=64))
    ap.add_argument("--nodes", default=[16], type=comma_list(int, low=1, high=64))
    ap.add_argument("--rows", default=25, type=int, help="kernel table rows (by total CUDA time)")
    ap.add_argument("--graph", action="store_true", help="profile CUDA-graph replays (kernel times inside the graph, "
                    "as the step runs) instead of eager calls")
    ap.add_argument("--mamba-ssm-cache-dtype", default="float32", choices=GDNForCausalLM.MAMBA_SSM_CACHE_DTYPES,
                    help="storage dtype of the GDN recurrent states (GDNForCausalLM.mamba_ssm_cache_dtype)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"decode", "verify", "prefill"}:
        ap.error(f"--parts takes a comma list of decode, verify, prefill; got {args.parts!r}")
    if not torch.cuda.is_available():
        print("profile_step needs a CUDA GPU (it profiles CUDA kernels)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.size, "cuda")
    model.mamba_ssm_cache_dtype = args.mamba_ssm_cache_dtype
    tag = "" if args.mamba_ssm_cache_dtype == "float32" else f"_ssm_{args.mamba_ssm_cache_dtype}"
    for B in args.batches if "decode" in parts else ():
        dec = StaticDecoder(model, batch_size=B, max_len=1024, use_graph=args.graph)
        ids = torch.randint(0, model.vocab_size, (B,), device="cuda")
        prof(lambda: dec.step(ids), f"decode_b{B}" + ("_graph" if args.graph else "") + tag, out, rows=args.rows)
        del dec
    for B, N in [(b, n) for b in args.batches for n in args.nodes] if "verify" in parts else ():
        run = StaticSpecRunner(model, FixedTreeDrafter(N), _cfg_for(N), batch_size=B, max_len=1024,
                               use_graph=args.graph)
        parents = torch.tensor([-1] + [max(0, i - 1 - (i % 3)) for i in range(1, N)], device="cuda")
        tree = DraftTree(torch.randint(0, model.vocab_size, (B, N), device="cuda"), parents.expand(B, N).contiguous(),
                         torch.zeros(B, N, device="cuda"), torch.ones(B, N, dtype=torch.bool, device="cuda"))
        prof(lambda: run.step(tree), f"verify_b{B}_n{N}" + ("_graph" if args.graph else "") + tag, out, rows=args.rows)
        del run
    if "prefill" in parts:
        for T in (16, 128):
            ids = torch.randint(0, model.vocab_size, (1, T), device="cuda")
            prof(lambda: model(ids, logits_to_keep=1), f"prefill_t{T}", out, rows=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
