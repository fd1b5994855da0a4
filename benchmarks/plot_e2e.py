"""Plot an e2e benchmark JSON (benchmarks/bench_e2e.py): speedup vs tokens per forward, verify cost vs N.

    python benchmarks/plot_e2e.py benchmarks/results/e2e_NVIDIA_H100_80GB_HBM3.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: str) -> None:
    res = json.loads(Path(path).read_text())
    fig, axes = plt.subplots(1, 4 if res.get("prefill") else 2, figsize=(22 if res.get("prefill") else 11, 4.2))
    if res.get("prefill"):
        ax = axes[2]
        for variant in ("fused", "unfused"):
            rows = [r for r in res["decode"] if r.get("variant", "fused") == variant]
            if rows:
                ax.plot([r["batch"] for r in rows], [r["step_ms"] for r in rows], "o-", label=f"decode step, {variant}")
        rows = [r for r in res["decode"] if r.get("variant", "fused") == "fused"]
        ax.plot([r["batch"] for r in rows], [r["floor_ms"] for r in rows], "k--", label="bytes / copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("ms per decode step (CUDA graph)")
        ax.legend()
        ax = axes[3]
        rows = res["prefill"]
        ax.plot([r["T"] for r in rows], [r["prefill_ms"] for r in rows], "o-", label="eager")
        g = [r for r in rows if r.get("graph_ms")]
        ax.plot([r["T"] for r in g], [r["graph_ms"] for r in g], "o-", label="CUDA graph (generate / engine)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens (batch 1)")
        ax.set_ylabel("prefill ms")
        ax.legend()
    ax = axes[0]
    for B in sorted({r["batch"] for r in res["speedup"]}):
        rows = sorted((r for r in res["speedup"] if r["batch"] == B and r["speedup"] is not None
                       and r.get("error_rate", 0) == 0), key=lambda r: r["tokens_per_forward"])
        ax.plot([r["tokens_per_forward"] for r in rows], [r["speedup"] for r in rows], "o-", label=f"batch {B}")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xlabel("tokens per target forward (oracle chain drafter)")
    ax.set_ylabel("wall-clock speedup vs graph-captured plain decoding")
    ax.legend()
    ax = axes[1]
    for B in sorted({r["batch"] for r in res["verify"]}):
        rows = [r for r in res["verify"] if r["batch"] == B]
        ax.plot([r["N"] for r in rows], [r["x_decode_step"] for r in rows], "o-", label=f"batch {B}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree nodes N")
    ax.set_ylabel("verify step / plain decode step")
    ax.legend()
    fig.suptitle(f"{res['env']['gpu']}, {res['params'] / 1e9:.2f}B Qwen3-Next-style model (bf16, random weights)")
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
