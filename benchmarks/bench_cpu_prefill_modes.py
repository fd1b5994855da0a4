"""CPU: token loop vs chunked GDN form for a multi-token model forward (prompts, draft catch-ups), per T and thread count.

    python benchmarks/bench_cpu_prefill_modes.py [--threads 1,2] [--lengths 8,16,32,64,128] [--repeats 15] [--out F.json]

For the default bundle's target and draft model, a whole forward of T tokens (batch 1, float32, inference mode)
with mode="recurrent" (the per-token loop) and mode="chunk" (the WY chunk form); median milliseconds of --repeats
calls after 3 warm-ups, on an idle machine. The crossover is what models/lm.CPU_CHUNK_MIN_TOKENS encodes. Both
modes are checked to give the same logits (float32, relative 1e-4) before any time is printed. Prints a table and
JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, time_host  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    ap.add_argument("--lengths", default="8,16,32,64,128", help="comma list of token counts T >= 2")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    try:
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
        lengths = [int(t) for t in args.lengths.split(",") if t.strip()]
    except ValueError:
        ap.error("--threads and --lengths take comma lists of ints")
    if not threads or min(threads) < 1:
        ap.error(f"--threads must list ints >= 1, got {args.threads!r}")
    if not lengths or min(lengths) < 2:
        ap.error(f"--lengths must list ints >= 2, got {args.lengths!r}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")

    import gdnspec
    from gdnspec.models.lm import CPU_CHUNK_MIN_TOKENS

    bundle = gdnspec.load()
    models = {"target": bundle.model, "draft": bundle.drafters["model"].model}
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        for name, model in models.items():
            for T in lengths:
                ids = torch.randint(0, model.vocab_size, (1, T), generator=g)
                with torch.inference_mode():
                    a = model(ids, mode="recurrent").logits
                    b = model(ids, mode="chunk").logits
                    err = float((a - b).norm() / a.norm())
                    row = {"threads": n, "model": name, "T": T, "rel_err": err}
                    if err < 1e-4:
                        row["recurrent_ms"] = time_host(lambda: model(ids, mode="recurrent"), iters=args.repeats)
                        row["chunk_ms"] = time_host(lambda: model(ids, mode="chunk"), iters=args.repeats)
                rows.append(row)
    print(f"CPU ({environment()['machine']}), float32, batch 1; model forward over T tokens; "
          f"auto picks chunk from T >= {CPU_CHUNK_MIN_TOKENS}")
    print(f"{'threads':>7} {'model':>6} {'T':>5} {'loop ms':>9} {'chunk ms':>9} {'loop/chunk':>10}")
    for r in rows:
        if "chunk_ms" in r:
            print(f"{r['threads']:>7} {r['model']:>6} {r['T']:>5} {r['recurrent_ms']:>9.2f} {r['chunk_ms']:>9.2f}"
                  f" {r['recurrent_ms'] / r['chunk_ms']:>10.2f}")
        else:
            print(f"{r['threads']:>7} {r['model']:>6} {r['T']:>5}  MISMATCH (rel err {r['rel_err']:.2e}): no time")
    result = {"env": environment(), "cpu_chunk_min_tokens": CPU_CHUNK_MIN_TOKENS, "rows": rows}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if all("chunk_ms" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
