"""Shared pieces of the benchmarks: environment record, CUDA-event timing, table printing, JSON output, and the
held-out generation requests that the request profiles time (profile_generate.py, profile_request.py)."""
from __future__ import annotations

import json
from pathlib import Path
import platform
import statistics
import time

import torch


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = None
        env["cpu_threads"] = torch.get_num_threads()
    return env


def time_host(fn, *, warmup: int = 3, iters: int = 20) -> float:
    """Median wall-clock milliseconds of fn() over iters runs after warmup runs (host clock: CPU work)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_cuda(fn, *, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of fn() over iters runs, timed with CUDA events (host clock without CUDA: time_host)."""
    if not torch.cuda.is_available():
        return time_host(fn, warmup=warmup, iters=iters)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e9


def print_table(rows: list[dict], columns: list[str]) -> None:
    if not rows:
        print("(not run)")
        return
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-+-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "-" if v is None else str(v)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)


def emit_json(path, payload: dict) -> None:
    """`payload` as JSON into `path` (its folder made first), or printed when path is None."""
    if path is None:
        print(json.dumps(payload, indent=1, default=str))
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, payload)


@torch.inference_mode()
def greedy_consistent(model, outputs: torch.Tensor, prompt_len: int, *, rel_tol: float = 0.02) -> tuple[bool, float]:
    """Is every generated token a greedy choice of `model` up to low-precision rounding?

    Teacher-forces `outputs` (B, T) through the model and checks, at each generated position, that the chosen token's
    logit is within rel_tol * max(|max logit|, 1) of the maximum. In float32/float64 plain and speculative greedy
    outputs are identical; in bf16 the verify pass and the decode step round differently, and a near-tie can flip
    (every engine has this). Returns (ok, worst margin / tolerance scale).
    """
    logits = model(outputs).logits[:, prompt_len - 1: -1].float()  # (B, new, vocab)
    chosen = logits.gather(-1, outputs[:, prompt_len:, None]).squeeze(-1)
    top = logits.max(-1).values
    scale = top.abs().clamp(min=1.0)
    worst = float(((top - chosen) / scale).max())
    return worst <= rel_tol, worst


def add_request_args(ap, *, shape: str) -> None:
    """The arguments of a held-out request profile: --device, --dtype, --shape (default `shape`), --prompts,
    --tokens."""
    from gdnspec.evaluate import SHAPES

    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shape", default=shape, choices=sorted(SHAPES))
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)


def bundle_and_prompts(args):
    """(the shipped bundle in args.dtype on args.device, args.prompts held-out prompts of 128 tokens there)."""
    from gdnspec.bundle import load
    from gdnspec.evaluate import heldout_prompts

    b = load(dtype=getattr(torch, args.dtype), device=args.device)
    prompts = [p.to(args.device) for p in heldout_prompts(b.tokenizer, num_prompts=args.prompts, prompt_tokens=128)]
    return b, prompts


def device_sync(device: str) -> None:
    """Wait for the device's queued work (CUDA; a no-op on the CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def best_wall(fn, device: str, n: int = 3) -> float:
    """The fewest wall seconds of n runs of fn(), each from an idle device to the end of its device work."""
    ts = []
    for _ in range(n):
        device_sync(device)
        t = time.perf_counter()
        fn()
        device_sync(device)
        ts.append(time.perf_counter() - t)
    return min(ts)
