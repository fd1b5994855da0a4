"""End-to-end GPU benchmark of a Qwen3-Next-style dense model (random weights, bf16, 3:1 GDN:attention).

    python benchmarks/bench_e2e.py --out benchmarks/results/e2e_h100.json [--size 1.5b] [--plot]

Measures, with CUDA graphs for both the baseline and speculative decoding:
  1. plain decode step (graph-captured, batch 1 / 8 / 32): tokens/s and achieved GB/s (weight + state bytes read per
     step / step time) against the measured copy bandwidth;
  2. verify step (propose on the host, graph-captured verify + accept + commit) for N in {4, 8, 16, 32, 64}, relative
     to one plain decode step at the same batch;
  3. speedup at controlled acceptance: an oracle drafter proposes the target's own greedy continuation as a chain,
     corrupted at a chosen rate; wall-clock of SpeculativeEngine.generate vs generate_autoregressive (both static /
     graph-replayed) on the same prompts. A speed is printed only when the outputs are identical.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth_gbs, environment, greedy_consistent, print_table, time_cuda, write_json  # noqa: E402

from gdnspec import GDNConfig, GDNForCausalLM, generate_autoregressive  # noqa: E402
from gdnspec.generate import PREFILL_GRAPH_MAX_LEN, graph_prefill  # noqa: E402
from gdnspec.runtime import StaticDecoder, StaticSpecRunner  # noqa: E402
from gdnspec.spec import SpeculativeEngine, TreeConfig  # noqa: E402
from gdnspec.spec.drafters import OracleDrafter  # noqa: E402

SIZES = {
    # hidden, layers, GDN value heads (k heads = half), MLP width: ~1.5B parameters with vocab 32k
    "1.5b": dict(hidden_size=2048, num_hidden_layers=24, linear_num_value_heads=32, linear_num_key_heads=16,
                 intermediate_size=5632, num_attention_heads=16, num_key_value_heads=2, head_dim=256),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, linear_num_value_heads=4, linear_num_key_heads=2,
                 intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}


def build_model(size: str, device: str) -> GDNForCausalLM:
    cfg = GDNConfig(vocab_size=32000, full_attention_interval=4, linear_key_head_dim=128, linear_value_head_dim=128,
                    partial_rotary_factor=0.25, **SIZES[size])
    torch.manual_seed(0)
    model = GDNForCausalLM(cfg, dtype=torch.bfloat16, device=device).eval()
    with torch.no_grad():
        # Random weights give near-uniform logits whose greedy choice flips under bf16 rounding (the verify pass and
        # the decode step round differently), so plain and speculative outputs would part ways on near-ties. We give
        # the random model a wide-margin greedy walk instead: unit-variance embeddings and lm_head rows that point the
        # embedding of token t at token perm[t]. Shapes and therefore costs are those of the real model.
        emb = torch.randn(cfg.vocab_size, cfg.hidden_size, device=device)
        perm = torch.randperm(cfg.vocab_size, device=device)
        model.embed_tokens.weight.copy_(emb)
        model.lm_head.weight.copy_(emb[torch.argsort(perm)])
    return model


class FixedTreeDrafter:
    """A host drafter returning the same random tree every step (verify cost measurement only)."""

    needs_target_hidden = False
    vocab_size = None

    def __init__(self, n):
        self.n = n


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_median(fn, repeats: int = 3):
    """(last result, median wall seconds over `repeats` runs)."""
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return out, sorted(times)[len(times) // 2]


def count_kernels(fn) -> int:
    """CUDA kernels (and device memcpy/memset) launched by one call of fn, counted with the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def state_bytes(state) -> int:
    total = 0
    for layer in state.layers:
        for t in vars(layer).values():
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def comma_list(kind, *, low: float, high: float | None = None):
    """argparse type: a comma list of `kind` values in [low, high] (one clear usage error naming the flag otherwise)."""
    def parse(text: str):
        try:
            vals = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of {kind.__name__} values, got {text!r}") from None
        if not vals or any(v < low or (high is not None and v > high) for v in vals):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"every value must be {bound}, got {text!r}")
        return vals
    return parse


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1.5b", choices=sorted(SIZES))
    ap.add_argument("--out", default="benchmarks/results/e2e.json")
    ap.add_argument("--batches", default=[1, 8, 32], type=comma_list(int, low=1))
    ap.add_argument("--nodes", default=[4, 8, 16, 32, 64], type=comma_list(int, low=1, high=64))
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test of this script)")
    ap.add_argument("--parts", default="decode,unfused,prefill,verify,speedup", help="which parts to run (comma list)")
    ap.add_argument("--prefill", default=[16, 128, 512, 4096, 32768], type=comma_list(int, low=1),
                    help="prefill lengths (batch 1)")
    ap.add_argument("--chains", default=[1, 2, 3, 5], type=comma_list(int, low=1),
                    help="oracle chain lengths (accept length = chain + 1 without errors)")
    ap.add_argument("--errors", default=[0.0], type=comma_list(float, low=0.0, high=1.0), help="oracle error rates")
    ap.add_argument("--ab-env", default=None, metavar="NAME=VALUE",
                    help="also time every verify row with this environment setting (e.g. GDNSPEC_TREE_INDEX=0), "
                         "alternating --ab-reps times with the default in this process (medians)")
    ap.add_argument("--mamba-ssm-cache-dtype", default="float32", choices=GDNForCausalLM.MAMBA_SSM_CACHE_DTYPES,
                    help="storage dtype of the GDN recurrent states (GDNForCausalLM.mamba_ssm_cache_dtype)")
    ap.add_argument("--ab-reps", type=int, default=3, help="alternations of --ab-env (medians over them)")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"], help="GDN kernels (model.gdn_backend)")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench_e2e needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    model = build_model(args.size, dev)
    model.gdn_backend = args.backend
    model.mamba_ssm_cache_dtype = args.mamba_ssm_cache_dtype
    n_params = sum(p.numel() for p in model.parameters())
    wbytes = weight_bytes(model)
    bw = copy_bandwidth_gbs() if dev == "cuda" else float("nan")
    env = environment()
    print(f"# {env['gpu']} | torch {env['torch']} | triton {env['triton']} | params {n_params / 1e9:.2f}B | copy bw {bw:.0f} GB/s"
          f" | GDN state {args.mamba_ssm_cache_dtype}")
    batches, nodes = args.batches, args.nodes
    max_len = 1024
    parts = set(args.parts.split(","))
    from gdnspec.runtime.static import compile_enabled

    results = {"env": env, "backend": args.backend, "mamba_ssm_cache_dtype": args.mamba_ssm_cache_dtype, "compiled": compile_enabled(), "size": args.size, "params": n_params, "weight_bytes": wbytes, "copy_bandwidth_gbs": bw, "decode": [], "verify": [],
               "speedup": [], "prefill": []}

    # 1. plain decode step: fused (default) and module-by-module, graph-replayed; kernels counted on the eager step
    decode_ms = {}
    variants = ["fused", "unfused"] if "unfused" in parts else ["fused"]
    for B in batches:
        for variant in variants:
            model.fused_steps = variant == "fused"
            dec = StaticDecoder(model, batch_size=B, max_len=max_len)
            ids = torch.randint(0, model.vocab_size, (B,), device=dev)
            dec.state.reserve_kv(max_len)

            def fill():
                for layer in dec.state.layers:  # a realistic context: 512 cached positions per row
                    if hasattr(layer, "lengths"):
                        layer.lengths.fill_(512)

            fill()
            ms = time_cuda(lambda: dec.step(ids), warmup=5, iters=50)
            fill()
            kernels = count_kernels(lambda: dec._run()) if dev == "cuda" else None
            fill()
            if variant == "fused":
                decode_ms[B] = ms
            sbytes = state_bytes(dec.state)
            floor_ms = (wbytes + sbytes) / (bw * 1e9) * 1e3
            row = {"batch": B, "variant": variant, "step_ms": ms, "floor_ms": floor_ms, "tokens_per_s": B / ms * 1e3,
                   "kernels": kernels, "weights+state_GBps": (wbytes + sbytes) / (ms * 1e-3) / 1e9,
                   "frac_of_copy_bw": floor_ms / ms}
            results["decode"].append(row)
            del dec
            torch.cuda.empty_cache()
    model.fused_steps = True
    b1 = decode_ms.get(1)
    for row in results["decode"]:
        row["x_B1_step"] = row["step_ms"] / b1 if b1 and row["variant"] == "fused" else None
    print("\n## plain decode step (CUDA graph replay; kernels = CUDA kernels of one eager step, torch profiler)")
    print_table(results["decode"], ["batch", "variant", "step_ms", "floor_ms", "frac_of_copy_bw", "kernels", "tokens_per_s",
                                    "x_B1_step"])

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, results)  # partial results survive a later failure or timeout
    # 1b. prefill (batch 1): chunked kernels for every T >= 2 on CUDA, long prompts in chunks
    for T in (args.prefill if "prefill" in parts else []):
        ids = torch.randint(0, model.vocab_size, (1, T), device=dev)
        ms = time_cuda(lambda: model(ids, logits_to_keep=1), warmup=2, iters=5 if T < 8192 else 2)
        row = {"T": T, "prefill_ms": ms, "tokens_per_s": T / ms * 1e3, "graph_ms": None}
        if dev == "cuda" and T <= PREFILL_GRAPH_MAX_LEN:  # what generate / the engine run: the graph-captured prefill
            ref = model(ids, logits_to_keep=1).logits[:, -1].float()
            got = graph_prefill(model, ids)[1].float()
            row["graph_rel_err"] = float((got - ref).norm() / ref.norm())
            row["graph_ms"] = time_cuda(lambda: graph_prefill(model, ids), warmup=2, iters=10)
        results["prefill"].append(row)
        torch.cuda.empty_cache()
    if results["prefill"]:
        print("\n## prefill, batch 1 (logits of the last position)")
        print_table(results["prefill"], ["T", "prefill_ms", "graph_ms", "graph_rel_err", "tokens_per_s"])

    write_json(args.out, results)
    # 2. verify step vs N (with --ab-env NAME=VALUE also under that setting, alternating, in this process)
    g = torch.Generator().manual_seed(0)
    settings = [None] + ([tuple(args.ab_env.split("=", 1))] if args.ab_env else [])
    for B in batches if "verify" in parts else []:
        for N in nodes:
            parents = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, N)])
            from gdnspec.spec.tree import DraftTree
            tree = DraftTree(torch.randint(0, model.vocab_size, (B, N), device=dev), parents.expand(B, N).to(dev).clone(),
                             torch.zeros(B, N, device=dev), torch.ones(B, N, dtype=torch.bool, device=dev))
            times = {s: [] for s in settings}
            kernels = {}
            for rep in range(args.ab_reps if len(settings) > 1 else 1):
                for setting in settings:
                    with _env(setting):
                        run = StaticSpecRunner(model, FixedTreeDrafter(N), _cfg_for(N), batch_size=B, max_len=max_len)
                        run.set_tree(tree)
                        lengths = [l for l in run.target_state.layers if hasattr(l, "lengths")]
                        for l in lengths:  # 512 cached positions; each timed step commits ~1 more (random tokens)
                            l.lengths.fill_(512)

                        def one():
                            run.graph.replay() if run.graph is not None else run._run()

                        times[setting].append(time_cuda(one, warmup=3, iters=40))
                        if rep == 0 and dev == "cuda":  # the eager step (it advances the state: timed before)
                            kernels[setting] = count_kernels(run._run)
                    del run
                    torch.cuda.empty_cache()
            for setting in settings:
                ms = sorted(times[setting])[len(times[setting]) // 2]
                results["verify"].append({"batch": B, "N": N, "setting": "default" if setting is None else "=".join(setting),
                                          "verify_ms": ms, "x_decode_step": ms / decode_ms[B],
                                          "kernels": kernels.get(setting), "reps_ms": times[setting]})
    print("\n## verify step (tree verify + accept + commit, CUDA graph) relative to one decode step; kernels of one "
          "eager step (torch profiler)")
    print_table(results["verify"], ["batch", "N", "setting", "verify_ms", "x_decode_step", "kernels"])

    write_json(args.out, results)
    # 3. speedup at controlled acceptance, prefill included and decode phase alone
    for B in [b for b in batches if "speedup" in parts]:
        prompts = torch.randint(0, model.vocab_size, (B, args.prompt_len), device=dev)
        generate_autoregressive(model, prompts, args.new_tokens, static=True)  # capture (same KV capacity bucket as timed)
        ref, plain_s = timed_median(lambda: generate_autoregressive(model, prompts, args.new_tokens, static=True))
        _, prefill_s = timed_median(lambda: graph_prefill(model, prompts) or model(prompts, logits_to_keep=1))
        ref_ok, _ = greedy_consistent(model, ref, args.prompt_len)
        results.setdefault("plain_greedy_consistent", {})[B] = ref_ok
        for steps in args.chains:
            eng = SpeculativeEngine(model, OracleDrafter(ref, vocab_size=model.vocab_size), TreeConfig(builder="chain", num_steps=steps),
                                    static=True)
            eng.generate(prompts, args.new_tokens)  # capture once per (batch, chain), same KV capacity bucket as timed
            for err in args.errors:
                eng.drafter = OracleDrafter(ref, error_rate=err, vocab_size=model.vocab_size, seed=steps)
                eng.stats = type(eng.stats)()
                out, spec_s = timed_median(lambda: eng.generate(prompts, args.new_tokens))
                exact = torch.equal(out, ref)
                ok, worst = (True, 0.0) if exact else greedy_consistent(model, out, args.prompt_len)
                st = eng.stats.as_dict()
                results["speedup"].append({"batch": B, "chain": steps, "error_rate": err, "correct": ok,
                                           "identical_to_plain": exact, "worst_margin": worst,
                                           "tokens_per_forward": st["mean_accept_length"],
                                           "plain_tok_s": B * args.new_tokens / plain_s,
                                           "spec_tok_s": B * args.new_tokens / spec_s if ok else None,
                                           "prefill_ms": prefill_s * 1e3,
                                           "speedup": plain_s / spec_s if ok else None,
                                           "decode_phase_speedup": (plain_s - prefill_s) / (spec_s - prefill_s) if ok else None})
    print("\n## speedup at controlled acceptance (oracle chain drafter; both paths CUDA-graph replayed)")
    print_table(results["speedup"], ["batch", "chain", "error_rate", "correct", "identical_to_plain", "tokens_per_forward",
                                     "plain_tok_s", "spec_tok_s", "prefill_ms", "speedup", "decode_phase_speedup"])
    print("correct = every token is the target's greedy choice up to bf16 rounding (see common.greedy_consistent); "
          "identical_to_plain = token-for-token equal to generate_autoregressive")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, results)
    print(f"\nwrote {args.out}")
    return 0 if all(r["correct"] for r in results["speedup"]) else 1


@contextlib.contextmanager
def _env(setting):
    """Set one environment variable (NAME, VALUE) for the block; None: nothing."""
    if setting is None:
        yield
        return
    name, value = setting
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _cfg_for(N: int) -> TreeConfig:
    """A config whose tree holds N nodes and allows depth up to N - 1 (random trees)."""
    return TreeConfig(topk=N, num_steps=max(1, N - 1), num_draft_tokens=N) if N > 2 else TreeConfig(topk=2, num_steps=1, num_draft_tokens=N)


if __name__ == "__main__":
    sys.exit(main())
