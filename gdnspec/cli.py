"""Command line: `gdnspec <subcommand> ...` (or `python -m gdnspec.cli <subcommand> ...`).

    gdnspec data    --out runs/data [--vocab-size 8192] [--extra PATH ...]       corpus + tokenizer + token arrays
    gdnspec train   --data runs/data --preset default-target --out runs/target  train a target LM
    gdnspec distill --kind model|eagle --target runs/target --data runs/data --out runs/draft
    gdnspec generate --prompt "def fib(n):" [--model DIR] [--drafter eagle|model|ngram|none] [--temperature 0.7]
    gdnspec eval    [--model DIR] [--device cuda] --out runs/eval       drafters x tree shapes vs plain decoding

Each subcommand is one `add_<name>_parser(subparsers)` + `cmd_<name>(args)` pair registered in SUBCOMMANDS;
add a pair there to add a subcommand.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


# ---------------------------------------------------------------------------------------------- shared options
def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="runs/data", help="dataset folder (built from the stdlib when missing)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary when the data folder is built")
    p.add_argument("--extra", action="append", default=[], metavar="PATH",
                   help="extra text files/dirs for the corpus when the data folder is built (repeatable)")
    p.add_argument("--heldout-fraction", type=float, default=0.05)


def _add_train_options(p: argparse.ArgumentParser, *, steps: int, lr: float, batch_size: int = 32) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help="optimizer steps (upper bound with --time-budget)")
    g.add_argument("--time-budget", type=float, default=0.0, help="seconds; > 0 ends training (and the schedule) then")
    g.add_argument("--batch-size", type=int, default=batch_size)
    g.add_argument("--seq-len", type=int, default=512)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup-steps", type=int, default=100)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--eval-every", type=int, default=0, help="steps between held-out evals (best one is kept)")
    g.add_argument("--eval-tokens", type=int, default=200_000)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    g.add_argument("--autocast", default="auto", choices=["auto", "bf16", "none"], help="auto = bf16 on CUDA only")
    g.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32"])


def _train_config(args, extra: dict):
    from gdnspec.train.train import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                       min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                       grad_clip=args.grad_clip, time_budget=args.time_budget, eval_every=args.eval_every,
                       eval_tokens=args.eval_tokens, log_every=args.log_every, seed=args.seed, save_dtype=args.save_dtype,
                       autocast=args.autocast, extra=extra)


def _load_data(args):
    from gdnspec.train.data import TokenData, build_dataset

    folder = Path(args.data)
    if not (folder / "train.npy").exists():
        build_dataset(folder, vocab_size=args.vocab_size, heldout_fraction=args.heldout_fraction, extra_paths=args.extra,
                      tokenizer_path=getattr(args, "tokenizer", None))
    return TokenData.load(folder)


def _finish(summary: dict, out: str) -> int:
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------- data
def add_data_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="build the corpus, the BPE tokenizer and the token arrays")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--extra", action="append", default=[], metavar="PATH", help="extra text files/dirs (repeatable)")
    p.add_argument("--no-stdlib", action="store_true", help="use only the --extra paths")
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--tokenizer", default=None, help="reuse this tokenizer.json instead of training one")


def cmd_data(args) -> int:
    from gdnspec.train.data import build_dataset

    build_dataset(args.out, vocab_size=args.vocab_size, heldout_fraction=args.heldout_fraction,
                  include_stdlib=not args.no_stdlib, extra_paths=args.extra, tokenizer_path=args.tokenizer)
    return 0


# ---------------------------------------------------------------------------------------------- train
def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a GDN / hybrid target LM")
    _add_data_options(p)
    p.add_argument("--preset", default="default-target", help="config preset (tiny, default-target, default-draft, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="GDNConfig override (repeatable)")
    p.add_argument("--out", required=True, help="checkpoint folder (the best held-out checkpoint is written there)")
    _add_train_options(p, steps=2000, lr=1.5e-3)


def cmd_train(args) -> int:
    import torch

    from gdnspec.models.lm import GDNForCausalLM
    from gdnspec.train.train import count_params, make_config, train_lm

    data = _load_data(args)
    config = make_config(args.preset, data.vocab_size, args.set)
    torch.manual_seed(args.seed)
    model = GDNForCausalLM(config)
    print(f"[train] preset {args.preset}: {count_params(model) / 1e6:.2f}M params, layers {config.layer_types}", flush=True)
    tc = _train_config(args, {"kind": "target", "preset": args.preset, "overrides": args.set,
                              "command": " ".join(sys.argv)})
    summary = train_lm(model, data, tc, out_dir=args.out, device=args.device, name="train",
                       tokenizer=data.tokenizer_path)
    return _finish(summary, args.out)


# ---------------------------------------------------------------------------------------------- distill
def add_distill_parser(subparsers) -> None:
    p = subparsers.add_parser("distill", help="distil a drafter (small LM or EAGLE head) from a trained target")
    p.add_argument("--kind", required=True, choices=["model", "eagle"])
    p.add_argument("--target", required=True, help="target checkpoint folder")
    _add_data_options(p)
    p.add_argument("--out", required=True, help="drafter checkpoint folder")
    p.add_argument("--preset", default="default-draft", help="(--kind model) draft config preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="draft/head GDNConfig override")
    p.add_argument("--ce-weight", type=float, default=0.1, help="(model) weight of the data cross-entropy next to KL")
    p.add_argument("--eagle-intermediate-size", type=int, default=None, help="(eagle) MLP width; default: the target's")
    p.add_argument("--unroll-steps", type=int, default=3, help="(eagle) training-time unroll depth")
    p.add_argument("--reg-weight", type=float, default=0.2, help="(eagle) feature regression weight")
    p.add_argument("--step-decay", type=float, default=0.8, help="(eagle) loss weight decay per unroll step")
    _add_train_options(p, steps=1000, lr=2e-3)


def cmd_distill(args) -> int:
    import torch

    from gdnspec.models.checkpoint import load_checkpoint
    from gdnspec.models.eagle import EagleHead, eagle_config_for
    from gdnspec.models.lm import GDNForCausalLM
    from gdnspec.train.distill import distill_eagle, distill_model
    from gdnspec.train.train import count_params, make_config, resolve_device, _parse_value

    data = _load_data(args)
    target, _ = load_checkpoint(args.target)
    tgt_tok = Path(args.target) / "tokenizer.json"
    if tgt_tok.exists() and tgt_tok.read_text() != data.tokenizer_path.read_text():
        raise SystemExit(f"the target's tokenizer ({tgt_tok}) differs from the data folder's ({data.tokenizer_path})")
    if target.vocab_size != data.vocab_size:
        raise SystemExit(f"target vocab {target.vocab_size} != data vocab {data.vocab_size}")
    device = resolve_device(args.device)
    target.to(device)
    torch.manual_seed(args.seed)
    extra = {"kind": args.kind, "target": str(args.target), "overrides": args.set, "command": " ".join(sys.argv)}
    if args.kind == "model":
        config = make_config(args.preset, data.vocab_size, args.set)
        drafter = GDNForCausalLM(config)
        extra["preset"] = args.preset
    else:
        overrides = dict(item.split("=", 1) for item in args.set)
        config = eagle_config_for(target.config, intermediate_size=args.eagle_intermediate_size,
                                  **{k: _parse_value(v) for k, v in overrides.items()})
        drafter = EagleHead(config)
        extra.update(unroll_steps=args.unroll_steps, reg_weight=args.reg_weight, step_decay=args.step_decay)
    print(f"[distill] {args.kind}: {count_params(drafter) / 1e6:.2f}M params (target {count_params(target) / 1e6:.2f}M)",
          flush=True)
    tc = _train_config(args, extra)
    if args.kind == "model":
        summary = distill_model(target, drafter, data, tc, out_dir=args.out, tokenizer=data.tokenizer_path, device=device,
                                ce_weight=args.ce_weight)
    else:
        summary = distill_eagle(target, drafter, data, tc, out_dir=args.out, tokenizer=data.tokenizer_path,
                                device=device, steps=args.unroll_steps, reg_weight=args.reg_weight,
                                step_decay=args.step_decay)
    return _finish(summary, args.out)


# ---------------------------------------------------------------------------------------------- generate / eval
def _add_model_options(p: argparse.ArgumentParser, *, cuda_dtype: str = "bfloat16") -> None:
    p.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "float16", "bfloat16"],
                   help=f"default: float32 on the CPU, {cuda_dtype} on CUDA")
    p.set_defaults(cuda_dtype=cuda_dtype)


def _load_bundle(args):
    import torch

    import gdnspec

    dtype = args.dtype or (args.cuda_dtype if args.device.startswith("cuda") else "float32")
    return gdnspec.load(args.model, dtype=getattr(torch, dtype), device=args.device)


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="stream text with speculative decoding")
    p.add_argument("--prompt", required=True)
    _add_model_options(p)
    p.add_argument("--drafter", default="ngram",
                   help="ngram (default: the fastest on the shipped model, see the README's eval tables), eagle, model, "
                        "mtp (HF checkpoints with MTP weights) or none (plain decoding)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--topk", type=int, default=4, help="draft tree: children per expanded node")
    p.add_argument("--num-steps", type=int, default=5, help="draft tree: depth")
    p.add_argument("--num-draft-tokens", type=int, default=16, help="draft tree: nodes, root included")
    p.add_argument("--seed", type=int, default=0)


def cmd_generate(args) -> int:
    import time

    import torch

    from gdnspec.sampling import check_sampling_args
    from gdnspec.spec import SpeculativeEngine, TreeConfig

    check_sampling_args(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 0:
        raise SystemExit(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    bundle = _load_bundle(args)
    if bundle.tokenizer is None:
        raise SystemExit(f"{bundle.path} has no tokenizer.json: cannot encode --prompt")
    ids = torch.tensor(bundle.tokenizer.encode(args.prompt).ids, dtype=torch.long)
    if ids.numel() == 0:
        raise SystemExit("--prompt encodes to no tokens")
    eos = bundle.eos_token_id
    shown = [0]
    prompt_text = bundle.tokenizer.decode(ids.tolist())
    sys.stdout.write(prompt_text)

    def show(tokens: list[int]) -> None:  # print the new text as it arrives (decode the whole tail: BPE merges)
        text = bundle.tokenizer.decode(ids.tolist() + tokens)[len(prompt_text):]
        sys.stdout.write(text[shown[0]:])
        sys.stdout.flush()
        shown[0] = len(text)

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    if args.drafter == "none":
        from gdnspec.generate import generate_autoregressive

        gen = torch.Generator().manual_seed(args.seed)
        out = generate_autoregressive(bundle.model, ids[None], args.max_new_tokens, temperature=args.temperature,
                                      eos_token_id=eos, top_k=args.top_k, top_p=args.top_p, generator=gen)[0]
        new = out[ids.numel():].tolist()
        show(new)
        stats = {"mean_accept_length": 1.0, "mean_acceptance_rate": float("nan")}
    else:
        if args.drafter not in bundle.drafters:
            raise SystemExit(f"--drafter {args.drafter!r} is not available for this model; choose from "
                             f"{sorted(bundle.drafters) + ['none']}")
        config = TreeConfig(topk=args.topk, num_steps=args.num_steps, num_draft_tokens=args.num_draft_tokens)
        eng = SpeculativeEngine(bundle.model, bundle.drafters[args.drafter], config, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, generator=torch.Generator().manual_seed(args.seed),
                                static=False)
        session = eng.session()
        (sid,) = session.add([ids], max_new_tokens=args.max_new_tokens, eos_token_id=eos)
        show(session.sequences[sid].new_tokens)
        while session.active:
            session.step()
            show(session.sequences[sid].new_tokens)
        new = session.sequences[sid].new_tokens
        stats = eng.stats.as_dict()
    seconds = time.perf_counter() - start
    print()
    print(f"--- {len(new)} tokens in {seconds:.2f} s: {len(new) / max(seconds, 1e-9):.1f} tokens/s | "
          f"tokens per target forward {stats['mean_accept_length']:.2f} | acceptance rate {stats['mean_acceptance_rate']:.2f}"
          f" | drafter {args.drafter} | {args.device}", file=sys.stderr)
    return 0


def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="drafters x tree shapes on held-out files: tokens/forward and speedup")
    _add_model_options(p, cuda_dtype="float32")  # outputs are compared token for token: bf16 near-ties can flip
    p.add_argument("--drafters", default="ngram,model,eagle")
    p.add_argument("--shapes", default=None, help="comma list of gdnspec.evaluate.SHAPES names (default: all)")
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--out", default="runs/eval", help="folder for eval.json and eval.png")
    p.add_argument("--tag", default=None, help="file name stem (default: eval_<device>)")


def cmd_eval(args) -> int:
    import platform

    import torch

    from gdnspec.evaluate import SHAPES, evaluate, heldout_prompts, plot

    bundle = _load_bundle(args)
    shapes = SHAPES if args.shapes is None else {k: SHAPES[k] for k in args.shapes.split(",")}
    prompts = heldout_prompts(bundle.tokenizer, num_prompts=args.num_prompts, prompt_tokens=args.prompt_tokens)
    res = evaluate(bundle, prompts, drafters=args.drafters.split(","), shapes=shapes, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    res.update(device=dev, torch=torch.__version__, model=str(bundle.path), dtype=str(bundle.model.dtype))
    res["title"] = f"gdnspec eval on {dev}, T={args.temperature}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"eval_{'cuda' if args.device.startswith('cuda') else 'cpu'}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str))
    plotted = plot(res, str(out / f"{stem}.png"))
    print(f"\n{res['title']} | plain decoding {res['baseline']['tokens_per_s']:.1f} tokens/s")
    print(f"{'drafter':7s} | {'shape':9s} | tokens/fwd | accept rate | tokens/s | speedup")
    for r in res["rows"]:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "MISMATCH"
        tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] is not None else "-"
        print(f"{r['drafter']:7s} | {r['shape']:9s} | {r['tokens_per_forward']:10.2f} | {r['acceptance_rate']:11.2f} | {tps:>8s} | {sp}")
    print(f"wrote {out / (stem + '.json')}" + (f" and {out / (stem + '.png')}" if plotted else " (no matplotlib: no plot)"))
    return 0 if all(r["speedup"] is not None for r in res["rows"]) else 1


# ---------------------------------------------------------------------------------------------- entry point
SUBCOMMANDS = [
    ("data", add_data_parser, cmd_data),
    ("train", add_train_parser, cmd_train),
    ("distill", add_distill_parser, cmd_distill),
    ("generate", add_generate_parser, cmd_generate),
    ("eval", add_eval_parser, cmd_eval),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdnspec", description="Tree speculative decoding for Gated DeltaNet LMs")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for _, add, _ in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = {name: cmd for name, _, cmd in SUBCOMMANDS}[args.command]
    return handler(args) or 0


if __name__ == "__main__":
    sys.exit(main())
