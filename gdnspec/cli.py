"""Command line: `gdnspec <subcommand> ...` (or `python -m gdnspec <subcommand> ...`).

    gdnspec data    --out runs/data [--vocab-size 8192] [--extra PATH ...]       corpus + tokenizer + token arrays
    gdnspec train   --data runs/data --preset default-target --out runs/target  train a target LM
    gdnspec distill --kind model|eagle --target runs/target --data runs/data --out runs/draft
    gdnspec generate --prompt "def fib(n):" [--model DIR] [--drafter ngram|eagle|model|mtp|none] [--compare]
    gdnspec eval    [--model DIR] [--device cuda] [--repeats 3] --out runs/eval   drafters x tree shapes vs plain
    gdnspec serve   [--model DIR] [--drafter ngram] [--port 8000] [--max-batch-size 32]   OpenAI-compatible server

Each subcommand is one `add_<name>_parser(subparsers)` + `cmd_<name>(args)` pair registered in SUBCOMMANDS;
add a pair there to add a subcommand. `--help` shows every flag with its default.

User mistakes never end in a traceback: flag values are checked by argparse types (int_at_least, float_in,
device_arg, model_dir_arg, name_list), and what can only be checked later (a drafter the model lacks, a tree the
flags cannot build, a folder that does not load) raises UsageError; both end with ONE line, `gdnspec <command>:
error: <flag>: <what is expected>`, and exit code 2; arguments no parser knows are reported by the subcommand's
parser, with the closest flag. Ctrl-C ends with exit code 130 at any moment (generate first prints the text and
statistics so far): importing this module does not import torch (gdnspec's package imports lazily), so main() is
running, and catching the interrupt, before the slow imports start.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator


# ---------------------------------------------------------------------------------------------- parsing and user errors
class UsageError(Exception):
    """A user mistake found after parsing (a flag whose value cannot work here). main() prints it as one line,
    `gdnspec <command>: error: <message>`, and exits with 2, as argparse does for the mistakes it finds itself."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows '(default: X)' where there is a default worth showing (not for required flags, None or off)."""

    def _get_help_string(self, action):
        off = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if action.required or off or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and errors on ONE line (no usage block): `gdnspec generate: error: ...`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(low: int):
    """argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite number in the interval [low, high] (ends open where asked)."""
    lo = "(" if low_open else "["
    hi = ")" if high_open or high == math.inf else "]"
    if high == math.inf:
        what = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        what = f"a number in {lo}{low:g}, {high:g}{hi}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        bad_low = value <= low if low_open else value < low
        bad_high = value >= high if high_open else value > high
        if not math.isfinite(value) or bad_low or bad_high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def int_in(low: int, high: int, what: str | None = None):
    """argparse type: an integer in [low, high] (`what` describes the range in the error)."""
    what = what or f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


def threads_arg(text: str) -> int:
    """argparse type: a thread count from 1 to the number of CPUs (torch crashes on absurd counts)."""
    cpus = os.cpu_count() or 1
    return int_in(1, cpus, f"an integer from 1 to {cpus} (the CPUs of this machine)")(text)


def path_arg(text: str) -> str:
    """argparse type: a folder to write (or read) that is not a file; not empty (that would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a folder path, got {text!r}")
    if Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is a file (expected a folder)")
    return text


def existing_path_arg(text: str) -> str:
    """argparse type: a file or folder that exists."""
    if not text.strip() or not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist (expected a text file or a folder of them)")
    return text


def existing_file_arg(text: str) -> str:
    """argparse type: a file that exists."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file (expected a tokenizer.json)")
    return text


def file_stem_arg(text: str) -> str:
    """argparse type: a file name without its extension and without folders (eval's --tag)."""
    if not text.strip() or text in (".", "..") or "/" in text or os.sep in text or text.startswith("."):
        raise argparse.ArgumentTypeError(f"expected a file name such as eval_cpu (no folders, not hidden), got "
                                         f"{text!r}; the folder is --out")
    return text


def device_arg(text: str) -> str:
    """argparse type: cpu, cuda or cuda:N, and CUDA only where it is available."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but CUDA is not available here "
                                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but this machine has {torch.cuda.device_count()} "
                                             f"CUDA device(s)")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def model_dir_arg(text: str) -> str:
    """argparse type: an existing model folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a model folder, got {text!r} (leave --model out for the embedded "
                                         f"default model)")
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist (expected a model folder)")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder (expected a model folder with config.json)")
    return text


def name_list(valid: list[str] | Callable[[], list[str]]):
    """argparse type: a comma list of names, each one of `valid` (a list, or a function giving it when parsed)."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        choices = valid() if callable(valid) else valid
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown name(s) {', '.join(bad) or repr(text)}; expected a comma list of "
                                             f"{', '.join(choices)}")
        return names

    parse.__name__ = "names"
    return parse


def one_of(valid: Callable[[], list[str]]):
    """argparse type: one name of valid() (a function, so that the list is read only when parsing)."""
    def parse(text: str) -> str:
        choices = valid()
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown name {text!r}; expected one of {', '.join(choices)}")
        return text

    parse.__name__ = "name"
    return parse


def key_value(text: str) -> str:
    """argparse type: KEY=VALUE."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a GDNConfig field), got {text!r}")
    return text


def train_device_arg(text: str) -> str:
    """argparse type: auto, or what device_arg accepts."""
    return text if text == "auto" else device_arg(text)


def _presets() -> list[str]:
    from gdnspec.train.train import PRESETS

    return sorted(PRESETS)


POSITIVE_INT = int_at_least(1)
NON_NEGATIVE_INT = int_at_least(0)
POSITIVE_FLOAT = float_in(0.0, low_open=True)
NON_NEGATIVE_FLOAT = float_in(0.0)
SEED = int_in(-(2 ** 63), 2 ** 64 - 1, "an integer from -2**63 to 2**64 - 1")


# ---------------------------------------------------------------------------------------------- shared options
def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=path_arg, default="runs/data",
                   help="dataset folder (built from the stdlib when missing)")
    p.add_argument("--vocab-size", type=int_at_least(2), default=8192,
                   help="tokenizer vocabulary when the data folder is built")
    p.add_argument("--extra", type=existing_path_arg, action="append", default=[], metavar="PATH",
                   help="extra text files/dirs for the corpus when the data folder is built (repeatable)")
    p.add_argument("--heldout-fraction", type=float_in(0.0, 1.0, high_open=True), default=0.05,
                   help="share of the files (by name hash) held out for evaluation")


def _add_train_options(p: argparse.ArgumentParser, *, steps: int, lr: float, batch_size: int = 32) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=POSITIVE_INT, default=steps, help="optimizer steps (upper bound with --time-budget)")
    g.add_argument("--time-budget", type=NON_NEGATIVE_FLOAT, default=0.0,
                   help="seconds; > 0 ends training (and the schedule) then, 0 = no limit")
    g.add_argument("--batch-size", type=POSITIVE_INT, default=batch_size, help="sequences per optimizer step")
    g.add_argument("--seq-len", type=int_at_least(2), default=512, help="tokens per training sequence")
    g.add_argument("--lr", type=POSITIVE_FLOAT, default=lr, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float_in(0.0, 1.0), default=0.1, help="final learning rate / peak")
    g.add_argument("--warmup-steps", type=NON_NEGATIVE_INT, default=100, help="linear warmup steps")
    g.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=0.1, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=NON_NEGATIVE_FLOAT, default=1.0, help="gradient norm clip (0 = off)")
    g.add_argument("--eval-every", type=NON_NEGATIVE_INT, default=0,
                   help="steps between held-out evals (best one is kept); 0 = at the end only")
    g.add_argument("--eval-tokens", type=POSITIVE_INT, default=200_000, help="held-out tokens per eval")
    g.add_argument("--log-every", type=POSITIVE_INT, default=10, help="steps between log lines")
    g.add_argument("--seed", type=SEED, default=0, help="random seed")
    g.add_argument("--device", type=train_device_arg, default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    g.add_argument("--autocast", default="auto", choices=["auto", "bf16", "none"], help="auto = bf16 on CUDA only")
    g.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the saved weights")


def _train_config(args, extra: dict):
    from gdnspec.train.train import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                       min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                       grad_clip=args.grad_clip, time_budget=args.time_budget, eval_every=args.eval_every,
                       eval_tokens=args.eval_tokens, log_every=args.log_every, seed=args.seed, save_dtype=args.save_dtype,
                       autocast=args.autocast, extra=extra)


def _refuse_draft_vocab_set(args) -> None:
    """--set draft_vocab_size=N made a head drafting over the placeholder ids 0..N-1 (a model: a field nothing reads)."""
    if any(item.partition("=")[0].strip() == "draft_vocab_size" for item in args.set):
        raise UsageError("--set: draft_vocab_size is chosen from the data: use `gdnspec distill --kind eagle "
                         "--draft-vocab N` (the N most frequent tokens of --data)")


def _make_config(args, vocab_size: int):
    """make_config(--preset, vocab_size, --set); a config it rejects is a --set usage error."""
    from gdnspec.train.train import make_config

    _refuse_draft_vocab_set(args)
    if any(item.partition("=")[0].strip() == "vocab_size" for item in args.set):
        raise UsageError("--set: vocab_size comes from the --data folder's tokenizer (give --vocab-size when the data "
                         "folder is built)")
    try:
        return make_config(args.preset, vocab_size, args.set)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--set: {e}") from None


def _load_data(args):
    from gdnspec.train.data import TokenData, build_dataset

    folder = Path(args.data)
    if not (folder / "train.npy").exists():
        build_dataset(folder, vocab_size=args.vocab_size, heldout_fraction=args.heldout_fraction, extra_paths=args.extra,
                      tokenizer_path=getattr(args, "tokenizer", None))
    data = TokenData.load(folder)
    T = args.seq_len  # an empty held-out split crashed distillation (ZeroDivisionError) and made train's best silent
    if data.train.size < T + 2:
        raise UsageError(f"--data: {folder} has {data.train.size:,} train tokens, fewer than --seq-len + 2 = {T + 2}: "
                         f"lower --seq-len or add files to the corpus")
    if data.heldout.size < T + 1:
        raise UsageError(f"--data: {folder} has {data.heldout.size:,} held-out tokens, fewer than --seq-len + 1 = "
                         f"{T + 1} (one evaluation window; the checkpoint kept is the best on held-out text): rebuild "
                         f"it with more files or a larger --heldout-fraction (files are held out by a hash of their "
                         f"names), or lower --seq-len")
    return data


def _finish(summary: dict, out: str) -> int:
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------- data
def add_data_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="build the corpus, the BPE tokenizer and the token arrays")
    p.add_argument("--out", type=path_arg, required=True, help="dataset folder to write")
    p.add_argument("--vocab-size", type=int_at_least(2), default=8192, help="tokenizer vocabulary")
    p.add_argument("--extra", type=existing_path_arg, action="append", default=[], metavar="PATH",
                   help="extra text files/dirs (repeatable)")
    p.add_argument("--no-stdlib", action="store_true", help="use only the --extra paths")
    p.add_argument("--heldout-fraction", type=float_in(0.0, 1.0, high_open=True), default=0.05,
                   help="share of the files (by name hash) held out for evaluation")
    p.add_argument("--tokenizer", type=existing_file_arg, default=None,
                   help="reuse this tokenizer.json instead of training one")


def cmd_data(args) -> int:
    from gdnspec.train.data import build_dataset

    if args.no_stdlib and not args.extra:
        raise UsageError("--no-stdlib: the corpus then comes from --extra PATH only; give at least one")
    try:
        build_dataset(args.out, vocab_size=args.vocab_size, heldout_fraction=args.heldout_fraction,
                      include_stdlib=not args.no_stdlib, extra_paths=args.extra, tokenizer_path=args.tokenizer)
    except ValueError as e:  # no documents in the --extra paths, a tokenizer that does not fit...
        raise UsageError(f"--extra/--tokenizer: {e}") from None
    return 0


# ---------------------------------------------------------------------------------------------- train
def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a GDN / hybrid target LM")
    _add_data_options(p)
    p.add_argument("--preset", type=one_of(_presets), default="default-target",
                   help="config preset (tiny, default-target, default-draft, ...)")
    p.add_argument("--set", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="GDNConfig override (repeatable)")
    p.add_argument("--out", type=path_arg, required=True,
                   help="checkpoint folder (the best held-out checkpoint is written there)")
    _add_train_options(p, steps=2000, lr=1.5e-3)


def cmd_train(args) -> int:
    import torch

    from gdnspec.models.lm import GDNForCausalLM
    from gdnspec.train.train import count_params, train_lm

    _make_config(args, args.vocab_size)  # a bad --set fails now, not after the data folder is built
    data = _load_data(args)
    config = _make_config(args, data.vocab_size)
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
    p.add_argument("--target", type=model_dir_arg, required=True, help="target checkpoint folder")
    _add_data_options(p)
    p.add_argument("--out", type=path_arg, required=True, help="drafter checkpoint folder")
    p.add_argument("--preset", type=one_of(_presets), default=None,
                   help="(--kind model) draft config preset (default: default-draft)")
    p.add_argument("--set", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="draft/head GDNConfig override (repeatable)")
    p.add_argument("--init", type=model_dir_arg, default=None, metavar="FOLDER",
                   help="start from this drafter checkpoint of the same --kind (continue a distillation; its config "
                        "is used, so --preset, --set and --eagle-intermediate-size must be left out)")
    p.add_argument("--ce-weight", type=NON_NEGATIVE_FLOAT, default=0.1,
                   help="(model) weight of the data cross-entropy next to KL")
    p.add_argument("--eagle-intermediate-size", type=POSITIVE_INT, default=None,
                   help="(eagle) MLP width; default: the target's")
    p.add_argument("--unroll-steps", type=POSITIVE_INT, default=3, help="(eagle) training-time unroll depth")
    p.add_argument("--reg-weight", type=NON_NEGATIVE_FLOAT, default=0.2, help="(eagle) feature regression weight")
    p.add_argument("--step-decay", type=POSITIVE_FLOAT, default=0.8, help="(eagle) loss weight decay per unroll step")
    p.add_argument("--draft-vocab", type=POSITIVE_INT, default=None, metavar="N",
                   help="(eagle) draft over the N most frequent tokens of --data only (EAGLE-3's draft_vocab_size; "
                        "stored with the head; lossless): a cheaper lm_head per drafting step")
    _add_train_options(p, steps=1000, lr=2e-3)


def _drafter_config(args, target):
    """The config of the drafter to distil (--kind, --preset, --set, --eagle-intermediate-size) for `target`; a
    config it cannot make is a --set usage error."""
    from gdnspec.models.eagle import eagle_config_for
    from gdnspec.train.train import _parse_value

    if args.kind == "model":
        return _make_config(args, target.vocab_size)  # the --data folder's vocabulary is checked to match
    _refuse_draft_vocab_set(args)
    overrides = dict(item.split("=", 1) for item in args.set)
    try:
        return eagle_config_for(target.config, intermediate_size=args.eagle_intermediate_size,
                                **{k.strip(): _parse_value(v.strip()) for k, v in overrides.items()})
    except (ValueError, TypeError) as e:
        raise UsageError(f"--set: {e}") from None


def _init_drafter(args, target):
    """The --init checkpoint (float32, trainable) after checking that it fits --kind and the target."""
    import torch

    from gdnspec.models.checkpoint import load_checkpoint
    from gdnspec.models.eagle import EagleHead
    from gdnspec.models.lm import GDNForCausalLM

    given = [flag for flag, v in (("--preset", args.preset), ("--set", args.set),
                                  ("--eagle-intermediate-size", args.eagle_intermediate_size)) if v]
    if given:
        raise UsageError(f"--init: the checkpoint's config is used; leave out {', '.join(given)}")
    try:
        drafter, _ = load_checkpoint(args.init, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--init: cannot load {args.init}: {e}") from None
    want = GDNForCausalLM if args.kind == "model" else EagleHead
    if type(drafter) is not want:
        raise UsageError(f"--init: {args.init} holds a {type(drafter).__name__}, --kind {args.kind} needs a "
                         f"{want.__name__}")
    if drafter.config.vocab_size != target.vocab_size:
        raise UsageError(f"--init: {args.init} has a vocabulary of {drafter.config.vocab_size}, the target "
                         f"{target.vocab_size}")
    if args.kind == "eagle" and drafter.config.hidden_size != target.config.hidden_size:
        raise UsageError(f"--init: {args.init} has hidden size {drafter.config.hidden_size}, the target "
                         f"{target.config.hidden_size}")
    return drafter.requires_grad_(True)


def cmd_distill(args) -> int:
    import torch

    from gdnspec.models.checkpoint import load_checkpoint
    from gdnspec.models.eagle import EagleHead
    from gdnspec.models.lm import GDNForCausalLM
    from gdnspec.train.distill import distill_eagle, distill_model
    from gdnspec.train.train import count_params, resolve_device

    try:
        target, _ = load_checkpoint(args.target)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--target: cannot load {args.target}: {e}") from None
    if args.draft_vocab is not None and args.kind != "eagle":
        raise UsageError(f"--draft-vocab: a reduced draft vocabulary is for --kind eagle heads, got --kind {args.kind}")
    if args.draft_vocab is not None and args.draft_vocab > target.vocab_size:
        raise UsageError(f"--draft-vocab: at most the target's vocabulary ({target.vocab_size}), got {args.draft_vocab}")
    init = _init_drafter(args, target) if args.init is not None else None
    args.preset = args.preset or "default-draft"
    config = init.config if init is not None else _drafter_config(args, target)  # a bad --set fails now
    data = _load_data(args)
    tgt_tok = Path(args.target) / "tokenizer.json"
    if tgt_tok.exists() and tgt_tok.read_text() != data.tokenizer_path.read_text():
        raise UsageError(f"--target: its tokenizer ({tgt_tok}) differs from the --data folder's ({data.tokenizer_path})")
    if target.vocab_size != data.vocab_size:
        raise UsageError(f"--target: its vocabulary ({target.vocab_size}) differs from the --data folder's "
                         f"({data.vocab_size})")
    device = resolve_device(args.device)
    target.to(device)
    torch.manual_seed(args.seed)
    extra = {"kind": args.kind, "target": str(args.target), "overrides": args.set, "command": " ".join(sys.argv)}
    if init is not None:
        extra["init"] = str(args.init)
    if args.kind == "model":
        drafter = init if init is not None else GDNForCausalLM(config)
        extra["preset"] = args.preset if init is None else None
    else:
        drafter = init if init is not None else EagleHead(config)
        extra.update(unroll_steps=args.unroll_steps, reg_weight=args.reg_weight, step_decay=args.step_decay)
        if args.draft_vocab is not None:
            drafter.set_draft_vocab(data.frequent_tokens(args.draft_vocab))
            extra["draft_vocab"] = args.draft_vocab
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
DRAFTERS = ["ngram", "eagle", "model", "mtp"]  # what gdnspec.load can attach (mtp: HF checkpoints with MTP weights)
SMALL_MODEL_PARAMS = 100_000_000  # CPU thread rule: below this, one thread (see choose_threads)


def _add_model_options(p: argparse.ArgumentParser, *, cuda_dtype: str = "bfloat16") -> None:
    p.add_argument("--model", type=model_dir_arg, default=None, help="model folder (default: the embedded default model)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:1 ...")
    auto = "float32" if cuda_dtype == "float32" else f"float32 on the CPU, {cuda_dtype} on CUDA"
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"], help=f"auto = {auto}")
    p.add_argument("--mamba-ssm-cache-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the GDN layers' recurrent states (vLLM's flag): a 16-bit state halves their "
                        "memory and bytes per step (the maths stays float32); greedy speculative output may then "
                        "differ from plain decoding at near-ties. float64 models keep float64")
    p.add_argument("--threads", type=threads_arg, default=None,
                   help="CPU threads for torch (default: 1 for models under 100M parameters on the CPU, else torch's "
                        "default; OMP_NUM_THREADS, when set, is respected)")
    p.add_argument("--enable-torch-compile", action="store_true",
                   help="CPU: run the drafters' expansions (draft model, EAGLE head) and GDN-only models' decode steps "
                        "compiled by torch.compile (SGLang's flag; same as GDNSPEC_CPU_COMPILE=1): ~1.4-2x cheaper "
                        "expansions on 2 cores; each new batch size compiles once for a few seconds (cached on disk). "
                        "No effect on CUDA (CUDA graphs)")
    p.set_defaults(cuda_dtype=cuda_dtype)


def choose_threads(requested: int | None, device: str, num_params: int) -> int | None:
    """The torch thread count to set, or None to keep torch's. The rule: --threads wins; otherwise, on the CPU, a model
    under SMALL_MODEL_PARAMS runs on 1 thread (its ops are too small to gain from more, and it collapses when another
    process wants the cores), unless OMP_NUM_THREADS says otherwise; larger models and CUDA keep torch's default."""
    if requested is not None:
        return requested
    if not device.startswith("cpu") or os.environ.get("OMP_NUM_THREADS"):
        return None
    return 1 if num_params < SMALL_MODEL_PARAMS else None


def _apply_threads(args, model) -> int:
    import torch

    n = choose_threads(args.threads, args.device, sum(p.numel() for p in model.parameters()))
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _load_bundle(args):
    """gdnspec.load with the CLI's flags; a folder that cannot be loaded is a --model error (exit 2)."""
    import torch

    import gdnspec

    dtype = args.dtype if args.dtype != "auto" else (args.cuda_dtype if args.device.startswith("cuda") else "float32")
    try:
        bundle = gdnspec.load(args.model, dtype=getattr(torch, dtype), device=args.device)
    except (OSError, ValueError, KeyError) as e:  # missing / unreadable files, bad config or weights
        where = args.model or "the embedded default model"
        raise UsageError(f"--model: cannot load {where}: {e}") from None
    bundle.model.mamba_ssm_cache_dtype = args.mamba_ssm_cache_dtype  # the target's states (drafters keep theirs)
    return bundle


def _drafter(bundle, name: str, flag: str = "--drafter"):
    """The bundle's drafter `name` (None for 'none'); a drafter this model does not have is a usage error of `flag`."""
    if name == "none":
        return None
    if name not in bundle.drafters:
        names = sorted(bundle.drafters) + (["none"] if flag == "--drafter" else [])
        why = f" ({bundle.skipped[name]})" if name in getattr(bundle, "skipped", {}) else ""
        raise UsageError(f"{flag}: {name!r} is not available for this model{why}; choose from {', '.join(names)}")
    return bundle.drafters[name]


def _tree_config(args):
    """The draft tree of --speculative-* (None for --drafter none), checked with the flags' own names."""
    if args.drafter == "none":
        return None
    from gdnspec.spec import TreeConfig

    if args.num_steps >= args.num_draft_tokens:  # deeper drafting than the tree can keep only costs time
        raise UsageError(f"--speculative-num-steps: {args.num_steps} steps are deeper than a tree of "
                         f"--speculative-num-draft-tokens {args.num_draft_tokens} nodes (root included) can reach: at "
                         f"most {args.num_draft_tokens - 1}")
    cap = TreeConfig(topk=args.topk, num_steps=args.num_steps).max_nodes()
    if args.num_draft_tokens > cap:
        raise UsageError(f"--speculative-num-draft-tokens: {args.num_draft_tokens} is more than the {args.drafter} "
                         f"drafter's tree can hold: with --speculative-eagle-topk {args.topk} and "
                         f"--speculative-num-steps {args.num_steps} it has at most {cap} nodes (root included)")
    return TreeConfig(topk=args.topk, num_steps=args.num_steps, num_draft_tokens=args.num_draft_tokens)


def _check_tree_fits(args, model) -> None:
    """--speculative-eagle-topk against the model's vocabulary (known once the model is loaded)."""
    if args.drafter != "none" and args.topk > model.vocab_size:
        raise UsageError(f"--speculative-eagle-topk: {args.topk} children per tree node is more than this model's "
                         f"vocabulary ({model.vocab_size} tokens)")


def _stop_ids(eos) -> set[int]:
    """eos_token_id (None, an id, or a list of ids) as a set."""
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple, set)) else {int(eos)}


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="stream text with speculative decoding")
    p.add_argument("--prompt", required=True, help="text to continue")
    _add_model_options(p)
    _add_drafter_option(p)
    p.add_argument("--max-new-tokens", type=NON_NEGATIVE_INT, default=200, help="tokens to generate at most")
    p.add_argument("--compare", action="store_true",
                   help="then run plain decoding of the same prompt with the same settings and print the measured "
                        "speedup of the decode phase")
    s = p.add_argument_group("sampling (a flag left out takes the model's default: its generation_config.json's "
                             "value with do_sample true, else greedy decoding; the stats line shows what was used)")
    s.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=None,
                   help="0 = greedy (default: the model's; greedy unless its generation_config.json sets do_sample)")
    s.add_argument("--top-k", type=POSITIVE_INT, default=None,
                   help="sample from the k most likely tokens (default: the model's; off unless its "
                        "generation_config.json sets do_sample)")
    s.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=None,
                   help="nucleus sampling mass in (0, 1] (default: the model's; off unless its generation_config.json "
                        "sets do_sample)")
    s.add_argument("--seed", type=SEED, default=0, help="random seed for sampling")
    _add_tree_options(p)


def _add_drafter_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter", default="ngram", choices=DRAFTERS + ["none"],
                   help="ngram (default: the fastest on the shipped model, see the README's eval tables), eagle, model, "
                        "mtp (HF checkpoints with MTP weights) or none (plain decoding)")


def _add_tree_options(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("draft tree (SGLang's flag names; --topk, --num-steps, --num-draft-tokens are aliases)")
    t.add_argument("--speculative-eagle-topk", "--topk", dest="topk", type=POSITIVE_INT, default=4, metavar="K",
                   help="children per expanded tree node (not sampling's --top-k)")
    t.add_argument("--speculative-num-steps", "--num-steps", dest="num_steps", type=POSITIVE_INT, default=5, metavar="S",
                   help="tree depth: drafting steps per target forward")
    t.add_argument("--speculative-num-draft-tokens", "--num-draft-tokens", dest="num_draft_tokens", type=int_at_least(2),
                   default=16, metavar="N", help="tree nodes verified per target forward, root included")


class _Timing:
    """Compute time of one generation: the clock runs only while the model works (printing is left out)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.first_s: float | None = None  # time to the first token (prefill + first sample)
        self.total_s = 0.0
        self.interrupted = False

    def record(self, tokens: list[int], elapsed: float) -> None:
        self.tokens = list(tokens)
        self.total_s = elapsed
        if self.first_s is None and tokens:
            self.first_s = elapsed

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first per second after the first; None with fewer than 2 tokens."""
        if len(self.tokens) < 2 or self.first_s is None or self.total_s <= self.first_s:
            return None
        return (len(self.tokens) - 1) / (self.total_s - self.first_s)


def _drive(stream: Iterator[list[int]], on_tokens: Callable[[list[int]], None]) -> _Timing:
    """Run a token stream (each item: all new tokens so far) to its end or to Ctrl-C, timing the model's work."""
    timing = _Timing()
    elapsed, clock = 0.0, time.perf_counter()
    try:
        for tokens in stream:
            elapsed += time.perf_counter() - clock
            timing.record(tokens, elapsed)
            on_tokens(tokens)
            clock = time.perf_counter()
    except KeyboardInterrupt:
        timing.interrupted = True
    return timing


_STATIC_DECODERS = None  # weakref.WeakKeyDictionary: model -> {max_len: StaticDecoder} (this process's own)


def _static_decoder(model, max_len: int):
    """A batch-1 static decode step (a CUDA graph on the GPU), kept per model and capacity, so that --compare's
    warm-up captures the graph once."""
    global _STATIC_DECODERS
    import weakref

    from gdnspec.runtime import StaticDecoder

    if _STATIC_DECODERS is None:
        _STATIC_DECODERS = weakref.WeakKeyDictionary()
    per_model = _STATIC_DECODERS.setdefault(model, {})
    if max_len not in per_model or not per_model[max_len].current():  # rebuilt when the weights changed since
        per_model.pop(max_len, None)
        per_model[max_len] = StaticDecoder(model, batch_size=1, max_len=max_len)
    return per_model[max_len]


def _plain_stream(model, ids, max_new_tokens: int, eos, sampling: dict, generator, *, capacity: int | None = None,
                  static: bool | None = None) -> Iterator[list[int]]:
    """Plain decoding token by token, as generate_autoregressive decodes (so the same tokens): eager steps on the CPU,
    static graph-replayed steps on CUDA (static=None). capacity: prompt + new tokens the static KV must hold."""
    import torch

    from gdnspec.generate import check_finite, prefill
    from gdnspec.sampling import sample_next

    if max_new_tokens == 0:
        return
    stop = _stop_ids(eos)
    state, logits, _ = prefill(model, [ids])
    check_finite(logits)
    if static is None:
        static = model.device.type == "cuda"
    if static:
        capacity = capacity or ids.numel() + max_new_tokens
        decoder = _static_decoder(model, -(-(capacity + 1) // 256) * 256)
        decoder.load(state)

        def step(tok: int):
            return decoder.step(torch.tensor([tok], device=model.device))[:1]
    else:
        def step(tok: int):
            return model(torch.tensor([[tok]], device=model.device), state, logits_to_keep=1).logits[:, -1]
    new: list[int] = []
    while True:
        tok = int(sample_next(logits, generator=generator, **sampling)[0])
        new.append(tok)
        yield new
        if len(new) >= max_new_tokens or tok in stop:
            return
        logits = step(tok)


def _spec_stream(engine, ids, max_new_tokens: int, eos) -> Iterator[list[int]]:
    """Speculative decoding one verify step at a time (the first item comes from the prefill)."""
    session = engine.session()
    (sid,) = session.add([ids], max_new_tokens=max_new_tokens, eos_token_id=[eos])
    seq = session.sequences[sid]
    if seq.new_tokens:
        yield seq.new_tokens
    while session.active:
        session.step()
        yield seq.new_tokens


class _Printer:
    """Streams new text to stdout as tokens arrive (decodes the whole tail each time: BPE merges across tokens).

    A character whose bytes span several tokens (emoji, CJK, Cyrillic in byte-level BPE) decodes to U+FFFD until its
    last byte arrives: trailing U+FFFD are held back until the text after them is known, or until finish()."""

    def __init__(self, tokenizer, ids: list[int]):
        self.tokenizer, self.ids = tokenizer, ids
        self.prompt_text = tokenizer.decode(ids)
        self.shown = 0
        self.text = ""

    def start(self) -> None:
        sys.stdout.write(self.prompt_text)
        sys.stdout.flush()

    def __call__(self, tokens: list[int]) -> None:
        self.text = self.tokenizer.decode(self.ids + tokens)[len(self.prompt_text):]
        self._write(self.text.rstrip("\ufffd"))

    def finish(self) -> None:
        """Write what was held back (a character the generation ended in the middle of shows as U+FFFD)."""
        self._write(self.text)

    def _write(self, text: str) -> None:
        sys.stdout.write(text[self.shown:])
        sys.stdout.flush()
        self.shown = max(self.shown, len(text))


def _fmt(value: float | None, fmt: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{unit}"


def _speed_report(timing: _Timing, prompt_len: int, max_new_tokens: int) -> str:
    """'N new tokens | first token X s | decode Y tokens/s' (n/a where there is nothing to measure)."""
    n = len(timing.tokens)
    if n == 0:
        why = " (--max-new-tokens 0)" if max_new_tokens == 0 else ""
        return f"no tokens generated{why}, prompt {prompt_len} tokens | first token n/a | decode n/a"
    decode = _fmt(timing.decode_tokens_per_s, ".1f", " tokens/s") if n > 1 else "n/a (1 token)"
    return (f"{n} new token{'s' if n > 1 else ''} (prompt {prompt_len}) | first token {timing.first_s:.3f} s | "
            f"decode {decode}")


def _accept_report(engine, num_tokens: int) -> str:
    """Tokens per target forward and acceptance rate (n/a where nothing was verified)."""
    if engine is None:
        per_forward = "1.00" if num_tokens else "n/a"
        return f"tokens per target forward {per_forward} (plain decoding) | acceptance rate n/a"
    st = engine.stats.as_dict()
    if st["total_row_steps"] == 0:
        return "tokens per target forward n/a | acceptance rate n/a (no verify step ran)"
    return (f"tokens per target forward {st['mean_accept_length']:.2f} | "
            f"acceptance rate {st['mean_acceptance_rate']:.2f}")


def _sampling_report(sampling: dict, args, from_model: list[str]) -> str:
    """The sampling settings used: 'greedy' or 'temperature T, top-k K, top-p P', saying which values came from the
    model's generation_config.json (from_model: their flags) and which given flags greedy decoding leaves unused."""
    if sampling["temperature"] == 0:
        unused = [flag for flag, key in (("--top-k", "top_k"), ("--top-p", "top_p")) if getattr(args, key) is not None]
        text = "greedy" + (f" ({' and '.join(unused)} unused at temperature 0)" if unused else "")
    else:
        text = ", ".join([f"temperature {sampling['temperature']:g}",
                          "top-k off" if sampling["top_k"] is None else f"top-k {sampling['top_k']}",
                          "top-p off" if sampling["top_p"] is None else f"top-p {sampling['top_p']:g}"])
    if from_model:
        text += f" ({', '.join(from_model)} from the model's generation_config.json)"
    return text


def _compare_report(spec: _Timing, plain: _Timing, drafter: str, greedy: bool) -> str:
    """The plain run's figures and the speculative decode-phase speedup over it."""
    a, b = spec.decode_tokens_per_s, plain.decode_tokens_per_s
    speedup = f"{a / b:.2f}x" if a and b else "n/a (fewer than 2 tokens)"
    same = (", same output" if spec.tokens == plain.tokens else ", OUTPUTS DIFFER") if greedy else ""
    return (f"--- plain decoding: first token {_fmt(plain.first_s, '.3f', ' s')} | decode "
            f"{_fmt(b, '.1f', ' tokens/s')} | speculative ({drafter}) decode speedup over plain: {speedup}{same}")


def _sampling_from_model(args, generation_config: dict, sampling: dict) -> list[str]:
    """The sampling flags left out whose value came from generation_config.json (do_sample true): --temperature, and
    --top-k / --top-p where they are used (temperature > 0) and on."""
    if generation_config.get("do_sample") is not True:
        return []
    used = {"temperature": True, "top_k": sampling["temperature"] > 0 and sampling["top_k"] is not None,
            "top_p": sampling["temperature"] > 0 and sampling["top_p"] is not None}
    flags = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p"}
    return [flags[k] for k in flags if getattr(args, k) is None and used[k]]


class _Generation:
    """The decoding runs of one `gdnspec generate`: the chosen one (streamed) and, for --compare, plain decoding of
    the same prompt with the same settings."""

    def __init__(self, args, bundle, drafter, config, ids: list[int]):
        import torch

        from gdnspec.spec import SpeculativeEngine

        self.args, self.bundle, self.model, self.ids = args, bundle, bundle.model, ids
        self.prompt = torch.tensor(ids, dtype=torch.long)
        self.eos = bundle.eos_token_id
        self.sampling = bundle.sampling_args(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        self.from_model = _sampling_from_model(args, bundle.generation_config, self.sampling)
        self.engine = None
        if drafter is not None:  # eager steps, so that the text streams step by step
            self.engine = SpeculativeEngine(bundle.model, drafter, config, static=False, **self.sampling)

    def plain(self, max_new_tokens: int | None = None) -> Iterator[list[int]]:
        import torch

        gen = torch.Generator(device=self.model.device).manual_seed(self.args.seed)
        n = self.args.max_new_tokens if max_new_tokens is None else max_new_tokens
        return _plain_stream(self.model, self.prompt, n, self.eos, self.sampling, gen,
                             capacity=len(self.ids) + self.args.max_new_tokens)

    def speculative(self, max_new_tokens: int | None = None) -> Iterator[list[int]]:
        import torch

        self.engine.generator = torch.Generator().manual_seed(self.args.seed)
        n = self.args.max_new_tokens if max_new_tokens is None else max_new_tokens
        return _spec_stream(self.engine, self.prompt, n, self.eos)

    def chosen(self) -> Iterator[list[int]]:
        return self.plain() if self.engine is None else self.speculative()

    def run(self, stream: Iterator[list[int]], on_tokens: Callable[[list[int]], None] = lambda tokens: None) -> _Timing:
        import torch

        torch.manual_seed(self.args.seed)
        with torch.inference_mode():
            return _drive(stream, on_tokens)

    def warm_up(self) -> None:
        """A few tokens of both decodings first: first calls pay one-time costs, and --compare times both alike."""
        warm = min(self.args.max_new_tokens, 8)
        for stream in (self.speculative(warm), self.plain(warm)):
            if self.run(stream).interrupted:
                raise KeyboardInterrupt
        self.engine.stats = type(self.engine.stats)()


def _encode_prompt(bundle, text: str) -> list[int]:
    if bundle.tokenizer is None:
        raise UsageError(f"--model: {bundle.path} has no tokenizer.json: cannot encode --prompt")
    ids = bundle.tokenizer.encode(text).ids
    if not ids:
        raise UsageError("--prompt: encodes to no tokens")
    return ids


def _prepare_generation(args) -> tuple[_Generation, int]:
    """Check the flags, load the model and build the decoding runs (warmed up for --compare); -> (runs, threads)."""
    if args.compare and args.drafter == "none":
        raise UsageError("--compare: compares a speculative --drafter with plain decoding; --drafter none is plain "
                         "decoding already")
    config = _tree_config(args)  # every flag is checked before the model loads and before anything is printed
    bundle = _load_bundle(args)
    _check_tree_fits(args, bundle.model)
    threads = _apply_threads(args, bundle.model)
    drafter = _drafter(bundle, args.drafter)
    ids = _encode_prompt(bundle, args.prompt)
    gen = _Generation(args, bundle, drafter, config, ids)
    if args.compare:
        gen.warm_up()
    return gen, threads


def _non_finite_error(args, error: FloatingPointError) -> UsageError:
    """A model whose logits are NaN / inf (broken weights, or float16 overflow) as a --model / --dtype error."""
    where = args.model or "the embedded default model"
    return UsageError(f"--model: {where}: {error} (with --dtype {args.dtype}; try --dtype float32)")


def _stats_line(gen: _Generation, timing: _Timing, threads: int) -> str:
    """The statistics line after the streamed text (it ends with the thread count, which the README's measuring
    command reads)."""
    args = gen.args
    state = "--- interrupted: " if timing.interrupted else "--- "
    return (f"{state}{_speed_report(timing, len(gen.ids), args.max_new_tokens)} | "
            f"{_accept_report(gen.engine, len(timing.tokens))} | {_sampling_report(gen.sampling, args, gen.from_model)} | "
            f"drafter {args.drafter} | {args.device}, {threads} thread{'s' if threads > 1 else ''}")


def cmd_generate(args) -> int:
    try:
        gen, threads = _prepare_generation(args)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("before the first token (while loading the model or warming up): nothing was "
                                "generated") from None
    except FloatingPointError as e:
        raise _non_finite_error(args, e) from None
    printer = _Printer(gen.bundle.tokenizer, gen.ids)
    printer.start()
    try:
        timing = gen.run(gen.chosen(), printer)
    except FloatingPointError as e:
        print()  # end the echoed prompt's line, so that the error stands on its own line
        raise _non_finite_error(args, e) from None
    printer.finish()
    print()
    print(_stats_line(gen, timing, threads), file=sys.stderr)
    if timing.interrupted:
        return 130
    if args.compare:
        base = gen.run(gen.plain())
        if base.interrupted:
            print("--- plain decoding interrupted: no comparison", file=sys.stderr)
            return 130
        print(_compare_report(timing, base, args.drafter, gen.sampling["temperature"] == 0), file=sys.stderr)
    return 0


def add_eval_parser(subparsers) -> None:
    from_shapes = lambda: list(__import__("gdnspec.evaluate", fromlist=["SHAPES"]).SHAPES)  # noqa: E731 (lazy)
    p = subparsers.add_parser("eval", help="drafters x tree shapes on held-out files: tokens/forward and speedup")
    _add_model_options(p, cuda_dtype="float32")  # outputs are compared token for token: bf16 near-ties can flip
    p.add_argument("--drafters", type=name_list(DRAFTERS), default=None,
                   help="comma list of drafters (default: every drafter the model has, e.g. ngram,model,eagle for the "
                        "embedded model, ngram,mtp for a Hugging Face folder with MTP weights)")
    p.add_argument("--shapes", type=name_list(from_shapes), default=None,
                   help="comma list of tree shapes: chain-4, chain-6, tree-2x5, tree-4x5, tree-8x6 (default: all)")
    p.add_argument("--num-prompts", type=POSITIVE_INT, default=6, help="held-out files used as prompts")
    p.add_argument("--prompt-tokens", type=POSITIVE_INT, default=128, help="tokens of each prompt")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=128, help="tokens generated per prompt")
    p.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=0.0, help="0 = greedy (outputs checked identical)")
    p.add_argument("--repeats", type=POSITIVE_INT, default=3,
                   help="timings per drafter x shape; the median speedup is reported with its min-max spread")
    p.add_argument("--adaptive", action="store_true",
                   help="speculative engines fall back to plain steps where those are measured faster (CUDA-graph "
                        "steps on CUDA, eager steps on the CPU; the table adds the share of plain steps), and eager "
                        "steps size each tree from the drafter's confidence and the measured costs (the table adds "
                        "the mean nodes verified and depth drafted)")
    p.add_argument("--sample-drafts", action="store_true",
                   help="with --temperature > 0: stochastic trees (drafts sampled from the drafter's q, accepted with "
                        "min(1, p/q); TreeConfig.sample_drafts) instead of the top-k of q")
    p.add_argument("--out", type=path_arg, default="runs/eval", help="folder for <tag>.json and <tag>.png")
    p.add_argument("--tag", type=file_stem_arg, default="eval",
                   help="file name stem: writes <out>/<tag>.json and <out>/<tag>.png")


def _device_name(args) -> str:
    import platform

    import torch

    if args.device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(args.device))
    n = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {n} thread{'s' if n > 1 else ''})"


def _speedup_text(row: dict) -> str:
    if row["speedup"] is None:
        return "MISMATCH"
    if row.get("speedup_min") is None or row.get("repeats", 1) == 1:
        return f"{row['speedup']:.2f}x"
    return f"{row['speedup']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f})"


def _print_eval_table(res: dict) -> None:
    base = res["baseline"]
    print(f"\n{res['title']} | plain decoding {base['tokens_per_s']:.1f} tokens/s | speedup: median of "
          f"{res['repeats']} (min-max)")
    adaptive = any("plain_step_share" in r for r in res["rows"])
    sized = any("tree_sizing" in r for r in res["rows"])
    print(f"{'drafter':7s} | {'shape':9s} | tokens/fwd | accept rate | tokens/s | speedup"
          + (" | plain steps" if adaptive else "") + (" | nodes / depth" if sized else ""))
    for r in res["rows"]:
        tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] is not None else "-"
        ts = r.get("tree_sizing")
        print(f"{r['drafter']:7s} | {r['shape']:9s} | {r['tokens_per_forward']:10.2f} | {r['acceptance_rate']:11.2f} | "
              f"{tps:>8s} | {_speedup_text(r)}" + (f" | {100 * r['plain_step_share']:.0f}%" if adaptive else "")
              + ((f" | {ts['mean_nodes']:.1f} / {ts['mean_depth']:.1f}" if ts else " | -") if sized else ""))


def _eval_paths(args) -> tuple[Path, Path]:
    """(<out>/<tag>.json, <out>/<tag>.png); the folder is made before the long run, so a bad --out fails at once."""
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot make the folder {out}: {e.strerror or e}") from None
    return out / f"{args.tag}.json", out / f"{args.tag}.png"


def _eval_intro(args, prompts, shapes) -> str:
    lengths = sorted({p.numel() for p in prompts})
    span = f"{lengths[0]}" if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
    fewer = f" (of {args.num_prompts} asked for)" if len(prompts) < args.num_prompts else ""
    return (f"[eval] {len(prompts)} held-out prompt(s){fewer} of {span} tokens, {args.max_new_tokens} new tokens each; "
            f"{len(args.drafters)} drafter(s) x {len(shapes)} tree shape(s), {args.repeats} timing(s) each, plain "
            f"decoding alternating")


def cmd_eval(args) -> int:
    import torch

    from gdnspec.evaluate import SHAPES, evaluate, heldout_prompts, plot

    json_path, png_path = _eval_paths(args)
    bundle = _load_bundle(args)
    _apply_threads(args, bundle.model)
    if args.drafters is None:  # every drafter this model has
        args.drafters = [name for name in ("ngram", "model", "eagle", "mtp") if name in bundle.drafters]
    for name in args.drafters:
        _drafter(bundle, name, "--drafters")
    if bundle.tokenizer is None:
        raise UsageError(f"--model: {bundle.path} has no tokenizer.json: eval needs one to encode its prompts")
    shapes = SHAPES if args.shapes is None else {k: SHAPES[k] for k in args.shapes}
    if args.sample_drafts:
        import dataclasses

        if args.temperature <= 0:
            raise UsageError("--sample-drafts: stochastic trees need --temperature > 0 (greedy drafts are the top-k)")
        plain = [n for n in args.drafters if not getattr(bundle.drafters[n], "supports_draft_sampling", False)]
        if plain:
            raise UsageError(f"--sample-drafts: the drafter(s) {', '.join(plain)} draft deterministically; use "
                             f"--drafters with {', '.join(n for n in bundle.drafters if n not in plain) or 'model or eagle'}")
        shapes = {k: dataclasses.replace(v, sample_drafts=True) for k, v in shapes.items()}
    prompts = heldout_prompts(bundle.tokenizer, num_prompts=args.num_prompts, prompt_tokens=args.prompt_tokens)
    print(_eval_intro(args, prompts, shapes), flush=True)
    try:
        res = evaluate(bundle, prompts, drafters=args.drafters, shapes=shapes, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, repeats=args.repeats, adaptive=args.adaptive)
    except FloatingPointError as e:
        raise _non_finite_error(args, e) from None
    dev = _device_name(args)
    res.update(device=dev, torch=torch.__version__, model=str(bundle.path), dtype=str(bundle.model.dtype),
               threads=torch.get_num_threads(), sample_drafts=args.sample_drafts,
               title=f"gdnspec eval on {dev}, T={args.temperature}" + (", sampled drafts" if args.sample_drafts else ""))
    json_path.write_text(json.dumps(res, indent=2, default=str))
    plotted = plot(res, str(png_path))
    _print_eval_table(res)
    print(f"wrote {json_path}" + (f" and {png_path}" if plotted else ""))
    if not plotted:
        print(f"plot skipped: matplotlib is not installed (pip install matplotlib, or the plot extra: pip install "
              f"'.[plot]' in the gdnspec source folder; then run again for {png_path})")
    return 0 if all(r["speedup"] is not None for r in res["rows"]) else 1


# ---------------------------------------------------------------------------------------------- serve
def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server: continuous batching, speculative decoding")
    _add_model_options(p)
    _add_drafter_option(p)
    _add_tree_options(p)
    h = p.add_argument_group("server")
    h.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 = every interface: anyone who reaches this machine can use it; "
                        "set --api-key)")
    h.add_argument("--port", type=int_in(0, 65535, "a port from 0 to 65535 (0 = any free port)"), default=8000,
                   help="TCP port (0 = any free port; the startup line says which)")
    h.add_argument("--max-batch-size", type=POSITIVE_INT, default=32,
                   help="sequences decoded together; further requests wait for a slot")
    h.add_argument("--max-queue-size", type=NON_NEGATIVE_INT, default=256,
                   help="requests that may wait for a slot; more are answered 429")
    h.add_argument("--max-model-len", type=int_at_least(2), default=None,
                   help="context length: prompt + completion tokens of a request (default: the model's "
                        "max_position_embeddings, else 4096)")
    h.add_argument("--api-key", default=os.environ.get("GDNSPEC_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ routes (default: $GDNSPEC_API_KEY; none = open)")
    h.add_argument("--served-model-name", default=None,
                   help="the model name of /v1/models and requests (default: gdnspec-default for the embedded model, "
                        "else the model folder's name)")
    h.add_argument("--shutdown-timeout", type=NON_NEGATIVE_FLOAT, default=30.0,
                   help="seconds in-flight requests may take to finish after SIGTERM / Ctrl-C; the rest are aborted")
    a = p.add_argument_group("speculation at large batches")
    a.add_argument("--speculative-disable-by-batch-size", type=int_at_least(2), default=None, metavar="N",
                   help="plain decoding steps whenever N or more sequences run")
    a.add_argument("--no-speculative-adaptive", dest="adaptive", action="store_false",
                   help="always speculate (below --speculative-disable-by-batch-size); by default each step is "
                        "speculative or plain, whichever has been faster per token at the current batch size (greedy "
                        "output is the same; seeded sampled output is reproducible only with this flag)")


def _bind(host: str, port: int):
    """A listening socket on host:port, before the model loads (a port in use is reported at once)."""
    import errno
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"--host: cannot resolve {host!r}: {getattr(e, 'strerror', None) or e}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        flag = "--port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else "--host"
        raise UsageError(f"{flag}: cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(512)
    sock.set_inheritable(True)
    return sock


def cmd_serve(args) -> int:
    from gdnspec import serve

    missing = serve.missing_dependencies()
    if missing:
        raise UsageError(f"the server needs {', '.join(missing)}, which are not installed: pip install "
                         f"{' '.join(missing)} (or the serve extra: pip install 'gdnspec[serve]')")
    if not args.host.strip():
        raise UsageError("--host: expected an address such as 127.0.0.1, got ''")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key: empty (leave it out for a server without a key)")
    config = _tree_config(args)
    sock = _bind(args.host, args.port)
    try:
        bundle = _load_bundle(args)
        _check_tree_fits(args, bundle.model)
        threads = _apply_threads(args, bundle.model)
        drafter = _drafter(bundle, args.drafter)
        if bundle.tokenizer is None:
            raise UsageError(f"--model: {bundle.path} has no tokenizer.json: the server needs one")
        known = serve.model_max_len(bundle.path)
        if args.max_model_len is not None and known is not None and args.max_model_len > known:
            raise UsageError(f"--max-model-len: {args.max_model_len} is more than the model's max_position_embeddings "
                             f"({known})")
        max_len = args.max_model_len or known or 4096
        name = args.served_model_name or ("gdnspec-default" if args.model is None else Path(args.model).resolve().name)
        policy = {"disable_by_batch_size": args.speculative_disable_by_batch_size, "adaptive": args.adaptive}
        loop, app, state = serve.build(bundle, drafter, config, model_name=name, max_model_len=max_len,
                                       max_batch_size=args.max_batch_size, max_queue_size=args.max_queue_size,
                                       api_key=args.api_key, policy_args=policy, sampling=bundle.sampling_args())
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"gdnspec serve: listening on http://{shown}:{port} | model {name} ({args.device}, {threads} thread"
          f"{'s' if threads > 1 else ''}) | drafter {args.drafter}: {loop.policy.describe()} | max batch "
          f"{args.max_batch_size}, queue {args.max_queue_size}, context {max_len} | chat template: "
          f"{state.chat_template.origin} | {'API key required' if args.api_key else 'no API key'}",
          file=sys.stderr, flush=True)
    serve.serve_forever(app, loop, sock, shutdown_timeout=args.shutdown_timeout)
    print("gdnspec serve: stopped", file=sys.stderr, flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- entry point
SUBCOMMANDS = [
    ("data", add_data_parser, cmd_data),
    ("train", add_train_parser, cmd_train),
    ("distill", add_distill_parser, cmd_distill),
    ("generate", add_generate_parser, cmd_generate),
    ("eval", add_eval_parser, cmd_eval),
    ("serve", add_serve_parser, cmd_serve),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gdnspec", description="Tree speculative decoding for Gated DeltaNet LMs")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for _, add, _ in SUBCOMMANDS:
        add(subparsers)
    return parser


def _interrupted(message: str) -> int:
    """Print why the command ended after Ctrl-C (a second Ctrl-C meanwhile is ignored) and return exit code 130."""
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        print(f"\n{message}", file=sys.stderr)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    return 130


def parse_args(argv=None) -> argparse.Namespace:
    """build_parser().parse_args, except that arguments no parser knows are reported by the subcommand's parser
    (`gdnspec generate: error: unrecognized arguments: --tempreature (did you mean --temperature?)`)."""
    import difflib

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        flags = [o for a in sub._actions for o in a.option_strings]
        hints = [f"{x} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(x.split("=")[0], flags, 1)) else x
                 for x in extra]
        sub.error(f"unrecognized arguments: {' '.join(hints)}")
    return args


def _check_env_switches() -> None:
    """A bad GDNSPEC_* switch value as one usage line before any work (gdnspec.ops.check_env_switches), not as a
    traceback from the first step that reads it."""
    from gdnspec.ops import check_env_switches

    try:
        check_env_switches()
    except ValueError as e:
        raise UsageError(str(e)) from None


def main(argv=None) -> int:
    """Parse argv and run the subcommand. User mistakes end with one `gdnspec <command>: error: ...` line and exit
    code 2 (argparse's own errors do the same); Ctrl-C ends with exit code 130 and no traceback."""
    try:
        args = parse_args(argv)
    except KeyboardInterrupt:  # argument checks import torch, which takes a moment
        return _interrupted("gdnspec: interrupted while starting: nothing ran")
    handler = {name: cmd for name, _, cmd in SUBCOMMANDS}[args.command]
    try:
        if getattr(args, "enable_torch_compile", False):
            os.environ["GDNSPEC_CPU_COMPILE"] = "1"
        _check_env_switches()
        return handler(args) or 0
    except UsageError as e:
        print(f"gdnspec {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt as e:
        return _interrupted(f"gdnspec {args.command}: interrupted" + (f" {e}" if str(e) else ""))
    except BrokenPipeError:  # the reader of stdout went away (`gdnspec generate ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
