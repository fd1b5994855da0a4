"""`gdnspec.load()`: a target model with its tokenizer and ready-made drafters.

    bundle = gdnspec.load()                      # the embedded default (gdnspec/assets/default, trained on Python code)
    bundle = gdnspec.load("path/to/folder")      # a gdnspec checkpoint folder, or a Hugging Face / fla folder
    worker = GDNSpeculativeWorker(target_model=bundle.model, drafter=bundle.drafters["eagle"])

A gdnspec folder is a target checkpoint (config.json with model_type "gdnspec", model.safetensors, tokenizer.json)
with optional sibling/child drafter folders "draft" and "eagle" (the layout of the embedded default: target/,
draft/, eagle/ side by side). Hugging Face folders (qwen3_next, qwen3_5*, fla gated_deltanet) load through
gdnspec.models.hf and get an "mtp" drafter when the checkpoint has MTP weights. Every bundle has "ngram".

A folder's generation_config.json (Hugging Face format) gives `bundle.eos_token_id` (an id or a list of stop ids)
and the sampling defaults of `bundle.sampling_args()`:

    out = generate_autoregressive(bundle.model, ids, 64, eos_token_id=bundle.eos_token_id, **bundle.sampling_args())
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gdnspec.generate import stop_ids
from gdnspec.sampling import check_sampling_args
from gdnspec.spec.drafters import EagleDrafter, ModelDrafter, NGramDrafter


@dataclass
class Bundle:
    """A loaded model: `model`, `tokenizer` (tokenizers.Tokenizer or None), `drafters` by name, `path` (the target
    folder), `generation_config` (the folder's generation_config.json as a dict, {} without one) and `skipped`
    (drafter name -> why a sibling drafter folder was left out: it belongs to another target of the layout)."""

    model: torch.nn.Module
    tokenizer: object | None
    drafters: dict = field(default_factory=dict)
    path: Path | None = None
    generation_config: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    @property
    def eos_token_id(self) -> int | list[int] | None:
        """Stop id(s) for generation: generation_config.json's eos_token_id (an int or a list; every entry point
        accepts both), else config.json's, else the tokenizer's <|endoftext|>, </s> or <|im_end|> (first found)."""
        ids = self._checkpoint_eos()
        if ids is not None:
            return ids
        if self.tokenizer is None:
            return None
        for name in ("<|endoftext|>", "</s>", "<|im_end|>"):
            tid = self.tokenizer.token_to_id(name)
            if tid is not None:
                return tid
        return None

    def _checkpoint_eos(self) -> int | list[int] | None:
        eos = self.generation_config.get("eos_token_id")
        if eos is None and self.path is not None:
            from gdnspec.models.hf import hf_generation_info

            eos = hf_generation_info(self.path).get("eos_token_id")
        if eos is None or eos == []:
            return None
        ids = stop_ids(eos, name=f"eos_token_id of {self.path}")
        return list(ids) if isinstance(eos, list) else ids[0]

    def sampling_args(self, *, temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None) -> dict:
        """{temperature, top_k, top_p} for the entry points: each one the caller gives, else generation_config.json's.

        As transformers: without `do_sample: true` the default is greedy (temperature 0); with it, fields the file
        leaves out take transformers' defaults (temperature 1.0, top_k 50, top_p 1.0 = off)."""
        defaults = sampling_defaults(self.generation_config)
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        out = {k: defaults[k] if v is None else v for k, v in given.items()}
        check_sampling_args(out["temperature"], out["top_k"], out["top_p"])
        return out


def sampling_defaults(gc: dict) -> dict:
    """{temperature, top_k, top_p} that a generation_config dict asks for (see Bundle.sampling_args); top_k 0 and
    top_p 1.0 mean off (None). Values the entry points cannot take raise ValueError naming the field."""
    if not isinstance(gc.get("do_sample", False), (bool, type(None))):
        raise ValueError(f"do_sample must be true or false, got {gc['do_sample']!r}")
    if gc.get("do_sample") is not True:
        return {"temperature": 0.0, "top_k": None, "top_p": None}
    fields = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
    out = {k: default if gc.get(k) is None else gc[k] for k, default in fields.items()}
    if out["top_k"] == 0 and not isinstance(out["top_k"], bool):
        out["top_k"] = None
    if isinstance(out["top_p"], (int, float)) and not isinstance(out["top_p"], bool) and out["top_p"] == 1.0:
        out["top_p"] = None
    if isinstance(out["temperature"], int) and not isinstance(out["temperature"], bool):
        out["temperature"] = float(out["temperature"])
    check_sampling_args(out["temperature"], out["top_k"], out["top_p"])
    return out


def read_generation_config(folder: Path) -> dict:
    """folder/generation_config.json as a dict ({} when absent); a malformed file raises naming its path."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    if data.get("eos_token_id") is not None:
        stop_ids(data["eos_token_id"], name=f"eos_token_id in {path}")
    try:
        sampling_defaults(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e} (sampling fields; top_k 0 and top_p 1.0 mean off)") from None
    return data


def _gdnspec_folders(path: Path) -> tuple[Path, Path | None, Path | None]:
    """(target, draft or None, eagle or None) for a gdnspec checkpoint layout."""
    target = path / "target" if (path / "target" / "config.json").exists() else path
    found = {}
    for name in ("draft", "eagle"):
        for cand in (target.parent / name, target / name):
            if (cand / "config.json").exists() and cand != target:
                found[name] = cand
                break
    return target, found.get("draft"), found.get("eagle")


def _model_type(folder: Path) -> str:
    """config.json's model_type; errors name the file (missing, malformed, or without a model_type)."""
    from gdnspec.models.checkpoint import read_config_json
    from gdnspec.models.hf import CheckpointError

    cfg = folder / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a model folder")
    mt = read_config_json(cfg).get("model_type")
    if not isinstance(mt, str) or not mt:
        raise CheckpointError(f"{cfg} has no model_type (expected 'gdnspec' or a Hugging Face model type such as "
                              f"'qwen3_next'), got {mt!r}")
    return mt


_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64,
                "double": torch.float64}


def parse_dtype(dtype) -> torch.dtype | None:
    """None, a floating torch dtype, or its name ("float16", "torch.bfloat16", "bf16", ...) -> torch.dtype or None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    elif isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ValueError(f"dtype must be None or a floating-point dtype (torch.float32, torch.float16, torch.bfloat16, "
                     f"torch.float64, or its name such as 'float16'), got {dtype!r}")


def parse_device(device) -> torch.device | None:
    """None or a device spec ('cpu', 'cuda', 'cuda:1', torch.device) that exists on this machine -> torch.device."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be None or a torch device such as 'cpu', 'cuda' or 'cuda:0', "
                         f"got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (use 'cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _load_drafter_model(folder: Path, role: str, dtype, device):
    """load_checkpoint for a drafter folder; its errors say which drafter (and folder) failed."""
    from gdnspec.models.checkpoint import load_checkpoint
    from gdnspec.models.hf import CheckpointError

    try:
        return load_checkpoint(folder, dtype=dtype, device=device)[0]
    except (CheckpointError, ValueError, TypeError, OSError) as e:
        raise CheckpointError(f"the {role} checkpoint in {folder} could not be loaded: {e}") from e


def _misfit(name: str, drafter_model, target) -> str | None:
    """Why a drafter model cannot draft for `target` (None when it can): vocabulary, and an EAGLE head's hidden size."""
    if drafter_model.config.vocab_size != target.config.vocab_size:
        return (f"its vocabulary ({drafter_model.config.vocab_size}) differs from the target's "
                f"({target.config.vocab_size})")
    if name == "eagle" and drafter_model.config.hidden_size != target.config.hidden_size:
        return (f"its hidden size ({drafter_model.config.hidden_size}) differs from the target's "
                f"({target.config.hidden_size})")
    return None


def _gdnspec_drafters(model, target_dir: Path, folders: dict, dtype, device) -> tuple[dict, dict]:
    """(drafters, skipped) for a gdnspec target: "ngram", plus "model" / "eagle" from their folders. A drafter that does
    not fit the target is skipped (with the reason) when its folder is a sibling of the target's (it belongs to another
    model of the layout, e.g. the draft model loaded as the target), and an error naming the folder when it is the
    target's own child folder."""
    from gdnspec.models.hf import CheckpointError

    drafters, skipped = {"ngram": NGramDrafter()}, {}
    roles = {"model": "draft model", "eagle": "EAGLE head"}
    for name, folder in folders.items():
        if folder is None:
            continue
        drafter_model = _load_drafter_model(folder, roles[name], dtype, device)
        why = _misfit(name, drafter_model, model)
        if why is not None and folder.parent != target_dir:
            skipped[name] = f"the {roles[name]} in {folder} does not fit this model: {why}"
        elif why is not None:
            raise CheckpointError(f"the {roles[name]} in {folder} does not fit the target in {target_dir}: {why}")
        else:
            drafters[name] = ModelDrafter(drafter_model) if name == "model" else EagleDrafter(drafter_model, model)
    return drafters, skipped


def load(path: str | Path | None = None, *, dtype: torch.dtype | str | None = None, device=None) -> Bundle:
    """Load a bundle (see the module docstring). dtype None: float32 for gdnspec folders, the checkpoint's own for HF
    (a torch dtype or its name, e.g. "bfloat16"). device: "cpu", "cuda", "cuda:1", ... (default CPU)."""
    from gdnspec.models.checkpoint import DEFAULT_DIR, load_checkpoint

    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path (str or pathlib.Path), or None for the embedded default model; "
                        f"got {type(path).__name__}")
    dtype, device = parse_dtype(dtype), parse_device(device)
    folder = Path(path) if path is not None else DEFAULT_DIR
    if not folder.exists():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file: path must be a model folder (with config.json)")
    target_dir, draft_dir, eagle_dir = _gdnspec_folders(folder)
    mt = _model_type(target_dir)
    if mt == "gdnspec":
        model, tok = load_checkpoint(target_dir, dtype=dtype, device=device)
        folders = {"model": draft_dir, "eagle": eagle_dir}
        drafters, skipped = _gdnspec_drafters(model, target_dir, folders, dtype, device)
        return Bundle(model, tok, drafters, target_dir, read_generation_config(target_dir), skipped)
    if mt == "gdnspec_eagle":
        from gdnspec.models.hf import CheckpointError

        raise CheckpointError(f"{target_dir} holds an EAGLE head (a drafter), not a language model: load the folder of "
                              f"its target (the layout's target/ folder, or the one holding this eagle/ folder)")
    from gdnspec.models.hf import load_hf

    model, tok, mtp = load_hf(target_dir, dtype=dtype, device=device)
    drafters = {"ngram": NGramDrafter()}
    if mtp is not None:
        from gdnspec.spec.drafters.mtp import MTPDrafter

        drafters["mtp"] = MTPDrafter(model, mtp)
    return Bundle(model, tok, drafters, target_dir, read_generation_config(target_dir))
