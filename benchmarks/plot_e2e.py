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
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for B in sorted({r["batch"] for r in res["speedup"]}):
        rows = sorted((r for r in res["speedup"] if r["batch"] == B and r["speedup"] is not None), key=lambda r: r["tokens_per_forward"])
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
