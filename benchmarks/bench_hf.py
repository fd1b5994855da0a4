"""Prefill and decode speed on Qwen3-Next-style checkpoints, side by side: transformers (+ fla) vs gdnspec.

    python benchmarks/bench_hf.py --out results.json                        # CUDA; sizes tiny .. ~1B, batch 1
    python benchmarks/bench_hf.py --sizes 1.7b --dtype bfloat16 --prefill 16,128,512,4096 --out hf_1.7b.json
    python benchmarks/bench_hf.py --sizes tiny --device cpu --new-tokens 16 --prefill 16  # smoke run without a GPU

Per size: (1) prefill, batch 1, for each --prefill length T: transformers' forward over the prompt (use_cache=True,
what `generate` runs first) vs gdnspec's `generate.prefill` (a CUDA graph of the chunked kernels on CUDA); the last
position's logits must agree (same argmax, max abs difference reported) before a time is printed. (2) decoding:
transformers `generate` vs gdnspec plain decoding (`generate_autoregressive`: CUDA-graph decode steps) vs gdnspec
speculative (n-gram drafter), whole calls, and the decode phase alone (whole call minus the prompt's prefill,
measured on its own), tokens/s = new tokens / seconds.

For every size a random-weight checkpoint is made with transformers' own Qwen3NextForCausalLM, saved with
save_pretrained to a temp dir and loaded by both sides from that folder. transformers runs as its users run it:
with flash-linear-attention (and causal-conv1d) kernels when they import, else its torch fallback (reported).
Greedy decoding, batch 1. Before any speed is printed the three outputs must be token-identical; a size whose
outputs differ is reported as MISMATCH (with the first differing position) and gets no speed.
Weights: O(1) random (gain 0.5 projections, peaked logits) so greedy choices are not near-ties; float32 by default
with TF32 off (bf16 via --dtype bfloat16: different kernels then legitimately round differently and may diverge).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {  # Qwen3-Next layout: 3 GDN layers then 1 gated-attention layer, partial RoPE, (1 + w) norms
    "tiny": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
                 linear_value_head_dim=64, num_experts=0),
    "small": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=128, linear_num_key_heads=4, linear_num_value_heads=8,
                  linear_key_head_dim=128, linear_value_head_dim=128, num_experts=0),
    "medium": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=3072, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=128, linear_num_key_heads=8, linear_num_value_heads=16,
                   linear_key_head_dim=128, linear_value_head_dim=128, num_experts=0),
    "moe": dict(hidden_size=1024, num_hidden_layers=16, intermediate_size=3072, num_attention_heads=8,
                num_key_value_heads=2, head_dim=128, linear_num_key_heads=8, linear_num_value_heads=16,
                linear_key_head_dim=128, linear_value_head_dim=128, num_experts=32, num_experts_per_tok=4,
                moe_intermediate_size=512, shared_expert_intermediate_size=512),
    # the 1.7B config of bench_e2e.py ("1.5b" there: 1.73B parameters with vocab 32k)
    "1.7b": dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=5632, num_attention_heads=16,
                 num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
                 linear_key_head_dim=128, linear_value_head_dim=128, num_experts=0),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=6144, num_attention_heads=16,
               num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
               linear_key_head_dim=128, linear_value_head_dim=128, num_experts=0),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 3 + 0.5))
            elif name.endswith("dt_bias"):
                p.copy_(n * 0.5)
            elif "norm" in name:
                p.add_(n * 0.2)
            elif "embed" in name or name.startswith("lm_head"):
                p.copy_(n * 4.0 / p.shape[-1] ** 0.5)
            elif "conv1d" in name:
                p.copy_(n / p.shape[-1] ** 0.5)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(n * 3.0 / p.shape[-1] ** 0.5)
            else:
                p.copy_(n * 0.5 / p.shape[-1] ** 0.5)


def make_checkpoint(size: str, folder: Path, vocab: int, seed: int) -> int:
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    cfg = Qwen3NextConfig(vocab_size=vocab, max_position_embeddings=4096, rope_theta=10000.0, **SIZES[size])
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(cfg).eval()
    randomize_(model, seed)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def timed(fn, device, repeats: int):
    """(result of the last run, median seconds) over `repeats` runs after one warm-up."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def first_diff(a: torch.Tensor, b: torch.Tensor) -> int | None:
    a, b = a.flatten().cpu(), b.flatten().cpu()
    n = min(a.numel(), b.numel())
    d = (a[:n] != b[:n]).nonzero()
    if d.numel():
        return int(d[0])
    return None if a.numel() == b.numel() else n


def hf_prefill(hf, ids: torch.Tensor) -> torch.Tensor:
    """transformers' prompt forward as `generate` runs it (a fresh cache); last position's logits (1, vocab)."""
    with torch.inference_mode():
        return hf(ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1).logits[:, -1]


def our_prefill(model, ids: torch.Tensor) -> torch.Tensor:
    """gdnspec's prompt prefill as `generate` runs it; last position's logits (1, vocab)."""
    from gdnspec.generate import prefill

    return prefill(model, [ids[0]])[1]


def bench_prefill(hf, ours, T: int, args, device) -> dict:
    """Prefill of a T-token random prompt, batch 1, both sides; times only when the last logits agree (argmax)."""
    g = torch.Generator().manual_seed(args.seed + T)
    ids = torch.randint(0, args.vocab, (1, T), generator=g).to(device)
    ref, t_hf = timed(lambda: hf_prefill(hf, ids), device, args.repeats)
    got, t_ours = timed(lambda: our_prefill(ours, ids), device, args.repeats)
    same = bool((ref.argmax(-1) == got.argmax(-1)).all())
    row = {"T": T, "same_argmax": same, "max_abs_logit_diff": float((ref.float() - got.float()).abs().max()),
           "logit_scale": float(ref.float().abs().max())}
    if same:
        row.update(transformers_ms=t_hf * 1e3, gdnspec_ms=t_ours * 1e3, speedup=t_hf / t_ours)
    return row


def bench_size(size, args, device, dtype) -> dict:
    from transformers import AutoModelForCausalLM

    from gdnspec import generate_autoregressive
    from gdnspec.models.hf import load_hf
    from gdnspec.spec import GDNSpeculativeWorker, NGramDrafter

    row: dict = {"size": size}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        row["params"] = make_checkpoint(size, folder, args.vocab, args.seed)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        ours = load_hf(folder, dtype=dtype, device=device)[0]
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(args.seed + 1)
    motif = torch.randint(0, args.vocab, (16,), generator=g)
    prompt = torch.cat([torch.randint(0, args.vocab, (args.prompt_len - 32,), generator=g), motif, motif])[None].to(device)
    N = args.new_tokens

    def run_hf():
        with torch.inference_mode():
            return hf.generate(prompt, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                               attention_mask=torch.ones_like(prompt))

    def run_plain():
        return generate_autoregressive(ours, prompt, N)

    worker = GDNSpeculativeWorker(target_model=ours, drafter=NGramDrafter(max_ngram=args.max_ngram), topk=args.topk,
                                  num_steps=args.num_steps)

    def run_spec():
        return worker.generate(prompt, N)

    row["prefill"] = [bench_prefill(hf, ours, T, args, device) for T in args.prefill]
    # the decode phase alone: the same prompt's prefill, timed on its own for each side
    _, t_hf_pre = timed(lambda: hf_prefill(hf, prompt), device, args.repeats)
    _, t_ours_pre = timed(lambda: our_prefill(ours, prompt), device, args.repeats)
    out_hf, t_hf = timed(run_hf, device, args.repeats)
    out_plain, t_plain = timed(run_plain, device, args.repeats)
    worker.reset_statistics()
    out_spec, t_spec = timed(run_spec, device, args.repeats)
    stats = worker.get_statistics()
    diffs = {"plain_vs_transformers": first_diff(out_plain, out_hf), "spec_vs_plain": first_diff(out_spec, out_plain)}
    row["identical"] = all(v is None for v in diffs.values())
    row["first_diff"] = diffs
    row["new_tokens"] = N
    row["spec_tokens_per_target_forward"] = stats.get("mean_accept_length")
    row["prompt_prefill_ms"] = {"transformers": t_hf_pre * 1e3, "gdnspec": t_ours_pre * 1e3}
    if row["identical"]:
        row["tokens_per_s"] = {"transformers": N / t_hf, "gdnspec_plain": N / t_plain, "gdnspec_spec_ngram": N / t_spec}
        row["speedup_plain_vs_transformers"] = t_hf / t_plain
        row["speedup_spec_vs_transformers"] = t_hf / t_spec
        # decode phase: N tokens, the first comes from the prefill logits, so N - 1 decode forwards on each side
        dec_hf, dec_plain = t_hf - t_hf_pre, t_plain - t_ours_pre
        if dec_hf > 0 and dec_plain > 0:
            row["decode_tokens_per_s"] = {"transformers": (N - 1) / dec_hf, "gdnspec_plain": (N - 1) / dec_plain}
            row["decode_speedup_plain_vs_transformers"] = dec_hf / dec_plain
        else:  # timing noise: the prefill measured alone took as long as the whole call
            row["decode_phase_note"] = ("n/a: the prompt's prefill measured alone took as long as the whole call "
                                        "(noise; raise --new-tokens or --repeats)")
    del hf, ours, worker
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--sizes", default="tiny,small,medium,moe,1b", help=f"comma list of {list(SIZES)}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--topk", type=int, default=1, help="n-gram tree width (1 = chain)")
    ap.add_argument("--num-steps", type=int, default=6, help="n-gram draft depth")
    ap.add_argument("--max-ngram", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefill", default="16,128,512,4096",
                    help="prompt lengths for the prefill comparison (comma list of ints >= 2; empty: skip)")
    args = ap.parse_args(argv)
    try:
        args.prefill = [int(t) for t in args.prefill.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--prefill must be a comma list of ints, got {args.prefill!r}")
    if any(t < 2 for t in args.prefill):
        ap.error(f"--prefill lengths must be >= 2, got {args.prefill}")
    if args.prompt_len < 33:
        ap.error("--prompt-len must be >= 33")
    for flag in ("new_tokens", "repeats", "topk", "num_steps", "max_ngram", "vocab"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    try:
        torch.device(args.device)
    except (RuntimeError, ValueError) as e:
        ap.error(f"--device: cannot use {args.device!r} ({str(e).splitlines()[0]})")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: run on a GPU, or pass --device cpu for a smoke run", file=sys.stderr)
        return 2
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        ap.error(f"unknown sizes {bad}; choose from {list(SIZES)}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    import transformers

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": args.dtype,
        "transformers_gdn_kernels": "fla" if importlib.util.find_spec("fla") else "torch fallback",
        "transformers_conv_kernels": "causal_conv1d" if importlib.util.find_spec("causal_conv1d") else "torch fallback",
        "batch_size": 1, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "ngram": {"topk": args.topk, "num_steps": args.num_steps, "max_ngram": args.max_ngram},
    }
    print(json.dumps(env))
    rows = []
    for size in sizes:
        row = bench_size(size, args, device, dtype)
        rows.append(row)
        print(json.dumps(row), flush=True)
    head = f"{'size':<8}{'params':>9}  {'transformers':>13}{'gdnspec plain':>15}{'gdnspec spec':>14}{'plain x':>9}{'spec x':>8}{'tok/fwd':>8}"
    print(f"\n{env['device']}, {args.dtype}, batch 1, {args.new_tokens} new tokens, transformers kernels: "
          f"{env['transformers_gdn_kernels']} (tokens/s)")
    print(head)
    for r in rows:
        p = f"{r['params'] / 1e6:.0f}M"
        if r["identical"]:
            s = r["tokens_per_s"]
            print(f"{r['size']:<8}{p:>9}  {s['transformers']:>13.1f}{s['gdnspec_plain']:>15.1f}{s['gdnspec_spec_ngram']:>14.1f}"
                  f"{r['speedup_plain_vs_transformers']:>9.2f}{r['speedup_spec_vs_transformers']:>8.2f}"
                  f"{r['spec_tokens_per_target_forward'] or 0:>8.2f}")
        else:
            print(f"{r['size']:<8}{p:>9}  MISMATCH (first differing token index: {r['first_diff']}); no speed reported")
    print(f"\ndecode phase alone (whole call minus the prompt's prefill), tokens/s")
    print(f"{'size':<8}{'transformers':>13}{'gdnspec plain':>15}{'plain x':>9}")
    for r in rows:
        if r.get("decode_tokens_per_s"):
            d = r["decode_tokens_per_s"]
            print(f"{r['size']:<8}{d['transformers']:>13.1f}{d['gdnspec_plain']:>15.1f}"
                  f"{r['decode_speedup_plain_vs_transformers']:>9.2f}")
        elif not r["identical"]:
            print(f"{r['size']:<8}  MISMATCH: no speed reported")
        else:
            print(f"{r['size']:<8}  {r['decode_phase_note']}")
    if args.prefill:
        print("\nprefill, batch 1 (ms; a length whose last-position argmax differs prints MISMATCH)")
        print(f"{'size':<8}{'T':>7}{'transformers':>14}{'gdnspec':>10}{'speedup':>9}{'max |dlogit|':>14}")
        for r in rows:
            for p in r["prefill"]:
                if p["same_argmax"]:
                    print(f"{r['size']:<8}{p['T']:>7}{p['transformers_ms']:>14.2f}{p['gdnspec_ms']:>10.2f}"
                          f"{p['speedup']:>9.2f}{p['max_abs_logit_diff']:>14.3g}")
                else:
                    print(f"{r['size']:<8}{p['T']:>7}  MISMATCH (last-position argmax differs; max |dlogit| "
                          f"{p['max_abs_logit_diff']:.3g})")
    if args.out:
        args.out.write_text(json.dumps({"env": env, "results": rows}, indent=2))
    ok = all(r["identical"] and all(p["same_argmax"] for p in r["prefill"]) for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
