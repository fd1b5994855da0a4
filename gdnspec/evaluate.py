"""Evaluation of drafters and tree shapes on held-out text: tokens per target forward, acceptance by depth, and
wall-clock speedup against plain decoding (`generate_autoregressive`) of the same target on the same prompts.

    from gdnspec.evaluate import heldout_prompts, evaluate, SHAPES
    rows = evaluate(bundle, heldout_prompts(bundle.tokenizer), drafters=["ngram", "model", "eagle"])

Each speedup is timed `repeats` times and reported as the median with its min-max spread.
Greedy rows are checked token for token against plain decoding; a row whose output differs reports no speedup.
Sampling rows (temperature > 0) compare against plain sampling at the same temperature; their exactness is a
distribution property, tested in tests/test_spec_sampling.py. Run from the CLI: `gdnspec eval`.
"""
from __future__ import annotations

import statistics
import time

import torch

from gdnspec.generate import generate_autoregressive
from gdnspec.spec import SpeculativeEngine, TreeConfig

# name -> tree shape (num_draft_tokens counts the root)
SHAPES = {
    "chain-4": TreeConfig(builder="chain", num_steps=4),
    "chain-6": TreeConfig(builder="chain", num_steps=6),
    "tree-2x5": TreeConfig(topk=2, num_steps=5, num_draft_tokens=10),
    "tree-4x5": TreeConfig(topk=4, num_steps=5, num_draft_tokens=16),
    "tree-8x6": TreeConfig(topk=8, num_steps=6, num_draft_tokens=32),
}


def heldout_prompts(tokenizer, *, num_prompts: int = 6, prompt_tokens: int = 128, heldout_fraction: float = 0.05,
                    extra_paths=(), include_stdlib: bool = True, min_tokens: int = 512) -> list[torch.Tensor]:
    """The first prompt_tokens tokens of held-out files (the same by-file split the training used), deterministic."""
    from gdnspec.train.data import collect_documents, split_documents

    _, heldout = split_documents(collect_documents(include_stdlib=include_stdlib, extra_paths=extra_paths), heldout_fraction)
    prompts = []
    for doc in heldout:
        ids = tokenizer.encode(doc.text).ids
        if len(ids) >= min_tokens:
            prompts.append(torch.tensor(ids[:prompt_tokens], dtype=torch.long))
        if len(prompts) == num_prompts:
            break
    if not prompts:
        raise ValueError("no held-out document is long enough for a prompt")
    return prompts


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _spread(values: list[float]) -> dict:
    """median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@torch.inference_mode()
def evaluate(bundle, prompts: list[torch.Tensor], *, drafters=("ngram", "model", "eagle"), shapes: dict | None = None,
             max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0, repeats: int = 1,
             adaptive: bool = False, size_trees: bool | None = None, static: bool | None = None,
             progress=print) -> dict:
    """Returns {"baseline": {...}, "rows": [...]} (batch 1, prompts one after another, as a user would run them).

    Each row is timed `repeats` times; one timing = plain and speculative decoding of every prompt, the two
    alternating prompt by prompt (so a slow phase of the machine hits both), and gives speedup = plain seconds /
    speculative seconds. A row reports the median speedup with its min and max ("speedups": all of them) and
    tokens/s from the median speculative time; the baseline's tokens/s comes from the median plain timing.

    adaptive=True: the speculative engines fall back to plain steps where those are measured faster
    (SpeculativeEngine(adaptive=True): CUDA-graph steps on CUDA, eager steps on the CPU; spec/policy.py); each row
    then reports the share of plain steps, and eager rows how each step's tree was sized ("tree_sizing",
    spec/sizing.TreeSizer.summary()). size_trees: SpeculativeEngine's (None: with adaptive; False: the adaptive
    fall-back without per-step sizing, for A/B runs; True: sizing without the fall-back). static: SpeculativeEngine's
    (None: CUDA-graph steps on CUDA, eager steps elsewhere; False: eager steps on CUDA too)."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    model = bundle.model
    device = model.device
    shapes = SHAPES if shapes is None else shapes
    prompts = [p.to(device) for p in prompts]

    def plain_one(p):
        g = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        return generate_autoregressive(model, p[None], max_new_tokens, temperature=temperature, generator=g)[0]

    ref = [plain_one(p) for p in prompts]  # warm-up (CUDA graphs are captured here) and the greedy reference
    n_new = sum(r.numel() - p.numel() for r, p in zip(ref, prompts))
    plain_times = []
    rows = []
    for name in drafters:
        if name not in bundle.drafters:
            raise ValueError(f"drafter {name!r} is not in this bundle (it has {sorted(bundle.drafters)})")
        for shape_name, config in shapes.items():
            eng = SpeculativeEngine(model, bundle.drafters[name], config, temperature=temperature,
                                    **(dict(adaptive=True) if adaptive else {}), size_trees=size_trees,
                                    static=static)

            def spec_one(p):
                eng.generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
                return eng.generate(p[None], max_new_tokens)[0]

            spec_one(prompts[0])  # warm-up
            eng.stats = type(eng.stats)()
            if eng.policy is not None:
                eng.policy.choices.clear()  # count the timed runs' choices (the measured costs stay)
            if eng.sizer is not None:
                eng.sizer.reset_counts()  # the same for the sizes and depths chosen
            spec_s, plain_s, identical = [], [], True
            for _ in range(repeats):
                t_plain = t_spec = 0.0
                for p, r in zip(prompts, ref):
                    _, t = _timed(lambda: plain_one(p), device)
                    t_plain += t
                    o, t = _timed(lambda: spec_one(p), device)
                    t_spec += t
                    identical = identical and torch.equal(o, r)
                plain_s.append(t_plain)
                spec_s.append(t_spec)
            plain_times += plain_s
            ok = identical or temperature > 0
            st = eng.stats.as_dict()  # accumulated over the repeats: the same runs each time, so the same means
            speedups = [a / b for a, b in zip(plain_s, spec_s)]
            sp = _spread(speedups)
            row = {"drafter": name, "shape": shape_name, "topk": config.topk, "num_steps": config.num_steps,
                   "num_draft_tokens": config.num_draft_tokens, "temperature": temperature,
                   "identical_to_plain": identical if temperature == 0 else None,
                   "tokens_per_forward": st["mean_accept_length"], "acceptance_rate": st["mean_acceptance_rate"],
                   "acceptance_by_depth": st["acceptance_by_depth"], "repeats": repeats,
                   "seconds": statistics.median(spec_s), "plain_seconds": statistics.median(plain_s),
                   "tokens_per_s": n_new / statistics.median(spec_s) if ok else None,
                   "speedup": sp["median"] if ok else None, "speedup_min": sp["min"] if ok else None,
                   "speedup_max": sp["max"] if ok else None, "speedups": speedups if ok else None}
            if eng.policy is not None:
                ch = eng.policy.summary()
                row["plain_step_share"] = ch["plain_steps"] / max(ch["plain_steps"] + ch["speculative_steps"], 1)
            if eng.sizer is not None and eng.sizer.steps:  # eager steps sized per step (spec/sizing.py)
                row["tree_sizing"] = eng.sizer.summary()
            rows.append(row)
            text = (f"{sp['median']:.2f}x" + (f" ({sp['min']:.2f}-{sp['max']:.2f})" if repeats > 1 else "")
                    if ok else "MISMATCH (no speedup reported)")
            progress(f"{name:6s} {shape_name:9s} tokens/forward {row['tokens_per_forward']:.2f}  speedup {text}")
    if not plain_times:  # no rows: time plain decoding on its own for the baseline
        for _ in range(repeats):
            plain_times.append(sum(_timed(lambda: plain_one(p), device)[1] for p in prompts))
    base = _spread(plain_times)
    baseline = {"seconds": base["median"], "seconds_min": base["min"], "seconds_max": base["max"], "tokens": n_new,
                "tokens_per_s": n_new / max(base["median"], 1e-9)}
    return {"baseline": baseline, "rows": rows, "max_new_tokens": max_new_tokens, "num_prompts": len(prompts),
            "prompt_tokens": statistics.mean(p.numel() for p in prompts), "repeats": repeats}


def plot(results: dict, path: str) -> bool:
    """Speedup and tokens per forward per drafter/shape as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results["rows"] if r["speedup"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in sorted({r["drafter"] for r in rows}):
        sub = [r for r in rows if r["drafter"] == name]
        axes[0].plot([r["shape"] for r in sub], [r["tokens_per_forward"] for r in sub], marker="o", label=name)
        med = [r["speedup"] for r in sub]
        err = [[m - (r.get("speedup_min") or m) for m, r in zip(med, sub)],
               [(r.get("speedup_max") or m) - m for m, r in zip(med, sub)]]
        axes[1].errorbar([r["shape"] for r in sub], med, yerr=err, marker="o", capsize=3, label=name)
    axes[0].set_ylabel("tokens per target forward")
    axes[1].set_ylabel("wall-clock speedup vs plain (median, min-max)")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    for ax in axes:
        ax.legend()
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(results.get("title", "gdnspec eval"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
