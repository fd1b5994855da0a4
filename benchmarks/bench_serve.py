"""Load test of `gdnspec serve`: a concurrency sweep with speculation on and off, as a client sees it.

    python benchmarks/bench_serve.py                                  # CPU, embedded model: levels 1,4,16,64
    python benchmarks/bench_serve.py --quick                          # smoke run, < 1 min on a 2-core CPU
    python benchmarks/bench_serve.py --device cuda --dtype float32    # GPU
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000      # a server started elsewhere (one mode)

For each mode (speculative: `--drafter D`, adaptive steps as the server's default; plain: `--drafter none`) a server
is started on a free port, warmed up, then for each concurrency level c, c clients send requests back to back (closed
loop, streamed, greedy, held-out Python files as token-id prompts) until --requests-per-level requests finished.
Per level: output tokens/s, requests/s, time to first token p50 / p99, inter-token latency p50 / p99 (a chunk's
arrival gap over the tokens it carried, per token), mean accept length and the share of plain steps (the server's
/metrics, differences over the level). At concurrency 1 the same engine (same drafter and tree) also runs offline in
this process on the same prompts, so the server's overhead on the inter-token latency can be read off.
Writes JSON and a PNG (matplotlib), prints a markdown table for the README.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def parse_metrics(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def spec_summary(before: dict, after: dict) -> dict:
    def d(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    drafts = d("gdnspec:spec_decode_num_drafts_total")
    spec_steps = d("gdnspec:spec_decode_steps_total", kind="speculative")
    plain_steps = d("gdnspec:spec_decode_steps_total", kind="plain")
    return {"mean_accept_length": 1 + d("gdnspec:spec_decode_num_accepted_tokens_total") / drafts if drafts else None,
            "plain_step_share": plain_steps / (spec_steps + plain_steps) if spec_steps + plain_steps else None}


class ServerProcess:
    def __init__(self, args, drafter: str, max_batch: int):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "gdnspec", "serve", "--port", "0", "--drafter", drafter,
               "--device", args.device, "--dtype", args.dtype, "--max-batch-size", str(max_batch),
               "--max-queue-size", str(4 * max_batch), "--max-model-len",
               str(args.prompt_tokens + args.max_tokens + 8), "--topk", str(args.topk), "--num-steps",
               str(args.num_steps), "--num-draft-tokens", str(args.num_draft_tokens)]
        if args.model:
            cmd += ["--model", args.model]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        cmd += args.server_args.split()
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, env=env, cwd=REPO)
        deadline = time.monotonic() + 300
        while True:
            text = Path(self.log.name).read_text()
            m = re.search(r"listening on (http://\S+)", text)
            if m:
                self.url = m.group(1)
                self.banner = text.strip().splitlines()[-1]
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the server did not start:\n{text}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        os.unlink(self.log.name)


async def one_request(client, url: str, prompt: list[int], max_tokens: int, model: str | None) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "return_token_ids": True}
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    first, last, itl, tokens = None, None, [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            n = len(chunk["choices"][0].get("token_ids", [])) if chunk.get("choices") else 0
            if n == 0:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
                n -= 1
            if n > 0:
                itl += [(now - last) / n] * n
            last = now
            tokens += n + (1 if tokens == 0 else 0)
    return {"ttft": first - t0 if first else None, "itl": itl, "tokens": tokens, "latency": time.perf_counter() - t0}


async def run_level(url: str, prompts: list[list[int]], c: int, n_requests: int, max_tokens: int,
                    model: str | None) -> dict:
    import httpx

    results, next_i = [], 0
    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        before = parse_metrics((await client.get(url + "/metrics")).text)

        async def worker():
            nonlocal next_i
            while next_i < n_requests:
                i = next_i
                next_i += 1
                results.append(await one_request(client, url, prompts[i % len(prompts)], max_tokens, model))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        wall = time.perf_counter() - t0
        after = parse_metrics((await client.get(url + "/metrics")).text)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    ms = lambda v: None if v is None else v * 1e3  # noqa: E731
    return {"concurrency": c, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
            "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
            "itl_p50_ms": ms(percentile(itl, 50)), "itl_p99_ms": ms(percentile(itl, 99)),
            **spec_summary(before, after)}


def offline_itl(args, prompts: list[list[int]], drafter_name: str, speculate: bool) -> dict:
    """The same engine alone in this process: per-token step time at batch 1 (p50 / p99), as the server measures;
    speculate False: plain steps (the server's plain mode)."""
    import torch

    import gdnspec
    from gdnspec.spec import SpeculativeEngine, TreeConfig
    from gdnspec.spec.drafters import NullDrafter

    dtype = args.dtype if args.dtype != "auto" else "float32"
    bundle = gdnspec.load(args.model, dtype=getattr(torch, dtype), device=args.device)
    if args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    drafter = NullDrafter() if drafter_name == "none" or not speculate else bundle.drafters[drafter_name]
    engine = SpeculativeEngine(bundle.model, drafter, TreeConfig(topk=args.topk, num_steps=args.num_steps,
                                                                 num_draft_tokens=args.num_draft_tokens), static=False)
    per_token, tokens, wall = [], 0, 0.0
    for k, p in enumerate(prompts[: max(2, min(len(prompts), 4))]):
        s = engine.session()
        (sid,) = s.add([torch.tensor(p)], max_new_tokens=args.max_tokens, eos_token_id=[bundle.eos_token_id])
        while s.active:
            t0 = time.perf_counter()
            new = s.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            n = sum(len(v) for v in new.values())
            if k > 0 and n:  # the first prompt warms up
                per_token += [dt / n] * n
                tokens, wall = tokens + n, wall + dt
    return {"itl_p50_ms": percentile(per_token, 50) * 1e3, "itl_p99_ms": percentile(per_token, 99) * 1e3,
            "decode_tokens_per_s": tokens / wall if wall else None}


def load_prompts(args) -> list[list[int]]:
    import gdnspec
    from gdnspec.evaluate import heldout_prompts

    tok = gdnspec.load(args.model).tokenizer if args.model else gdnspec.load().tokenizer
    n = max(8, max(args.concurrency))
    return [p.tolist() for p in heldout_prompts(tok, num_prompts=n, prompt_tokens=args.prompt_tokens,
                                                 min_tokens=args.prompt_tokens + 1)]


def plot(res: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for mode, rows in res["modes"].items():
        cs = [r["concurrency"] for r in rows]
        axes[0].plot(cs, [r["tokens_per_s"] for r in rows], "o-", label=mode)
        for ax, key in ((axes[1], "ttft"), (axes[2], "itl")):
            ax.plot(cs, [r[f"{key}_p50_ms"] for r in rows], "o-", label=f"{mode} p50")
            ax.plot(cs, [r[f"{key}_p99_ms"] for r in rows], "x--", label=f"{mode} p99")
    for ax, label in zip(axes, ("output tokens/s", "time to first token (ms)", "inter-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.legend()
    for mode, off in res.get("offline", {}).items():
        axes[2].axhline(off["itl_p50_ms"], ls=":", color="k" if mode == "plain" else "gray",
                        label=f"offline {mode} steps p50 (batch 1)")
        axes[2].legend()
    fig.suptitle(res["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def table(res: dict) -> str:
    lines = ["| mode | concurrency | tokens/s | requests/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | accept length | "
             "plain steps |", "|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for mode, rows in res["modes"].items():
        for r in rows:
            lines.append(f"| {mode} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                         f"{f(r['ttft_p50_ms'], '.1f')} / {f(r['ttft_p99_ms'], '.1f')} | {f(r['itl_p50_ms'], '.2f')} / "
                         f"{f(r['itl_p99_ms'], '.2f')} | {f(r['mean_accept_length'], '.2f')} | "
                         f"{f(r['plain_step_share'], '.0%')} |")
    modes = res["modes"]
    if "speculative" in modes and "plain" in modes:
        lines.append("")
        for a, b in zip(modes["speculative"], modes["plain"]):
            lines.append(f"concurrency {a['concurrency']}: speculative / plain tokens/s = "
                         f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x")
    for mode, off in res.get("offline", {}).items():
        srv = res["modes"][mode][0]
        mixed = ""
        if mode == "speculative" and srv.get("plain_step_share"):
            mixed = (f"; the server made {srv['plain_step_share']:.0%} plain steps (adaptive): compare with "
                     f"--server-args=--no-speculative-adaptive")
        lines.append(f"{mode}, concurrency {srv['concurrency']}: ITL p50 {srv['itl_p50_ms']:.2f} ms through the server "
                     f"vs {off['itl_p50_ms']:.2f} ms offline (the same engine's {mode} steps alone; "
                     f"{srv['itl_p50_ms'] / off['itl_p50_ms'] - 1:+.0%}{mixed})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="benchmark this running server (one mode) instead of starting servers")
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--drafter", default="ngram", help="the speculative mode's drafter")
    ap.add_argument("--modes", default="speculative,plain", help="comma list of speculative, plain")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="server CPU threads (default: the server's rule)")
    ap.add_argument("--concurrency", default=None, help="comma list of concurrent clients (default 1,4,16,64)")
    ap.add_argument("--requests-per-level", type=int, default=None, help="default: max(8, 2 x concurrency)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default 128")
    ap.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (default 128)")
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--num-steps", type=int, default=5)
    ap.add_argument("--num-draft-tokens", type=int, default=16)
    ap.add_argument("--server-args", default="", help="extra flags for gdnspec serve (quoted)")
    ap.add_argument("--no-offline", action="store_true", help="skip the offline engine's inter-token latency")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: defaults concurrency 1,4, 4 requests each, 32-token prompts and outputs")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/serve_<device>.json)")
    args = ap.parse_args()
    quick = {"concurrency": "1,4", "prompt_tokens": 32, "max_tokens": 32, "requests_per_level": 4}
    full = {"concurrency": "1,4,16,64", "prompt_tokens": 128, "max_tokens": 128, "requests_per_level": None}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    prompts = load_prompts(args)
    dev = "cpu" if args.device == "cpu" else args.device
    out = Path(args.out or REPO / "benchmarks" / "results" / f"serve_{dev.replace(':', '')}{'_quick' if args.quick else ''}.json")
    res = {"title": f"gdnspec serve, {args.model or 'embedded model'}, {args.device}, drafter {args.drafter}, "
                    f"prompt {args.prompt_tokens} / output {args.max_tokens} tokens, greedy",
           "args": {k: v for k, v in vars(args).items()}, "modes": {}}
    targets = [("server", None)] if args.url else [(m, "none" if m == "plain" else args.drafter) for m in modes]
    for mode, drafter in targets:
        server = None
        url = args.url
        if url is None:
            server = ServerProcess(args, drafter, max(args.concurrency))
            url = server.url
            print(server.banner, flush=True)
        try:
            asyncio.run(run_level(url, prompts, 2, 4, min(args.max_tokens, 16), None))  # warm-up
            rows = []
            for c in args.concurrency:
                n = args.requests_per_level or max(8, 2 * c)
                row = asyncio.run(run_level(url, prompts, c, n, args.max_tokens, None))
                print(f"[{mode}] c={c}: {row['tokens_per_s']:.1f} tokens/s, TTFT p50 {row['ttft_p50_ms']:.1f} ms, "
                      f"ITL p50 {row['itl_p50_ms']:.2f} ms, accept length {row['mean_accept_length']}", flush=True)
                rows.append(row)
            res["modes"][mode] = rows
        finally:
            if server is not None:
                server.stop()
    if not args.no_offline and not args.url:
        res["offline"] = {m: offline_itl(args, prompts, args.drafter, m == "speculative") for m in modes}
    from common import environment

    res["environment"] = environment()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    png = out.with_suffix(".png")
    drawn = plot(res, png)
    print()
    print(table(res))
    print(f"\nwrote {out}" + (f" and {png}" if drawn else " (no PNG: matplotlib is not installed)"))


if __name__ == "__main__":
    main()
